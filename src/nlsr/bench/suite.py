"""The benchmark suite: which blocks and networks are measured (model surgery, the released
baselines), at which sizes (probing, skipping what would exceed the limits), and the fitted
scaling exponents of what was measured."""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from nlsr.attention.reference import ReleasedFormError, released_baseline
from nlsr.bench.inputs import (
    INPUTS,
    NetworkFeatures,
    load_source,
    make_inputs,
    network_channels,
    support_sizes,
)
from nlsr.bench.measuring import (
    BenchError,
    MemoryMeter,
    environment,
    extrapolate,
    fit_exponent,
    load_average,
    measure,
    profile_ops,
    resolve_device,
    workload,
)
from nlsr.bench.reporting import Fit, Report, Row, Settings, format_bytes, format_row

#: Model configurations: constructor defaults (the papers' sizes) or each architecture's reduced
#: ``small`` options (:func:`nlsr.models.small_config`).
CONFIGS = ("small", "paper")
#: A first size at least this large is preceded by probe runs at 1/8 and 1/4 of its side.
PROBE_FROM = 128
#: A block name that is no attention: the conv-ReLU-conv residual block around the attention
#: blocks in every network, measured as the reference for their time and memory.
REFERENCE_BLOCK = "resblock"
#: Values of ``Settings.baseline``: None, or "released" (rows named ``NAME@released``, computed
#: by :func:`nlsr.attention.reference.released_baseline`).
BASELINES = ("released",)


# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------


class SharedPatternAdapter(nn.Module):
    """Wraps a block so that it can stand in for a pattern-sharing block (LCoAN's
    ``forward_shared``): it computes its own attention and shares no pattern."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped block's output."""
        return self.block(x)

    def forward_shared(self, x: torch.Tensor, pattern: object = None) -> tuple[torch.Tensor, None]:
        """The wrapped block's output and no pattern (the next block computes its own)."""
        return self.block(x), None


def _attention_types() -> tuple[type, ...]:
    """Classes of the registered attention blocks (built on the meta device: no memory)."""
    from nlsr.attention import available_attention, create_attention

    types: set[type] = set()
    with torch.device("meta"):
        for name in available_attention():
            with contextlib.suppress(ValueError, TypeError):
                types.add(type(create_attention(name, 64)))
    return tuple(types)


def _in_channels(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise BenchError(f"cannot tell the channel count of {type(module).__name__}")


def swap_attention(model: nn.Module, name: str) -> int:
    """Replace every registered attention block inside ``model`` by ``create_attention(name,
    channels)`` (wrapped in :class:`SharedPatternAdapter`); returns how many were replaced."""
    from nlsr.attention import create_attention

    kinds = _attention_types()
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, kinds)
    ]
    for parent, child_name, child in targets:
        block = create_attention(name, _in_channels(child))
        setattr(parent, child_name, SharedPatternAdapter(block))
    return len(targets)


def build_model(spec: str, scale: int = 2, config: str = "small") -> nn.Module:
    """Network ``spec`` = ``ARCH`` or ``ARCH+BLOCK`` (the network with every attention block
    replaced by attention ``BLOCK``, or with ``attention=BLOCK`` where the network takes that
    option, as EDSR and RCAN do), in the ``small`` (:func:`nlsr.models.small_config`) or
    ``paper`` size."""
    from nlsr.attention import available_attention
    from nlsr.models import available, create, small_config

    if config not in CONFIGS:
        raise BenchError(f"--config must be one of {', '.join(CONFIGS)}, got {config!r}")
    arch, _, block = spec.partition("+")
    if arch not in available():
        raise BenchError(f"--models: unknown network {arch!r}; available: {', '.join(available())}")
    if block and block not in available_attention():
        raise BenchError(
            f"--models: unknown attention {block!r} in {spec!r}; "
            f"available: {', '.join(available_attention())}"
        )
    options = small_config(arch) if config == "small" else {}
    if block:
        with torch.device("meta"):  # shapes only: which constructor is it?
            kind = type(create(arch, scale, **options))
        if "attention" in inspect.signature(kind.__init__).parameters:
            return create(arch, scale, attention=block, **options)
    model = create(arch, scale, **options)
    if block and swap_attention(model, block) == 0:
        raise BenchError(f"--models {spec!r}: network {arch!r} has no attention block to replace")
    return model


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def _skip_reason(
    settings: Settings,
    history: list[tuple[int, float, int | None]],
    positions: int,
) -> str:
    """Why a size should be skipped, from the extrapolated time and memory, or ''."""
    basis = ", ".join(str(math.isqrt(p)) for p, _, _ in history[-2:])
    t = extrapolate([(p, m) for p, m, _ in history], positions)
    if settings.max_seconds is not None and t is not None and t > settings.max_seconds:
        return (
            f"predicted {t:.3g} s per run > --max-seconds {settings.max_seconds:g} "
            f"(from sides {basis})"
        )
    mem = extrapolate([(p, e) for p, _, e in history if e is not None], positions)
    if settings.max_memory is not None and mem is not None and mem > settings.max_memory:
        return (
            f"predicted {format_bytes(mem)} extra memory > "
            f"--max-memory {format_bytes(settings.max_memory)} (from sides {basis})"
        )
    return ""


