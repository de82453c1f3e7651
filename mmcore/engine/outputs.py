"""What a run (or an evaluation) writes: results, per-sample predictions, reports, plots.

The file names are the run directory's (:mod:`mmcore.rundir`); an evaluation writes the same set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcore.evaluation.calibration import apply_temperature, decide_logits
from mmcore.evaluation.explain import bootstrap_intervals, image_sizes, modality_summary, slice_keys, slice_metrics
from mmcore.evaluation.metrics import binary_metrics
from mmcore.evaluation.plots import write_plots
from mmcore.evaluation.report import write_html_report, write_markdown_report
from mmcore.io import write_json
from mmcore.rundir import PREDICTIONS_FILE, REPORT_HTML, REPORT_MD, RESULTS_FILE

SCORE_NAMES = {
    "score": "sigmoid(logit): the model's raw probability of label 1",
    "calibrated_score": "sigmoid(logit / temperature); the decision is calibrated_score >= threshold",
    "at_0.5": "score (raw) at 0.5: the model before the run's decision",
    "at_threshold": "calibrated_score at the tuned threshold: the run's decisions",
    "intervals": "bootstrap 95% intervals of calibrated_score's AUROC, AUPRC and F1 at the threshold",
}


def score_split(logits, labels, *, temperature, threshold, intervals=False):
    """Raw and calibrated scores, decisions, and metrics (at 0.5 on the raw score, at the threshold on the calibrated one).

    ``intervals=True`` adds bootstrap 95% intervals (``metrics["intervals"]``).
    """
    raw, calibrated, decision = decide_logits(logits, temperature=temperature, threshold=threshold)
    metrics = None
    if labels is not None and len(labels):
        metrics = {
            "at_0.5": binary_metrics(raw, labels, 0.5),
            "at_threshold": binary_metrics(calibrated, labels, threshold),
            "ece_raw": binary_metrics(raw, labels, 0.5)["ece"],
            "ece_calibrated": binary_metrics(calibrated, labels, 0.5)["ece"],
        }
        if intervals:
            metrics["intervals"] = bootstrap_intervals(calibrated, labels, threshold)
        metrics["scores"] = {k: SCORE_NAMES[k] for k in ("at_0.5", "at_threshold", *(("intervals",) if intervals else ()))}
    return raw, calibrated, decision, metrics


def prediction_records(split, indices, raw, calibrated, decision):
    """Per-sample rows of ``test_predictions.json``, in the CSV's order."""
    records = []
    for k, i in enumerate(indices):
        i = int(i)
        label = split.labels[i] if split.labels is not None else None
        records.append(
            {
                "row": split.rows[i],
                "path": split.raw_paths[i],
                "text": split.texts[i],
                "label": bool(label) if label is not None else None,
                "score": float(raw[k]),
                "calibrated_score": float(calibrated[k]),
                "prediction": bool(decision[k]),
            }
        )
    records.sort(key=lambda r: r["row"])
    return records


