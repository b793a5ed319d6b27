"""The web console in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium, against every service running as real processes
on the real broker and database.

One browser for the module; every state the tests reach is screenshotted under
`test-output/console/` (ignored by git).
"""

from __future__ import annotations

import csv
import io
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imgpipe.contracts.settings import Settings
from tests.support.http_server import LoopbackServer, Recorded, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.namespaces import remove_namespace
from tests.support.system import System, running_system

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "console"
WAIT = 120  # seconds for the system to finish a small request
# Seconds for each service to start: on a 2-core machine shared with other test runs,
# five Python processes importing at once have taken over a minute.
READY = 240

webdriver = pytest.importorskip("selenium.webdriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    # CI installs them and sets IMGPIPE_REQUIRE_CHROMIUM: there, missing is a failure.
    if os.environ.get("IMGPIPE_REQUIRE_CHROMIUM"):
        raise RuntimeError(
            "IMGPIPE_REQUIRE_CHROMIUM is set but chromium or chromedriver is missing"
        )
    pytest.skip(
        "needs Debian's chromium and chromium-driver (.ci/run installs them)",
        allow_module_level=True,
    )

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

# Fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1600",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def module_settings(
    mongo_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        mongodb_url=mongo_url,
        IMGPIPE_DATA_DIR=tmp_path_factory.mktemp("console") / "data",
        IMGPIPE_NAMESPACE="t" + uuid.uuid4().hex[:10],
        IMGPIPE_ALLOW_PRIVATE_URLS=True,
        webhook_secret="whsec_" + "dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI=",
    )


@pytest.fixture(scope="module")
def system(
    mongo_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """One system for the tests without API keys: one download attempt per image, so an
    image whose host is down fails at once (and a retry runs it again)."""
    settings = module_settings(mongo_url, amqp_url, tmp_path_factory)
    try:
        with running_system(
            settings, ready_timeout=READY, IMGPIPE_DOWNLOAD_ATTEMPTS="1"
        ) as running:
            yield running
    finally:
        remove_namespace(settings)


class Images:
    """A loopback image host. An image made `flaky` answers 503 to imgpipe's first
    download (its host was down) and serves it from then on; browsers (the thumbnails)
    always get the image, so they cannot use up the failure."""

    def __init__(self, server: LoopbackServer) -> None:
        self.server = server
        self._lock = threading.Lock()

    def add(self, path: str, seed: int, flaky: bool = False, delay: float = 0.0) -> str:
        body = jpeg_bytes(320, 240, seed=seed)
        failures = [1 if flaky else 0]

        def answer(request: Recorded) -> Response:
            with self._lock:
                if _from_imgpipe(request) and failures[0] > 0:
                    failures[0] -= 1
                    return Response(b"down", 503, "text/plain")
            return Response(body, 200, "image/jpeg", delay=delay)

        return self.server.add(path, answer)


def _from_imgpipe(request: Recorded) -> bool:
    return request.headers.get("user-agent", "").startswith("imgpipe/")


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    with loopback_server() as server:
        yield Images(server)


# Helpers ----------------------------------------------------------------------------


def catalogue(rows: list[tuple[str, list[str]]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for number, (name, urls) in enumerate(rows, start=1):
        writer.writerow([str(number), name, ",".join(urls)])
    return text.getvalue().encode()


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = WAIT) -> Any:
    return WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition)


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def open_console(driver: WebDriver, system: System) -> None:
    driver.get(f"{system.ingest_url}/")
    wait(driver, lambda d: d.find_element(By.ID, "app").is_displayed(), 30)


def choose_and_upload(driver: WebDriver, path: Path, quality: str = "") -> None:
    driver.find_element(By.ID, "csv-file").send_keys(str(path))
    field = driver.find_element(By.ID, "quality")
    field.clear()
    if quality:
        field.send_keys(quality)
    driver.find_element(By.ID, "upload-button").click()


def request_status(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "request-section").get_attribute("data-status") or ""


def wait_for_status(driver: WebDriver, *wanted: str) -> None:
    wait(driver, lambda d: request_status(d) in wanted)


def thumbnails(driver: WebDriver) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#products img.thumb'), img => "
        "({src: img.src, alt: img.alt, loaded: img.complete && img.naturalWidth > 0, "
        "width: img.getBoundingClientRect().width}));"
    )
    return found


