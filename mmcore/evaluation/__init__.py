"""Evaluation of a run's scores: metrics, threshold tuning, temperature scaling, plots and reports.

Pure functions on arrays of scores (probabilities), logits and 0/1 labels; the engine calls them.
A prediction is positive when ``score >= threshold`` throughout.
"""

from mmcore.evaluation.calibration import apply_temperature, fit_temperature
from mmcore.evaluation.metrics import binary_metrics, calibration_bins, metrics_report
from mmcore.evaluation.plots import write_plots
from mmcore.evaluation.report import write_html_report, write_markdown_report
from mmcore.evaluation.threshold import parse_threshold_rule, tune_threshold

__all__ = [
    "apply_temperature",
    "binary_metrics",
    "calibration_bins",
    "fit_temperature",
    "metrics_report",
    "parse_threshold_rule",
    "tune_threshold",
    "write_html_report",
    "write_markdown_report",
    "write_plots",
]
