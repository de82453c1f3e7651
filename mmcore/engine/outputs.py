"""What a run (or an evaluation) writes: results, per-sample predictions, reports, plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mmcore.engine.loop import sigmoid
from mmcore.errors import RunError
from mmcore.evaluation.calibration import apply_temperature
from mmcore.evaluation.metrics import binary_metrics
from mmcore.evaluation.plots import write_plots
from mmcore.evaluation.report import write_html_report, write_markdown_report
from mmcore.io import write_json

STATUS_FILE = "status.json"
RECIPE_FILE = "recipe.toml"
BEST = "checkpoint_best.ckpt"
LAST = "last.ckpt"


def write_status(run_dir, state, **extra):
    """``status.json``: running | completed | failed | interrupted (eval/compare trust only completed)."""
    data = {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    write_json(Path(run_dir) / STATUS_FILE, data)


def read_status(run_dir):
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def require_completed(run_dir):
    """Refuse a run directory that is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    status = read_status(run_dir)
    if status is None:
        raise RunError(f"{run_dir}: not an mmcore run directory (no {STATUS_FILE})")
    if status.get("state") != "completed":
        raise RunError(
            f"{run_dir}: run is not complete (status: {status.get('state')}); "
            f"resume it with: mmcore run --resume {run_dir}"
        )
    return status


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
    write_json(out_dir / "results.json", results)
    write_json(out_dir / "test_predictions.json", records)
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
    write_markdown_report(out_dir / "test_report.md", summary=report_summary, samples=samples)
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
            out_dir / "report.html",
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
