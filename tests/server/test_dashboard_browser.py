"""The dashboard in a real browser: Debian's chromium driven by Selenium (chromium-driver).

Skipped, with a message saying how to enable it, where chromium, chromedriver or selenium is missing:
``apt-get install -y chromium chromium-driver`` and ``pip install -e .[dev]``. Nothing downloads:
the browser and its driver are the system's. Screenshots go to ``$RECTALFL_TEST_ARTEFACTS/dashboard``
when that variable is set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.dashboard import create_app
from server.dashboard.data import UnknownRun, find_run
from server.dashboard.serve import running
from server.dashboard.synthetic import write_synthetic_run
from server.store import RunStore

CHROMIUM = os.environ.get("RECTALFL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RECTALFL_CHROMEDRIVER", "/usr/bin/chromedriver")
TOKEN = "browser-test-token-0123456789abcdef"
HOW = ("needs Debian's chromium and its driver (`apt-get install -y chromium chromium-driver`) and selenium "
       "(`pip install -e .[dev]`)")

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(webdriver is None, reason=f"selenium is not installed; this test {HOW}"),
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason=f"{CHROMIUM} or {CHROMEDRIVER} not found; this test {HOW}"),
]


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    base = os.environ.get("RECTALFL_TEST_ARTEFACTS")
    out = (Path(base) if base else tmp_path) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager (which could download one) is never asked
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _severe_console(driver: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _wait(driver: webdriver.Chrome, cond, timeout: float = 20.0):  # noqa: ANN001, ANN202 - selenium's condition type
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(cond)


def _text(driver: webdriver.Chrome, element_id: str) -> str:
    """An element's text, read in one step (live sections are replaced while the page updates)."""
    return str(driver.execute_script(
        "const n = document.getElementById(arguments[0]); return n ? n.textContent.trim() : null;", element_id))


def test_finished_run_in_the_browser(tmp_path: Path, browser: webdriver.Chrome, artefacts: Path) -> None:
    runs = tmp_path / "runs"
    write_synthetic_run(runs, "run-fedavg", name="fedavg-demo", n_rounds=6, n_sites=4, dp=True, seed=3)
    write_synthetic_run(runs, "run-fedprox", name="fedprox-demo", n_rounds=6, n_sites=4, strategy="fedprox", seed=4)
    with running(create_app(runs, TOKEN, poll_interval=0.2)) as url:
        # without the token: the 401 page, and no run is named
        browser.get(f"{url}/")
        assert "401" in browser.title and "fedavg-demo" not in browser.page_source
        assert any("401" in m for m in _severe_console(browser))  # (and drains the console log)
        # the login link sets the cookie and drops the token from the address bar
        browser.get(f"{url}/?token={TOKEN}")
        assert browser.current_url == f"{url}/"
        rows = browser.find_elements(By.CSS_SELECTOR, "#runs-table tr.run-row")
        assert len(rows) == 2
        assert "FDL" in rows[0].text and "completed" in rows[0].text
        # the filter hides rows as you type
        browser.find_element(By.ID, "filter-q").send_keys("fedprox")
        assert [r.is_displayed() for r in rows] in ([True, False], [False, True])
        browser.save_screenshot(str(artefacts / "runs_list.png"))
        browser.get(f"{url}/runs/run-fedavg")
        assert browser.find_element(By.ID, "rounds-done").text == "6"
        assert browser.find_element(By.ID, "run-status").text == "completed"
        site_rows = browser.find_elements(By.CSS_SELECTOR, "#sites-table tbody tr")
        assert len(site_rows) == 5  # 4 training sites + 1 external
        assert "site_dropped" in browser.find_element(By.ID, "events-table").text
        # the vendored chart script drew one line per backbone, and the per-site chart one per site
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-consortium polyline")) == 4)
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-sites polyline")) == 4)
        legend = browser.find_element(By.CSS_SELECTOR, "#chart-consortium .mc-legend").text
        assert "pre_t2w" in legend and "post_dwi" in legend
        assert browser.find_element(By.ID, "report-link").get_attribute("href").endswith("/files/report.html")
        browser.save_screenshot(str(artefacts / "run_page.png"))
        browser.get(f"{url}/compare?run=run-fedavg&run=run-fedprox")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-compare polyline")) == 2)
        assert "fedprox" in browser.find_element(By.ID, "config-diff").text
        browser.save_screenshot(str(artefacts / "compare.png"))
        browser.get(f"{url}/runs/run-fedavg/files/report.html")
        assert "Report of fedavg-demo" in browser.page_source
        assert _severe_console(browser) == []


def test_live_run_updates_without_a_reload(tmp_path: Path, browser: webdriver.Chrome, artefacts: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            write_synthetic_run(runs, "run-live", name="live-demo", n_rounds=8, n_sites=3, round_delay=1.0, seed=5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    with running(create_app(runs, TOKEN, poll_interval=0.2)) as url:
        writer.start()
        deadline = time.monotonic() + 30
        while True:  # the run exists once start_run has committed
            try:
                find_run(runs, "run-live")
                break
            except UnknownRun:
                assert time.monotonic() < deadline, "the writer never started the run"
                time.sleep(0.1)
        browser.get(f"{url}/runs/run-live?token={TOKEN}")
        assert _text(browser, "live-state").startswith("live")
        start = int(_text(browser, "rounds-done"))
        assert start < 6
        browser.execute_script("window.__notReloaded = 'same page';")
        _wait(browser, lambda d: int(_text(d, "rounds-done")) >= start + 2, timeout=30)
        assert browser.execute_script("return window.__notReloaded;") == "same page"
        # the sections re-rendered from the record too: the rounds table has the new rounds
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")) >= start + 2)
        browser.save_screenshot(str(artefacts / "run_live.png"))
        # the run ends: the page says so, still without a reload
        writer.join(timeout=60)
        assert not errors, errors
        _wait(browser, lambda d: _text(d, "run-status") == "completed", timeout=30)
        assert int(_text(browser, "rounds-done")) == 8
        assert browser.execute_script("return window.__notReloaded;") == "same page"
        with RunStore.open_run_dir(runs / "run-live", readonly=True) as store:
            assert store.last_completed_round("run-live") == 8
        browser.save_screenshot(str(artefacts / "run_finished.png"))
        assert _severe_console(browser) == []
