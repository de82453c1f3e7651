"""report.html in a real browser (headless Chromium through Selenium): it renders, loads nothing
from the network, its filters hide the rows they should, and a thumbnail enlarges.

Chromium and its driver come from Debian (``scripts/install-test-deps.sh``); without them the
tests are skipped with the reason.
"""

import pytest
from chromium import needs_chromium, requested_urls, visible
from PIL import Image, ImageDraw

from mmcore.evaluation import write_html_report

pytestmark = needs_chromium


@pytest.fixture
def page(tmp_path):
    """A report with one sample of each outcome, two of them without OCR text."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    cases = [  # (label, prediction, score, text)
        (0, 1, 0.9, "MEGA SALE 50% OFF"),  # FP
        (1, 0, 0.1, ""),  # FN, no text
        (1, 1, 0.8, "buy now"),  # TP
        (0, 0, 0.2, ""),  # TN, no text
        (0, 0, 0.3, "grandma's garden"),  # TN
    ]
    for k, (label, prediction, score, text) in enumerate(cases):
        image = Image.new("RGB", (800, 600), (40 * k, 120, 200))
        ImageDraw.Draw(image).text((20, 20), f"ad {k}", fill="white")
        image.save(images / f"{k}.jpg")
        rows.append({"path": f"{k}.jpg", "text": text, "label": label, "score": score, "prediction": prediction})
    return write_html_report(tmp_path / "run" / "report.html", title="browser", summary={"threshold": 0.5},
                             plots={}, samples=rows, image_root=images)


def visible_outcomes(driver):
    return sorted(row.get_attribute("data-outcome") for row in visible(driver, "tr.sample"))


def test_renders_offline_and_filters_and_enlarges(browser, page):
    browser.get_log("performance")  # drop what an earlier test left
    browser.get(page.as_uri())
    assert browser.title == "browser"
    assert visible_outcomes(browser) == ["FN", "FP", "TN", "TN", "TP"]
    loaded = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb')).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded  # every thumbnail file beside the page loads

    # nothing but the page's own files: no CDN, no font, no analytics
    urls = requested_urls(browser)
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls

    # the outcome filter: only the errors
    for value in ("TP", "TN"):
        browser.find_element("css selector", f"input[name=outcome][value={value}]").click()
    assert visible_outcomes(browser) == ["FN", "FP"]
    assert browser.find_element("id", "shown").text == "2"
    # text filter on top: the errors with no OCR text
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("css selector", "select[name=text]")).select_by_value("empty")
    assert visible_outcomes(browser) == ["FN"]
    Select(browser.find_element("css selector", "select[name=text]")).select_by_value("any")
    for value in ("TP", "TN"):
        browser.find_element("css selector", f"input[name=outcome][value={value}]").click()
    # the search box matches the OCR text
    search = browser.find_element("css selector", "input[name=search]")
    search.send_keys("garden")
    assert visible_outcomes(browser) == ["TN"]
    search.clear()
    search.send_keys(" ")  # clear() sends no input event; a space trims to an empty query
    assert len(visible_outcomes(browser)) == 5

    # click a thumbnail: the viewer opens with the 640 px copy
    viewer = browser.find_element("id", "viewer")
    assert not viewer.is_displayed()
    thumb = browser.find_element("css selector", "tr.sample img.thumb")
    small_width = browser.execute_script("return arguments[0].naturalWidth", thumb)
    thumb.click()
    assert viewer.is_displayed()
    large = viewer.find_element("css selector", "img.large")
    browser.execute_script("return new Promise(r => arguments[0].complete ? r() : arguments[0].onload = r)", large)
    width = browser.execute_script("return arguments[0].naturalWidth", large)
    assert small_width == 200 and width == 640
    assert large.size["width"] > thumb.size["width"] * 2  # shown larger, not only loaded
    viewer.click()
    assert not viewer.is_displayed()
