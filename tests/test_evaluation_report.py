"""report.html lists errors by margin, stays small at any size (thumbnails as files), and escapes OCR text."""

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from mmcore.evaluation import write_html_report, write_markdown_report, write_plots
from mmcore.evaluation.plots import _training_curves_figure
from mmcore.evaluation.report import MAX_CORRECT, MAX_ERRORS, prepare_samples

HOSTILE_TEXT = "<script>alert('x')</script> buy <b>now</b> & save | 50%"


class ReportParser(HTMLParser):
    """Collects images, scripts, links and the rows of each samples table in document order."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.tags, self.large = [], [], 0, [], []
        self.tables = []  # (table id, [row attrs])
        self.rows = []  # every sample <tr> (it has data-margin), with the text of its OCR cell
        self._in_text_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            if "src" in attrs:  # the enlarge viewer's <img> gets its src on click
                self.images.append(attrs["src"])
            if "data-large" in attrs:
                self.large.append(attrs["data-large"])
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "script":
            self.scripts += 1
            assert "src" not in attrs
        if tag == "table" and "samples" in attrs.get("class", ""):
            self.tables.append((attrs["id"], []))
        if tag == "tr" and "data-margin" in attrs:
            row = dict(attrs, text="")
            self.tables[-1][1].append(row)
            self.rows.append(row)
        if tag == "td" and attrs.get("class") == "text":
            self._in_text_cell = True

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_text_cell = False

    def handle_data(self, data):
        if self._in_text_cell:
            self.rows[-1]["text"] += data


def make_image(path, size, fmt):
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)
    return path


@pytest.fixture
def samples(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    make_image(images / "a.jpg", (640, 480), "JPEG")
    make_image(images / "b.png", (100, 300), "PNG")
    Image.new("RGBA", (50, 50), (0, 0, 255, 128)).save(images / "c.png")
    (images / "corrupt.jpg").write_bytes(b"not an image at all")
    return [
        # wrong, margin logit(0.9) (predicted 1 with score 0.9)
        {"path": "a.jpg", "text": HOSTILE_TEXT, "label": 0, "score": 0.9, "prediction": 1},
        # wrong, margin logit(0.6) (predicted 0 with score 0.4)
        {"path": "b.png", "text": "plain", "label": 1, "score": 0.4, "prediction": 0},
        # wrong, margin logit(0.95), image missing
        {"path": "missing.jpg", "text": None, "label": 1, "score": 0.05, "prediction": 0},
        # right, margin logit(0.7)
        {"path": "c.png", "text": "ok", "label": 1, "score": 0.7, "prediction": 1},
        # right, margin logit(0.55), corrupt image
        {"path": "corrupt.jpg", "text": "", "label": 0, "score": 0.45, "prediction": 0},
        # right, margin logit(0.99), absolute path
        {"path": str(images / "a.jpg"), "text": "sure", "label": 1, "score": 0.99, "prediction": 1},
    ]


@pytest.fixture
def plots(tmp_path):
    return {
        "roc": make_image(tmp_path / "roc.png", (300, 200), "PNG"),
        "pr": make_image(tmp_path / "pr.png", (300, 200), "PNG"),
    }


SUMMARY = {
    "threshold": 0.42,
    "threshold_rule": "max F1 on validation (F1=0.800)",
    "test": {"at_0.5": {"auroc": 0.9, "f1": 0.8, "tp": 3}, "at_threshold": {"auroc": 0.9, "f1": None, "tp": 4}},
}


@pytest.fixture
def parsed(tmp_path, samples, plots):
    path = write_html_report(tmp_path / "run" / "report.html", title="Run <1>", summary=SUMMARY,
                             plots=plots, samples=samples, image_root=tmp_path / "images", thumb_size=64)
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    parser.page = path
    return parser


def test_thumbnails_are_files_beside_the_page_with_a_legible_large_copy(parsed):
    # plots outside the page's folder are embedded; the 4 thumbnails (a.jpg twice) are files
    assert sum(src.startswith("data:image/png") for src in parsed.images) == 2
    thumbs = [src for src in parsed.images if not src.startswith("data:")]
    assert len(thumbs) == 4 and len(set(thumbs)) == 3  # a.jpg is written once
    sizes = {}
    for src, large in zip(thumbs, parsed.large):
        assert src.startswith("report_files/") and large.startswith("report_files/")
        with Image.open(parsed.page.parent / src) as small, Image.open(parsed.page.parent / large) as big:
            assert max(small.size) <= 64
            sizes[max(big.size)] = big.size
    # a.jpg (640x480) keeps 640 px for the enlarged view; b.png (100x300) and c.png are not blown up
    assert sizes == {640: (640, 480), 300: (100, 300), 50: (50, 50)}


def test_self_contained(parsed):
    assert parsed.scripts == 1  # the inline script, nothing loaded from outside
    assert all(href.startswith("#") for href in parsed.links)
    assert "link" not in parsed.tags
    assert all(src.startswith(("data:", "report_files/")) for src in parsed.images)


def test_errors_by_largest_margin_then_correct_by_smallest(parsed):
    assert [name for name, _ in parsed.tables] == ["misclassified-table", "correct-table"]
    wrong, right = (rows for _, rows in parsed.tables)
    # threshold 0.5: margin = |logit(score)|
    assert [float(r["data-margin"]) for r in wrong] == pytest.approx([logit(0.95), logit(0.9), logit(0.6)], abs=1e-5)
    assert [float(r["data-margin"]) for r in right] == pytest.approx([logit(0.55), logit(0.7), logit(0.99)], abs=1e-5)
    assert [r["data-outcome"] for r in wrong] == ["FN", "FP", "FN"]
    assert all("wrong" in r["class"] for r in wrong) and all("right" in r["class"] for r in right)


def logit(p):
    return math.log(p / (1 - p))


def test_margin_is_measured_from_the_tuned_threshold_on_the_calibrated_score():
    # the demo: threshold 0.2529; 0.2522 is 0.0007 from flipping, 0.7128 is far
    samples = [
        {"path": "a", "text": "", "label": 1, "score": 0.9, "calibrated_score": 0.2522, "prediction": 0},
        {"path": "b", "text": "", "label": 0, "score": 0.1, "calibrated_score": 0.7128, "prediction": 1},
        {"path": "c", "text": "", "label": 1, "score": 0.3, "calibrated_score": 0.2611, "prediction": 1},
    ]
    errors, correct, counts = prepare_samples(samples, 0.2529)
    assert [r["path"] for r in errors] == ["b", "a"]
    assert errors[1]["margin"] == pytest.approx(abs(logit(0.2522) - logit(0.2529)))
    assert errors[0]["signed_margin"] == pytest.approx(logit(0.7128) - logit(0.2529))
    assert correct[0]["outcome"] == "TP" and counts == {"errors": 2, "correct": 1, "total": 3}


def test_ocr_text_is_escaped_not_markup(parsed):
    assert parsed.tags.count("script") == 1
    assert "b" not in parsed.tags
    assert any(row["text"] == HOSTILE_TEXT for row in parsed.rows)  # the text survives, as text


def test_missing_and_corrupt_images_get_placeholders(tmp_path, samples, plots):
    html = write_html_report(tmp_path / "r.html", title="t", summary=SUMMARY, plots=plots,
                             samples=samples, image_root=tmp_path / "images").read_text()
    assert "image not found" in html and "unreadable image" in html


def test_summary_table_shows_nested_metrics(tmp_path, samples):
    html = write_html_report(tmp_path / "r.html", title="Run <1>", summary=SUMMARY, plots={},
                             samples=samples, image_root=tmp_path / "images").read_text()
    assert "<title>Run &lt;1&gt;</title>" in html
    assert "test / at_0.5" in html and "test / at_threshold" in html
    assert "0.9000" in html and "n/a" in html


def markdown_rows(text):
    """The cells of every sample row of a Markdown table, split on unescaped pipes."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 8 and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_markdown_report_orders_by_margin_and_escapes(tmp_path, samples):
    long_text = "x" * 200 + "\nline two"
    samples = samples + [{"path": "long.jpg", "text": long_text, "label": 0, "score": 0.1, "prediction": 0}]
    text = write_markdown_report(tmp_path / "test_report.md", summary=SUMMARY, samples=samples).read_text()
    misclassified, correct = text.split("## Correct")
    assert [row[1] for row in markdown_rows(misclassified)] == ["missing.jpg", "a.jpg", "b.png"]
    # correct ones, smallest margin first: 0.55, 0.7, 0.9 (score 0.1 predicted 0), 0.99
    assert [row[1] for row in markdown_rows(correct)][:3] == ["corrupt.jpg", "c.png", "long.jpg"]
    assert markdown_rows(correct)[3][1].endswith("a.jpg")
    assert [float(row[6]) for row in markdown_rows(misclassified)] == pytest.approx(
        [logit(0.95), logit(0.9), logit(0.6)], abs=1e-3)

    hostile = markdown_rows(misclassified)[1]
    assert hostile[7] == HOSTILE_TEXT.replace("|", "\\|")  # the escaped pipe adds no column
    long_cell = markdown_rows(correct)[2][7]
    assert "line two" not in long_cell and long_cell.endswith("…") and len(long_cell) == 80
    assert "| threshold | 0.4200 |" in text
    assert "| f1 | 0.8000 | n/a |" in text