def request_id_shown(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "request-id").text


def listed(system: System) -> set[str]:
    """Every request the status service lists."""
    answer = httpx.get(f"{system.status_url}/requests", params={"limit": 200}).json()
    return {item["request_id"] for item in answer["items"]}


def write_csv(tmp_path: Path, name: str, body: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


# Tests ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_upload_follows_progress_shows_thumbnails_downloads_csv_and_deletes(
    browser: WebDriver, system: System, images: Images, downloads: Path, tmp_path: Path
) -> None:
    urls = [images.add(f"/shoe/{i}.jpg", seed=i) for i in range(3)]
    missing = images.server.url("/missing.jpg")  # 404: a failed image with its reason
    body = catalogue([("Trail <b>shoe</b>", urls[:2]), ("Sock", [urls[2], missing])])
    open_console(browser, system)
    assert "Content-Security-Policy" in httpx.get(f"{system.ingest_url}/").headers
    shot(browser, "01-empty")

    choose_and_upload(browser, write_csv(tmp_path, "products.csv", body), quality="60")
    wait_for_status(browser, "received", "processing", "completed")
    shot(browser, "02-uploaded")
    wait_for_status(browser, "completed")
    progress = browser.find_element(By.ID, "progress-text").text
    assert "3 of 4" not in progress and "4 of 4 images done (3 ok, 1 failed)" in progress
    # A product name is text, never markup.
    assert browser.find_elements(By.CSS_SELECTOR, "#products b") == []
    assert "1. Trail <b>shoe</b>" in browser.find_element(By.ID, "products").text

    # Before (the input) for every image, after (the output) for each that worked; every
    # one loads but the missing image's own.
    wait(
        browser,
        lambda d: (
            len(thumbnails(d)) == 7
            and all(t["loaded"] or t["src"] == missing for t in thumbnails(d))
        ),
    )
    sources = {t["src"] for t in thumbnails(browser)}
    assert set(urls) <= sources
    status = httpx.get(f"{system.status_url}/status/{request_id_shown(browser)}").json()
    outputs = [url for product in status["products"] for url in product["output_urls"] if url]
    assert len(outputs) == 3 and set(outputs) <= sources
    assert all(t["width"] == 64 for t in thumbnails(browser))
    failed = browser.find_element(By.CSS_SELECTOR, f'li.image[data-input-url="{missing}"]')
    assert failed.get_attribute("data-state") == "failed"
    assert "failed:" in failed.text and "404" in failed.text
    shot(browser, "03-completed")

    # The output CSV, fetched with the key (if any) and saved by the browser.
    request_id = request_id_shown(browser)
    browser.find_element(By.ID, "download-button").click()
    saved = downloads / f"{request_id}.csv"
    wait(browser, lambda _: saved.exists() and saved.stat().st_size > 0, 30)
    expected = httpx.get(f"{system.status_url}/status/{request_id}/output.csv").content
    assert saved.read_bytes() == expected

    # At phone width nothing needs a sideways scroll.
    browser.set_window_size(390, 1400)
    try:
        wait(
            browser,
            lambda d: d.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            ),
            10,
        )
        shot(browser, "04-phone-width")
    finally:
        browser.set_window_size(1280, 1600)

    # Recent requests list it (status's GET /requests).
    browser.find_element(By.ID, "refresh-recent").click()
    wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#recent [data-request-id="{request_id}"]'),
        30,
    )
    shot(browser, "05-recent")

    browser.find_element(By.ID, "delete-button").click()
    wait(browser, ec.alert_is_present(), 10).accept()
    wait_for_status(browser, "deleted")
    assert httpx.get(f"{system.status_url}/status/{request_id}").status_code == 404
    shot(browser, "06-deleted")


