"""Error reports of a run: one self-contained ``report.html`` and a terminal-friendly ``test_report.md``.

Both list the misclassified samples first, most confident errors on top, then the correct ones
with the least confident on top (the ones closest to flipping). A sample is a dict with keys
``path, text, label, score, prediction``; ``confidence`` is the probability the model gave to
the class it predicted (``score`` for a positive prediction, ``1 - score`` for a negative one).
"""

import base64
import html
import io
import json
import math
import numbers
from pathlib import Path

MARKDOWN_TEXT_CHARS = 80


def prepare_samples(samples):
    """Split samples into ``(misclassified, correct)``, each sorted for the report.

    Each returned sample is a copy with ``confidence`` and ``correct`` added.
    """
    rows = []
    for sample in samples:
        score = float(sample["score"])
        prediction = int(sample["prediction"])
        row = dict(sample)
        row["confidence"] = score if prediction == 1 else 1.0 - score
        row["correct"] = int(sample["label"]) == prediction
        rows.append(row)
    misclassified = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["confidence"])
    correct = sorted((r for r in rows if r["correct"]), key=lambda r: r["confidence"])
    return misclassified, correct


# ---------------------------------------------------------------------------- summary tables


def _format_value(value):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _is_metric_column(value):
    return isinstance(value, dict) and value and not any(isinstance(v, dict) for v in value.values())


def summary_tables(summary):
    """Lay a summary dict out as ``(settings, columns)`` for display.

    ``settings`` are the top-level ``(key, value)`` pairs that are not dicts; ``columns`` are
    ``(name, {metric: value})`` for every dict of plain values, nested names joined with " / "
    (``{"test": {"at_0.5": {...}}}`` gives the column ``"test / at_0.5"``).
    """
    settings, columns = [], []

    def walk(prefix, value):
        if _is_metric_column(value):
            columns.append((prefix, value))
        elif isinstance(value, dict):
            flat = {k: v for k, v in value.items() if not isinstance(v, dict)}
            if flat:
                columns.append((prefix, flat))
            for key, child in value.items():
                if isinstance(child, dict):
                    walk(f"{prefix} / {key}", child)

    for key, value in summary.items():
        if isinstance(value, dict):
            walk(str(key), value)
        else:
            settings.append((str(key), value))
    return settings, columns


def _metric_rows(columns):
    names = []
    for _, metrics in columns:
        names.extend(k for k in metrics if k not in names)
    return names


# ---------------------------------------------------------------------------- images


