"""The exponential moving average of a model's weights that training keeps beside the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Exponential moving average of a model's weights (buffers are copied as they are)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay used for update number ``updates`` (1-based): warmed up as
        ``min(decay, (1 + n) / (10 + n))`` so the initial weights fade out quickly."""
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """``ema = d * ema + (1 - d) * weights`` for every floating tensor, ``d = decay_at``."""
        decay = self.decay_at(updates)
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)
