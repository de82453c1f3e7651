"""The audit and drift pages in headless Chromium: they load nothing from the network, the audit
page's filters (given label, OCR text, flagged only) hide the rows they should, thumbnails and
plots load, and a near-duplicate pair shows both images."""

import numpy as np
import pytest
from chromium import needs_chromium, requested_urls, visible
from PIL import Image, ImageDraw

from mmcore.evaluation.explain import slice_keys
from mmcore.quality import DuplicatePair, DuplicateSearch, LabelIssue, LabelIssues, label_noise_by_slice
from mmcore.quality.audit_page import write_audit_page

pytestmark = needs_chromium

# (given label, flagged, OCR text) of six audited rows, worst first
ROWS = [(1, True, "grandma's garden"), (0, True, "50% OFF"), (1, False, ""), (0, False, ""), (1, False, "SALE"),
        (0, False, "")]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(len(ROWS)):
        image = Image.new("RGB", (320, 240), (40 * k, 120, 200))
        ImageDraw.Draw(image).text((20, 20), f"ad {k}", fill="white")
        image.save(folder / f"{k}.jpg")
    return folder


@pytest.fixture
def audit_page(tmp_path, images):
    issues = LabelIssues(flagged=2, rows=tuple(
        LabelIssue(rank=k + 1, position=k, row=f"train:{k + 2}", file=f"{k}.jpg", given_label=label,
                   suggested_label=1 - label if flagged else label, oof_score=0.1 if label else 0.9,
                   label_quality=0.1 + k / 10, is_issue=flagged)
        for k, (label, flagged, _) in enumerate(ROWS)))
    texts = [text for _, _, text in ROWS]
    pair = DuplicatePair(first=0, second=4, first_split="train", second_split="test", similarity=0.97, exact=False)
    return write_audit_page(
        tmp_path / "audit" / "report.html", issues=issues, texts=texts,
        duplicates=DuplicateSearch(pairs=(pair,), found=1, threshold=0.95),
        duplicate_files=[f"{k}.jpg" for k in range(len(ROWS))], duplicate_texts=texts,
        noise=label_noise_by_slice(issues.mask(), slice_keys(texts)), image_root=images)


def shown_ranks(driver):
    return [int(row.get_attribute("data-rank")) for row in visible(driver, "tr.audit-row")]


def choose(driver, name, value):
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("css selector", f"#audit-filters select[name={name}]")).select_by_value(value)


def test_audit_page_filters_thumbnails_and_pairs(browser, audit_page):
    requested_urls(browser)  # drop what an earlier test left
    browser.get(audit_page.as_uri())
    assert browser.title == "Label audit"
    assert shown_ranks(browser) == [1, 2, 3, 4, 5, 6]
    assert browser.find_element("id", "audit-shown").text == "6"
    urls = requested_urls(browser)
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls
    loaded = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb')).map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * (len(ROWS) + 2)  # every row's thumbnail, and both sides of the pair

    choose(browser, "label", "1")
    assert shown_ranks(browser) == [1, 3, 5]
    choose(browser, "text", "empty")
    assert shown_ranks(browser) == [3]
    choose(browser, "label", "any")
    assert shown_ranks(browser) == [3, 4, 6] and browser.find_element("id", "audit-shown").text == "3"
    choose(browser, "text", "present")
    browser.find_element("css selector", "#audit-filters input[name=flagged]").click()
    assert shown_ranks(browser) == [1, 2]
    choose(browser, "text", "any")
    assert shown_ranks(browser) == [1, 2]
    first = visible(browser, "tr.audit-row")[0]
    assert [c.text for c in first.find_elements("css selector", "td")][2:7] == ["1", "0", "0.1000", "0.1000", "yes"]

    pair = browser.find_element("css selector", "#pairs-table tr.pair")
    assert "train: 0.jpg" in pair.text and "test: 4.jpg" in pair.text and "0.9700" in pair.text
    noise = browser.find_element("id", "noise").text
    assert "text present 3 2 0.6667" in noise  # 2 of the 3 rows with text are flagged

    # the report's viewer: a click enlarges the thumbnail
    thumb = visible(browser, "tr.audit-row img.thumb")[0]
    thumb.click()
    viewer = browser.find_element("id", "viewer")
    assert viewer.is_displayed()
    viewer.click()
    assert not viewer.is_displayed()


def test_drift_page_shows_the_verdict_plots_and_slices(browser, tmp_path):
    pytest.importorskip("sklearn")
    from mmcore.quality import build_profile, compare_to_profile
    from mmcore.quality.drift_page import write_drift_page

    rng = np.random.default_rng(0)
    texts = ["50% OFF", ""] * 100
    profile = build_profile(rng.beta(2, 5, 200), 0.4, texts, {"image": rng.normal(size=(200, 4))})
    report = compare_to_profile(profile, scores=rng.beta(5, 2, 150), texts=[""] * 150,
                                embeddings={"image": rng.normal(size=(150, 4)) + 2.0})
    page = write_drift_page(tmp_path / "drift.html", report)

    requested_urls(browser)
    browser.get(page.as_uri())
    assert browser.title == "Drift"
    verdict = browser.find_element("id", "verdict").text
    assert verdict.startswith("drift: image domain AUROC") and verdict.endswith("(exit code 10)")
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('#plots img')).map(i => [i.complete, i.naturalWidth > 300])")
    assert sizes == [[True, True], [True, True]]  # the score histograms and the domain AUROC
    urls = requested_urls(browser)
    assert urls and all(u.startswith("file://") for u in urls), urls
    slices = browser.find_element("id", "slices").text
    assert "text empty 100 150 0.5000 1.0000" in slices
