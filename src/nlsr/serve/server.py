"""The HTTP side of ``nlsr serve``: the standard library's ThreadingHTTPServer, a fixed set of
routes (static files from the package, a small JSON API), uploads as raw request bodies."""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nlsr.serve.jobs import Jobs, ServeError

#: URL path -> (file in nlsr/serve/static, content type): the only files the server sends.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
#: Sent with every answer: only this origin's scripts, styles and images; no framing, no sniffing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_JOB_FILE = re.compile(r"^/api/jobs/([^/]+)/(input|result)\.png$")
_JOB = re.compile(r"^/api/jobs/([^/]+)$")
_LOOPBACK_NAMES = ("localhost",)


def display_name(raw: str) -> str:
    """The upload's file name for messages and downloads: last path part, printable, short."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return text[:120] or "upload"


def _ascii_name(name: str) -> str:
    """A file name safe in a Content-Disposition header."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "result"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the jobs and the page's settings."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], jobs: Jobs, info: dict[str, Any]) -> None:
        super().__init__(address, Handler)
        self.jobs, self.info = jobs, info
        self.loopback = is_loopback(address[0])

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    """Routes: GET the page and its files, GET /api/info, POST /api/jobs (the raw image as the
    body, options in the query), GET /api/jobs/ID, GET /api/jobs/ID/{input,result}.png."""

    server: Server
    server_version = "nlsr-serve"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        """Static files, settings, job status and images."""
        self._answer(self._get)

    def do_POST(self) -> None:
        """A new job."""
        self._answer(self._post)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the command prints the address and errors only."""

    # -- routes -------------------------------------------------------------------------------

    def _get(self, path: str, query: dict[str, str]) -> None:
        if path in STATIC:
            filename, kind = STATIC[path]
            data = resources.files("nlsr.serve").joinpath("static", filename).read_bytes()
            self._send(HTTPStatus.OK, data, kind)
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.server.info)
        elif match := _JOB_FILE.match(path):
            jobs = self.server.jobs
            job = jobs.get(match.group(1))
            if match.group(2) == "result" and job.state != "done":
                raise ServeError(f"job {job.id} has no result yet ({job.state})", 409)
            data = jobs.path(job.id, match.group(2)).read_bytes()
            headers = {}
            if "download" in query:
                stem = _ascii_name(job.name.rsplit(".", 1)[0])
                filename = f"{stem}_x{job.scale}_{job.model}.png"
                headers["Content-Disposition"] = f'attachment; filename="{filename}"'
            self._send(HTTPStatus.OK, data, "image/png", headers)
        elif match := _JOB.match(path):
            jobs = self.server.jobs
            self._json(HTTPStatus.OK, jobs.status(jobs.get(match.group(1))))
        else:
            raise ServeError(f"{path}: not found", 404)

    def _post(self, path: str, query: dict[str, str]) -> None:
        if path != "/api/jobs":
            raise ServeError(f"{path}: not found", 404)
        name = display_name(query.get("name", "upload"))
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ServeError("the upload needs a Content-Length", 411)
        limit = self.server.jobs.limits.max_upload
        if int(length) > limit:
            self.close_connection = True  # the body is not read
            raise ServeError(
                f"{name}: file too large ({int(length)} bytes; the limit is {limit} bytes, "
                "--max-upload)",
                413,
            )
        data = self.rfile.read(int(length))
        try:
            scale = int(query.get("scale", ""))
        except ValueError:
            raise ServeError(f"scale {query.get('scale')!r}: not a whole number") from None
        jobs = self.server.jobs
        job = jobs.submit(data, name, query.get("model", ""), scale, query.get("precision", ""))
        self._json(HTTPStatus.ACCEPTED, jobs.status(job))

    # -- plumbing -----------------------------------------------------------------------------

    def _answer(self, route: Any) -> None:
        """Run a route; a ServeError becomes ``{"error": message}`` with its status."""
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            self._check_host()
            route(url.path, query)
        except ServeError as e:
            self._json(e.status, {"error": str(e)})
        except FileNotFoundError:  # the job was pruned meanwhile
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such job any more"})
        except Exception as e:  # a failed write, a bug: one line, as the CLI prints it
            from nlsr.cli import describe_error

            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": describe_error(e)[1]})

    def _check_host(self) -> None:
        """On loopback, refuse requests for another host name (a DNS-rebinding page)."""
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        if self.server.loopback and not is_loopback(host):
            raise ServeError(f"Host {host!r}: this server answers to localhost only", 403)

    def _json(self, status: int, value: Any) -> None:
        body = json.dumps(value).encode()
        self._send(status, body, "application/json")

    def _send(
        self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
