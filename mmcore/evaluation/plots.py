"""PNG plots for a run directory: ROC, PR, reliability, score histograms, confusion, training curves.

Figures are built with ``matplotlib.figure.Figure`` and never touch pyplot, so no display,
no global backend switch and no figure leaks, whatever backend the user has configured.
"""

import numbers
from pathlib import Path

import numpy as np

from mmcore.evaluation.metrics import ECE_BINS, binary_metrics, calibration_bins, check_scores_labels

DPI = 110
NEGATIVE_COLOR = "#4C72B0"
POSITIVE_COLOR = "#DD8452"
THRESHOLD_COLOR = "#C44E52"
# bookkeeping columns a per-epoch history may carry that are not curves worth plotting
SKIPPED_HISTORY_KEYS = {"epoch", "step", "global_step", "epoch_time_s", "time_s", "seconds"}


def write_plots(out_dir, *, scores, labels, threshold, history=None, raw_scores=None, selected_epoch=None):
    """Write the evaluation plots into ``out_dir`` and return ``{name: path}``.

    Names: ``roc``, ``pr``, ``reliability``, ``score_hist``, ``confusion`` and, when
    ``history`` (a list of per-epoch dicts such as ``{"epoch": 1, "train_loss": ..,
    "val_auroc": ..}``) is given, ``training_curves``. ``raw_scores`` (the uncalibrated scores,
    when ``scores`` are temperature-scaled) adds the raw curve to the reliability diagram;
    ``selected_epoch`` (the checkpoint the run kept) is marked on the training curves.
    """
    scores, labels = check_scores_labels(scores, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    at_threshold = binary_metrics(scores, labels, threshold)
    at_half = binary_metrics(scores, labels, 0.5)

    figures = {
        "roc": _roc_figure(scores, labels, at_threshold, at_half),
        "pr": _pr_figure(scores, labels, at_threshold, at_half),
        "reliability": _reliability_figure(scores, labels, raw_scores),
        "score_hist": _score_hist_figure(scores, labels, threshold),
        "confusion": _confusion_figure(at_threshold),
    }
    if history:
        figures["training_curves"] = _training_curves_figure(history, selected_epoch)

    paths = {}
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=DPI)
        paths[name] = path
    return paths


def _figure(width=6.0, height=5.0, **kwargs):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def _rates(metrics):
    """(FPR, TPR) of a ``binary_metrics`` result."""
    negatives = metrics["tn"] + metrics["fp"]
    positives = metrics["tp"] + metrics["fn"]
    fpr = metrics["fp"] / negatives if negatives else 0.0
    tpr = metrics["tp"] / positives if positives else 0.0
    return fpr, tpr


def _single_class_note(ax, what):
    ax.text(0.5, 0.5, f"{what} undefined:\nonly one class in the labels", ha="center", va="center",
            transform=ax.transAxes, fontsize=11, color="0.4")


def _mark_operating_points(ax, points, at_threshold, at_half):
    """Mark the tuned threshold and 0.5 on a curve; ``points(metrics) -> (x, y)``."""
    x, y = points(at_threshold)
    ax.plot([x], [y], "o", color=THRESHOLD_COLOR, markersize=8,
            label=f"threshold {at_threshold['threshold']:.3g}")
    if abs(at_threshold["threshold"] - 0.5) > 1e-9:
        x, y = points(at_half)
        ax.plot([x], [y], "s", color="0.3", markersize=6, fillstyle="none", label="threshold 0.5")


def _roc_figure(scores, labels, at_threshold, at_half):
    import torch
    from torchmetrics.functional.classification import binary_roc

    figure = _figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    if at_threshold["auroc"] is None:
        _single_class_note(ax, "ROC")
    else:
        fpr, tpr, _ = binary_roc(torch.from_numpy(scores), torch.from_numpy(labels))
        ax.plot(fpr.numpy(), tpr.numpy(), color=NEGATIVE_COLOR, linewidth=2,
                label=f"ROC (AUROC = {at_threshold['auroc']:.3f})")
        _mark_operating_points(ax, _rates, at_threshold, at_half)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (recall)", title=f"ROC curve (n = {at_threshold['n']})")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return figure


def _pr_figure(scores, labels, at_threshold, at_half):
    import torch
    from torchmetrics.functional.classification import binary_precision_recall_curve

    figure = _figure()
    ax = figure.add_subplot()
    prevalence = at_threshold["positives"] / at_threshold["n"]
    ax.axhline(prevalence, linestyle="--", color="0.6", linewidth=1,
               label=f"chance (prevalence {prevalence:.3f})")
    if at_threshold["auprc"] is None:
        _single_class_note(ax, "PR curve")
    else:
        precision, recall, _ = binary_precision_recall_curve(
            torch.from_numpy(scores), torch.from_numpy(labels)
        )
        ax.step(recall.numpy(), precision.numpy(), where="post", color=NEGATIVE_COLOR, linewidth=2,
                label=f"PR (AP = {at_threshold['auprc']:.3f})")
        _mark_operating_points(ax, lambda m: (m["recall"], m["precision"]), at_threshold, at_half)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="Recall", ylabel="Precision",
           title=f"Precision-recall curve (n = {at_threshold['n']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return figure


