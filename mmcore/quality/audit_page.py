"""``audit/report.html``: the suspect labels with their images, near-duplicate pairs side by side,
and the label noise of each slice, in the style of the run's ``report.html``.

Plain HTML with the report's style, sorting and image viewer (:mod:`mmcore.evaluation.report`)
plus a small filter script of its own; thumbnails are JPEG files in ``report_files/`` beside the
page, nothing comes from the network. At most ``max_rows`` labels (worst first) and ``max_pairs``
pairs are listed, so the page stays small for any dataset.
"""

from __future__ import annotations

import html
from pathlib import Path

from mmcore.evaluation.report import (
    HTML_TEXT_CHARS,
    LARGE_SIZE,
    SCRIPT,
    THUMB_SIZE,
    VIEWER,
    _html_table,
    _resolve,
    write_thumbnails,
)
from mmcore.quality.noise import NOISE_LEVEL
from mmcore.quality.page import write_page

MAX_ROWS = 300
MAX_PAIRS = 200
NOISE_COLUMNS = ("slice", "n", "issues", "rate", "low", "high")

AUDIT_STYLE = """
#audit-filters { position: sticky; top: 0; background: #fff; padding: 0.5rem 0; border-bottom: 1px solid #ddd; z-index: 1; }
#audit-filters label { margin-right: 0.8rem; white-space: nowrap; }
tr.issue td.flag { color: #b00020; font-weight: 600; }
table.pairs td.thumb { width: auto; }
"""

AUDIT_FILTERS = """
<div id='audit-filters'>
  <strong>Show</strong>
  <label>given label <select name='label'><option value='any'>any</option><option value='0'>0</option>
    <option value='1'>1</option></select></label>
  <label>OCR text <select name='text'><option value='any'>any</option><option value='present'>present</option>
    <option value='empty'>empty</option></select></label>
  <label><input type='checkbox' name='flagged'> flagged only</label>
  <span class='note'><span id='audit-shown'></span> rows shown</span>
</div>
"""

AUDIT_SCRIPT = """
(function () {
  var filters = document.getElementById("audit-filters");
  function apply() {
    var label = filters.querySelector("select[name=label]").value;
    var text = filters.querySelector("select[name=text]").value;
    var flagged = filters.querySelector("input[name=flagged]").checked;
    var shown = 0;
    document.querySelectorAll("tr.audit-row").forEach(function (row) {
      var visible = (label === "any" || row.dataset.label === label) &&
        (text === "any" || (text === "present") === (row.dataset.hastext === "1")) &&
        (!flagged || row.dataset.issue === "1");
      row.hidden = !visible;
      if (visible) { shown += 1; }
    });
    document.getElementById("audit-shown").textContent = shown;
  }
  filters.addEventListener("change", apply);
  apply();
})();
"""


class _Thumbs:
    """Thumbnails for one page: JPEG copies in ``files_dir``, a placeholder for a bad image."""

    def __init__(self, files_dir, image_root, thumb_size, large_size):
        self.files_dir, self.image_root = Path(files_dir), image_root
        self.sizes = (int(thumb_size), int(large_size))

    def image(self, path):
        """The thumbnail of the image at ``path`` (click to enlarge), or a placeholder saying why not."""
        e = html.escape
        files, reason = write_thumbnails(_resolve(path, self.image_root), self.files_dir, self.sizes)
        if files is None:
            return f"<div class='missing' title='{e(reason)}'>{e(reason)}</div>"
        small, large = (f"{self.files_dir.name}/{f.name}" for f in files)
        return f"<img class='thumb' src='{e(small)}' data-large='{e(large)}' alt='{e(str(path))}' loading='lazy'>"


def _shown_text(text):
    text = "" if text is None else str(text)
    return text if len(text) <= HTML_TEXT_CHARS else text[: HTML_TEXT_CHARS - 1] + "…"


