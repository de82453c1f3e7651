"""report.html is self-contained, orders samples by correctness and confidence, and escapes OCR text."""

import base64
import io
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from mmcore.evaluation import write_html_report, write_markdown_report

HOSTILE_TEXT = "<script>alert('x')</script> buy <b>now</b> & save | 50%"


class ReportParser(HTMLParser):
    """Collects images, scripts, links and the rows of each samples table in document order."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.tags = [], [], 0, []
        self.tables = []  # (table id, [row attrs])
        self.rows = []  # every <tr> with data-confidence, with the text of its cells
        self._in_text_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "script":
            self.scripts += 1
            assert "src" not in attrs
        if tag == "table" and "samples" in attrs.get("class", ""):
            self.tables.append((attrs["id"], []))
        if tag == "tr" and "data-confidence" in attrs:
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
        # wrong, confidence 0.9 (predicted 1 with score 0.9)
        {"path": "a.jpg", "text": HOSTILE_TEXT, "label": 0, "score": 0.9, "prediction": 1},
        # wrong, confidence 0.6 (predicted 0 with score 0.4)
        {"path": "b.png", "text": "plain", "label": 1, "score": 0.4, "prediction": 0},
        # wrong, confidence 0.95, image missing
        {"path": "missing.jpg", "text": None, "label": 1, "score": 0.05, "prediction": 0},
        # right, confidence 0.7
        {"path": "c.png", "text": "ok", "label": 1, "score": 0.7, "prediction": 1},
        # right, confidence 0.55, corrupt image
        {"path": "corrupt.jpg", "text": "", "label": 0, "score": 0.45, "prediction": 0},
        # right, confidence 0.99, absolute path
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
    return parser


def test_every_image_is_an_embedded_loadable_image(parsed):
    # 2 plots + 4 thumbnails (a.jpg, b.png, c.png, a.jpg again); missing and corrupt get placeholders
    assert len(parsed.images) == 6
    for src in parsed.images:
        header, _, payload = src.partition(",")
        assert header in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.load()
            assert max(image.size) <= 300


def test_thumbnails_are_shrunk_to_thumb_size(parsed):
    thumbs = [s for s in parsed.images if s.startswith("data:image/jpeg")]
    assert len(thumbs) == 4
    for src in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))) as image:
            assert max(image.size) <= 64


def test_self_contained(parsed):
    assert parsed.scripts == 1  # the inline sort script, nothing loaded from outside
    assert all(href.startswith("#") for href in parsed.links)
    assert "link" not in parsed.tags


def test_misclassified_first_then_correct_each_sorted_by_confidence(parsed):
    assert [name for name, _ in parsed.tables] == ["misclassified-table", "correct-table"]
    wrong, right = (rows for _, rows in parsed.tables)
    assert [float(r["data-confidence"]) for r in wrong] == pytest.approx([0.95, 0.9, 0.6])
    assert [float(r["data-confidence"]) for r in right] == pytest.approx([0.55, 0.7, 0.99])
    assert all(r["class"] == "wrong" for r in wrong) and all(r["class"] == "right" for r in right)


def test_ocr_text_is_escaped_not_markup(parsed):
    assert parsed.tags.count("script") == 1
    assert "b" not in parsed.tags
    assert parsed.rows[1]["text"] == HOSTILE_TEXT  # the text survives, as text


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
        if len(cells) == 7 and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_markdown_report_orders_and_escapes(tmp_path, samples):
    long_text = "x" * 200 + "\nline two"
    samples = samples + [{"path": "long.jpg", "text": long_text, "label": 0, "score": 0.1, "prediction": 0}]
    text = write_markdown_report(tmp_path / "test_report.md", summary=SUMMARY, samples=samples).read_text()
    misclassified, correct = text.split("## Correct")
    assert [row[1] for row in markdown_rows(misclassified)] == ["missing.jpg", "a.jpg", "b.png"]
    # correct ones, least confident first: 0.55, 0.7, 0.9 (score 0.1 predicted 0), 0.99
    assert [row[1] for row in markdown_rows(correct)][:3] == ["corrupt.jpg", "c.png", "long.jpg"]
    assert markdown_rows(correct)[3][1].endswith("a.jpg")

    hostile = markdown_rows(misclassified)[1]
    assert hostile[6] == HOSTILE_TEXT.replace("|", "\\|")  # the escaped pipe adds no column
    long_cell = markdown_rows(correct)[2][6]
    assert "line two" not in long_cell and long_cell.endswith("…") and len(long_cell) == 80
    assert "| threshold | 0.4200 |" in text
    assert "| f1 | 0.8000 | n/a |" in text
