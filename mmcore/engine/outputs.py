"""What a run (or an evaluation) writes: results, per-sample predictions, reports, plots.

The file names are the run directory's (:mod:`mmcore.rundir`); an evaluation writes the same set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcore.engine.loop import sigmoid
from mmcore.evaluation.calibration import apply_temperature
from mmcore.evaluation.metrics import binary_metrics
from mmcore.evaluation.plots import write_plots
from mmcore.evaluation.report import write_html_report, write_markdown_report
from mmcore.io import write_json
from mmcore.rundir import PREDICTIONS_FILE, REPORT_HTML, REPORT_MD, RESULTS_FILE


def score_split(logits, labels, *, temperature, threshold):
    """Raw and calibrated scores, decisions, and metrics (at 0.5 and at the threshold)."""
    raw = sigmoid(logits)
    calibrated = apply_temperature(logits, temperature) if temperature != 1.0 else raw
    decision = calibrated >= threshold
    metrics = None
    if labels is not None and len(labels):
        metrics = {
            "at_0.5": binary_metrics(raw, labels, 0.5),
            "at_threshold": binary_metrics(calibrated, labels, threshold),
            "ece_raw": binary_metrics(raw, labels, 0.5)["ece"],
            "ece_calibrated": binary_metrics(calibrated, labels, 0.5)["ece"],
        }
    return raw, np.asarray(calibrated, dtype=np.float64), decision, metrics


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


def write_evaluation(out_dir, *, split, indices, logits, labels, decision_info, summary, history=None, title="mmcore"):
    """results.json, test_predictions.json, test_report.md, report.html and the plots."""
    out_dir = Path(out_dir)
    temperature = decision_info["temperature"]
    threshold = decision_info["threshold"]
    raw, calibrated, decision, metrics = score_split(
        logits, labels, temperature=temperature, threshold=threshold
    )
    records = prediction_records(split, indices, raw, calibrated, decision)
    results = {**summary, "test": metrics, "decision": decision_info}
    write_json(out_dir / RESULTS_FILE, results)
    write_json(out_dir / PREDICTIONS_FILE, records)
    samples = [
        {
            "path": str(split.paths[int(i)]),
            "text": r["text"],
            "label": r["label"],
            "score": r["calibrated_score"],
            "prediction": r["prediction"],
        }
        for r, i in zip(records, sorted(indices.tolist(), key=lambda i: split.rows[int(i)]))
    ]
    report_summary = _report_summary(results)
    write_markdown_report(out_dir / REPORT_MD, summary=report_summary, samples=samples)
    plots = {}
    if labels is not None and len(labels):
        plots = write_plots(
            out_dir,
            scores=calibrated,
            labels=labels.astype(int),
            threshold=threshold,
            history=history,
            raw_scores=raw,
        )
        write_html_report(
            out_dir / REPORT_HTML,
            title=title,
            summary=report_summary,
            plots=plots,
            samples=samples,
        )
    return results, records


def _report_summary(results):
    """The readable part of results.json for the Markdown and HTML reports."""
    summary = {k: results[k] for k in ("experiment", "run_dir", "selected_epoch") if k in results}
    if results.get("data"):
        summary["rows"] = ", ".join(f"{name} {count}" for name, count in results["data"].items())
    decision = results.get("decision", {})
    summary["threshold"] = decision.get("threshold")
    summary["threshold rule"] = decision.get("description")
    summary["temperature"] = decision.get("temperature")
    if results.get("test"):
        summary["test"] = results["test"]
    return summary
