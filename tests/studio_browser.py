"""Headless Chromium from Debian driven by Selenium, for the Studio's browser tests: one
browser per test module, axe-core checks, and screenshots in light and dark, narrow and wide.

The browser is required, never optional: without ``/usr/bin/chromium`` and
``/usr/bin/chromedriver`` (Debian's ``chromium`` and ``chromium-driver``) the tests fail and
say what to install — a skipped browser test would hide a Studio nobody checked.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
AXE = Path(__file__).parent / "npm" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = Path(__file__).parent / "screenshots"
WIDE = (1280, 900)
NARROW = (390, 844)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        raise AssertionError(f"{', '.join(missing)} missing: install Debian's browser with "
                             "`apt-get install chromium chromium-driver`")
    if not AXE.exists():
        raise AssertionError(f"{AXE} missing: run `npm ci` in tests/npm (make test does)")


def start_browser() -> Iterator[webdriver.Chrome]:
    require_browser()
    profile = tempfile.mkdtemp(prefix="director-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WIDE[0]},{WIDE[1]}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: webdriver.Chrome, condition: Callable[[], Any], timeout: float = 30.0,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # the page may be swapping a region right now
            last_error = error
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s (last error: {last_error}); page:"
                         f"\n{driver.page_source[:4000]}")


def find(driver: webdriver.Chrome, css: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, css)


def fill(driver: webdriver.Chrome, values: dict[str, str]) -> None:
    """Type into inputs by name (the first one of each name on the page)."""
    for name, value in values.items():
        element = driver.find_element(By.NAME, name)
        element.clear()
        element.send_keys(value)


def submit(driver: webdriver.Chrome, label: str) -> None:
    """Click the submit button with this text and wait for the next page."""
    button = driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']")
    old = driver.find_element(By.TAG_NAME, "html")
    button.click()
    wait_for(driver, lambda: _stale(old), 30, f"the page after {label!r}")
    wait_for(driver, lambda: driver.execute_script("return document.readyState") == "complete")


def _stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except Exception:
        return True
    return False


def axe_violations(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Serious and critical axe-core violations of the current page."""
    driver.execute_script(AXE.read_text())
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']})"
        ".then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.html).slice(0, 3)}))))"
        ".catch(e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));")
    return [v for v in result if v["impact"] in ("serious", "critical")]


def check_accessibility(driver: webdriver.Chrome, page: str) -> None:
    violations = axe_violations(driver)
    assert not violations, f"axe-core on {page}: {violations}"


def screenshots(driver: webdriver.Chrome, name: str) -> list[Path]:
    """The current page, light and dark, narrow and wide, whole length, in tests/screenshots."""
    SCREENSHOTS.mkdir(exist_ok=True)
    written = []
    for scheme in ("light", "dark"):
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": scheme}]})
        for label, (width, height) in (("wide", WIDE), ("narrow", NARROW)):
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1,
                "mobile": label == "narrow"})
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True})
            path = SCREENSHOTS / f"{name}-{scheme}-{label}.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            written.append(path)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    return written


def record(driver: webdriver.Chrome, name: str) -> None:
    """Each page a test visits: checked by axe-core, then photographed."""
    check_accessibility(driver, name)
    screenshots(driver, name)
