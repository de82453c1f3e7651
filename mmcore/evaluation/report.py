"""Error reports of a run: ``report.html`` (with its thumbnails in ``report_files/``) and ``test_report.md``.

Both show the misclassified samples first, then the correct ones nearest the threshold, ranked
by their **margin**: the distance of the decision from the threshold in logit space,
``|logit(calibrated_score) - logit(threshold)|`` (see :func:`mmcore.evaluation.explain.margin`).
Errors come largest margin first (the surest mistakes), correct rows smallest margin first
(the ones closest to flipping). A page stays small at any size: at most ``max_errors`` errors
and ``max_correct`` correct rows are listed, and thumbnails are JPEG files beside the page,
loaded lazily, never embedded.

A sample is a dict with ``path, text, label, score`` (raw, ``sigmoid(logit)``),
``calibrated_score`` (``sigmoid(logit / temperature)``; the decision uses it; defaults to
``score``) and ``prediction``; optionally ``score_without_text``, ``score_without_image``,
``gate_mean`` (modality contribution) and ``saliency`` (a file name relative to the page).
"""

import base64
import hashlib
import html
import json
import math
import numbers
from pathlib import Path

from mmcore.data.images import BadImageError
from mmcore.evaluation.explain import margin

MARKDOWN_TEXT_CHARS = 80
HTML_TEXT_CHARS = 1000
MAX_ERRORS = 300
MAX_CORRECT = 100
THUMB_SIZE = 200
LARGE_SIZE = 640  # an ad's small print is legible at this size


def _text(value):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def outcome(label, prediction):
    """``"TP"``, ``"TN"``, ``"FP"`` or ``"FN"``."""
    return ("T" if bool(label) == bool(prediction) else "F") + ("P" if prediction else "N")


def prepare_samples(samples, threshold=0.5, *, max_errors=MAX_ERRORS, max_correct=MAX_CORRECT):
    """``(misclassified, correct, counts)``: the rows the reports list, ranked by margin.

    Each row is a copy with ``calibrated_score`` (``score`` when absent), ``margin`` (absolute,
    logit space), ``signed_margin``, ``outcome`` and ``correct`` added. ``misclassified``: the
    ``max_errors`` errors with the largest margin, largest first; ``correct``: the
    ``max_correct`` correct rows with the smallest margin, smallest first. ``counts`` holds the
    totals (``errors``, ``correct``, ``total``) before the caps.
    """
    rows = []
    for sample in samples:
        row = dict(sample)
        row["calibrated_score"] = float(sample.get("calibrated_score", sample["score"]))
        row["score"] = float(sample["score"])
        row["prediction"] = int(bool(sample["prediction"]))
        row["label"] = int(bool(sample["label"]))
        row["signed_margin"] = float(margin(row["calibrated_score"], threshold))
        row["margin"] = abs(row["signed_margin"])
        row["correct"] = row["label"] == row["prediction"]
        row["outcome"] = outcome(row["label"], row["prediction"])
        rows.append(row)
    errors = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["margin"])
    right = sorted((r for r in rows if r["correct"]), key=lambda r: r["margin"])
    counts = {"errors": len(errors), "correct": len(right), "total": len(rows)}
    return errors[:max_errors], right[:max_correct], counts


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


def _open_rgb(path, size):
    """The image at ``path`` read like every other image (:func:`mmcore.data.images.load_rgb`:
    allowed formats only, EXIF orientation applied, transparency on white), decoded at about ``size``."""
    from mmcore.data.images import load_rgb

    return load_rgb(path, target_size=(size, size))