def _data_uri(data, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail_uri(path, thumb_size):
    """A JPEG data URI of the image at ``path`` shrunk to ``thumb_size``, or ``(None, reason)``.

    Read like every other image (:func:`mmcore.data.images.load_rgb`: allowed formats only,
    EXIF orientation applied, transparency on white).
    """
    from mmcore.data.images import BadImageError, load_rgb

    try:
        image = load_rgb(path, target_size=(thumb_size, thumb_size))
        image.thumbnail((thumb_size, thumb_size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    except BadImageError as error:
        return None, "image not found" if str(error) == "image not found" else f"unreadable image ({error})"
    except Exception as error:  # any unreadable image is reported in place, never fatal
        return None, f"unreadable image ({type(error).__name__})"
    return _data_uri(buffer.getvalue(), "image/jpeg"), None


def _resolve(path, image_root):
    path = Path(str(path))
    if image_root is not None and not path.is_absolute():
        path = Path(image_root) / path
    return path


# ---------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1400px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.3rem; margin-top: 2.5rem; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.35rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1rem; }
.plots figure { margin: 0; border: 1px solid #eee; padding: 0.5rem; }
.plots figure.wide { grid-column: 1 / -1; }
.plots img { width: 100%; height: auto; }
.plots figcaption { text-align: center; color: #555; font-size: 0.9rem; }
table.samples { width: 100%; }
table.samples th[data-sort] { cursor: pointer; user-select: none; white-space: nowrap; }
table.samples th[data-sort]:hover { background: #e8e8e8; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
td.thumb { width: THUMBpx; text-align: center; }
td.thumb img { max-width: THUMBpx; max-height: THUMBpx; }
.missing { width: THUMBpx; height: 80px; display: flex; align-items: center; justify-content: center;
           background: repeating-linear-gradient(45deg, #f3f3f3, #f3f3f3 8px, #e6e6e6 8px, #e6e6e6 16px);
           color: #777; font-size: 0.8rem; text-align: center; }
td.text { max-width: 40rem; white-space: pre-wrap; word-break: break-word; font-size: 0.9rem; }
td.text div { max-height: 10rem; overflow: auto; }
td.path { font-family: ui-monospace, monospace; font-size: 0.8rem; overflow-wrap: anywhere;
          min-width: 8rem; max-width: 16rem; }
tr.wrong td.pred { color: #b00020; font-weight: 600; }
tr.right td.pred { color: #1b7f3b; font-weight: 600; }
.note { color: #555; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.samples th[data-sort]").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], key = th.dataset.sort;
    var descending = th.getAttribute("aria-sort") !== "descending";
    table.querySelectorAll("th[data-sort]").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.dataset[key], y = b.dataset[key];
      var d = (isNaN(x) || isNaN(y)) ? x.localeCompare(y) : x - y;
      return descending ? -d : d;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""

SORTABLE = {"label": "label", "score": "score", "prediction": "prediction", "confidence": "confidence"}


def _html_summary(summary):
    e = html.escape
    settings, columns = summary_tables(summary)
    parts = []
    if settings:
        parts.append("<table class='settings'><tbody>")
        for key, value in settings:
            parts.append(f"<tr><th>{e(key)}</th><td>{e(_format_value(value))}</td></tr>")
        parts.append("</tbody></table>")
    if columns:
        parts.append("<table class='metrics'><thead><tr><th>metric</th>")
        parts.extend(f"<th>{e(name)}</th>" for name, _ in columns)
        parts.append("</tr></thead><tbody>")
        for metric in _metric_rows(columns):
            parts.append(f"<tr><th>{e(str(metric))}</th>")
            for _, metrics in columns:
                cell = _format_value(metrics[metric]) if metric in metrics else ""
                parts.append(f"<td class='num'>{e(cell)}</td>")
            parts.append("</tr>")
        parts.append("</tbody></table>")
    return "\n".join(parts)


PLOT_CAPTIONS = {
    "roc": "ROC curve",
    "pr": "Precision-recall curve",
    "reliability": "Reliability diagram (calibration)",
    "score_hist": "Score histogram per true class",
    "confusion": "Confusion matrix",
    "training_curves": "Training curves",
}


def _html_plots(plots):
    from PIL import Image

    e = html.escape
    parts = ["<div class='plots'>"]
    for name, path in plots.items():
        path = Path(path)
        caption = e(PLOT_CAPTIONS.get(name, str(name)))
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                wide = image.width > 1.8 * image.height  # e.g. training curves side by side
        except OSError:
            parts.append(f"<figure><div class='missing'>plot {e(path.name)} missing</div>"
                         f"<figcaption>{caption}</figcaption></figure>")
            continue
        css = " class='wide'" if wide else ""
        parts.append(f"<figure{css}><img src='{_data_uri(data, 'image/png')}' alt='{caption}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)


def _html_samples(section_id, rows, image_root, thumb_size, initial_sort):
    e = html.escape
    headers = ["#", "image", "path", "OCR text", "label", "score", "prediction", "confidence"]
    parts = [f"<table class='samples' id='{section_id}-table'><thead><tr>"]
    for header in headers:
        key = SORTABLE.get(header)
        if key is None:
            parts.append(f"<th>{e(header)}</th>")
            continue
        aria = f" aria-sort='{initial_sort}'" if key == "confidence" else ""
        parts.append(f"<th data-sort='{key}' title='click to sort'{aria}>{e(header)}</th>")
    parts.append("</tr></thead><tbody>")
    for index, row in enumerate(rows, start=1):
        uri, reason = _thumbnail_uri(_resolve(row["path"], image_root), thumb_size)
        if uri is None:
            thumb = f"<div class='missing' title='{e(reason)}'>{e(reason)}</div>"
        else:
            thumb = f"<img src='{uri}' alt='{e(str(row['path']))}' loading='lazy'>"
        text = row.get("text")
        text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
        css = "right" if row["correct"] else "wrong"
        parts.append(
            f"<tr class='{css}' data-label='{int(row['label'])}' data-score='{float(row['score']):.6f}'"
            f" data-prediction='{int(row['prediction'])}' data-confidence='{row['confidence']:.6f}'>"
            f"<td class='num'>{index}</td><td class='thumb'>{thumb}</td>"
            f"<td class='path'>{e(str(row['path']))}</td>"
            f"<td class='text'><div>{e(text)}</div></td>"
            f"<td class='num'>{int(row['label'])}</td>"
            f"<td class='num'>{float(row['score']):.4f}</td>"
            f"<td class='num pred'>{int(row['prediction'])}</td>"
            f"<td class='num'>{row['confidence']:.4f}</td></tr>"
        )
    parts.append("</tbody></table>")
    return "\n".join(parts)


def write_html_report(path, *, title, summary, plots, samples, image_root=None, thumb_size=160):
    """Write one self-contained HTML report to ``path`` and return its Path.

    Plots and thumbnails are embedded as base64 ``data:`` URIs, so the file still works when the
    run directory is copied elsewhere; no external script or stylesheet. Sections: summary
    metrics, plots, misclassified samples (most confident first), correct samples (least
    confident first); click a column header to re-sort a table. Relative sample paths are
    resolved against ``image_root``; a missing or unreadable image shows a placeholder.
    """
    e = html.escape
    path = Path(path)
    thumb_size = int(thumb_size)
    misclassified, correct = prepare_samples(samples)
    total = len(misclassified) + len(correct)
    body = [
        f"<h1>{e(str(title))}</h1>",
        "<nav><a href='#summary'>Summary</a><a href='#plots'>Plots</a>"
        f"<a href='#misclassified'>Misclassified ({len(misclassified)})</a>"
        f"<a href='#correct'>Correct ({len(correct)})</a></nav>",
        "<section id='summary'><h2>Summary</h2>",
        _html_summary(summary),
        "</section>",
    ]
    if plots:
        body += ["<section id='plots'><h2>Plots</h2>", _html_plots(plots), "</section>"]
    body += [
        f"<section id='misclassified'><h2>Misclassified samples ({len(misclassified)} of {total})</h2>",
        "<p class='note'>Most confident errors first. Confidence is the probability given to the"
        " predicted class. Click a column header to sort.</p>",
        _html_samples("misclassified", misclassified, image_root, thumb_size, "descending")
        if misclassified else "<p>None.</p>",
        "</section>",
        f"<section id='correct'><h2>Correct samples ({len(correct)} of {total})</h2>",
        "<p class='note'>Least confident first: the correct predictions closest to flipping.</p>",
        _html_samples("correct", correct, image_root, thumb_size, "ascending")
        if correct else "<p>None.</p>",
        "</section>",
    ]
    document = "\n".join(
        [
            "<!DOCTYPE html>",
            "<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{e(str(title))}</title>",
            f"<style>{STYLE.replace('THUMB', str(thumb_size))}</style>",
            "</head><body>",
            *body,
            f"<script>{SORT_SCRIPT}</script>",
            "</body></html>",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- Markdown


def _md_cell(value, limit=None):
    text = _format_value(value) if not isinstance(value, str) else value
    text = " ".join(text.split())  # newlines and tabs would break the table row
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _md_samples(rows):
    lines = [
        "| # | path | label | score | prediction | confidence | text |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for index, row in enumerate(rows, start=1):
        text = row.get("text")
        text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
        lines.append(
            f"| {index} | {_md_cell(str(row['path']))} | {int(row['label'])} | {float(row['score']):.4f}"
            f" | {int(row['prediction'])} | {row['confidence']:.4f} | {_md_cell(text, MARKDOWN_TEXT_CHARS)} |"
        )
    return lines


def write_markdown_report(path, *, summary, samples):
    """Write ``test_report.md``: summary, misclassified samples (most confident first), then correct ones."""
    path = Path(path)
    misclassified, correct = prepare_samples(samples)
    total = len(misclassified) + len(correct)
    settings, columns = summary_tables(summary)
    lines = ["# Test report", ""]
    if settings:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {_md_cell(key)} | {_md_cell(value)} |" for key, value in settings]
        lines.append("")
    if columns:
        lines.append("| metric | " + " | ".join(_md_cell(name) for name, _ in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for metric in _metric_rows(columns):
            cells = [_md_cell(m[metric]) if metric in m else "" for _, m in columns]
            lines.append(f"| {_md_cell(str(metric))} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"## Misclassified ({len(misclassified)} of {total}), most confident first", ""]
    lines += _md_samples(misclassified) if misclassified else ["None."]
    lines += ["", f"## Correct ({len(correct)} of {total}), least confident first", ""]
    lines += _md_samples(correct) if correct else ["None."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
