"""``mmcore predict``: score unlabeled data with a finished run.

The CSV goes through the run's own pipeline (same preprocessing and forward as training and
``mmcore eval``) in float32 from the raw rows, as the run's bundle computes: nothing is read
from or written to the feature cache unless asked (``cache=True``, ``--cache``: float16
features, faster for data scored again and again). The output is the input CSV with three columns added:
``score`` (raw sigmoid), ``calibrated_score`` (after the run's temperature) and ``prediction``
(``calibrated_score >= threshold``, the threshold tuned on validation).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.errors import MmcoreError
from mmcore.io import atomic_open

OUTPUT_COLUMNS = ("score", "calibrated_score", "prediction")


@attrs.frozen
class PredictSummary:
    """What ``predict_csv`` did: rows read, rows scored, rows predicted positive, the decision."""

    output: Path
    rows: int
    scored: int
    positives: int
    threshold: float
    temperature: float

    @property
    def skipped(self):
        return self.rows - self.scored


def predict_csv(
    run_dir, input_csv, output, *, batch_size=None, base_dir=None, device="auto", cache=False, registry=None,
    progress=True, echo=print
):
    """Score every row of ``input_csv`` with the run in ``run_dir``; write ``output`` atomically."""
    from mmcore.commands.evaluate import load_run, open_run, score_with_run
    from mmcore.engine.outputs import score_split
    from mmcore.export.devices import parse_device

    input_csv, output = Path(input_csv), Path(output)
    check_output_file(output, input_csv)
    device = parse_device(device)
    run_dir = open_run(run_dir, echo=echo)  # completion (or a live run) checked once, here
    # Validate the data before the (possibly large) model is built.
    modality = (run_dir.recipe_data().get("train") or {}).get("modality", "multimodal")
    needs_text, needs_images = modality != "vision_only", modality != "text_only"
    max_image_bytes = (run_dir.recipe_data().get("data") or {}).get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES)
    frame, split = read_input(input_csv, base_dir, require_text=needs_text, check_images=needs_images,
                              max_image_bytes=max_image_bytes)

    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress, use_cache=cache, device=device,
                              fp32=True)
    recipe = pipeline.recipe
    if batch_size:
        # Pipeline.loader and the feature pass read the batch size from the recipe.
        pipeline.recipe = attrs.evolve(recipe, eval=attrs.evolve(recipe.eval, batch_size=int(batch_size)))
    decision = ckpt.get("decision") or {"threshold": 0.5, "temperature": 1.0}
    kept, indices, logits, _, _ = score_with_run(
        pipeline, split, "predict", progress=progress, desc=f"predict {input_csv.name}"
    )
    raw, calibrated, predicted, _ = score_split(
        logits, None, temperature=decision["temperature"], threshold=decision["threshold"]
    )

    write_scored_csv(output, frame, [kept.rows[int(i)] for i in indices], raw, calibrated, predicted)

    summary = PredictSummary(
        output=output,
        rows=len(frame),
        scored=len(indices),
        positives=int(predicted.sum()),
        threshold=float(decision["threshold"]),
        temperature=float(decision["temperature"]),
    )
    echo(
        f"scored {summary.scored} of {summary.rows} rows of {input_csv} on {pipeline.device}: "
        f"{summary.positives} predicted positive "
        f"(calibrated_score >= {summary.threshold:.4f})"
    )
    if summary.skipped:
        rows = "row" if summary.skipped == 1 else "rows"
        echo(f"{summary.skipped} {rows} skipped (unreadable images; score left empty, data.on_bad_image = \"skip\")")
    echo(f"wrote {output}")
    return summary


def check_output_file(output, input_csv=None):
    """``-o``: a file name whose nearest existing parent is a folder, not the input CSV (checked before any work)."""
    output = Path(output)
    if output.is_dir():
        raise MmcoreError(f"-o {output} is a folder; give a CSV file name")
    if input_csv is not None and Path(input_csv).is_file() and output.exists() and output.resolve() == Path(input_csv).resolve():
        raise MmcoreError(f"-o {output}: is the input CSV; write the predictions to another file")
    parent = existing_parent(output)
    if not parent.is_dir():
        raise MmcoreError(f"-o {output}: {parent} is not a folder; choose another path")


def existing_parent(path):
    """The nearest ancestor of ``path`` that exists (where its folders will be made)."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def write_scored_csv(output, frame, rows, raw, calibrated, predicted):
    """``frame`` (the input CSV) with score, calibrated_score and prediction, written atomically.

    ``rows`` are the CSV rows (numbered from 1) that were scored, in the order of the scores;
    a row left out (an unreadable image, skipped) keeps those columns empty.
    """
    columns = {name: [""] * len(frame) for name in OUTPUT_COLUMNS}
    for k, row in enumerate(rows):
        columns["score"][row - 1] = repr(float(raw[k]))
        columns["calibrated_score"][row - 1] = repr(float(calibrated[k]))
        columns["prediction"][row - 1] = str(bool(predicted[k]))
    for name in OUTPUT_COLUMNS:
        frame[name] = columns[name]
    with atomic_open(output, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)


def read_input(input_csv, base_dir=None, *, require_text=True, check_images=True, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The CSV to score, read once: ``(frame, split)`` — its columns as given, to be written back
    out with the scores, and the validated :class:`~mmcore.data.split.Split` to score."""
    from mmcore.data.csvs import REQUIRED_COLUMNS, read_table, split_from_table

    needed = {"local_image_path": True, "label": False, "text_info": require_text}
    frame = read_table(
        input_csv,
        required=[c for c in REQUIRED_COLUMNS if needed[c]],
        optional=[c for c in REQUIRED_COLUMNS if not needed[c]],
    )
    split = split_from_table(frame, input_csv, base_dir, require_label=False, check_images=check_images,
                             max_image_bytes=max_image_bytes)
    return frame, split
