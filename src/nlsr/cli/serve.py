"""``nlsr serve``: a local web page where one drops an image, picks the model, scale and
precision, watches the tiles, compares before and after, and downloads the result.

The page and its scripts ship in the package (nothing from the internet). The server binds to
loopback unless told otherwise, limits upload bytes and pixels, runs one job at a time per
model, and keeps every file in one temporary folder, removed when it stops (Ctrl-C).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr serve``."""
    from nlsr.serve.jobs import DEFAULT_MODELS, Limits

    limits = Limits()
    p = subparsers.add_parser(
        "serve",
        help="a local web page to upscale images",
        description="Serve a web page on this machine where one drops or picks an image, "
        "chooses the model, scale and precision, watches progress, compares input and result "
        "with a before/after slider and downloads the result (PNG). Stop it with Ctrl-C.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; anything else lets "
        "other machines upload images)",
    )
    p.add_argument(
        "--port", type=int, default=8000, metavar="N", help="port (default 8000; 0: any free one)"
    )
    p.add_argument(
        "--model",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="models to offer: shipped models, an architecture with shipped "
        f"weights, or bicubic (default: {', '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--open", action="store_true", help="open the page in the web browser")
    p.add_argument(
        "--max-upload",
        type=int,
        default=limits.max_upload,
        metavar="BYTES",
        help=f"refuse larger uploads (default {limits.max_upload})",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=limits.max_pixels,
        metavar="N",
        help="refuse images with more pixels, read from the header before decoding "
        f"(default {limits.max_pixels})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=limits.max_queue,
        metavar="N",
        help=f"refuse new jobs while this many wait (default {limits.max_queue})",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=512,
        metavar="N",
        help="run in overlapping tiles of N input pixels, memory bounded (default 512)",
    )
    p.add_argument(
        "--overlap", type=int, default=16, metavar="N", help="tile overlap in pixels (default 16)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.set_defaults(run=run)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; then stop the workers and remove the temporary folder."""
    from nlsr.serve import Limits, make_server
    from nlsr.serve.server import is_loopback

    for option in ("max_upload", "max_pixels", "max_queue"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag}: expected a positive number, got {getattr(args, option)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: expected 0 to 65535, got {args.port}")
    limits = Limits(args.max_upload, args.max_pixels, args.max_queue)
    server = make_server(
        args.host,
        args.port,
        args.model,
        limits,
        tile=args.tile,
        overlap=args.overlap,
        device=args.device,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill also removes the folder
    try:
        if not is_loopback(args.host):
            print(
                f"nlsr serve: warning: listening on {args.host}: other machines can upload images",
                file=sys.stderr,
            )
        print(f"nlsr serve: files in {server.jobs.folder} (removed on exit)")
        print(f"nlsr serve: {server.url} (Ctrl-C to stop)", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        print("nlsr serve: stopped")
    finally:
        server.server_close()
        server.jobs.close()
    return 0
