"""Headless Chromium for the tests of the HTML pages (report.html, the audit and drift pages).

Chromium and its driver come from Debian (``scripts/install-test-deps.sh``); without them, or
without selenium, a test module that imports this one is skipped with the reason.
"""

import json
import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install 'mmcore[test]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
MISSING = None if CHROMIUM and DRIVER else "headless Chromium not installed (bash scripts/install-test-deps.sh)"
needs_chromium = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def start_chromium():
    """A headless Chromium driver that logs every request (for :func:`requested_urls`); quit it after use."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def requested_urls(driver):
    """The URLs the browser requested since the last call (the performance log is drained)."""
    urls = [json.loads(entry["message"])["message"].get("params", {}).get("request", {}).get("url")
            for entry in driver.get_log("performance")]
    return [u for u in urls if u]


def visible(driver, selector):
    """The elements matching ``selector`` that are displayed (a filter hides the others)."""
    return [element for element in driver.find_elements("css selector", selector) if element.is_displayed()]