def _targets(
    settings: Settings, device: torch.device
) -> Iterator[tuple[str, str, int, Callable[[], nn.Module]]]:
    """(kind, name, input channels, builder) of every block and network to measure; under
    ``--input network`` a block has its network's channel count, not ``settings.channels``."""
    from nlsr.attention import create_attention

    if settings.baseline is not None and settings.baseline not in BASELINES:
        raise BenchError(
            f"--baseline must be one of {', '.join(BASELINES)}, got {settings.baseline!r}"
        )
    released = settings.baseline == "released"
    for name in settings.blocks:
        c = (
            network_channels(name, settings.scale)
            if settings.input == "network"
            else settings.channels
        )
        if name == REFERENCE_BLOCK:
            from nlsr.models.common import ResBlock

            yield "block", name, c, lambda c=c: ResBlock(c).to(device)
            continue
        yield "block", name, c, lambda n=name, c=c: create_attention(n, c).to(device)
        if released and name in ("nlsa", "gla", "hspa", "csna"):
            yield (
                "block",
                f"{name}@released",
                c,
                lambda n=name, c=c: released_baseline(create_attention(n, c).to(device)),
            )
    for spec in settings.models:
        yield (
            "model",
            spec,
            3,
            lambda s=spec: build_model(s, settings.scale, settings.config).to(device),
        )
        if released:
            yield (
                "model",
                f"{spec}@released",
                3,
                lambda s=spec: released_baseline(
                    build_model(s, settings.scale, settings.config).to(device)
                ),
            )


def run_suite(settings: Settings, log: Callable[[str], None] | None = None) -> Report:
    """Measure every block and network of ``settings`` at every size and mode (ascending
    sizes; a size is skipped, with a note, when the extrapolation of the sizes measured before
    it -- or of probe runs at 1/8 and 1/4 of its side, for a first size of at least
    :data:`PROBE_FROM` -- exceeds ``max_seconds`` per run or ``max_memory`` extra), then fit
    the exponents."""
    device = resolve_device(settings.device)
    if settings.input not in INPUTS:
        raise BenchError(f"--input must be one of {', '.join(INPUTS)}, got {settings.input!r}")
    if settings.input_block < 0:
        raise BenchError(f"--input-block must be >= 0, got {settings.input_block}")
    source = load_source(settings.input_image) if settings.input != "random" else None
    sources = _Inputs(
        source,
        NetworkFeatures(source, settings.seed, settings.scale, settings.input_block, device)
        if source is not None and settings.input == "network"
        else None,
    )
    meter = MemoryMeter(device)
    env = environment(device, meter)
    rows: list[Row] = []
    sizes = sorted(set(settings.sizes))
    for kind, name, channels, build in _targets(settings, device):
        for mode in settings.modes:
            history: list[tuple[int, float, int | None]] = []
            stop = ""
            for size in sizes:
                positions = size * size
                row = Row(kind, name, size, positions, channels, mode, "ok")
                if not history and not stop and size >= PROBE_FROM:
                    history = _probe(row, build, settings, sources, device, meter, log)
                row.note = stop or _skip_reason(settings, history, positions)
                if row.note:
                    row.status = "skipped"
                else:
                    _measure_row(row, build, settings, sources, device, meter)
                    gc.collect()  # the target and its input are gone: free them now
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if row.status == "ok":
                        history.append((positions, row.median_s or 0.0, row.extra_bytes))
                    elif row.status == "skipped":
                        stop = row.note
                    else:
                        stop = f"not measured: {row.note.split(':')[0]} at size {size}"
                rows.append(row)
                if log:
                    log(format_row(row))
    env["load_average_end"] = load_average()
    return Report(env, settings, rows, fit_rows(rows, settings.fit_range))


