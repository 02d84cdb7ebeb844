"""The ``nlsr serve`` page end to end in Debian's headless chromium (Selenium): pick a file,
see the tiles progress, move the slider, zoom, download the result (equal to ``nlsr.upscale``),
and see a bad file's one-line message. Skipped when selenium, chromium or chromedriver is absent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import load_script
from PIL import Image as PILImage

import nlsr
from nlsr.serve import Server, make_server

TILE, OVERLAP = 16, 4
WAIT = 60  # seconds: the longest any step may take


@pytest.fixture(scope="module")
def screens() -> Iterator[ModuleType]:
    yield from load_script("serve_screens")


@pytest.fixture
def page(screens: ModuleType, tmp_path: Path) -> Iterator[tuple[Any, Server, Path]]:
    """(driver on the page, the server, the download folder) for a bicubic server in tiles."""
    reason = screens.browser_missing()
    if reason:
        pytest.skip(f"the browser test needs chromium: {reason}")
    server = make_server("127.0.0.1", 0, ["bicubic"], tile=TILE, overlap=OVERLAP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = screens.start_browser(downloads, tmp_path / "profile")
    try:
        screens.open_page(driver, server.url, WAIT)
        yield driver, server, downloads
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        server.jobs.close()


def wait_until(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, what)


def test_upload_progress_slider_download(page: tuple[Any, Server, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver, server, downloads = page
    pixels = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    source = tmp_path / "tiny.png"
    PILImage.fromarray(pixels).save(source)
    find = lambda element_id: driver.find_element(By.ID, element_id)  # noqa: E731

    # Hold the job once it runs, to see the page report it; then let it go.
    release, original = threading.Event(), server.jobs._run

    def held(job: Any) -> None:
        assert release.wait(WAIT)
        original(job)

    server.jobs._run = held  # type: ignore[method-assign]
    assert Select(find("model")).first_selected_option.text == "bicubic"
    assert Select(find("scale")).first_selected_option.text == "x2"
    Select(find("precision")).select_by_value("fp32")
    find("file").send_keys(str(source))
    wait_until(driver, lambda d: find("status").text.startswith("Running"), "job running")
    # 3 x 5 tiles: ceil((40 - 4) / (16 - 4)) rows, ceil((56 - 4) / (16 - 4)) columns
    assert find("status").text.startswith("Running: tile 0 of 15 done, tiny.png (56x40)")
    assert find("progress").get_attribute("max") == "15"
    release.set()
    wait_until(driver, lambda d: find("status").text.startswith("Done"), "job done")
    assert find("progress").get_attribute("value") == "15"
    assert "112x80" in find("status").text
    wait_until(
        driver,
        lambda d: d.execute_script("return document.getElementById('after').naturalWidth") == 112,
        "img",
    )

    # The slider uncovers the result: all before at 0, all after at 100.
    slider = find("slider")
    slider.send_keys(Keys.HOME)
    assert find("clip").value_of_css_property("width") == "0px"
    slider.send_keys(Keys.END)
    Select(find("zoom")).select_by_value("2")
    assert find("stage").size == {"width": 224, "height": 160}  # 200% of the result
    assert find("clip").size["width"] == 224
    assert find("before").size == find("after").size == {"width": 224, "height": 160}

    find("download").click()
    wait_until(
        driver,
        lambda d: [p for p in downloads.iterdir() if p.suffix == ".png"],
        "download finished",
    )
    (saved,) = downloads.iterdir()
    assert saved.name == "tiny_x2_bicubic.png"
    expected = nlsr.upscale(
        "bicubic", pixels, scale=2, tile=TILE, overlap=OVERLAP, precision="fp32"
    )
    np.testing.assert_array_equal(np.asarray(PILImage.open(saved).convert("RGB")), expected)


def test_bad_file_message(page: tuple[Any, Server, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver, _, _ = page
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    driver.find_element(By.ID, "file").send_keys(str(notes))
    error = driver.find_element(By.ID, "error")
    wait_until(driver, lambda d: error.is_displayed() and error.text, "error shown")
    assert error.text == (
        "notes.txt: not a supported image file (PNG, JPEG, BMP, TIFF or WebP expected)"
    )
    assert not driver.find_element(By.ID, "viewer").is_displayed()
    assert driver.find_element(By.ID, "start").is_enabled()
