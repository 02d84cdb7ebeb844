"""Which attention blocks a network has, and what each saw during one seeded inference.

:func:`attention_blocks` lists the non-local blocks of a network in call order of their
modules; :func:`capture` runs :func:`nlsr.inference.forward` once (whole image, seeded) with a
forward-pre-hook on the chosen blocks that keeps each block's input and the state of its random
generator just before the block drew its hash projections or k-means initialisation, so that
:mod:`nlsr.explain.rows` recomputes the very draws of that run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.attention.cross_scale import CrossScaleAttention, InScaleNonLocalAttention
from nlsr.attention.gla import GlobalLearnableAttention
from nlsr.attention.hspa import HSPA
from nlsr.attention.lcoa import LCoA
from nlsr.attention.nla import NonLocalAttention
from nlsr.attention.nlsa import NonLocalSparseAttention
from nlsr.inference import DEFAULT_SEED, check_seed, forward
from nlsr.models.descriptor import ModelDescriptor

#: Block classes nlsr explains, most specific first, with the name of their mechanism.
KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (HSPA, "hspa"),
    (NonLocalAttention, "nla"),
    (InScaleNonLocalAttention, "in-scale"),
    (NonLocalSparseAttention, "nlsa"),
    (GlobalLearnableAttention, "gla"),
    (LCoA, "lcoa"),
    (CrossScaleAttention, "csna"),
)


class ExplainError(ValueError):
    """A request nlsr explain cannot serve (no attention block, a block or query out of range)."""


def block_kind(module: nn.Module) -> str | None:
    """The mechanism name of an attention block (``"nla"``, ``"gla"``, ...), None otherwise."""
    for cls, kind in KINDS:
        if isinstance(module, cls):
            return kind
    return None


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module path, block, kind)`` of every attention block of ``model``, in module order."""
    return [
        (name, m, kind) for name, m in model.named_modules() if (kind := block_kind(m)) is not None
    ]


@dataclass
class Captured:
    """What one block saw: its ``input`` ``(1, C, h, w)`` (a detached copy; None once
    processed), the state of its generator before the block drew (None: the block draws
    nothing or has fixed projections), for LCoA in a shared-pattern network the index of the
    block whose pattern it applied, and what the ``process`` of :func:`capture` made of it."""

    index: int
    name: str
    kind: str
    block: nn.Module
    input: Tensor | None
    generator_state: Tensor | None
    shared_from: int | None = None
    result: Any = None


Process = Callable[[Captured], Any]


@contextmanager
def _hooks(
    blocks: list[tuple[int, str, nn.Module, str]],
    sink: dict[int, Captured],
    process: Process | None,
) -> Iterator[None]:
    """Record the first call of every block in ``blocks`` into ``sink`` (input copied before
    the call; with ``process``, processed right after the call and the input dropped, so one
    copy lives at a time), then remove the hooks.

    LCoA blocks in LCoAN are called through ``forward_shared`` (not ``__call__``), so for them
    that method is wrapped on the instance for the duration."""
    handles: list[Any] = []
    wrapped: list[nn.Module] = []
    owner: dict[int, int] = {}  # id(pattern) -> index of the block that made it
    pending: dict[int, Captured] = {}

    def before(index: int, name: str, block: nn.Module, kind: str, x: Tensor) -> None:
        if index not in sink and index not in pending:
            gen = getattr(block, "generator", None)
            state = gen.get_state() if isinstance(gen, torch.Generator) else None
            pending[index] = Captured(index, name, kind, block, x.detach().clone(), state)

    def after(index: int) -> None:
        c = pending.pop(index, None)
        if c is None:
            return
        if process is not None:  # after the call: LCoA's k-means is initialised by then
            c.result = process(c)
            c.input = None
        sink[index] = c

    for index, name, block, kind in blocks:

        def pre(module: nn.Module, args: tuple[Any, ...], i=index, n=name, k=kind) -> None:
            before(i, n, module, k, args[0])

        def post(module: nn.Module, args: tuple[Any, ...], output: Any, i=index) -> None:
            after(i)

        handles.append(block.register_forward_pre_hook(pre))
        handles.append(block.register_forward_hook(post))
        if isinstance(block, LCoA):
            original: Callable[..., Any] = block.forward_shared

            def shared(x: Tensor, pattern: Any = None, i=index, n=name, b=block, f=original):
                before(i, n, b, "lcoa", x)
                if pattern is not None and i in pending:
                    pending[i].shared_from = owner.get(id(pattern))
                out, made = f(x, pattern)
                owner.setdefault(id(made), i)
                after(i)
                return out, made

            block.forward_shared = shared  # type: ignore[method-assign]
            wrapped.append(block)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for block in wrapped:
            del block.forward_shared


def capture(
    model: ModelDescriptor,
    lr: Tensor,
    blocks: list[int] | None = None,
    seed: int = DEFAULT_SEED,
    process: Process | None = None,
) -> tuple[list[Captured], Tensor]:
    """Run ``model`` once on ``lr`` ``(1, 3, H, W)`` in [0, 1] (whole image, float32, ``seed``)
    and return what the attention blocks numbered ``blocks`` (all when None) saw, and the SR
    output. With ``process``, each block's record is handed to it right after the block ran
    and its input is then dropped (memory: the inference's plus one feature map)."""
    if seed is None:
        raise ExplainError("explain needs a seed (the draws are recomputed from it)")
    check_seed(seed)
    found = attention_blocks(model.module)
    if not found:
        raise ExplainError(f"model {model.name} has no attention block to explain")
    wanted = range(len(found)) if blocks is None else blocks
    for k in wanted:
        if not 0 <= k < len(found):
            raise ExplainError(f"--block {k}: the model has blocks 0 to {len(found) - 1}")
    chosen = [(k, *found[k]) for k in wanted]
    owners = {k for k, _, b, _ in chosen if isinstance(b, LCoA)}
    if owners:  # a shared pattern is explained through the block that made it: keep them all
        chosen += [(k, *f) for k, f in enumerate(found) if f[2] == "lcoa" and k not in wanted]
    sink: dict[int, Captured] = {}
    with _hooks(chosen, sink, process):
        sr = forward(model, lr, seed=seed, precision="fp32")
    wanted_set = set(wanted)
    keep = [sink[k] for k in sorted(sink) if k in wanted_set or _is_owner(sink, k, wanted_set)]
    return keep, sr


def _is_owner(sink: dict[int, Captured], k: int, wanted: set[int]) -> bool:
    """Whether block ``k`` made the pattern that a wanted block applied."""
    return any(sink[j].shared_from == k for j in wanted if j in sink)
