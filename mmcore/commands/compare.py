"""``mmcore compare RUN_DIR...``: one table of several runs' test metrics and the recipe keys that differ
(:mod:`mmcore.evaluation.comparison`); a folder of runs (a sweep, an experiment) stands for every run in it.
"""

from __future__ import annotations

from mmcore.evaluation.comparison import compare_runs, expand_run_dirs, sweep_keys, to_csv, to_markdown, write_comparison
from mmcore.io import check_output_path


def compare(run_dirs, *, out=None, fmt="md", echo=print, note=print):
    """Print the comparison of ``run_dirs`` as Markdown (``fmt="md"``) or CSV through ``echo``; with
    ``out``, also write ``comparison.md`` and ``comparison.csv`` there (said through ``note``)."""
    check_output_path(out, "comparison folder", folder=True)  # before the runs are read
    comparison = compare_runs(expand_run_dirs(run_dirs), keys=sweep_keys(run_dirs))
    echo(to_markdown(comparison) if fmt == "md" else to_csv(comparison))
    if out is not None:
        md, table = write_comparison(comparison, out)
        note(f"wrote {md} and {table}")
    return comparison
