"""nlsr: single-image super-resolution with non-local, self-similarity attention.

The public functions are imported lazily so that ``import nlsr`` stays cheap (no torch import
until a model or the inference engine is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "degrade": "nlsr.resize",
    "imresize": "nlsr.resize",
    "modcrop": "nlsr.resize",
    "read_image": "nlsr.io",
    "write_image": "nlsr.io",
    "upscale": "nlsr.inference",
    "evaluate": "nlsr.evaluation",
    "load": "nlsr.models",
    "save": "nlsr.models",
    "resolve_model": "nlsr.models",
    "export_onnx": "nlsr.export",
}
_SUBMODULES = ("attention", "data", "metrics", "models")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"nlsr.{name}")
    else:
        raise AttributeError(f"module 'nlsr' has no attribute {name!r}")
    globals()[name] = value
    return value