def synthetic_rows(tmp_path, n=10_000, seed=0):
    """``n`` scored rows over 20 small images, about 15% of them wrong, with long OCR text."""
    rng = np.random.default_rng(seed)
    images = tmp_path / "many"
    images.mkdir()
    for k in range(20):
        Image.new("RGB", (120 + k, 90), (10 * k, 100, 200)).save(images / f"{k}.jpg")
    labels = rng.integers(0, 2, n)
    logits = (labels * 2 - 1) * rng.gamma(2.0, 1.5, n) * np.where(rng.random(n) < 0.15, -1, 1)
    scores = 1 / (1 + np.exp(-logits))
    threshold = 0.3
    return [
        {"path": str(images / f"{i % 20}.jpg"), "text": f"offer {i} " + "lorem ipsum " * 40,
         "label": int(labels[i]), "score": float(scores[i]), "calibrated_score": float(scores[i]),
         "prediction": bool(scores[i] >= threshold)}
        for i in range(n)
    ], threshold


PAGE_BUDGET = 1_500_000  # bytes of report.html, whatever the size of the test set


def test_a_report_of_10000_rows_stays_under_budget_and_ranks_errors_by_margin(tmp_path):
    samples, threshold = synthetic_rows(tmp_path)
    out = tmp_path / "run"
    scores = np.array([s["calibrated_score"] for s in samples])
    labels = np.array([s["label"] for s in samples])
    plots = write_plots(out, scores=scores, labels=labels, threshold=threshold,
                        history=[{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}], selected_epoch=2)
    page = write_html_report(out / "report.html", title="big", summary=SUMMARY, plots=plots, samples=samples,
                             threshold=threshold)
    assert page.stat().st_size < PAGE_BUDGET
    parser = ReportParser()
    parser.feed(page.read_text(encoding="utf-8"))
    wrong, right = (rows for _, rows in parser.tables)
    n_errors = sum(s["label"] != s["prediction"] for s in samples)
    assert n_errors > MAX_ERRORS and len(wrong) == MAX_ERRORS and len(right) == MAX_CORRECT
    margins = [float(r["data-margin"]) for r in wrong]
    assert margins == sorted(margins, reverse=True)
    # the listed errors are the ones with the largest margins of all errors
    all_margins = sorted((abs(logit(min(max(s["calibrated_score"], 1e-12), 1 - 1e-12)) - logit(threshold))
                          for s in samples if s["label"] != s["prediction"]), reverse=True)
    assert margins == pytest.approx(all_margins[:MAX_ERRORS], abs=1e-5)
    assert [float(r["data-margin"]) for r in right] == sorted(float(r["data-margin"]) for r in right)
    assert all(src.startswith(("report_files/", "roc.png", "pr.png")) or src.endswith(".png") for src in parser.images)
    assert len(list((out / "report_files").iterdir())) == 2 * 20  # one small + one large per distinct image


