"""Non-local attention blocks. Each maps ``(N, C, H, W) -> (N, C, H, W)`` for any H, W >= 1.

``create_attention(name, channels, **options)`` builds one by name, so backbones accept any.
Importing the package imports every block module, which registers its blocks
(:mod:`nlsr.attention.registry`).
"""

from __future__ import annotations

from nlsr.attention import cross_scale, gla, hspa, lcoa, nla, nlsa  # noqa: F401  (registration)
from nlsr.attention.registry import available_attention, create_attention, register_attention

__all__ = ["available_attention", "create_attention", "register_attention"]
