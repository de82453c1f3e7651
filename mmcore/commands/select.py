"""``mmcore select RUN pool.csv --budget N``: which unlabelled ads to label next.

The pool's rows are scored by the run through the scoring path (calibrated scores, texts by the
text rule) and embedded (each modality's pooled feature, L2-normalised, concatenated, so image
and text weigh the same whatever their dimensions); the run's train + val rows are embedded the
same way as the labelled set. :func:`mmcore.quality.selection.select_rows` picks (uncertainty,
diversity or both). Never returned: a pool row whose image path or content is in an
``--exclude`` CSV (an earlier round's ``selected.csv``), or whose content is a labelled row's;
excluded rows count as labelled for diversity, so a second round spreads away from the first.

``selected.csv``, in labelling order: ``order, pool_row, local_image_path, text_info, score,
margin, distance, reason`` (``pool_row`` counts from 1, the header excluded; ``local_image_path``
as the pool CSV writes it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import attrs
import numpy as np

from mmcore.commands.drift import score_and_embed
from mmcore.data.csvs import read_table
from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.data.memo import ImageHashes
from mmcore.errors import DataError, MmcoreError
from mmcore.io import check_output_path, write_text

SELECTED_COLUMNS = ("order", "pool_row", "local_image_path", "text_info", "score", "margin", "distance", "reason")
DEFAULT_OUT = "selected.csv"


@attrs.frozen(eq=False)
class Selection:
    """What :func:`select` wrote: the CSV, the pool rows chosen (CSV rows, from 1, in order) and how many were excluded."""

    out: Path
    pool_rows: tuple[int, ...]
    excluded: int
    scored: int


def joint_embeddings(embeddings):
    """Each modality's rows L2-normalised, concatenated in name order (float32 [N, sum of dims])."""
    parts = []
    for name in sorted(embeddings):
        values = np.asarray(embeddings[name], dtype=np.float32)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        parts.append(values / np.maximum(norms, 1e-12))
    return np.concatenate(parts, axis=1)


def _excluded_keys(exclude_csvs, pool_base, hashes):
    """``(image paths as written, content keys)`` of the rows of every ``--exclude`` CSV."""
    written, keys = set(), set()
    for path in exclude_csvs:
        path = Path(path)
        frame = read_table(path, required=["local_image_path"])
        for raw in frame["local_image_path"].tolist():
            raw = str(raw).strip()
            written.add(raw)
            for folder in (path.parent, pool_base):  # an earlier selected.csv names the pool's own paths
                candidate = Path(raw) if Path(raw).is_absolute() else Path(folder) / raw
                if candidate.is_file():
                    keys.update(k for k in hashes([str(candidate)]) if k is not None)
                    break
    return written, keys


def _selected_csv(picks, split, positions, calibrated):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SELECTED_COLUMNS)
    for order, pick in enumerate(picks, start=1):
        i = int(positions[pick.position])
        writer.writerow([order, split.rows[i], split.raw_paths[i], split.texts[i], f"{calibrated[pick.position]:.6f}",
                         "" if pick.margin is None else f"{pick.margin:.6f}",
                         "" if pick.distance is None else f"{pick.distance:.6f}", pick.reason])
    return buffer.getvalue()


def select(run, pool_csv, *, budget, strategy="both", exclude=(), seed=0, out=DEFAULT_OUT, base_dir=None,
           device="auto", registry=None, progress=True, echo=print):
    """Choose up to ``budget`` rows of ``pool_csv`` to label next with the run ``run``; write ``out`` -> :class:`Selection`."""
    from mmcore.commands.kfold import labelled_rows
    from mmcore.devices import parse_device
    from mmcore.engine.restore import open_run
    from mmcore.export.bundle import is_bundle
    from mmcore.quality.selection import STRATEGIES, select_rows
    from mmcore.scoring.run import RunScorer
    from mmcore.scoring.tables import read_input

    pool_csv, out = Path(pool_csv), Path(out)
    if budget < 1:
        raise MmcoreError(f"--budget {budget}: choose at least 1 row")
    if strategy not in STRATEGIES:
        raise MmcoreError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if is_bundle(run):
        raise MmcoreError(f"{run}: a bundle; select needs the run directory (its labelled rows and embeddings)")
    check_output_path(out, "selection CSV", option="--out")
    if out.exists() and out.resolve() == pool_csv.resolve():
        raise MmcoreError(f"--out {out}: is the pool CSV; write the selection to another file")
    for path in exclude:
        if Path(path).resolve() == pool_csv.resolve():
            raise MmcoreError(f"--exclude {path}: is the pool itself; give an earlier round's {DEFAULT_OUT}")
    run_dir = open_run(run, echo=echo)
    data = run_dir.recipe_data()
    modality = (data.get("train") or {}).get("modality", "multimodal")
    _, pool = read_input(pool_csv, base_dir, require_text=modality != "vision_only", check_images=modality != "text_only",
                         max_image_bytes=(data.get("data") or {}).get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES))
    recipe = run_dir.load_recipe(registry)
    hashes = ImageHashes.for_recipe(recipe)
    written, keys = _excluded_keys(exclude, Path(base_dir) if base_dir else pool_csv.parent, hashes)
    labelled = labelled_rows(recipe).split
    keys.update(k for k in hashes([str(p) for p in labelled.paths]) if k is not None)

    scorer = RunScorer(run_dir, device=parse_device(device), registry=registry, progress=progress)
    scored = score_and_embed(scorer, pool, registry=registry, progress=progress, desc=f"select {pool_csv.name}")
    if scored.positions.size == 0:
        raise DataError(f"{pool_csv}: no row could be scored (every image unreadable)")
    positions = scored.positions
    pool_keys = hashes([str(pool.paths[int(i)]) for i in positions])
    excluded = [k for k, i in enumerate(positions) if pool.raw_paths[int(i)] in written or pool_keys[k] in keys]
    labelled_embeddings = None
    if strategy != "uncertainty":
        known = score_and_embed(scorer, labelled, fill_text=False, registry=registry, progress=progress,
                                desc="labelled rows")
        labelled_embeddings = joint_embeddings(known.embeddings)
    picks = select_rows(scored.calibrated, float(scorer.decision["threshold"]),
                        joint_embeddings(scored.embeddings) if strategy != "uncertainty" else None, budget,
                        strategy=strategy, labelled_embeddings=labelled_embeddings, exclude=excluded, seed=seed)
    write_text(out, _selected_csv(picks, pool, positions, scored.calibrated))
    chosen = tuple(pool.rows[int(positions[p.position])] for p in picks)
    left = len(positions) - len(excluded)
    echo(f"chose {len(chosen)} of {left} pool rows left ({strategy}; {len(excluded)} excluded as labelled or chosen"
         f"{f', {len(scored.bad)} unreadable' if scored.bad else ''})")
    echo(f"wrote {out}")
    return Selection(out=out, pool_rows=chosen, excluded=len(excluded), scored=int(len(positions)))