def _reliability_figure(scores, labels, raw_scores):
    figure = _figure(6.0, 6.5)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfectly calibrated")

    curves = [("calibrated" if raw_scores is not None else "model", scores, NEGATIVE_COLOR)]
    if raw_scores is not None:
        raw_scores, _ = check_scores_labels(raw_scores, labels)
        curves.insert(0, ("raw", raw_scores, "0.55"))
    for name, values, color in curves:
        bins = [b for b in calibration_bins(values, labels) if b["count"]]
        ece = binary_metrics(values, labels)["ece"]
        top.plot([b["mean_score"] for b in bins], [b["positive_rate"] for b in bins], "o-",
                 color=color, linewidth=2, label=f"{name} (ECE = {ece:.3f})")

    width = 1 / ECE_BINS
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for name, values, color in curves:
        counts = [b["count"] for b in calibration_bins(values, labels)]
        bottom.bar(edges[:-1], counts, width=width, align="edge", color=color, alpha=0.6,
                   edgecolor="white", label=name)
    top.set(xlim=(0, 1), ylim=(-0.01, 1.01), ylabel="Observed fraction of positives",
            title=f"Reliability diagram ({ECE_BINS} bins)")
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    bottom.set(xlabel="Predicted probability (score)", ylabel="Samples")
    bottom.grid(alpha=0.3)
    return figure


def _score_hist_figure(scores, labels, threshold):
    figure = _figure(7.0, 4.5)
    ax = figure.add_subplot()
    edges = np.linspace(0, 1, 41)
    for value, name, color in ((0, "negative", NEGATIVE_COLOR), (1, "positive", POSITIVE_COLOR)):
        members = scores[labels == value]
        ax.hist(members, bins=edges, color=color, alpha=0.6, edgecolor="white",
                label=f"label {value} ({name}, n = {members.size})")
    ax.axvline(threshold, color=THRESHOLD_COLOR, linewidth=2, label=f"threshold {threshold:.3g}")
    if abs(threshold - 0.5) > 1e-9:
        ax.axvline(0.5, color="0.3", linewidth=1, linestyle=":", label="0.5")
    ax.set(xlim=(0, 1), xlabel="Score (predicted probability of label 1)", ylabel="Samples",
           title="Score distribution per true class")
    ax.grid(alpha=0.3)
    # below the axes: inside, it would hide the bars of one class or the other
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    return figure


def _confusion_figure(metrics):
    figure = _figure(5.0, 4.5)
    ax = figure.add_subplot()
    counts = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(counts):
        ax.text(col, row, f"{count}\n{shares[row, col]:.1%} of row", ha="center", va="center",
                color="white" if shares[row, col] > 0.6 else "black", fontsize=12)
    ax.set_xticks([0, 1], labels=["predicted 0", "predicted 1"])
    ax.set_yticks([0, 1], labels=["label 0", "label 1"])
    ax.set_title(f"Confusion matrix at threshold {metrics['threshold']:.3g}")
    return figure


def _numeric_series(history):
    """``{key: (epochs, values)}`` for every numeric key of the per-epoch dicts."""
    series = {}
    for index, row in enumerate(history):
        epoch = row.get("epoch", index + 1)
        for key, value in row.items():
            if key in SKIPPED_HISTORY_KEYS or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if not np.isfinite(value):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(epoch)
            ys.append(value)
    return series


def _training_curves_figure(history, selected_epoch=None):
    series = _numeric_series(history)
    groups = [
        ("Loss", [k for k in series if "loss" in k]),
        ("Validation metrics", [k for k in series if "loss" not in k and not _is_lr(k)]),
        ("Learning rate", [k for k in series if _is_lr(k)]),
    ]
    groups = [(title, keys) for title, keys in groups if keys] or [("No numeric history", [])]
    figure = _figure(6.0 * len(groups), 4.5)
    axes = np.atleast_1d(figure.subplots(1, len(groups)))
    for ax, (title, keys) in zip(axes, groups):
        for key in keys:
            xs, ys = series[key]
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", label=key)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5,
                       label=f"selected epoch {selected_epoch}")
        ax.set(xlabel="Epoch", title=title)
        if title == "Learning rate" and all(v > 0 for k in keys for v in series[k][1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if keys or selected_epoch is not None:
            ax.legend()
    figure.suptitle("Training curves")
    return figure


def _is_lr(key):
    return key == "lr" or key.startswith("lr_") or "learning_rate" in key
