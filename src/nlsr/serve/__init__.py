"""``nlsr serve``: a local web page to upscale an image, made of :mod:`~nlsr.serve.jobs` (models,
queues, progress, the temporary folder) and :mod:`~nlsr.serve.server` (HTTP, static files).

Nothing is fetched from elsewhere: the page (``static/``) ships in the package."""

from __future__ import annotations

from typing import Any

from nlsr.serve.jobs import BICUBIC, DEFAULT_MODELS, Jobs, Limits, ServeError, resolve_models
from nlsr.serve.server import Server

__all__ = ["DEFAULT_MODELS", "Jobs", "Limits", "ServeError", "Server", "make_server"]


def make_server(
    host: str = "127.0.0.1",
    port: int = 0,
    models: list[str] | None = None,
    limits: Limits | None = None,
    *,
    tile: int = 512,
    overlap: int = 16,
    device: str | None = None,
) -> Server:
    """A server bound to ``host:port`` (port 0: any free one) offering ``models`` (default:
    those of :data:`DEFAULT_MODELS` shipped here); run it with ``serve_forever`` and end it with
    ``shutdown(); server_close(); server.jobs.close()``."""
    from nlsr.inference import PRECISIONS

    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(
            f"--tile {tile} / --overlap {overlap}: need tile >= 1, 0 <= overlap < tile"
        )
    if not models:  # the defaults that exist here (a weights folder may ship other models)
        from nlsr.models.pretrained import read_manifest

        shipped = read_manifest()
        models = [n for n in DEFAULT_MODELS if n == BICUBIC or n in shipped]
    offered = resolve_models(list(models))
    limits = limits or Limits()
    jobs = Jobs(offered, limits, tile=tile, overlap=overlap, device=device)
    info: dict[str, Any] = {
        "models": [{"name": n, "scales": list(s)} for n, s in offered.items()],
        "precisions": [p for p in PRECISIONS if p != "fp16"],
        "precision": "auto" if "auto" in PRECISIONS else "fp32",
        "max_upload": limits.max_upload,
        "max_pixels": limits.max_pixels,
        "tile": tile,
    }
    try:
        return Server((host, port), jobs, info)
    except BaseException:
        jobs.close()
        raise
