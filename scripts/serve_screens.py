"""Screenshots of the ``nlsr serve`` page before, during and after a job, and the time to first
result, in Debian's headless chromium driven by Selenium (as tests/test_serve_browser.py).

    python scripts/serve_screens.py [--model nlsr-dlsn-s] [--tile 512] [--out docs/img]
        [--no-screens]

Starts a server on 127.0.0.1 (any free port) in this process, opens the page, picks the bundled
sample (src/nlsr/assets/sample.png) with the model's default scale and precision, and prints the
seconds from picking the file to the result shown (model loading included: a first result).
Writes docs/img/serve_before.png, serve_during.png, serve_after.png (palette PNGs when a
full-colour one would exceed 300 KB).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "nlsr" / "assets" / "sample.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Chromium switches: headless, nothing fetched from the network, no profile left behind.
SWITCHES = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
MAX_BYTES = 300_000


def browser_missing() -> str | None:
    """Why the page cannot be driven here (None when selenium, chromium and chromedriver are
    all present)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


def start_browser(downloads: Path, profile: Path, size: tuple[int, int] = (1100, 900)) -> Any:
    """Headless chromium saving downloads to ``downloads``, with a fresh profile in ``profile``;
    the driver path is given, so selenium-manager downloads nothing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager, were it ever asked: never download
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for switch in (*SWITCHES, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(switch)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    return driver


def open_page(driver: Any, url: str, timeout: float = 30) -> None:
    """Load the page and wait until its script has filled the choices."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
    )


def save_small(png: bytes, path: Path) -> int:
    """Write a screenshot, as a 256-colour palette PNG if the full-colour one is too big."""
    from PIL import Image

    from nlsr.atomic import atomic_write

    if len(png) > MAX_BYTES:
        out = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(out, "PNG", optimize=True)
        png = out.getvalue()
    atomic_write(path, png)
    return len(png)


def run(model: str, tile: int, out: Path | None) -> tuple[float, float]:
    """Drive one job on the sample; return the seconds to the first result shown, and the CPU
    seconds this process (the server: model loading, decoding, the network) spent meanwhile."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from nlsr.serve import make_server

    server = make_server("127.0.0.1", 0, [model, "bicubic"], tile=tile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scratch = Path(tempfile.mkdtemp(prefix="nlsr-screens-"))
    driver = start_browser(scratch / "downloads", scratch / "profile")
    try:
        open_page(driver, server.url)
        if out is not None:
            save_small(driver.get_screenshot_as_png(), out / "serve_before.png")
        status = driver.find_element(By.ID, "status")
        progress = driver.find_element(By.ID, "progress")
        start, cpu = time.perf_counter(), time.process_time()
        driver.find_element(By.ID, "file").send_keys(str(SAMPLE))
        if out is not None:
            WebDriverWait(driver, 300, poll_frequency=0.05).until(
                lambda d: (
                    status.text.startswith("Done")
                    or (
                        status.text.startswith("Running")
                        and 3 * float(progress.get_attribute("value") or 0)
                        >= float(progress.get_attribute("max") or 1)
                    )
                )
            )
            save_small(driver.get_screenshot_as_png(), out / "serve_during.png")
        WebDriverWait(driver, 600, poll_frequency=0.05).until(
            lambda d: (
                status.text.startswith("Done")
                and d.execute_script("return document.getElementById('after').complete")
            )
        )
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if out is not None:
            # 400%, the before | after line at 3/4 of the width, on the bricks (bottom right)
            Select(driver.find_element(By.ID, "zoom")).select_by_value("4")
            driver.execute_script(
                "const s = document.getElementById('slider');"
                "s.value = 75; s.dispatchEvent(new Event('input'));"
                "const f = document.getElementById('frame');"
                "f.scrollTo(0.75 * f.scrollWidth - f.clientWidth / 2,"
                " 0.75 * f.scrollHeight - f.clientHeight / 2);"
            )
            save_small(driver.get_screenshot_as_png(), out / "serve_after.png")
        return seconds, cpu
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        server.jobs.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nlsr-dlsn-s", help="model to run (default nlsr-dlsn-s)")
    parser.add_argument("--tile", type=int, default=512, help="server tile (default 512)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="screenshots")
    parser.add_argument("--no-screens", action="store_true", help="only time the first result")
    args = parser.parse_args()
    reason = browser_missing()
    if reason:
        raise SystemExit(f"serve_screens: {reason}")
    out = None if args.no_screens else args.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    seconds, cpu = run(args.model, args.tile, out)
    load = os.getloadavg()
    print(
        f"time to first result: {seconds:.2f} s, server CPU {cpu:.2f} s ({args.model}, sample "
        f"{SAMPLE.name}, tile {args.tile}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
    )
    if out is not None:
        for name in ("before", "during", "after"):
            path = out / f"serve_{name}.png"
            print(
                f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
                f"{path.stat().st_size} bytes"
            )


if __name__ == "__main__":
    main()