def _issue_rows(issues, texts, thumbs, max_rows):
    e = html.escape
    headers = [("#", "rank"), ("image", None), ("given", "label"), ("suggested", "suggested"),
               ("OOF score", "oof"), ("label quality", "quality"), ("flagged", None), ("OCR text", None),
               ("row", None), ("file", None)]
    parts = ["<table class='samples' id='issues-table'><thead><tr>"]
    for header, key in headers:
        sort = f" data-sort='{key}' title='click to sort'" if key else ""
        parts.append(f"<th{sort}>{e(header)}</th>")
    parts.append("</tr></thead><tbody>")
    for r in issues.rows[:max_rows]:
        text = "" if texts[r.position] is None else str(texts[r.position])
        data = {"rank": r.rank, "label": r.given_label, "suggested": r.suggested_label, "oof": f"{r.oof_score:.6f}",
                "quality": f"{r.label_quality:.6f}", "issue": int(r.is_issue), "hastext": int(bool(text.strip()))}
        attributes = " ".join(f"data-{k}='{v}'" for k, v in data.items())
        css = "issue" if r.is_issue else "clean"
        parts.append(
            f"<tr class='sample audit-row {css}' {attributes}><td class='num'>{r.rank}</td><td class='thumb'>{thumbs.image(r.file)}</td>"
            f"<td class='num'>{r.given_label}</td><td class='num'>{r.suggested_label}</td>"
            f"<td class='num'>{r.oof_score:.4f}</td><td class='num'>{r.label_quality:.4f}</td>"
            f"<td class='flag'>{'yes' if r.is_issue else ''}</td><td class='text'><div>{e(_shown_text(text))}</div></td>"
            f"<td class='path'>{e(r.row)}</td><td class='path'>{e(r.file)}</td></tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _pair_rows(duplicates, files, texts, thumbs, max_pairs):
    e = html.escape
    parts = ["<table class='pairs' id='pairs-table'><thead><tr><th>#</th><th>first</th><th>second</th>"
             "<th>similarity</th><th>exact copy</th><th>splits</th></tr></thead><tbody>"]
    for k, pair in enumerate(duplicates.pairs[:max_pairs], start=1):
        sides = []
        for position, split in ((pair.first, pair.first_split), (pair.second, pair.second_split)):
            sides.append(f"<td class='thumb'>{thumbs.image(files[position])}<div class='path'>{e(split)}:"
                         f" {e(str(files[position]))}</div><div class='note'>{e(_shown_text(texts[position])[:120])}</div></td>")
        css = "cross" if pair.cross_split else "within"
        parts.append(f"<tr class='pair {css}'><td class='num'>{k}</td>{sides[0]}{sides[1]}"
                     f"<td class='num'>{pair.similarity:.4f}</td><td>{'yes' if pair.exact else ''}</td>"
                     f"<td>{e(pair.first_split)} / {e(pair.second_split)}</td></tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def write_audit_page(path, *, issues, texts, duplicates=None, duplicate_files=None, duplicate_texts=None, noise=None,
                     image_root=None, title="Label audit", max_rows=MAX_ROWS, max_pairs=MAX_PAIRS,
                     thumb_size=THUMB_SIZE, large_size=LARGE_SIZE, notes=()):
    """Write the audit page (thumbnails under ``<stem>_files/`` beside it) and return its Path.

    ``issues``: :class:`~mmcore.quality.label_issues.LabelIssues`; ``texts``: the OCR text of each
    audited position; ``duplicates``: a :class:`~mmcore.quality.duplicates.DuplicateSearch` with the
    file and text of each of its positions; ``noise``: :func:`~mmcore.quality.noise.label_noise_by_slice`.
    Relative image paths resolve against ``image_root``.
    """
    e = html.escape
    path = Path(path)
    if duplicates is not None and duplicate_files is None:
        raise ValueError("near-duplicate pairs need duplicate_files: the file of each position they name")
    duplicate_texts = duplicate_texts if duplicate_texts is not None else [""] * len(duplicate_files or ())
    thumbs = _Thumbs(path.parent / f"{path.stem}_files", image_root, thumb_size, large_size)
    listed = min(len(issues.rows), int(max_rows))
    body = [f"<h1>{e(str(title))}</h1>",
            "<nav><a href='#issues'>Label issues</a><a href='#duplicates'>Near duplicates</a>"
            "<a href='#noise'>Label noise per slice</a></nav>",
            "<section id='summary'><h2>Summary</h2>",
            _html_table(["", "value"], [["labelled rows audited", len(issues.rows)],
                                        ["flagged by cleanlab", issues.flagged],
                                        ["near-duplicate pairs", duplicates.found if duplicates else "not searched"]])]
    body += [f"<p class='note'>{e(str(note))}</p>" for note in notes]
    body += ["</section>", AUDIT_FILTERS,
             f"<section id='issues'><h2>Label issues ({issues.flagged} flagged; the {listed} most suspect of "
             f"{len(issues.rows)} listed)</h2>",
             "<p class='note'>Worst first: the rows cleanlab flags, lowest label quality first, then the others."
             " The OOF score is the out-of-fold probability of label 1 (from a head that never saw the row);"
             " the label quality is that probability for the given label. Click a thumbnail to enlarge it,"
             " a column header to sort.</p>",
             _issue_rows(issues, texts, thumbs, listed), "</section>"]
    if duplicates is not None:
        shown = min(len(duplicates.pairs), int(max_pairs))
        body += [f"<section id='duplicates'><h2>Near-duplicate pairs ({duplicates.found}; {shown} listed)</h2>",
                 f"<p class='note'>Cosine similarity of the embeddings &gt;= {duplicates.threshold:.3g}, most similar"
                 " first; an exact copy has the same file bytes.</p>",
                 _pair_rows(duplicates, duplicate_files, duplicate_texts, thumbs, shown) if shown else "<p>None.</p>",
                 "</section>"]
    if noise:
        body += ["<section id='noise'><h2>Label noise per slice</h2>",
                 f"<p class='note'>Share of each slice's labels that cleanlab flags, with its {NOISE_LEVEL:.0%}"
                 " Wilson interval (low, high).</p>"]
        for family, rows in noise.items():
            body += [f"<h3>{e(family)}</h3>", _html_table(NOISE_COLUMNS, [[r[c] for c in NOISE_COLUMNS] for r in rows])]
        body.append("</section>")
    body.append(VIEWER)
    return write_page(path, title=title, body=body, style=AUDIT_STYLE, scripts=(SCRIPT, AUDIT_SCRIPT),
                      thumb_size=thumb_size)