def test_training_curves_mark_the_selected_epoch(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_auroc": 0.5 + e / 10} for e in (1, 2, 3)]
    figure = _training_curves_figure(history, selected_epoch=2)
    for ax in figure.axes:
        marks = [line for line in ax.get_lines() if line.get_label() == "selected epoch 2"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]


def test_report_shows_slices_modality_and_notes(tmp_path, samples):
    slices = {"text": [{"slice": "text present", "n": 5, "positives": 2, "errors": 2, "accuracy": 0.6, "f1": 0.5,
                        "auroc": 0.75}]}
    modality = {"mean_abs_text_contribution": 0.125, "flips_without_image": 3, "mean_gate": 0.625}
    rows = [dict(s, score_without_text=0.25, score_without_image=0.75, gate_mean=0.5) for s in samples]
    html = write_html_report(tmp_path / "r.html", title="t", summary=SUMMARY, plots={}, samples=rows,
                             image_root=tmp_path / "images", slices=slices, modality=modality,
                             notes=["saliency overlays need Captum"]).read_text()
    assert "OCR text present or empty" in html and "0.7500" in html
    assert "decisions that flip without the image" in html and "0.6250" in html
    assert "saliency overlays need Captum" in html
    assert html.count("data-notext='0.250000'") == len(samples)