class _Inputs(NamedTuple):
    """Where the inputs come from: the image (None: random) and, under ``--input network``,
    the capture of the blocks' network features."""

    source: torch.Tensor | None
    features: NetworkFeatures | None


def _probe(
    target: Row,
    build: Callable[[], nn.Module],
    settings: Settings,
    inputs: _Inputs,
    device: torch.device,
    meter: MemoryMeter,
    log: Callable[[str], None] | None,
) -> list[tuple[int, float, int | None]]:
    """One untimed-warm-up run at sides ``size // 8`` and ``size // 4`` of ``target`` (not
    reported), so that a large first size is checked against the limits before it runs;
    returns their history."""
    quick = replace(settings, repeat=1, warmup=0, profile_top=0)
    history: list[tuple[int, float, int | None]] = []
    for side in (target.size // 8, target.size // 4):
        row = Row(target.kind, target.name, side, side * side, target.channels, target.mode, "ok")
        _measure_row(row, build, quick, inputs, device, meter)
        gc.collect()
        if log:
            log(f"(probe) {format_row(row)}")
        if row.status != "ok":
            break
        history.append((row.positions, row.median_s or 0.0, row.extra_bytes))
    return history


def _measure_row(
    row: Row,
    build: Callable[[], nn.Module],
    settings: Settings,
    sources: _Inputs,
    device: torch.device,
    meter: MemoryMeter,
) -> None:
    """Build the target, time it on its input (real, network features or random: see
    :mod:`nlsr.bench.inputs`) and fill ``row`` (status "error" with the message on failure)."""
    torch.manual_seed(settings.seed)
    try:
        module = build()
        row.parameters = sum(p.numel() for p in module.parameters())
        if sources.features is not None and row.kind == "block":
            inputs = sources.features(row.name.partition("@")[0], row.size, settings.batch)
        else:
            shape = (settings.batch, row.channels, row.size, row.size)
            inputs = make_inputs(row.kind, shape, sources.source, settings.seed, device)
        if row.mode == "train" and row.kind == "block":
            inputs.requires_grad_(True)
        elif row.mode == "train" and not any(p.requires_grad for p in module.parameters()):
            row.status, row.note = "skipped", "nothing to train (no trainable parameters)"
            return
        row.input_bytes = inputs.numel() * inputs.element_size()
        fn = workload(module, inputs, row.mode)
        timing = measure(
            fn, repeat=settings.repeat, warmup=settings.warmup, device=device, meter=meter
        )
        row.times_s = timing.times_s
        row.median_s = timing.median_s
        row.min_s = min(timing.times_s)
        row.cpu_times_s = timing.cpu_times_s
        row.cpu_median_s = statistics.median(timing.cpu_times_s)
        row.peak_bytes, row.extra_bytes = timing.peak_bytes, timing.extra_bytes
        if settings.profile_top > 0:
            row.profile = profile_ops(fn, device, settings.profile_top)
        row.supports = support_sizes(module, inputs.detach())
    except (BenchError, ReleasedFormError):
        raise
    except Exception as err:  # a failing block is reported, the suite goes on
        row.status = "error"
        row.note = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def fit_rows(rows: Sequence[Row], fit_range: tuple[int, int]) -> list[Fit]:
    """Time and memory exponents per target and mode over the measured sizes within
    ``fit_range`` (inclusive sides); targets with fewer than two such sizes get none."""
    lo, hi = fit_range
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.status == "ok" and lo <= r.size <= hi:
            groups.setdefault((r.kind, r.name, r.mode), []).append(r)
    fits: list[Fit] = []
    for (kind, name, mode), group in groups.items():
        sizes = [r.size for r in group]
        if len(set(sizes)) < 2:
            continue
        positions = [r.positions for r in group]
        for metric, values in (
            ("time", [r.median_s or 0.0 for r in group]),
            ("cpu", [r.cpu_median_s or 0.0 for r in group]),
        ):
            if min(values) > 0:
                fits.append(Fit(kind, name, mode, metric, fit_exponent(positions, values), sizes))
        mem = [r for r in group if r.extra_bytes]
        if len({r.size for r in mem}) >= 2:
            exponent = fit_exponent([r.positions for r in mem], [r.extra_bytes or 0 for r in mem])
            fits.append(Fit(kind, name, mode, "memory", exponent, [r.size for r in mem]))
    return fits
