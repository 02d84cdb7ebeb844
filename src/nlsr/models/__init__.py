"""Networks by name, and models resolved from anything that names or holds one.

``nlsr.models.create("dlsn", scale=2)``, ``available()``, ``options(name)``; ``register`` an
:class:`ArchSpec` to add an architecture; ``resolve_model(obj)`` for a :class:`ModelDescriptor`;
``load`` / ``save`` for checkpoints (also ``nlsr.load`` / ``nlsr.save``).

Like the root package, this one resolves its exports lazily on attribute access, so importing
any of its modules runs no other. Inside it each module imports only from those listed before
it: ``common``, ``spec`` and ``readers``; the networks (one module per architecture, each
declaring its ``ARCH``); ``registry`` (which imports the networks by name on first use);
``detection``; ``validation``, ``descriptor``; ``loading`` and ``pretrained`` (the
shipped-weights manifest); ``resolve``.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module that defines it
_EXPORTS = {
    "ArchSpec": "nlsr.models.spec",
    "PaperPreset": "nlsr.models.spec",
    "architectures": "nlsr.models.registry",
    "available": "nlsr.models.registry",
    "describe": "nlsr.models.registry",
    "options": "nlsr.models.registry",
    "register": "nlsr.models.registry",
    "small_config": "nlsr.models.registry",
    "unregister": "nlsr.models.registry",
    "detect": "nlsr.models.detection",
    "OPTION_RULES": "nlsr.models.validation",
    "check_options": "nlsr.models.validation",
    "ModelDescriptor": "nlsr.models.descriptor",
    "ModelSource": "nlsr.models.descriptor",
    "create": "nlsr.models.resolve",
    "load": "nlsr.models.resolve",
    "resolve_model": "nlsr.models.resolve",
    "save": "nlsr.models.resolve",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nlsr.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