def write_thumbnails(path, files_dir, sizes):
    """JPEG copies of the image at ``path`` no larger than each of ``sizes``, in ``files_dir``.

    Returns ``([file path per size], None)`` or ``(None, reason)`` for a missing or unreadable
    image. The names hash the source path, so a path listed twice is written once.
    """
    key = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:16]
    targets = [Path(files_dir) / f"{key}_{size}.jpg" for size in sizes]
    if all(t.is_file() for t in targets):
        return targets, None
    try:
        image = _open_rgb(path, max(sizes))
        Path(files_dir).mkdir(parents=True, exist_ok=True)
        for size, target in zip(sizes, targets):
            copy = image.copy()
            copy.thumbnail((size, size))
            copy.save(target, format="JPEG", quality=82 if size <= THUMB_SIZE else 85)
    except BadImageError as error:
        return None, "image not found" if str(error) == "image not found" else f"unreadable image ({error})"
    except Exception as error:  # any unreadable image is reported in place, never fatal
        return None, f"unreadable image ({type(error).__name__})"
    return targets, None


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
td.thumb img { max-width: THUMBpx; max-height: THUMBpx; cursor: zoom-in; }
.missing { width: THUMBpx; height: 80px; display: flex; align-items: center; justify-content: center;
           background: repeating-linear-gradient(45deg, #f3f3f3, #f3f3f3 8px, #e6e6e6 8px, #e6e6e6 16px);
           color: #777; font-size: 0.8rem; text-align: center; }
td.text { max-width: 36rem; white-space: pre-wrap; word-break: break-word; font-size: 0.9rem; }
td.text div { max-height: 10rem; overflow: auto; }
td.path { font-family: ui-monospace, monospace; font-size: 0.8rem; overflow-wrap: anywhere;
          min-width: 8rem; max-width: 14rem; }
tr.wrong td.outcome { color: #b00020; font-weight: 600; }
tr.right td.outcome { color: #1b7f3b; font-weight: 600; }
.note { color: #555; }
#filters { position: sticky; top: 0; background: #fff; padding: 0.5rem 0; border-bottom: 1px solid #ddd; z-index: 1; }
#filters label { margin-right: 0.8rem; white-space: nowrap; }
#filters input[type=search] { width: 18rem; }
#viewer { position: fixed; inset: 0; background: rgba(0, 0, 0, 0.85); display: none; align-items: center;
          justify-content: center; gap: 1rem; z-index: 10; cursor: zoom-out; flex-wrap: wrap; }
#viewer.open { display: flex; }
#viewer img { max-width: 48vw; max-height: 90vh; background: #fff; }
#viewer figcaption { color: #eee; text-align: center; }
#viewer figure { margin: 0; }
"""

SCRIPT = """
(function () {
  function sortTable(th) {
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
  }
  document.querySelectorAll("table.samples th[data-sort]").forEach(function (th) {
    th.addEventListener("click", function () { sortTable(th); });
  });

  var filters = document.getElementById("filters");
  function applyFilters() {
    var outcomes = {};
    filters.querySelectorAll("input[name=outcome]").forEach(function (box) { outcomes[box.value] = box.checked; });
    var text = filters.querySelector("select[name=text]").value;
    var query = filters.querySelector("input[name=search]").value.trim().toLowerCase();
    var shown = 0;
    document.querySelectorAll("tr.sample").forEach(function (row) {
      var visible = outcomes[row.dataset.outcome] &&
        (text === "any" || (text === "present") === (row.dataset.hastext === "1")) &&
        (!query || row.textContent.toLowerCase().indexOf(query) >= 0);
      row.hidden = !visible;
      if (visible) { shown += 1; }
    });
    document.getElementById("shown").textContent = shown;
  }
  if (filters) {
    filters.addEventListener("input", applyFilters);
    filters.addEventListener("change", applyFilters);
    applyFilters();
  }

  var viewer = document.getElementById("viewer");
  document.querySelectorAll("img.thumb").forEach(function (img) {
    img.addEventListener("click", function () {
      var large = viewer.querySelector("img.large"), saliency = viewer.querySelector("figure.saliency");
      large.src = img.dataset.large;
      viewer.querySelector("figcaption.caption").textContent = img.alt;
      if (img.dataset.saliency) {
        saliency.querySelector("img").src = img.dataset.saliency;
        saliency.hidden = false;
      } else {
        saliency.hidden = true;
      }
      viewer.classList.add("open");
    });
  });
  function close() { viewer.classList.remove("open"); }
  viewer.addEventListener("click", close);
  document.addEventListener("keydown", function (event) { if (event.key === "Escape") { close(); } });
})();
"""

SORTABLE = {"label": "label", "score": "score", "calibrated_score": "calibrated", "margin": "margin",
            "prediction": "prediction", "w/o text": "notext", "w/o image": "noimage", "gate": "gate"}


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
    "roc": "ROC curve (calibrated_score)",
    "pr": "Precision-recall curve (calibrated_score)",
    "reliability": "Reliability diagram (score and calibrated_score)",
    "score_hist": "calibrated_score histogram per true class",
    "confusion": "Confusion matrix at the threshold (calibrated_score)",
    "training_curves": "Training curves (dashed line: the selected epoch)",
}


def _html_plots(plots, page_dir):
    """Plots beside the page are linked by name; others are embedded (a bounded handful)."""
    from PIL import Image

    e = html.escape
    parts = ["<div class='plots'>"]
    for name, path in plots.items():
        path = Path(path)
        caption = e(PLOT_CAPTIONS.get(name, str(name)))
        try:
            with Image.open(path) as image:
                wide = image.width > 1.8 * image.height  # e.g. training curves side by side
        except OSError:
            parts.append(f"<figure><div class='missing'>plot {e(path.name)} missing</div>"
                         f"<figcaption>{caption}</figcaption></figure>")
            continue
        if path.resolve().parent == Path(page_dir).resolve():
            src = e(path.name)
        else:
            src = _data_uri(path.read_bytes(), "image/png")
        css = " class='wide'" if wide else ""
        parts.append(f"<figure{css}><img src='{src}' alt='{caption}'><figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)


def _has_modality(rows):
    return any(r.get("score_without_text") is not None for r in rows)


def _num(value, digits=4):
    return "" if value is None else f"{float(value):.{digits}f}"


def _html_samples(section_id, rows, *, image_root, files_dir, thumb_size, large_size, initial_sort, modality):
    e = html.escape
    headers = ["#", "image", "outcome", "label", "prediction", "score", "calibrated_score", "margin"]
    if modality:
        headers += ["w/o text", "w/o image", "gate"]
    headers += ["OCR text", "path"]
    parts = [f"<table class='samples' id='{section_id}-table'><thead><tr>"]
    for header in headers:
        key = SORTABLE.get(header)
        if key is None:
            parts.append(f"<th>{e(header)}</th>")
            continue
        aria = f" aria-sort='{initial_sort}'" if key == "margin" else ""
        parts.append(f"<th data-sort='{key}' title='click to sort'{aria}>{e(header)}</th>")
    parts.append("</tr></thead><tbody>")
    for index, row in enumerate(rows, start=1):
        files, reason = write_thumbnails(_resolve(row["path"], image_root), files_dir, (thumb_size, large_size))
        if files is None:
            thumb = f"<div class='missing' title='{e(reason)}'>{e(reason)}</div>"
        else:
            small, large = (f"{files_dir.name}/{f.name}" for f in files)
            saliency = f" data-saliency='{e(row['saliency'])}'" if row.get("saliency") else ""
            thumb = (f"<img class='thumb' src='{e(small)}' data-large='{e(large)}'{saliency}"
                     f" alt='{e(str(row['path']))}' loading='lazy'>")
        text = _text(row.get("text"))
        shown_text = text if len(text) <= HTML_TEXT_CHARS else text[: HTML_TEXT_CHARS - 1] + "…"
        css = "right" if row["correct"] else "wrong"
        data = {
            "outcome": row["outcome"], "hastext": int(bool(text.strip())), "label": row["label"],
            "prediction": row["prediction"], "score": f"{row['score']:.6f}",
            "calibrated": f"{row['calibrated_score']:.6f}", "margin": f"{row['margin']:.6f}",
        }
        cells = [
            f"<td class='num'>{index}</td>", f"<td class='thumb'>{thumb}</td>",
            f"<td class='outcome'>{row['outcome']}</td>", f"<td class='num'>{row['label']}</td>",
            f"<td class='num'>{row['prediction']}</td>", f"<td class='num'>{row['score']:.4f}</td>",
            f"<td class='num'>{row['calibrated_score']:.4f}</td>", f"<td class='num'>{row['margin']:.3f}</td>",
        ]
        if modality:
            for key, name in (("score_without_text", "notext"), ("score_without_image", "noimage"), ("gate_mean", "gate")):
                value = row.get(key)
                data[name] = "" if value is None else f"{float(value):.6f}"
                cells.append(f"<td class='num'>{_num(value)}</td>")
        cells += [f"<td class='text'><div>{e(shown_text)}</div></td>", f"<td class='path'>{e(str(row['path']))}</td>"]
        attributes = " ".join(f"data-{k}='{e(str(v))}'" for k, v in data.items())
        parts.append(f"<tr class='sample {css}' {attributes}>{''.join(cells)}</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


FILTERS = """
<div id='filters'>
  <strong>Show</strong>
  <label><input type='checkbox' name='outcome' value='FP' checked> FP (false positive)</label>
  <label><input type='checkbox' name='outcome' value='FN' checked> FN (false negative)</label>
  <label><input type='checkbox' name='outcome' value='TP' checked> TP</label>
  <label><input type='checkbox' name='outcome' value='TN' checked> TN</label>
  <label>OCR text <select name='text'><option value='any'>any</option><option value='present'>present</option>
    <option value='empty'>empty</option></select></label>
  <label>Search <input type='search' name='search' placeholder='OCR text or path'></label>
  <span class='note'><span id='shown'></span> rows shown</span>
</div>
"""

VIEWER = """
<div id='viewer' title='click or Esc to close'>
  <figure><img class='large' alt='enlarged image'><figcaption class='caption'></figcaption></figure>
  <figure class='saliency' hidden><img alt='saliency overlay'><figcaption>Grad-CAM: what pushed the
    score towards the predicted class</figcaption></figure>
</div>
"""


def _html_table(headers, rows):
    e = html.escape
    parts = ["<table><thead><tr>", *(f"<th>{e(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td class='num'>{e(_format_value(v))}</td>" if not isinstance(v, str)
                                      else f"<td>{e(v)}</td>" for v in row) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


SLICE_TITLES = {"text": "OCR text present or empty", "ocr_length": "OCR text length", "aspect_ratio": "Image aspect ratio",
                "image_size": "Image size"}
SLICE_COLUMNS = ("slice", "n", "positives", "errors", "accuracy", "f1", "auroc")


def _slice_rows(rows):
    return [[r.get(c) for c in SLICE_COLUMNS] for r in rows]


def _modality_rows(modality):
    labels = {
        "mean_abs_text_contribution": "mean |calibrated_score - score without text|",
        "mean_abs_image_contribution": "mean |calibrated_score - score without image|",
        "flips_without_text": "decisions that flip without the text",
        "flips_without_image": "decisions that flip without the image",
        "text_only_auroc": "AUROC with the image removed",
        "image_only_auroc": "AUROC with the text removed",
        "mean_gate": "mean GMU gate (1 = image, 0 = text)",
    }
    return [[labels[k], modality[k]] for k in labels if k in modality]


def write_html_report(path, *, title, summary, plots, samples, threshold=0.5, image_root=None, thumb_size=THUMB_SIZE,
                      large_size=LARGE_SIZE, max_errors=MAX_ERRORS, max_correct=MAX_CORRECT, slices=None,
                      modality=None, notes=()):
    """Write ``report.html`` (thumbnails under ``<stem>_files/`` beside it) and return its Path.

    Sections: summary metrics (each column names the score it uses), plots, modality
    contribution and slice metrics when given, then the misclassified and the nearest-correct
    samples ranked by margin (see the module docstring), with FP/FN/TP/TN and text filters, a
    search box and click-to-enlarge (``large_size`` px, plus the saliency overlay where there is
    one). Plain HTML and a little inline JavaScript: no script, font or style from elsewhere.
    Relative sample paths resolve against ``image_root``; a missing or unreadable image shows a
    placeholder.
    """
    e = html.escape
    path = Path(path)
    files_dir = path.parent / f"{path.stem}_files"
    misclassified, correct, counts = prepare_samples(samples, threshold, max_errors=max_errors, max_correct=max_correct)
    modality_columns = _has_modality(misclassified + correct)
    table_args = dict(image_root=image_root, files_dir=files_dir, thumb_size=int(thumb_size),
                      large_size=int(large_size), modality=modality_columns)
    nav = ["<a href='#summary'>Summary</a>", "<a href='#plots'>Plots</a>" if plots else "",
           "<a href='#modality'>Modality contribution</a>" if modality else "",
           "<a href='#slices'>Slices</a>" if slices else "",
           f"<a href='#misclassified'>Misclassified ({counts['errors']})</a>",
           f"<a href='#correct'>Correct nearest the threshold ({len(correct)} of {counts['correct']})</a>"]
    body = [f"<h1>{e(str(title))}</h1>", "<nav>" + "".join(nav) + "</nav>",
            "<section id='summary'><h2>Summary</h2>", _html_summary(summary)]
    body += [f"<p class='note'>{e(str(note))}</p>" for note in notes]
    body.append("</section>")
    if plots:
        body += ["<section id='plots'><h2>Plots</h2>", _html_plots(plots, path.parent), "</section>"]
    if modality:
        body += ["<section id='modality'><h2>Modality contribution</h2>",
                 "<p class='note'>Each test sample scored again with its text features zeroed and with its image"
                 " features zeroed (as <code>train.modality_dropout</code> trains); the columns w/o text and w/o"
                 " image of the tables below are those calibrated scores.</p>",
                 _html_table(["", "value"], _modality_rows(modality)), "</section>"]
    if slices:
        body += ["<section id='slices'><h2>Slices</h2>",
                 f"<p class='note'>Metrics at the threshold {threshold:.4g} on calibrated_score, per slice of the test set.</p>"]
        for family, rows in slices.items():
            body += [f"<h3>{e(SLICE_TITLES.get(family, family))}</h3>", _html_table(SLICE_COLUMNS, _slice_rows(rows))]
        body.append("</section>")
    body.append(FILTERS)
    shown_errors = (f"the {len(misclassified)} with the largest margin" if len(misclassified) < counts["errors"]
                    else "all")
    body += [
        f"<section id='misclassified'><h2>Misclassified samples ({counts['errors']} of {counts['total']}; {shown_errors}"
        " listed)</h2>",
        "<p class='note'>Largest margin first: the surest mistakes. The margin is the distance from the threshold in"
        f" logit space, |logit(calibrated_score) - logit({threshold:.4g})|; the decision is calibrated_score &gt;="
        " threshold. Click a thumbnail to enlarge it, a column header to sort.</p>",
        _html_samples("misclassified", misclassified, initial_sort="descending", **table_args)
        if misclassified else "<p>None.</p>",
        "</section>",
        f"<section id='correct'><h2>Correct samples nearest the threshold ({len(correct)} of {counts['correct']})</h2>",
        "<p class='note'>Smallest margin first: the correct decisions closest to flipping.</p>",
        _html_samples("correct", correct, initial_sort="ascending", **table_args) if correct else "<p>None.</p>",
        "</section>",
        VIEWER,
    ]
    document = "\n".join(
        [
            "<!DOCTYPE html>",
            "<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{e(str(title))}</title>",
            f"<style>{STYLE.replace('THUMB', str(int(thumb_size)))}</style>",
            "</head><body>",
            *body,
            f"<script>{SCRIPT}</script>",
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
        "| # | path | outcome | label | score | calibrated_score | margin | text |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for index, row in enumerate(rows, start=1):
        lines.append(
            f"| {index} | {_md_cell(str(row['path']))} | {row['outcome']} | {row['label']} | {row['score']:.4f}"
            f" | {row['calibrated_score']:.4f} | {row['margin']:.3f} | {_md_cell(_text(row.get('text')), MARKDOWN_TEXT_CHARS)} |"
        )
    return lines


def _md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def write_markdown_report(path, *, summary, samples, threshold=0.5, max_errors=MAX_ERRORS, max_correct=MAX_CORRECT,
                          slices=None, modality=None, notes=()):
    """Write ``test_report.md``: summary, errors (largest margin first), then the correct rows nearest the threshold."""
    path = Path(path)
    misclassified, correct, counts = prepare_samples(samples, threshold, max_errors=max_errors, max_correct=max_correct)
    settings, columns = summary_tables(summary)
    lines = ["# Test report", ""]
    if settings:
        lines += _md_table(["setting", "value"], settings) + [""]
    if columns:
        lines.append("| metric | " + " | ".join(_md_cell(name) for name, _ in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for metric in _metric_rows(columns):
            cells = [_md_cell(m[metric]) if metric in m else "" for _, m in columns]
            lines.append(f"| {_md_cell(str(metric))} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [str(note) for note in notes] + ([""] if notes else [])
    if modality:
        lines += ["## Modality contribution", ""] + _md_table(["", "value"], _modality_rows(modality)) + [""]
    if slices:
        lines += ["## Slices (calibrated_score at the threshold)", ""]
        for family, rows in slices.items():
            lines += [f"### {SLICE_TITLES.get(family, family)}", ""] + _md_table(SLICE_COLUMNS, _slice_rows(rows)) + [""]
    lines += [
        f"## Misclassified ({counts['errors']} of {counts['total']}, {len(misclassified)} listed), largest margin first",
        "",
        f"margin = |logit(calibrated_score) - logit({threshold:.4g})|; the decision is calibrated_score >= threshold.",
        "",
    ]
    lines += _md_samples(misclassified) if misclassified else ["None."]
    lines += ["", f"## Correct nearest the threshold ({len(correct)} of {counts['correct']}), smallest margin first", ""]
    lines += _md_samples(correct) if correct else ["None."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
