"""``drift.html``: a :class:`~mmcore.quality.drift.DriftReport` as a page with two plots (the score
histograms of reference and new rows on the server's buckets, the domain AUROC per modality) and
the per-slice table, in the report's style. Plots are PNG files in ``drift_files/`` beside the page;
nothing comes from the network.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from mmcore.evaluation.plots import DPI, NEGATIVE_COLOR, POSITIVE_COLOR, THRESHOLD_COLOR
from mmcore.evaluation.report import _html_table
from mmcore.quality.drift import MIN_SLICE_ROWS
from mmcore.quality.page import write_page

SLICE_COLUMNS = ("slice", "reference_rows", "new_rows", "reference_share", "new_share", "reference_positive_rate",
                 "new_positive_rate", "psi")

DRIFT_STYLE = """
.verdict { font-size: 1.3rem; font-weight: 600; padding: 0.5rem 0.8rem; display: inline-block; }
.verdict.drift { background: #fde7e9; color: #b00020; }
.verdict.stable { background: #e6f4ea; color: #1b7f3b; }
"""


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _bucket_labels(edges):
    lower = (0.0, *edges[:-1])
    return [f"{a:g}-{b:g}" for a, b in zip(lower, edges)]


def score_histogram_figure(report):
    """Bars of the share of rows in each score bucket, reference beside new."""
    score = report.score
    edges = score["buckets"]
    reference = np.asarray(score["reference_counts"], dtype=float)
    new = np.asarray(score["new_counts"], dtype=float)
    figure = _figure(11.0, 4.0)
    ax = figure.add_subplot()
    x = np.arange(len(edges))
    ax.bar(x - 0.2, reference / reference.sum(), width=0.4, color=NEGATIVE_COLOR, label=f"reference (n = {report.reference_rows})")
    ax.bar(x + 0.2, new / new.sum(), width=0.4, color=POSITIVE_COLOR, label=f"new (n = {report.new_rows})")
    ax.set_xticks(x, labels=_bucket_labels(edges), rotation=45, ha="right", fontsize=8)
    ax.set(xlabel="calibrated_score bucket (the server's histogram edges)", ylabel="share of rows",
           title=f"Score distribution: PSI {score['psi']:.3f} ({score['psi_band']}), KS {score['ks_statistic']:.3f}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(frameon=False)
    return figure


def domain_auroc_figure(report):
    """One bar per modality: the domain classifier's AUROC, with 0.5 (no drift) and the rule's limit."""
    figure = _figure(5.0, 3.6)
    ax = figure.add_subplot()
    names = list(report.domain_auroc)
    values = [report.domain_auroc[m]["auroc"] for m in names]
    colors = [THRESHOLD_COLOR if v >= report.rule.domain_auroc else NEGATIVE_COLOR for v in values]
    ax.bar(names, values, color=colors)
    for k, value in enumerate(values):
        ax.text(k, value + 0.01, f"{value:.3f}", ha="center", va="bottom")
    ax.axhline(0.5, color="0.4", linestyle=":", label="0.5: indistinguishable")
    ax.axhline(report.rule.domain_auroc, color=THRESHOLD_COLOR, linestyle="--", label=f"drift at {report.rule.domain_auroc:g}")
    ax.set(ylim=(0, 1.1), ylabel="cross-validated AUROC", title="Domain classifier: reference vs new")
    # below the axes: inside, it would cover a bar
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    return figure


def write_drift_page(path, report, *, title="Drift"):
    """Write ``drift.html`` (plots under ``<stem>_files/``) for ``report``; return its Path."""
    e = html.escape
    path = Path(path)
    files_dir = path.parent / f"{path.stem}_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    figures = {"score_histogram": (score_histogram_figure(report), "Score histograms, reference vs new", " class='wide'")}
    if report.domain_auroc:
        figures["domain_auroc"] = (domain_auroc_figure(report), "Domain AUROC per modality", "")
    plots = []
    for name, (figure, caption, css) in figures.items():
        figure.savefig(files_dir / f"{name}.png", dpi=DPI)
        plots.append(f"<figure{css}><img src='{e(files_dir.name)}/{name}.png' alt='{e(caption)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    verdict = "drift" if report.drift else "stable"
    said = "; ".join(report.reasons) if report.drift else "no measure passed the rule"
    measures = [[f"domain AUROC ({m})", v["auroc"]] for m, v in report.domain_auroc.items()]
    measures += [["score PSI", report.score["psi"]], ["score KS statistic", report.score["ks_statistic"]],
                 ["positive rate: reference", report.positive_rate["reference"]],
                 ["positive rate: new", report.positive_rate["new"]],
                 ["empty OCR rate: reference", report.empty_ocr_rate["reference"]],
                 ["empty OCR rate: new", report.empty_ocr_rate["new"]]]
    body = [f"<h1>{e(title)}</h1>",
            f"<p class='verdict {verdict}' id='verdict'>{verdict}: {e(said)} (exit code {report.exit_code})</p>",
            f"<p class='note'>Rule: drift when any modality's domain AUROC &gt;= {report.rule.domain_auroc:g} or the"
            f" score PSI &gt;= {report.rule.psi:g}. {report.reference_rows} reference rows, {report.new_rows} new rows,"
            f" threshold {report.threshold:.4g}.</p>",
            "<section id='measures'><h2>Measures</h2>", _html_table(["", "value"], measures), "</section>",
            "<section id='plots'><h2>Plots</h2><div class='plots'>", *plots, "</div></section>",
            "<section id='slices'><h2>Slices</h2>",
            f"<p class='note'>Each slice's share of the rows and positive rate on both sides; its own score PSI where"
            f" both sides have at least {MIN_SLICE_ROWS} rows (n/a otherwise).</p>"]
    body += [f"<p class='note'>{e(note)}</p>" for note in report.notes]
    for family, rows in report.slices.items():
        body += [f"<h3>{e(family)}</h3>", _html_table(SLICE_COLUMNS, [[r[c] for c in SLICE_COLUMNS] for r in rows])]
    body.append("</section>")
    return write_page(path, title=title, body=body, style=DRIFT_STYLE)
