"""``mmcore predict RUN_DIR|BUNDLE_DIR new.csv -o out.csv``: score unlabeled data with a finished run
or its export bundle.

Both go through the one scoring path (:func:`mmcore.scoring.rows.score_rows`): rows validated as
for a run, empty texts read by the recipe's OCR engine when it names one, images decoded in
parallel, scored in float32 from the raw rows — a run by its PyTorch model, a bundle by
onnxruntime — so the two agree. Nothing is read from or written to the feature cache unless asked
(``cache=True``, ``--cache``, runs only: float16 features, faster for data scored again and again).
The output is the input CSV with three columns added: ``score`` (raw sigmoid),
``calibrated_score`` (after the run's temperature) and ``prediction`` (``calibrated_score >=
threshold``, the threshold tuned on validation), written atomically.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.devices import parse_device
from mmcore.errors import MmcoreError
from mmcore.export.bundle import is_bundle
from mmcore.io import check_output_path, existing_parent
from mmcore.scoring.ensemble_dir import is_ensemble
from mmcore.scoring.rows import collect, score_rows
from mmcore.scoring.tables import read_input, write_scored_table


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


def predict_csv(source, input_csv, output, *, batch_size=None, base_dir=None, device="auto", cache=False, verify=None,
                registry=None, progress=True, echo=print):
    """Score every row of ``input_csv`` with the run or bundle at ``source``; write ``output`` atomically.

    ``cache`` (runs): score through the feature cache as training's validation did; ``verify``
    (bundles): hash every file of the bundle first.
    """
    input_csv, output = Path(input_csv), Path(output)
    check_output_path(output, "predictions CSV", option="-o")  # before any scoring
    check_output_file(output, input_csv)
    device = parse_device(device)
    if is_bundle(source) or is_ensemble(source):
        from mmcore.scoring.scorers import open_scorer

        scorer = open_scorer(source, device=device, verify=verify, registry=registry, progress=progress)
        frame, split = read_input(input_csv, base_dir, require_text=scorer.uses_text, check_images=scorer.uses_vision,
                                  max_image_bytes=scorer.data_config.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES))
        where = f"with {scorer.kind} {source} on {scorer.device_name}"
    else:
        from mmcore.engine.restore import open_run
        from mmcore.scoring.run import RunScorer

        run_dir = open_run(source, echo=echo)  # completion (or a live run) checked once, here
        # the data is validated before the (possibly large) model is built
        data = run_dir.recipe_data()
        modality = (data.get("train") or {}).get("modality", "multimodal")
        frame, split = read_input(input_csv, base_dir, require_text=modality != "vision_only",
                                  check_images=modality != "text_only",
                                  max_image_bytes=(data.get("data") or {}).get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES))
        scorer = RunScorer(run_dir, device=device, registry=registry, progress=progress)
        where = f"on {scorer.device_name}"
    scored = predict_rows(scorer, split, batch_size=batch_size, cache=cache, registry=registry, progress=progress,
                          desc=f"predict {input_csv.name}")
    write_scored_table(output, frame, [split.rows[int(i)] for i in scored.positions], scored.raw, scored.calibrated,
                     scored.predicted)
    summary = PredictSummary(output=output, rows=len(frame), scored=len(scored.positions),
                             positives=int(scored.predicted.sum()), threshold=float(scorer.decision["threshold"]),
                             temperature=float(scorer.decision["temperature"]))
    echo(f"scored {summary.scored} of {summary.rows} rows of {input_csv} {where}: {summary.positives} predicted positive "
         f"(calibrated_score >= {summary.threshold:.4f})")
    if summary.skipped:
        rows = "row" if summary.skipped == 1 else "rows"
        echo(f"{summary.skipped} {rows} skipped (unreadable images; score left empty, data.on_bad_image = \"skip\")")
    echo(f"wrote {output}")
    return summary


@attrs.frozen
class Predictions:
    """The scored rows of an input, in input order (rows left out: unreadable images, ``on_bad_image = "skip"``)."""

    #: the rows' positions in the input (int64)
    positions: np.ndarray
    #: raw sigmoid, after the run's temperature, and ``calibrated >= threshold``
    raw: np.ndarray
    calibrated: np.ndarray
    predicted: np.ndarray
    #: the text each row was scored with, and where it came from (:data:`mmcore.textsource.TEXT_SOURCES`;
    #: empty when scored through the feature cache)
    texts: tuple
    text_sources: tuple


def predict_rows(scorer, split, *, batch_size=None, cache=False, registry=None, progress=True, desc=None,
                 model_lock=None):
    """Score ``split`` with an open scorer -> :class:`Predictions`: ``mmcore predict`` and the Python
    API's ``Model.predict`` both score here (:func:`~mmcore.scoring.rows.score_rows`, or with
    ``cache`` a run's feature cache), so their scores are the same numbers."""
    if cache and scorer.kind == "run":
        from mmcore.commands.evaluate import score_through_cache, scoring_pipeline

        pipeline = scoring_pipeline(scorer, cache=True, batch_size=batch_size, progress=progress)
        split, positions, logits, _, _ = score_through_cache(pipeline, split, "predict", progress=progress, desc=desc)
        texts, sources = tuple(split.texts[int(i)] for i in positions), ("",) * len(positions)
    else:
        scored = collect(score_rows(scorer, split, batch_size=batch_size, registry=registry, progress=progress,
                                    desc=desc, model_lock=model_lock))
        positions, logits, texts, sources = scored.positions, scored.logits, scored.texts, scored.text_sources
    raw, calibrated, predicted = scorer.decide(logits)
    return Predictions(positions=positions, raw=raw, calibrated=calibrated, predicted=predicted, texts=texts,
                       text_sources=sources)


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
