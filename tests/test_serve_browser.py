"""The web page as a person uses it, in a real headless Chromium (Debian's, via Selenium).

Enroll 3 classes of real miniImageNet photos from file uploads and one from the (fake) camera,
classify a fourth photo, rename a class, remove one, reload and see the state kept, and check
that the page loaded nothing from outside the server and broke no content-security rule.

Needs Debian's `chromium` and `chromium-driver` (`make setup` installs them) and
../shared/data/miniimagenet/test; skips with the reason otherwise. Selenium is given the
driver's path, so it never fetches a browser or driver of its own. Screenshots go to
$MTL_EDGE_SCREENSHOTS (docs/img for the committed ones), else to the test's tmp folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from device_fixtures import make_bundle

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from serve_helpers import TOKEN, ProcessServer, auth  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
    # A synthetic camera, granted without a prompt: getUserMedia runs for real.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
)
WAIT_S = 60


@pytest.fixture
def photos(shared_data: Path) -> dict[str, list[Path]]:
    """Four test classes of miniImageNet, 6 photos each (5 to enroll, 1 to classify)."""
    root = shared_data / "miniimagenet" / "test"
    if not root.is_dir():
        pytest.skip(f"no miniImageNet test split at {root}")
    classes = sorted(p for p in root.iterdir() if p.is_dir())[:4]
    return {c.name: sorted(c.glob("*.jpg"))[:6] for c in classes}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"{CHROMIUM} or {CHROMEDRIVER} missing: `make setup` installs Debian's chromium and "
            "chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for downloads
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MTL_EDGE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def row_names(driver: Any) -> list[str]:
    """The class names the list shows (read in one script: the list is re-rendered often)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#class-list .class-row')].map(r => r.dataset.name)"
    )


def texts(driver: Any, selector: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector
    )


def test_page_enroll_predict_rename_remove_reload(
    tmp_path: Path, photos: dict[str, list[Path]], browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = make_bundle(tmp_path / "bundle").root
    gallery = tmp_path / "shop.gallery"
    shots = shots_dir(tmp_path)
    wait = WebDriverWait(browser, WAIT_S)
    names = list(photos)[:3]
    query = photos[names[0]][5]
    with ProcessServer("--bundle", bundle, "--gallery", gallery, "--backend", "onnxruntime-cpu"):
        pass  # started and stopped once: the page must also work on a fresh gallery file
    server = ProcessServer("--bundle", bundle, "--gallery", gallery, "--backend", "onnxruntime-cpu")
    with server:
        browser.get(f"{server.url}#token={TOKEN}")
        wait.until(lambda d: "batching" in d.find_element(By.ID, "model").text)
        assert "#token" not in browser.current_url  # the token is kept in the tab, not the URL

        for i, name in enumerate(names):
            label = f"class {i + 1} ({name})"
            field = browser.find_element(By.ID, "enroll-name")
            field.clear()
            field.send_keys(label)
            upload = browser.find_element(By.ID, "enroll-files")
            upload.send_keys("\n".join(str(p) for p in photos[name][:5]))
            browser.find_element(By.ID, "enroll-btn").click()
            wait.until(lambda d, label=label: label in row_names(d))
        assert row_names(browser) == [f"class {i + 1} ({n})" for i, n in enumerate(names)]
        assert texts(browser, ".class-row .count") == ["5 images"] * 3
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".class-row img.thumb")) == 3)

        # The camera: getUserMedia on Chromium's fake device, two frames, one new class.
        browser.find_element(By.ID, "camera-btn").click()
        wait.until(ec.element_to_be_clickable((By.ID, "capture-btn")))
        field = browser.find_element(By.ID, "enroll-name")
        field.clear()
        field.send_keys("camera")
        for _ in range(2):
            browser.find_element(By.ID, "capture-btn").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#captures img")) == 2)
        browser.find_element(By.ID, "enroll-captures-btn").click()
        wait.until(lambda d: "camera" in row_names(d))

        # Classify a fourth photo of the first class, never enrolled.
        top_k = browser.find_element(By.ID, "top-k")
        top_k.clear()
        top_k.send_keys("3")
        browser.find_element(By.ID, "predict-file").send_keys(str(query))
        wait.until(lambda d: d.find_element(By.ID, "verdict").text != "")
        verdict = browser.find_element(By.ID, "verdict").text
        bars = texts(browser, "#bars .bar-name")
        enrolled = set(row_names(browser))
        assert len(bars) == 3 and set(bars) <= enrolled
        assert verdict in enrolled | {"unknown"}
        widths = [
            e.value_of_css_property("width")
            for e in browser.find_elements(By.CSS_SELECTOR, "#bars .fill")
        ]
        assert all(w.endswith("px") for w in widths)
        api = httpx.post(
            server.url + "v1/predict?top_k=3",
            files=[("files", (query.name, query.read_bytes(), "image/jpeg"))],
            timeout=60,
        ).json()["predictions"][0]
        assert bars == [t["label"] for t in api["top_k"]]  # the page shows what the API says
        browser.save_screenshot(str(shots / "serve-page.png"))

        # Live camera frames: the verdict follows the fake camera, then stops.
        shown = browser.find_element(By.ID, "predict-preview").get_attribute("src")
        browser.find_element(By.ID, "live-btn").click()
        wait.until(lambda d: d.find_element(By.ID, "predict-preview").get_attribute("src") != shown)
        wait.until(lambda d: "camera" in d.find_element(By.ID, "bars").text)
        browser.find_element(By.ID, "live-btn").click()

        # Rename the first class, remove the second.
        first, second = f"class 1 ({names[0]})", f"class 2 ({names[1]})"
        row = browser.find_element(By.CSS_SELECTOR, f'.class-row[data-name="{first}"]')
        row.find_element(By.CSS_SELECTOR, "button.rename").click()
        field = row.find_element(By.CSS_SELECTOR, "input.rename-input")
        field.clear()
        field.send_keys("renamed class")
        row.find_element(By.CSS_SELECTOR, "button.rename-save").click()
        wait.until(lambda d: "renamed class" in row_names(d))
        row = browser.find_element(By.CSS_SELECTOR, f'.class-row[data-name="{second}"]')
        row.find_element(By.CSS_SELECTOR, "button.remove").click()
        wait.until(ec.alert_is_present())
        browser.switch_to.alert.accept()
        wait.until(lambda d: second not in row_names(d))

        # Reload: the server's state, not the page's, is what shows.
        expected = ["renamed class", f"class 3 ({names[2]})", "camera"]
        browser.refresh()
        wait.until(lambda d: row_names(d) == expected)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".class-row img.thumb")) == 3)
        browser.save_screenshot(str(shots / "serve-classes.png"))
        listed = httpx.get(server.url + "v1/classes", headers=auth(), timeout=30).json()
        assert [c["name"] for c in listed["classes"]] == expected

        origin = server.url.rstrip("/")
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        outside = [r for r in resources if not r.startswith((origin, "blob:", "data:"))]
        assert outside == []
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe

    # A new server on the same gallery serves the same classes.
    with ProcessServer("--bundle", bundle, "--gallery", gallery) as again:
        listed = httpx.get(again.url + "v1/classes", timeout=30).json()
        assert [c["name"] for c in listed["classes"]] == expected
