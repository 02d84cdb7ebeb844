"""Networks by name: ``nlsr.models.create("dlsn", scale=2)``, ``nlsr.models.available()``."""

from __future__ import annotations

from nlsr.models.registry import available, create, describe, options, register

__all__ = ["available", "create", "describe", "options", "register"]
