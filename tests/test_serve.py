"""``nlsr serve`` over HTTP: a server on 127.0.0.1, port 0, in a thread, driven with urllib and
http.client. Results are compared with ``nlsr.upscale`` of the same image and options."""

from __future__ import annotations

import http.client
import io
import json
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

import nlsr
from nlsr.cli import main
from nlsr.inference import PRECISIONS
from nlsr.io import ImageReadError, read_image
from nlsr.models.pretrained import WEIGHTS_ENV
from nlsr.serve import Limits, Server, make_server


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def forged_png(width: int, height: int) -> bytes:
    """A PNG signature and header claiming ``width`` x ``height``, and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


@pytest.fixture
def serve() -> Iterator[Any]:
    """A factory of running servers (stopped and cleaned afterwards)."""
    started: list[Server] = []

    def start(models: list[str] | None = None, **kwargs: Any) -> Server:
        limits = kwargs.pop("limits", Limits())
        server = make_server("127.0.0.1", 0, models or ["bicubic"], limits, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()
        server.jobs.close()


def request(server: Server, path: str, data: bytes | None = None) -> tuple[int, Any]:
    """(status, decoded JSON or bytes) of a GET, or of a POST when ``data`` is given."""
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + path, data)) as r:
            status, body, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body


def submit(server: Server, data: bytes, name: str = "x.png", **options: Any) -> tuple[int, Any]:
    query = {"model": "bicubic", "scale": 2, "precision": "fp32", "name": name, **options}
    return request(server, "api/jobs?" + urllib.parse.urlencode(query), data)


def wait(server: Server, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = request(server, f"api/jobs/{job_id}")
        assert status == 200, body
        if body["state"] in ("done", "failed"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's shipped weights (conftest hides them from every other test)."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


@pytest.mark.usefixtures("shipped")
def test_page_and_info(serve: Any) -> None:
    server = serve(["bicubic", "nlsr-dlsn-s"])
    status, page = request(server, "")
    assert status == 200 and b'src="/static/app.js"' in page and b"http" not in page.lower()
    for name in ("app.js", "style.css"):
        status, body = request(server, f"static/{name}")
        assert status == 200 and body and b"//cdn" not in body
    status, info = request(server, "api/info")
    assert status == 200
    assert [m["name"] for m in info["models"]] == ["bicubic", "nlsr-dlsn-s"]
    assert "fp32" in info["precisions"] and info["precision"] in info["precisions"]


def test_default_models_are_those_shipped() -> None:
    """Without shipped weights (conftest's empty folder) the page offers bicubic alone."""
    server = make_server("127.0.0.1", 0)
    try:
        assert [m["name"] for m in server.info["models"]] == ["bicubic"]
    finally:
        server.server_close()
        server.jobs.close()


@pytest.mark.usefixtures("shipped")
@pytest.mark.parametrize(
    ("model", "tile", "size"), [("bicubic", 16, (40, 30)), ("nlsr-dlsn-s", 512, (24, 20))]
)
def test_result_equals_upscale(serve: Any, model: str, tile: int, size: tuple[int, int]) -> None:
    """The downloaded PNG is nlsr.upscale's output for the same image and options; tiles are
    counted to the last one."""
    server = serve([model], tile=tile, overlap=4)
    pixels = random_image(*size)
    status, job = submit(server, png_bytes(pixels), model=model)
    assert status == 202 and job["state"] in ("queued", "running")
    done = wait(server, job["id"])
    assert done["state"] == "done", done["message"]
    assert done["tiles_done"] == done["tiles_total"] >= (6 if tile == 16 else 1)
    assert done["output"] == [size[1] * 2, size[0] * 2]
    status, body = request(server, f"api/jobs/{job['id']}/result.png?download=1")
    assert status == 200
    options = {"tile": tile, "overlap": 4} if tile < max(size) else {}  # one tile: whole image
    described = nlsr.resolve_model(model, 2, pretrained=model != "bicubic")
    expected = nlsr.upscale(described, pixels, precision="fp32", **options)
    np.testing.assert_array_equal(decoded(body), expected)
    status, before = request(server, f"api/jobs/{job['id']}/input.png")
    np.testing.assert_array_equal(decoded(before), pixels)


def test_16_bit_and_alpha_kept(serve: Any, tmp_path: Path) -> None:
    """A 16-bit RGBA upload gives a 16-bit RGBA result, equal to nlsr.upscale of the file."""
    server = serve()
    rng = np.random.default_rng(5)
    source = tmp_path / "deep.png"
    nlsr.write_image(source, rng.integers(0, 65536, (12, 10, 4), dtype=np.uint16))
    _, job = submit(server, source.read_bytes(), name="deep.png")
    assert wait(server, job["id"])["state"] == "done"
    result = tmp_path / "result.png"
    result.write_bytes(request(server, f"api/jobs/{job['id']}/result.png")[1])
    got, expected = read_image(result), nlsr.upscale("bicubic", read_image(source), scale=2)
    assert got.pixels.dtype == np.uint16 and got.alpha is not None
    np.testing.assert_array_equal(got.pixels, expected.pixels)
    np.testing.assert_array_equal(got.alpha, expected.alpha)


def test_download_header(serve: Any) -> None:
    server = serve()
    _, job = submit(server, png_bytes(random_image(8, 8)), name='my "photo".png')
    wait(server, job["id"])
    with urllib.request.urlopen(server.url + f"api/jobs/{job['id']}/result.png?download=1") as r:
        assert r.headers["Content-Disposition"] == (
            'attachment; filename="my__photo__x2_bicubic.png"'
        )


def test_bad_file_gives_the_cli_message(serve: Any, tmp_path: Path) -> None:
    server = serve()
    data = b"these are notes, not pixels\n"
    status, body = submit(server, data, name="../notes.txt")
    (tmp_path / "notes.txt").write_bytes(data)
    with pytest.raises(ImageReadError) as cli:
        read_image(tmp_path / "notes.txt")
    assert status == 400
    assert body["error"] == str(cli.value).replace(str(tmp_path / "notes.txt"), "notes.txt")
    assert body["error"].startswith("notes.txt: not a supported image file")
    status, body = submit(server, b"", name="empty.png")
    assert (status, body["error"]) == (400, "empty.png: empty file (0 bytes)")


def test_limits(serve: Any) -> None:
    server = serve(limits=Limits(max_upload=4000, max_pixels=1000))
    status, body = submit(server, forged_png(100_000, 100_000), name="bomb.png")
    assert status == 400
    assert body["error"].startswith("bomb.png: image is 100000x100000 = 10000000000 pixels")
    status, body = submit(server, png_bytes(random_image(40, 30)), name="big.png")
    assert status == 400 and "40 = 1200 pixels, above the limit of 1000" in body["error"]
    data = png_bytes(random_image(64, 64))
    assert len(data) > 4000
    status, body = submit(server, data, name="huge.png")
    assert status == 413
    assert body["error"] == (
        f"huge.png: file too large ({len(data)} bytes; the limit is 4000 bytes, --max-upload)"
    )
    status, body = submit(server, png_bytes(random_image(8, 8)), scale=5)
    assert (status, body["error"]) == (400, "model bicubic upscales x2, x3, x4, not x5")
    status, body = submit(server, png_bytes(random_image(8, 8)), model="nlsn")
    assert status == 400 and body["error"].startswith("model 'nlsn': not offered")


def test_failed_job_shows_message(serve: Any) -> None:
    """A job that cannot run (float16 on the CPU) fails with the CLI's one-line reason."""
    if "fp16" not in PRECISIONS:
        pytest.skip("needs nlsr.inference.PRECISIONS with fp16 (CUDA only)")
    server = serve(device="cpu")
    _, job = submit(server, png_bytes(random_image(8, 8)), precision="fp16")
    done = wait(server, job["id"])
    with pytest.raises(ValueError) as direct:
        nlsr.upscale("bicubic", random_image(8, 8), scale=2, precision="fp16", device="cpu")
    assert (done["state"], done["message"]) == ("failed", str(direct.value))


def raw_get(server: Server, path: str, host: str | None = None) -> tuple[int, bytes]:
    """A GET sent exactly as written (no normalisation of ``..``)."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.putrequest("GET", path, skip_host=host is not None)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    answer = connection.getresponse()
    result = answer.status, answer.read()
    connection.close()
    return result


@pytest.mark.parametrize(
    "path",
    [
        "/static/../jobs.py",
        "/static/%2e%2e/server.py",
        "/static/..%2fjobs.py",
        "/../../../../etc/passwd",
        "/api/jobs/..%2f..%2f..%2fetc%2fpasswd/input.png",
        "/api/jobs/../../etc/passwd",
        "/static/index.html/../../__init__.py",
    ],
)
def test_path_traversal_refused(serve: Any, path: str) -> None:
    server = serve()
    status, body = raw_get(server, path)
    assert status == 404
    assert b"import" not in body and b"root:" not in body


def test_foreign_host_refused(serve: Any) -> None:
    server = serve()
    assert raw_get(server, "/api/info", host="attacker.example:80")[0] == 403
    assert raw_get(server, "/api/info", host="localhost:1")[0] == 200


def test_queue_one_job_at_a_time(serve: Any) -> None:
    """While a job runs, later ones wait with their position; beyond max_queue they are refused;
    the result is asked too early gives 409; all finish once the first is let go."""
    server = serve(limits=Limits(max_queue=2))
    jobs = server.jobs
    release, running = threading.Event(), []
    original = jobs._run

    def held(job: Any) -> None:
        running.append(job.id)
        assert release.wait(30)
        original(job)

    jobs._run = held  # type: ignore[method-assign]
    ids = []
    for seed in range(3):
        status, job = submit(server, png_bytes(random_image(8, 8, seed)))
        assert status == 202
        ids.append(job["id"])
        if seed == 0:
            deadline = time.monotonic() + 10
            while not running and time.monotonic() < deadline:
                time.sleep(0.01)
    status, body = submit(server, png_bytes(random_image(8, 8)))
    assert status == 503 and "2 jobs are waiting already" in body["error"]
    states = [request(server, f"api/jobs/{i}")[1] for i in ids]
    assert [(s["state"], s["position"]) for s in states] == [
        ("running", 0),
        ("queued", 1),
        ("queued", 2),
    ]
    assert request(server, f"api/jobs/{ids[0]}/result.png")[0] == 409
    release.set()
    for seed, job_id in enumerate(ids):
        assert wait(server, job_id)["state"] == "done"
        _, body = request(server, f"api/jobs/{job_id}/result.png")
        expected = nlsr.upscale("bicubic", random_image(8, 8, seed), scale=2, tile=512)
        np.testing.assert_array_equal(decoded(body), expected)
    assert running == ids
    assert request(server, "api/jobs/0123456789abcdef")[0] == 404


def test_files_stay_in_the_temporary_folder(serve: Any) -> None:
    server = serve()
    folder = server.jobs.folder
    _, job = submit(server, png_bytes(random_image(8, 8)), name="../../../escape.png")
    wait(server, job["id"])
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{job['id']}-input.png",
        f"{job['id']}-result.png",
    ]
    assert not (folder.parent / "escape.png").exists()
    server.jobs.close()
    assert not folder.exists()


def test_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-upload", "0"]) == 2
    assert capsys.readouterr().err == (
        "nlsr serve: error: --max-upload: expected a positive number, got 0\n"
    )
    assert main(["serve", "--model", "nosuch", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlsr serve: error: --model 'nosuch': unknown model")
    assert err.count("\n") == 1


def test_command_serves_and_cleans_up_on_sigterm() -> None:
    """``nlsr serve --port 0`` prints its folder and address, answers, and on SIGTERM exits 0
    with the folder removed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "nlsr", "serve", "--port", "0", "--model", "bicubic"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        folder = Path(process.stdout.readline().split(" files in ", 1)[1].split(" (")[0])
        url = process.stdout.readline().split("nlsr serve: ", 1)[1].split(" ")[0]
        assert url.startswith("http://127.0.0.1:") and folder.is_dir()
        with urllib.request.urlopen(url + "api/info", timeout=30) as answer:
            assert json.load(answer)["models"] == [{"name": "bicubic", "scales": [2, 3, 4]}]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not folder.exists()
    finally:
        process.kill()
        process.wait()
