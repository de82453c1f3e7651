"""``mmcore export``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.cli.quantize import int8_choice, int8_options
from mmcore.commands.export import FORMATS, export_run
from mmcore.progress import progress_for


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder to write (must not exist; written only when parity passes).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="onnx", show_default=True,
              help="The fused model's graph: ONNX (onnxruntime), or TorchScript where ONNX cannot express the model.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of rows for the parity gate [default: the run's validation split].")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that --data's relative image paths start from [default: the CSV's folder].")
@click.option("--rows", type=click.IntRange(min=1), default=64, show_default=True, help="Rows the parity gate scores.")
@click.option("--score-tol", type=click.FloatRange(min=0), default=None,
              help="Largest |Δ score| allowed (raw and calibrated) [default: 1e-4; both sides compute in float32].")
@click.option("--agreement", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Smallest share of rows whose decision at the tuned threshold must agree.")
@click.option("--safetensors", is_flag=True,
              help="Also write model.safetensors, the classifier's state dict (a second copy of the weights the graph holds).")
@int8_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export_command(run_dir, out, fmt, data, base_dir, rows, score_tol, agreement, safetensors, quiet, **int8):
    """Export the finished run in RUN_DIR to a self-contained bundle, checked against the run.

    \b
    mmcore export runs/demo/20261128-101500 --out bundles/demo
    mmcore predict bundles/demo new.csv -o scored.csv
    mmcore serve bundles/demo --port 8000
    mmcore export runs/demo/20261128-101500 --out bundles/demo-int8 --quantize int8 --rows 512
    """
    export_run(run_dir, out, fmt=fmt, data=data, rows=rows, base_dir=base_dir, score_tol=score_tol,
               min_agreement=agreement, safetensors=safetensors, quantize=int8_choice(**int8),
               progress=progress_for(quiet), echo=click.echo)
