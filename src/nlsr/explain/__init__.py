"""Where the attention of a network looks: per-block attention rows of chosen LR pixels
(:func:`explain`) and their statistics over whole images (:mod:`nlsr.explain.stats`)."""

from nlsr.explain.api import BlockExplanation, explain
from nlsr.explain.capture import ExplainError, attention_blocks

__all__ = ["BlockExplanation", "ExplainError", "attention_blocks", "explain"]
