"""``mmcore export``: a finished run -> a self-contained bundle, refused unless it passes parity.

Order matters: the run scores the parity rows first (its own pipeline, untouched, without the
float16 feature cache: the model itself), then the bundle is written into a hidden temporary
folder, scored through onnxruntime and compared; only a bundle that passes is renamed to
``--out`` (see :mod:`mmcore.export.bundle`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import attrs

from mmcore.errors import DataError, MmcoreError
from mmcore.export import bundle as B
from mmcore.export import onnx as G
from mmcore.export import parity as P
from mmcore.export.text import write_text_side
from mmcore.rundir import RunDir

DEFAULT_ROWS = 64


@attrs.frozen
class ExportSummary:
    """Where the bundle went and what the gate measured."""

    out: Path
    format: str
    parity: dict


def parity_rows(pipeline, data, rows, base_dir=None):
    """The rows the gate scores: ``--data`` or the run's validation split, first ``rows`` of them."""
    from mmcore.data.csvs import read_split, resolve_csv

    recipe = pipeline.recipe
    needs_text = recipe.train.modality != "vision_only"
    try:
        if data:
            split = read_split(data, base_dir, require_label=False, require_text=needs_text,
                               max_image_bytes=recipe.data.max_image_bytes)
        else:
            split = read_split(resolve_csv(recipe.data.val, recipe.data.base_dir), recipe.data.base_dir,
                               require_label=False, require_text=needs_text, max_image_bytes=recipe.data.max_image_bytes)
    except DataError as exc:
        hint = "" if data else " (the run's validation split; choose rows with --data CSV)"
        raise DataError([f"{line}{hint}" for line in exc.problems]) from None
    return split.subset(range(min(rows, len(split))))


def _example_inputs(fused, scorer, split):
    """Two real rows as graph inputs (two, so that no axis is traced at size 1)."""
    import torch

    picks = [i % len(split) for i in range(2)]
    tensors = {}
    if scorer.uses_vision:
        items = [scorer.preprocess(scorer.load_image(split.paths[i])) for i in picks]
        tensors.update(scorer.preprocessing.collate(items))
    if scorer.uses_text:
        # different lengths: the token axis must not be traced as a constant
        texts = [split.texts[picks[0]] or "x", (split.texts[picks[1]] or "") + " and more words"]
        tensors.update({k: torch.from_numpy(v) for k, v in scorer.text_feeds(texts).items()})
    return tuple(tensors[name] for name in fused.input_names)


def export_run(run_dir, out, *, fmt="onnx", data=None, rows=DEFAULT_ROWS, base_dir=None, score_tol=None,
               min_agreement=1.0, registry=None, progress=True, echo=print):
    """Export the finished run in ``run_dir`` to the bundle folder ``out`` (see the module docstring)."""
    from mmcore.commands.evaluate import load_run, score_with_run

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in G.FORMATS:
        raise MmcoreError(f"--format {fmt}: expected one of {', '.join(G.FORMATS)}")
    if out.exists():
        raise MmcoreError(f"--out {out}: already exists; remove it or choose another folder")
    # the model itself, in float32 from the raw rows: the feature cache stores float16, whose rounding
    # (up to 1/2048 of each feature) no graph should be blamed or excused for
    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress, use_cache=False)
    recipe, model = pipeline.recipe, pipeline.model
    if score_tol is None:
        score_tol = P.FP32_SCORE_TOL if pipeline.dtype is None else P.BF16_SCORE_TOL
    # a text encoder that cannot leave its string work on the host is refused before any scoring
    plan = G.plan_text(model.text) if model.uses_text else None

    # 1. the PyTorch run's own scores of the parity rows (before anything is touched)
    split = parity_rows(pipeline, data, rows, base_dir)
    if not len(split):
        raise DataError(f"{split.csv}: no rows to check parity on")
    kept, indices, torch_logits, _, _ = score_with_run(pipeline, split, "parity", progress=progress)
    kept = kept.subset([int(i) for i in indices])

    # 2. everything of the bundle, in a hidden folder beside --out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model = model.to("cpu").eval()
        if plan is not None:
            _write_json(tmp / B.TEXT, write_text_side(tmp, plan))
        vision_names = []
        if model.uses_vision:
            preprocessing = model.vision.preprocessing
            _write_json(tmp / B.PREPROCESSING, B.describe_preprocessing(preprocessing))
            vision_names = list(preprocessing.collate([preprocessing(_blank_image())]))
        B.write_weights(model, tmp / B.WEIGHTS)
        shutil.copyfile(RunDir(run_dir).recipe_file, tmp / B.RECIPE)
        decision = ckpt.get("decision") or {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}
        _write_json(tmp / B.DECISION, decision)

        fused = G.FusedModel(model, vision_names, plan)
        graph_file = G.GRAPH_FILES[fmt]
        info = {
            "bundle_format": B.TOKENIZER_ONLY_FORMAT if plan is None or plan.single_tokenizer else B.BUNDLE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": str(run_dir.resolve()),
            "experiment": recipe.experiment,
            "modality": recipe.train.modality,
            "selected_epoch": ckpt.get("epoch"),
            "graph": {"format": fmt, "file": graph_file, "inputs": fused.input_names,
                      "vision_inputs": vision_names, "text_inputs": list(fused.text_names), "output": "logit",
                      "opset": G.OPSET if fmt == "onnx" else None},
        }
        B.write_manifest(tmp, info)  # provisional: the scorer below reads the graph description
        from mmcore.export.scoring import BundleScorer

        # the host side (tokenizers, featurizers) and preprocessing of the bundle itself make the example inputs
        probe = BundleScorer(tmp, verify=False, load_graph=False)
        example = _example_inputs(fused, probe, kept)
        try:
            write_graph(fused, example, tmp / graph_file, fmt)
        except Exception as exc:  # the exporters raise many kinds; each becomes the one line
            raise G.ExportUnsupported(_graph_failure(model, fmt, exc)) from None

        # 3. the gate
        scorer = BundleScorer(tmp, device="cpu", verify=False)
        report = P.compare(scorer, kept, torch_logits, score_tol=score_tol, min_agreement=min_agreement)
        figures = {**report.as_dict(), "format": fmt, "providers": scorer.runner.providers,
                   "torch_precision": "fp32" if pipeline.dtype is None else str(pipeline.dtype).replace("torch.", "")}
        if not report.passed:
            raise P.ParityError(report.failure_line(out))
        _write_json(tmp / B.PARITY, figures)
        B.write_manifest(tmp, info)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(
        f"parity on {report.rows} rows of {report.csv}: max |Δ logit| {report.max_abs_logit:.2e}, "
        f"max |Δ calibrated score| {report.max_abs_calibrated:.2e}, decision agreement {report.agreement:.4f}"
    )
    echo(f"wrote {out} ({fmt})")
    return ExportSummary(out=out, format=fmt, parity=figures)


def write_graph(fused, example, path, fmt):
    """Trace the fused model into ``path`` (a seam: tests replace it to perturb the exported weights)."""
    G.write_graph(fused, example, path, fmt)


def _graph_failure(model, fmt, exc):
    """One line: which component could not be traced into ``fmt``, and the exporter's reason."""
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    parts = []
    if model.uses_vision:
        parts.append(f"vision encoder {model.vision.name!r}")
    if model.uses_text:
        parts.append(f"text encoder {model.text.name!r}")
    other = "torchscript" if fmt == "onnx" else "onnx"
    return f"{' + '.join(parts)}: cannot be exported as {fmt} ({type(exc).__name__}: {reason}); try --format {other}"


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (127, 127, 127))


def _write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")