@pytest.mark.timeout(300)
def test_retry_runs_a_failed_image_again_and_the_page_shows_it_ok(
    browser: WebDriver, system: System, images: Images, tmp_path: Path
) -> None:
    good = images.add("/retry/good.jpg", seed=20)
    flaky = images.add("/retry/flaky.jpg", seed=21, flaky=True)
    open_console(browser, system)
    choose_and_upload(
        browser, write_csv(tmp_path, "retry.csv", catalogue([("Hat", [good, flaky])]))
    )
    wait_for_status(browser, "completed", "error")
    item = f'li.image[data-input-url="{flaky}"]'
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, item).get_attribute("data-state"))
    assert browser.find_element(By.CSS_SELECTOR, item).get_attribute("data-state") == "failed"
    assert "503" in browser.find_element(By.CSS_SELECTOR, item).text
    shot(browser, "07-before-retry")

    retry = browser.find_element(By.ID, "retry-button")
    assert retry.is_enabled()
    retry.click()
    wait(
        browser, lambda d: d.find_element(By.CSS_SELECTOR, item).get_attribute("data-state") == "ok"
    )
    wait_for_status(browser, "completed")
    wait(
        browser,
        lambda d: (
            "2 of 2 images done (2 ok, 0 failed)" in d.find_element(By.ID, "progress-text").text
        ),
    )
    wait(browser, lambda d: not d.find_element(By.ID, "retry-button").is_enabled())
    wait(browser, lambda d: len(thumbnails(d)) == 4 and all(t["loaded"] for t in thumbnails(d)))
    shot(browser, "08-after-retry")


@pytest.mark.timeout(300)
def test_an_upload_whose_answer_was_lost_is_sent_again_under_the_same_key(
    browser: WebDriver, system: System, images: Images, tmp_path: Path
) -> None:
    url = images.add("/idem/a.jpg", seed=40)
    open_console(browser, system)
    before = listed(system)
    # The upload reaches ingest but its answer is lost on the way back, once.
    browser.execute_script(
        """
        const realFetch = window.fetch;
        let lose = 1;
        window.uploadKeys = [];
        window.fetch = async (url, options) => {
          if (url !== "/upload") return realFetch(url, options);
          window.uploadKeys.push(options.headers["Idempotency-Key"]);
          const answer = await realFetch(url, options);
          if (lose-- > 0) throw new TypeError("network error");
          return answer;
        };
        """
    )
    choose_and_upload(browser, write_csv(tmp_path, "idem.csv", catalogue([("Cap", [url])])))
    message = browser.find_element(By.ID, "upload-message")
    wait(browser, lambda _: "did not get through" in message.text, 30)
    shot(browser, "13-upload-answer-lost")
    browser.find_element(By.ID, "upload-button").click()  # the same file, the same upload
    wait_for_status(browser, "completed")
    keys = browser.execute_script("return window.uploadKeys")
    assert len(keys) == 2 and keys[0] == keys[1], keys
    assert re.fullmatch(r"[0-9a-f]{32}", keys[0])
    assert len(listed(system) - before) == 1  # one request, not two
    downloads = [r for r in images.server.requests_to("/idem/a.jpg") if _from_imgpipe(r)]
    assert len(downloads) == 1

    # Another upload (the same file chosen again) is another attempt: a new key.
    choose_and_upload(browser, write_csv(tmp_path, "idem.csv", catalogue([("Cap", [url])])))
    wait(browser, lambda d: len(d.execute_script("return window.uploadKeys")) == 3, 30)
    third = browser.execute_script("return window.uploadKeys")[2]
    assert third != keys[0]


