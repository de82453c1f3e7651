"""``mmcore export``: a finished run -> a self-contained bundle, refused unless it passes parity.

Order matters: the run scores the parity rows first (its model, untouched, through the scoring
path in float32 whatever precision it trained in, without the float16 feature cache), then
the bundle is written into a hidden temporary folder, scored through onnxruntime and compared;
only a bundle that passes gets its model card and is renamed to ``--out`` (see
:mod:`mmcore.export.bundle`). Each file is hashed once, as it joins the manifest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import attrs

from mmcore.engine.mlflow_logger import log_bundle_to_mlflow
from mmcore.errors import DataError, MmcoreError, RunError
from mmcore.export import FORMATS
from mmcore.export import bundle as B
from mmcore.export import onnx as G
from mmcore.export import parity as P
from mmcore.export import schema as S
from mmcore.export.inputs import describe_inputs
from mmcore.export.int8 import Int8Options, quantize_bundle
from mmcore.export.source import ExportSource
from mmcore.export.text import write_text_side
from mmcore.io import check_output_path, existing_parent
from mmcore.rundir import RunDir
from mmcore.scoring.rows import collect, score_rows

DEFAULT_ROWS = 64
#: ``--quantize int8``'s defaults (the CLI shows them)
INT8_DEFAULTS = Int8Options()
#: what tracing a model may raise (torch.onnx's errors and torch.jit's are RuntimeErrors); each
#: becomes one line naming the component. OSError (a full disk) and MemoryError are not among them.
EXPORTER_ERRORS = (RuntimeError, TypeError, ValueError, AssertionError, IndexError, KeyError)


@attrs.frozen
class ExportSummary:
    """Where the bundle went and what the gate measured."""

    out: Path
    format: str
    parity: dict


def parity_rows(recipe, data, rows, base_dir=None):
    """The rows the gate scores: ``--data`` (a CSV, or a DataFrame from the Python API) or the run's
    validation split, ``rows`` of them spread over it in file order, each label its share
    (:meth:`~mmcore.data.split.Split.spread`): the first rows of a split sorted by label would all be
    of one label, and the int8 gate could not measure its AUROC change on them."""
    from mmcore.data.csvs import read_split, resolve_csv

    needs_text = recipe.train.modality != "vision_only"
    if data is None:
        from mmcore.data.frames import require_split_file

        require_split_file(recipe.data.val, "val", hint="choose parity rows with --data CSV")
    try:
        if data is not None and not isinstance(data, (str, os.PathLike)):
            from mmcore.data.frames import split_from_frame

            split = split_from_frame(data, base_dir=base_dir, require_label=False, require_text=needs_text,
                                     max_image_bytes=recipe.data.max_image_bytes,
                                     max_image_pixels=recipe.data.max_image_pixels,
                                     image_formats=recipe.data.image_formats)
        elif data:
            split = read_split(data, base_dir, require_label=False, require_text=needs_text,
                               max_image_bytes=recipe.data.max_image_bytes)
        else:
            split = read_split(resolve_csv(recipe.data.val, recipe.data.base_dir), recipe.data.base_dir,
                               require_label=False, require_text=needs_text, max_image_bytes=recipe.data.max_image_bytes)
    except DataError as exc:
        hint = "" if data is not None else " (the run's validation split; choose rows with --data CSV)"
        raise DataError([f"{line}{hint}" for line in exc.problems]) from None
    return split.spread(rows)


def _example_inputs(fused, folder, registry, split, max_image_pixels):
    """Two real rows as graph inputs (two, so that no axis is traced at size 1), made by the host side
    the bundle in ``folder`` holds already (its inputs.json, read back as a scorer reads it)."""
    import torch

    from mmcore.data.images import load_rgb
    from mmcore.export.inputs import read_host_inputs

    picks = [i % len(split) for i in range(2)]
    tensors = {}
    inputs = read_host_inputs(folder, registry, bundle_format=B.BUNDLE_FORMAT, vision=bool(fused.vision_names),
                              text=bool(fused.text_names))
    if fused.vision_names:
        preprocessing = inputs.preprocessing
        images = [load_rgb(split.paths[i], target_size=preprocessing.target_size, max_pixels=max_image_pixels)
                  for i in picks]
        tensors.update(preprocessing.collate([preprocessing(image) for image in images]))
    if fused.text_names:
        # different lengths: the token axis must not be traced as a constant
        texts = [split.texts[picks[0]] or "x", (split.texts[picks[1]] or "") + " and more words"]
        tensors.update({k: torch.from_numpy(v) for k, v in inputs.text.feeds(texts).items()})
    return tuple(tensors[name] for name in fused.input_names)


def export_run(run_dir, out, *, fmt="onnx", data=None, rows=DEFAULT_ROWS, base_dir=None, score_tol=None,
               min_agreement=1.0, safetensors=False, quantize=None, registry=None, progress=True, echo=print):
    """Export the finished run (or ensemble directory) in ``run_dir`` to the bundle folder ``out``
    (see the module docstring).

    ``quantize``: an :class:`~mmcore.export.int8.Int8Options` (``--quantize int8``): the graph that passed
    parity is quantized and kept only if its quality gate passes (:mod:`mmcore.export.int8`).

    ``safetensors``: also write the classifier's state dict as ``model.safetensors`` (the graph
    holds the weights already; this is a second copy, for PyTorch users).
    """
    from mmcore.scoring.ensemble_dir import is_ensemble

    run_dir, out = Path(run_dir), Path(out)
    check_output_path(out, "bundle folder")  # before the parity gate scores anything
    if fmt not in FORMATS:
        raise MmcoreError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    check_new_folder(out, "--out")
    if fmt == "onnx":  # before the model is loaded: a missing package is one line, not a minute later
        from mmcore.kit.deps import require_extra

        require_extra("export", "mmcore export")
    if is_ensemble(run_dir):
        from mmcore.export.ensemble_graph import ensemble_source

        source = ensemble_source(run_dir, registry=registry, progress=progress)
    else:
        source = run_source(run_dir, registry=registry, progress=progress)
    return export_source(source, out, fmt=fmt, data=data, rows=rows, base_dir=base_dir, score_tol=score_tol,
                         min_agreement=min_agreement, safetensors=safetensors, quantize=quantize, progress=progress,
                         echo=echo)


def run_source(run_dir, *, registry=None, progress=True):
    """A finished run as an :class:`ExportSource`: its model in float32 from the raw rows (the feature
    cache stores float16, whose rounding no graph should be blamed or excused for; bf16 autocast neither)."""
    from mmcore.engine.restore import load_run
    from mmcore.engine.runtime import autocast_dtype
    from mmcore.scoring.run import RunScorer

    run_model, ckpt = load_run(run_dir, registry=registry, progress=progress, fp32=True)
    model = run_model.model
    trained_precision = RunDir(run_dir).recipe_data().get("train", {}).get("precision", "auto")
    run_dtype = autocast_dtype(trained_precision, run_model.device)
    decision = ckpt.get("decision") or {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}
    S.structure_file(decision, S.Decision, path=f"{RunDir(run_dir).best}: decision")
    trained = None
    if run_dtype is not None:  # information: how far the run's own precision is from the float32 the bundle computes
        trained = RunScorer.from_model(run_model, decision=decision, source=run_dir, dtype=run_dtype)
    return ExportSource(
        path=Path(run_dir), recipe=run_model.recipe, registry=run_model.registry, model=model, weights=model,
        decision=decision, scorer=RunScorer.from_model(run_model, decision=decision, source=run_dir),
        trained_scorer=trained, trained_precision=trained_precision, selected_epoch=ckpt.get("epoch"),
        make_graph=lambda vision_names, plan: G.FusedModel(model, vision_names, plan),
        graph_failure=lambda fmt, exc: _graph_failure(model, fmt, exc),
    )


def export_source(source, out, *, fmt="onnx", data=None, rows=DEFAULT_ROWS, base_dir=None, score_tol=None,
                  min_agreement=1.0, safetensors=False, quantize=None, progress=True, echo=print):
    """Score the parity rows with ``source``'s PyTorch scorer, write the bundle into a hidden folder,
    score it with onnxruntime, and rename it to ``out`` only when the gate passes."""
    run_dir, recipe, model, decision = source.path, source.recipe, source.model, source.decision
    score_tol = P.FP32_SCORE_TOL if score_tol is None else score_tol
    trained_precision = source.trained_precision
    # a text encoder that cannot leave its string work on the host is refused before any scoring, and so is a full disk
    plan = G.plan_text(model.text) if model.uses_text else None
    needed = bundle_bytes(source.weights, fmt, safetensors)
    check_free_space(out, needed)

    # 1. the PyTorch run's own scores of the parity rows (before anything is touched)
    split = parity_rows(recipe, data, rows, base_dir)
    if not len(split):
        raise DataError(f"{split.csv}: no rows to check parity on")
    scored = collect(score_rows(source.scorer, split, registry=source.registry, progress=progress, desc="parity"))
    kept = _scored_rows(split, scored)  # the rows as scored: readable images, texts settled (OCR)
    torch_logits = scored.logits
    trained_logits = None
    if source.trained_scorer is not None:
        trained_logits = collect(score_rows(source.trained_scorer, kept, fill_text=False, progress=progress,
                                            desc="parity")).logits

    # 2. everything of the bundle, in a hidden folder beside --out
    source.weights.to("cpu").eval()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        registry = source.registry
        text_side = write_text_side(tmp, plan, registry) if plan is not None else None
        vision_names, described = [], None
        if model.uses_vision:
            preprocessing = model.vision.preprocessing
            try:
                described = B.describe_preprocessing(preprocessing, registry, component=recipe.vision.name)
            except RunError as exc:
                raise G.ExportUnsupported(str(exc)) from None
            vision_names = list(preprocessing.collate([preprocessing(_blank_image())]))
        _write_json(tmp / B.INPUTS, describe_inputs(vision=described, text=text_side))
        if safetensors:
            B.write_weights(source.weights, tmp / B.WEIGHTS)
        shutil.copyfile(RunDir(run_dir).recipe_file, tmp / B.RECIPE)
        _write_json(tmp / B.DECISION, decision)
        B.copy_reference_profile(run_dir, tmp)

        fused = source.make_graph(vision_names, plan)
        graph_file = B.GRAPH_FILES[fmt]
        info = {
            "bundle_format": B.BUNDLE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": str(run_dir.resolve()),
            "experiment": recipe.experiment,
            "modality": recipe.train.modality,
            "selected_epoch": source.selected_epoch,
            "graph": {"format": fmt, "file": graph_file, "inputs": fused.input_names,
                      "vision_inputs": vision_names, "text_inputs": list(fused.text_names), "output": "logit",
                      "opset": G.OPSET if fmt == "onnx" else None},
            **source.manifest_extra,
        }
        from mmcore.scoring.bundle import BundleScorer

        example = _example_inputs(fused, tmp, registry, kept, recipe.data.max_image_pixels)
        try:
            external = write_graph(fused, example, tmp / graph_file, fmt)
        except EXPORTER_ERRORS as exc:
            if shutil.disk_usage(tmp).free < (64 << 20):  # torch's C++ writers report a full disk as a RuntimeError
                raise OSError(errno.ENOSPC, "no space left on device") from None
            raise G.ExportUnsupported(source.graph_failure(fmt, exc)) from None
        if external:
            info["graph"]["external_data"] = external
        entries = B.file_entries(tmp)  # every file hashed once; parity.json and the card join below
        B.write_manifest(tmp, info, entries)

        # 3. the gate
        scorer = BundleScorer(tmp, device="cpu", verify=False, registry=registry)
        report = P.compare(scorer, kept, torch_logits, score_tol=score_tol, min_agreement=min_agreement)
        figures = {**report.as_dict(), "format": fmt, "providers": scorer.runner.providers, "torch_precision": "fp32",
                   "trained_precision": trained_precision}
        if trained_logits is not None:
            figures["trained_precision_deviation"] = P.precision_deviation(
                scorer, torch_logits, trained_logits,
                precision=str(source.trained_scorer.dtype).replace("torch.", ""))
        if not report.passed:
            raise P.ParityError(report.failure_line(out))
        _write_json(tmp / B.PARITY, figures)
        if quantize is not None:
            info = quantize_bundle(tmp, info, scorer, kept, quantize, out=out)
            entries = B.file_entries(tmp)  # the graph is another file now
        from mmcore.export.card import model_card

        card = model_card(bundle_name=str(out), recipe=scorer.recipe_data, results=RunDir(run_dir).results(),
                          decision=scorer.decision, parity=figures, manifest_info=info)
        (tmp / B.MODEL_CARD).write_text(card, encoding="utf-8")
        entries = B.file_entries(tmp, known=entries)
        B.write_manifest(tmp, info, entries)
        same_mode(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(disk_full_line(out, needed)) from None
        raise RunError(f"--out {out}: could not write the bundle ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    B.remember_verified(out, entries)  # this machine just hashed every file: serving it need not again
    echo(
        f"parity on {report.rows} rows of {report.csv}: max |Δ logit| {report.max_abs_logit:.2e}, "
        f"max |Δ calibrated score| {report.max_abs_calibrated:.2e}, decision agreement {report.agreement:.4f}"
    )
    if quantize is not None:
        echo(info["quantization"]["gate"]["reason"])
    echo(f"wrote {out} ({fmt}{', int8' if quantize is not None else ''}, {len(entries) + 1} files, {_size(sum(e['bytes'] for e in entries.values()))})")
    log_bundle_to_mlflow(run_dir, out, echo)  # into the run's MLflow run, when it logged to one
    return ExportSummary(out=out, format=fmt, parity=figures)


def _scored_rows(split, scored):
    """The rows of ``split`` that were scored, in order, with the texts they were scored with."""
    kept = split.subset([int(i) for i in scored.positions])
    return attrs.evolve(kept, texts=tuple(scored.texts))


def check_new_folder(out, flag):
    """``out`` must not exist and its nearest existing parent must be a folder (checked before any work)."""
    if out.exists():
        raise MmcoreError(f"{flag} {out}: already exists; remove it or choose another folder")
    parent = existing_parent(out)
    if not parent.is_dir():
        raise MmcoreError(f"{flag} {out}: {parent} is not a folder; choose another path")


def bundle_bytes(model, fmt, safetensors):
    """About how many bytes writing the bundle takes at its peak: the weights once (twice while a graph
    over the protobuf limit is gathered into its one data file; once more for ``--safetensors``),
    plus 64 MiB for the graph, tokenizers and JSON files."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    copies = 2 if fmt == "onnx" and weights > G.EXTERNAL_DATA_THRESHOLD else 1
    return weights * (copies + int(bool(safetensors))) + (64 << 20)


def check_free_space(out, needed):
    """Refuse before writing when the disk that will hold ``out`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(existing_parent(out)).free
    if free < needed:
        raise RunError(disk_full_line(out, needed, free))


def disk_full_line(out, needed, free=None):
    """One line naming the disk that holds ``out``, what is free there and what the bundle needs."""
    parent = existing_parent(out)
    mount = parent.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = shutil.disk_usage(parent).free if free is None else free
    return (f"--out {out}: not enough space on the disk mounted at {mount} ({_size(free)} free; the bundle needs "
            f"about {_size(needed)}); free some space or choose --out on another disk; nothing was written")


def _size(n):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def same_mode(folder):
    """Every file of the bundle readable alike (``0o666`` less the umask; folders ``0o777`` less it):
    safetensors and tempfile write 0600, which a server running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_graph(fused, example, path, fmt):
    """Trace the fused model into ``path`` (a seam: tests replace it to perturb the exported weights);
    returns the graph's external data file, if any."""
    return G.write_graph(fused, example, path, fmt)


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
    Path(path).write_text(json.dumps(data, indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")

