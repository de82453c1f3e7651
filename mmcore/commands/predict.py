"""``mmcore predict``: score unlabeled data with a finished run.

The CSV goes through the run's own pipeline (same preprocessing, feature cache and forward as
training and ``mmcore eval``); the output is the input CSV with three columns added:
``score`` (raw sigmoid), ``calibrated_score`` (after the run's temperature) and ``prediction``
(``calibrated_score >= threshold``, the threshold tuned on validation).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mmcore.errors import MmcoreError

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
    run_dir, input_csv, output, *, batch_size=None, base_dir=None, registry=None, progress=True, echo=print
):
    """Score every row of ``input_csv`` with the run in ``run_dir``; write ``output`` atomically."""
    from mmcore.commands.evaluate import load_run, open_run, score_with_run
    from mmcore.data import csvs
    from mmcore.engine.outputs import score_split
    from mmcore.io import atomic_open

    input_csv, output = Path(input_csv), Path(output)
    if output.exists() and output.is_dir():
        raise MmcoreError(f"-o {output} is a folder; give a CSV file name")
    if input_csv.is_file() and output.exists() and output.resolve() == input_csv.resolve():
        raise MmcoreError(f"-o {output}: is the input CSV; write the predictions to another file")
    run_dir = open_run(run_dir, echo=echo)  # completion (or a live run) checked once, here
    # Validate the data before the (possibly large) model is built.
    modality = (run_dir.recipe_data().get("train") or {}).get("modality", "multimodal")
    needs_text, needs_images = modality != "vision_only", modality != "text_only"
    split = csvs.read_split(
        input_csv, base_dir, require_label=False, require_text=needs_text, check_images=needs_images
    )
    frame = csvs._read_frame(input_csv)  # the columns as given, to write them back out
    frame.columns = [str(c).strip() for c in frame.columns]

    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress)
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

    # Rows are numbered from 1 in CSV order; a skipped image leaves its row's columns empty.
    columns = {name: [""] * len(frame) for name in OUTPUT_COLUMNS}
    for k, i in enumerate(indices):
        position = kept.rows[int(i)] - 1
        columns["score"][position] = repr(float(raw[k]))
        columns["calibrated_score"][position] = repr(float(calibrated[k]))
        columns["prediction"][position] = str(bool(predicted[k]))
    for name in OUTPUT_COLUMNS:
        frame[name] = columns[name]
    with atomic_open(output, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)

    summary = PredictSummary(
        output=output,
        rows=len(frame),
        scored=len(indices),
        positives=int(predicted.sum()),
        threshold=float(decision["threshold"]),
        temperature=float(decision["temperature"]),
    )
    echo(
        f"scored {summary.scored} of {summary.rows} rows of {input_csv}: {summary.positives} predicted positive "
        f"(calibrated_score >= {summary.threshold:.4f})"
    )
    if summary.skipped:
        rows = "row" if summary.skipped == 1 else "rows"
        echo(f"{summary.skipped} {rows} skipped (unreadable images; score left empty, data.on_bad_image = \"skip\")")
    echo(f"wrote {output}")
    return summary