def write_evaluation(out_dir, *, split, indices, logits, labels, decision_info, summary, history=None, title="mmcore",
                     pipeline=None):
    """results.json, test_predictions.json, test_report.md, report.html (+ report_files/) and the plots.

    With ``pipeline`` (the loaded model), the reports also explain the decisions: each sample's
    score without its text and without its image, the GMU gate, and saliency overlays of the
    misclassified images (:mod:`mmcore.engine.explain`). Slice metrics and bootstrap intervals
    need only the scores.
    """
    out_dir = Path(out_dir)
    temperature = decision_info["temperature"]
    threshold = decision_info["threshold"]
    labelled = labels is not None and len(labels) > 0
    raw, calibrated, decision, metrics = score_split(
        logits, labels, temperature=temperature, threshold=threshold, intervals=labelled
    )
    records = prediction_records(split, indices, raw, calibrated, decision)
    order = sorted(range(len(indices)), key=lambda k: split.rows[int(indices[k])])  # the records' order
    explanation = _explain(pipeline, split, indices, labels, decision, temperature, out_dir) if labelled else {}
    notes = explanation.get("notes", [])
    modality = slices = None
    samples = [
        {
            "path": str(split.paths[int(indices[k])]),
            "text": r["text"],
            "label": r["label"],
            "score": r["score"],
            "calibrated_score": r["calibrated_score"],
            "prediction": r["prediction"],
        }
        for r, k in zip(records, order)
    ]
    if explanation.get("index") is not None:
        by_index = {int(i): n for n, i in enumerate(explanation["index"])}
        positions = [by_index[int(indices[k])] for k in order]
        without_text = apply_temperature(explanation["logit_without_text"], temperature)[positions]
        without_image = apply_temperature(explanation["logit_without_image"], temperature)[positions]
        gate = explanation["gate_mean"][positions] if explanation.get("gate_mean") is not None else None
        for n, sample in enumerate(samples):  # per row in the reports; test_predictions.json keeps its columns
            sample.update(score_without_text=float(without_text[n]), score_without_image=float(without_image[n]))
            if gate is not None:
                sample["gate_mean"] = float(gate[n])
        modality = modality_summary(
            [s["calibrated_score"] for s in samples], without_text, without_image,
            labels=[int(s["label"]) for s in samples], gate_mean=gate, threshold=threshold,
        )
    for k, sample in zip(order, samples):
        saliency = explanation.get("saliency", {}).get(int(indices[k]))
        if saliency:
            sample["saliency"] = saliency
    results = {**summary, "test": metrics, "decision": decision_info}
    if labelled:
        sizes = image_sizes(s["path"] for s in samples) if split.paths and _has_images(pipeline) else None
        slices = slice_metrics([s["calibrated_score"] for s in samples], [int(s["label"]) for s in samples], threshold,
                               slice_keys([s["text"] for s in samples], sizes))
        results["slices"] = slices
    if modality:
        results["modality"] = modality
    if notes:
        results["notes"] = notes
    write_json(out_dir / RESULTS_FILE, results)
    write_json(out_dir / PREDICTIONS_FILE, records)
    report_summary = _report_summary(results)
    write_markdown_report(out_dir / REPORT_MD, summary=report_summary, samples=samples, threshold=threshold,
                          slices=slices, modality=modality, notes=notes)
    plots = {}
    if labelled:
        plots = write_plots(
            out_dir,
            scores=calibrated,
            labels=labels.astype(int),
            threshold=threshold,
            history=history,
            raw_scores=raw,
            selected_epoch=summary.get("selected_epoch"),
        )
        write_html_report(
            out_dir / REPORT_HTML,
            title=title,
            summary=report_summary,
            plots=plots,
            samples=samples,
            threshold=threshold,
            slices=slices,
            modality=modality,
            notes=notes,
        )
    return results, records


def _has_images(pipeline):
    return pipeline is None or pipeline.model.vision is not None


def _explain(pipeline, split, indices, labels, decision, temperature, out_dir):
    """:func:`mmcore.engine.explain.explain_split` for the misclassified samples; a note when it cannot run."""
    if pipeline is None:
        return {}
    from mmcore.dist import world_size
    from mmcore.engine.explain import explain_split

    if world_size() > 1:  # the feature pass synchronises ranks; only rank 0 writes the reports
        return {"notes": ["modality contribution and saliency are not computed under torchrun; run mmcore eval on the run"]}
    wrong = np.asarray(decision) != np.asarray(labels).astype(bool)
    misclassified = {int(indices[k]): bool(decision[k]) for k in np.flatnonzero(wrong)}
    return explain_split(pipeline, split, temperature=temperature, misclassified=misclassified, out_dir=out_dir)


def _report_summary(results):
    """The readable part of results.json for the Markdown and HTML reports; each metric column names its score."""
    summary = {k: results[k] for k in ("experiment", "run_dir", "selected_epoch") if k in results}
    if results.get("data"):
        summary["rows"] = ", ".join(f"{name} {count}" for name, count in results["data"].items())
    decision = results.get("decision", {})
    summary["threshold"] = decision.get("threshold")
    summary["threshold rule"] = decision.get("description")
    summary["temperature"] = decision.get("temperature")
    summary["decision"] = "calibrated_score >= threshold"
    test = results.get("test")
    if test:
        summary["ECE of score (raw)"] = test.get("ece_raw")
        summary["ECE of calibrated_score"] = test.get("ece_calibrated")
        columns = {"at 0.5 on score (raw)": test["at_0.5"], "at the threshold on calibrated_score": test["at_threshold"]}
        intervals = test.get("intervals")
        if intervals:
            columns["95% bootstrap interval (calibrated_score)"] = {
                k: "n/a" if v is None else f"[{v[0]:.4f}, {v[1]:.4f}]" for k, v in intervals.items() if k in ("auroc", "auprc", "f1")
            }
        summary["test"] = columns
    return summary