@pytest.mark.timeout(300)
def test_cancel_stops_a_running_request(
    browser: WebDriver, system: System, images: Images, tmp_path: Path
) -> None:
    slow = [images.add(f"/slow/{i}.jpg", seed=60 + i, delay=3.0) for i in range(12)]
    open_console(browser, system)
    rows = [(f"Slow {i}", slow[i : i + 3]) for i in range(0, 12, 3)]
    choose_and_upload(browser, write_csv(tmp_path, "slow.csv", catalogue(rows)))
    wait_for_status(browser, "received", "processing")
    cancel = browser.find_element(By.ID, "cancel-button")
    wait(browser, lambda _: cancel.is_enabled(), 30)
    cancel.click()
    wait_for_status(browser, "cancelled")
    assert "Cancelled" in browser.find_element(By.ID, "progress-text").text
    wait(browser, lambda _: not cancel.is_enabled(), 10)
    assert not browser.find_element(By.ID, "retry-button").is_enabled()
    shot(browser, "14-cancelled")


@pytest.mark.timeout(120)
def test_a_bad_csv_shows_each_problem_with_its_line(
    browser: WebDriver, system: System, tmp_path: Path
) -> None:
    body = (
        b"S. No.,Product Name,Input Image Urls\r\n"
        b"1,Good,http://example.com/a.jpg\r\n"
        b"2,Bad,ftp://example.com/b.jpg\r\n"
        b"3,,http://example.com/c.jpg\r\n"
    )
    open_console(browser, system)
    choose_and_upload(browser, write_csv(tmp_path, "bad.csv", body))
    errors = wait(browser, ec.visibility_of_element_located((By.ID, "upload-errors")), 30)
    text = errors.text
    assert "Line 3" in text and "Line 4" in text, text
    items = browser.find_elements(By.CSS_SELECTOR, "#upload-errors-list li")
    assert len(items) >= 2
    assert browser.find_element(By.ID, "request-section").is_displayed() is False
    shot(browser, "09-bad-csv")


@pytest.mark.timeout(300)
def test_with_api_keys_the_page_asks_for_the_key_then_works(
    browser: WebDriver,
    images: Images,
    mongo_url: str,
    amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    settings = module_settings(mongo_url, amqp_url, tmp_path_factory)
    settings = settings.model_copy(update={"api_keys": ["console-key-1"]})
    url = images.add("/keyed/a.jpg", seed=30)
    try:
        with running_system(settings, ready_timeout=READY) as keyed:
            assert httpx.get(f"{keyed.status_url}/status/x").status_code == 401
            browser.get(f"{keyed.ingest_url}/")
            key = wait(browser, ec.visibility_of_element_located((By.ID, "api-key")), 30)
            assert not browser.find_element(By.ID, "app").is_displayed()
            shot(browser, "10-key-asked")

            key.send_keys("wrong-key")
            browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
            wait(browser, ec.visibility_of_element_located((By.ID, "key-error")), 30)
            shot(browser, "11-key-refused")

            # The keyboard alone: type the key, press Enter.
            browser.find_element(By.ID, "api-key").send_keys("console-key-1" + Keys.ENTER)
            wait(browser, lambda d: d.find_element(By.ID, "app").is_displayed(), 30)
            stored = browser.execute_script(
                "return [sessionStorage.getItem('imgpipe.apiKey'), localStorage.length]"
            )
            assert stored == ["console-key-1", 0]

            csv_path = write_csv(tmp_path, "keyed.csv", catalogue([("Bag", [url])]))
            choose_and_upload(browser, csv_path)
            wait_for_status(browser, "completed")
            wait(
                browser,
                lambda d: len(thumbnails(d)) == 2 and all(t["loaded"] for t in thumbnails(d)),
            )
            shot(browser, "12-keyed-completed")

            # A reload keeps the key for the tab: no second prompt.
            browser.refresh()
            wait(browser, lambda d: d.find_element(By.ID, "app").is_displayed(), 30)
            assert not browser.find_element(By.ID, "key-section").is_displayed()
    finally:
        remove_namespace(settings)
