"""Time and memory of attention blocks and networks over growing feature maps (``nlsr bench``).

Every measurement runs one callable -- a forward pass under ``torch.inference_mode`` ("infer")
or a forward plus backward pass ("train") -- after ``warmup`` untimed calls and one untimed call
whose memory is tracked, ``repeat`` times, and keeps every wall time (median and minimum
reported) and the process CPU time of each call (with one thread on a shared machine the CPU
time is the less noisy figure: it leaves out the time spent waiting for a core). Peak memory is
taken around the tracked call by a :class:`MemoryMeter`:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* CPU on Linux: the kernel's resident-set high-water mark ``VmHWM`` of ``/proc/self/status``,
  reset before the call by writing ``5`` to ``/proc/self/clear_refs``, after a garbage
  collection and ``malloc_trim(0)`` so that memory freed earlier is not silently reused;
* CPU where the reset is refused: a thread sampling ``VmRSS`` every millisecond (a lower bound:
  it can miss peaks shorter than the period);
* elsewhere: no memory figure (``None``).

``peak_bytes`` is that high-water mark (the whole process on CPU, all tensors on CUDA);
``extra_bytes`` is the peak minus the level just before the call, i.e. the memory the call
needed on top of the model and its input.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.atomic import atomic_write

#: Feature-map sides measured by default (positions = side**2).
DEFAULT_SIZES = (48, 96, 192, 384)
#: What a measurement runs: forward only, or forward + backward.
MODES = ("infer", "train")
#: Model configurations: constructor defaults (the papers' sizes) or :data:`SMALL_CONFIGS`.
CONFIGS = ("small", "paper")
#: Reduced options per architecture for quick network measurements ("small" configuration).
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "edsr": {"n_resblocks": 8, "n_feats": 64},
    "rcan": {"n_resgroups": 2, "n_resblocks": 4, "n_feats": 64},
    "nlsn": {"n_resblocks": 8, "n_feats": 64},
    "dlsn": {"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64},
    "hspan": {"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64},
    "lcoan": {"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64},
    "csnln": {"n_feats": 32, "depth": 4},
}
#: A first size at least this large is preceded by probe runs at 1/8 and 1/4 of its side.
PROBE_FROM = 128
#: JSON layout version written by :meth:`Report.to_dict`.
SCHEMA_VERSION = 1

_SAMPLE_PERIOD_S = 0.001
#: Environment variables that change the figures (allocator, threading), recorded in the JSON.
_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_", "MKL_", "KMP_", "PYTORCH_")


class BenchError(ValueError):
    """A benchmark request that cannot be carried out (bad option, missing optional extra)."""


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    """Value of ``key`` (e.g. ``VmRSS``) in ``/proc/self/status``, in bytes; None if unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0); True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    """Hand memory that glibc keeps in its free lists back to the kernel (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


@dataclass
class MemoryUsage:
    """Peak memory seen during one tracked call (bytes; None when not measurable)."""

    peak_bytes: int | None = None
    extra_bytes: int | None = None


class MemoryMeter:
    """Tracks the peak memory of a call on ``device``; :attr:`method` says how (module doc)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "cuda-max-memory-allocated"
        elif _proc_status_bytes("VmHWM") is not None and _reset_peak_rss():
            self.method = "linux-vmhwm-reset"
        elif _proc_status_bytes("VmRSS") is not None:
            self.method = "rss-sampling-1ms"
        else:
            self.method = "unavailable"

    @contextlib.contextmanager
    def track(self) -> Iterator[MemoryUsage]:
        """Context manager measuring the block it wraps; the yielded record is filled on exit."""
        usage = MemoryUsage()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield usage
            torch.cuda.synchronize(self.device)
            usage.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            usage.extra_bytes = max(0, usage.peak_bytes - base)
            return
        if self.method == "unavailable":
            yield usage
            return
        gc.collect()
        _malloc_trim()
        base = _proc_status_bytes("VmRSS") or 0
        if self.method == "linux-vmhwm-reset":
            _reset_peak_rss()
            yield usage
            peak = _proc_status_bytes("VmHWM") or base
        else:
            finish = self._sampled(base)
            yield usage
            peak = finish()
        usage.peak_bytes = max(peak, base)
        usage.extra_bytes = usage.peak_bytes - base

    @staticmethod
    def _sampled(base: int) -> Callable[[], int]:
        """Start a thread sampling VmRSS; the returned function stops it and gives the maximum."""
        highest = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                highest[0] = max(highest[0], _proc_status_bytes("VmRSS") or 0)
                stop.wait(_SAMPLE_PERIOD_S)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()

        def finish() -> int:
            stop.set()
            thread.join()
            return max(highest[0], _proc_status_bytes("VmRSS") or 0)

        return finish


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall and process-CPU times (seconds) of the timed calls and the memory of a tracked one."""

    times_s: list[float]
    cpu_times_s: list[float]
    peak_bytes: int | None
    extra_bytes: int | None

    @property
    def median_s(self) -> float:
        """Median of :attr:`times_s`."""
        return statistics.median(self.times_s)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    *,
    repeat: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    meter: MemoryMeter | None = None,
) -> Timing:
    """Call ``fn`` ``warmup`` times, once more with its memory tracked by ``meter`` (untimed:
    the tracking trims the allocator, which costs page faults), then ``repeat`` times timed
    (wall clock and process CPU time, CUDA synchronised around each call)."""
    if repeat < 1 or warmup < 0:
        raise BenchError(f"--repeat must be >= 1 and --warmup >= 0, got {repeat} and {warmup}")
    device = torch.device(device)
    meter = meter or MemoryMeter(device)
    for _ in range(warmup):
        fn()
    with meter.track() as usage:
        fn()
    times: list[float] = []
    cpu_times: list[float] = []
    for _ in range(repeat):
        _synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return Timing(times, cpu_times, usage.peak_bytes, usage.extra_bytes)


# --------------------------------------------------------------------------------------------
# Scaling exponent
# --------------------------------------------------------------------------------------------


def fit_exponent(positions: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(positions)``: the ``p`` of
    ``value ~ a * positions**p``. Needs two or more distinct positive positions."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(positions, values, strict=True)]
    if len(pairs) < 2 or any(not math.isfinite(v) for p in pairs for v in p):
        raise BenchError("fit_exponent needs at least two points with positive values")
    mx = statistics.fmean(p[0] for p in pairs)
    my = statistics.fmean(p[1] for p in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx == 0:
        raise BenchError("fit_exponent needs at least two distinct numbers of positions")
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx


def extrapolate(points: Sequence[tuple[int, float]], positions: int) -> float | None:
    """Predicted value at ``positions`` from the measured ``(positions, value)`` points: the
    last value scaled by ``(positions / last)**p`` with ``p`` the slope of the last two points,
    at least 1 (no method gets cheaper per position as inputs grow). None without points."""
    usable = [(x, y) for x, y in points if y > 0]
    if not usable:
        return None
    x1, y1 = usable[-1]
    p = 1.0
    if len(usable) >= 2:
        x0, y0 = usable[-2]
        if x1 != x0:
            p = max(1.0, (math.log(y1) - math.log(y0)) / (math.log(x1) - math.log(x0)))
    return y1 * (positions / x1) ** p


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
    option, as EDSR and RCAN do), in the ``small`` (:data:`SMALL_CONFIGS`) or ``paper`` size."""
    from nlsr.attention import available_attention
    from nlsr.models import available, create

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
    options = dict(SMALL_CONFIGS.get(arch, {})) if config == "small" else {}
    if block:
        with torch.device("meta"):  # shapes only: which constructor is it?
            kind = type(create(arch, scale, **options))
        if "attention" in inspect.signature(kind.__init__).parameters:
            return create(arch, scale, attention=block, **options)
    model = create(arch, scale, **options)
    if block and swap_attention(model, block) == 0:
        raise BenchError(f"--models {spec!r}: network {arch!r} has no attention block to replace")
    return model


def workload(module: nn.Module, inputs: torch.Tensor, mode: str) -> Callable[[], None]:
    """The callable that one measurement times: ``module(inputs)`` under inference mode
    ("infer"), or forward, ``sum().backward()`` and gradient reset ("train", in train mode)."""
    if mode == "infer":
        module.eval()

        def infer() -> None:
            with torch.inference_mode():
                module(inputs)

        return infer
    if mode == "train":
        module.train()

        def train() -> None:
            module.zero_grad(set_to_none=True)
            inputs.grad = None
            module(inputs).sum().backward()

        return train
    raise BenchError(f"--mode must be among {', '.join(MODES)}, got {mode!r}")


def profile_ops(
    fn: Callable[[], object], device: torch.device | str = "cpu", top: int = 15
) -> list[dict[str, Any]]:
    """Run ``fn`` once under ``torch.profiler`` and return the ``top`` operators by self time
    (``op``, ``calls``, ``self_s``, ``total_s``, ``self_fraction`` of the summed self time)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        _synchronize(device)
    cuda = device.type == "cuda"
    events = prof.key_averages()

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls": int(e.count),
            "self_s": self_us(e) / 1e6,
            "total_s": float(e.device_time_total if cuda else e.cpu_time_total) / 1e6,
            "self_fraction": self_us(e) / total,
        }
        for e in ranked
    ]


# --------------------------------------------------------------------------------------------
# Baseline: the released implementations' approach (--baseline released)
#
# Used ONLY as a point of comparison for the timings: nlsr's blocks never call this. It is a
# re-implementation, from the description in the shared models spec, of how the released NLSN
# and DLSN code computes the bucketed attention: all rounds sorted at once (default sort of the
# offset codes), the sorted sequences gathered and tail-padded by copying, the neighbour chunks
# concatenated by copying (three copies of keys, values and GLA's score term), every score of
# every round materialised in float32 at once, log-sum-exp and softmax over the concatenation,
# the result unsorted by gathering and the rounds merged with softmax_r(lse_r). For HSPAN: the
# whole [N, L, L] score matrix at once and sparsemax over it (ReleasedHSPA).
# --------------------------------------------------------------------------------------------

#: A block name that is no attention: the conv-ReLU-conv residual block around the attention
#: blocks in every network, measured as the reference for their time and memory.
REFERENCE_BLOCK = "resblock"

#: Values of ``Settings.baseline``: None, or "released" (rows named ``NAME@released``).
BASELINES = ("released",)


def _released_hash(block: nn.Module, x: torch.Tensor, n_buckets: int, signed: bool) -> torch.Tensor:
    """Codes ``[N, R, L]`` as released: an einsum of the embeddings with the rounds' random
    projections, ``[xR, -xR]`` for NLSA (``signed``), and an argmax over the concatenation."""
    width = n_buckets // 2 if signed else n_buckets
    proj = block.projections
    if proj is None:
        proj = block.draw_projections(n_buckets, x.device, x.dtype)
    proj = proj.to(device=x.device, dtype=x.dtype)
    if tuple(proj.shape[1:]) != (block.n_hashes, width):
        raise BenchError(f"baseline: projections {tuple(proj.shape)} do not fit {n_buckets}")
    rotated = torch.einsum("btf,bfhi->bhti", x, proj.unsqueeze(0).expand(x.shape[0], -1, -1, -1))
    if signed:
        rotated = torch.cat([rotated, -rotated], dim=-1)
    return rotated.argmax(dim=-1)


def _with_neighbours(chunks: torch.Tensor) -> torch.Tensor:
    """``[N, R, nc, c, F]`` -> ``[N, R, nc, 3c, F]``: each chunk followed by copies of its
    previous and next chunk (cyclic), concatenated, as released."""
    back = torch.cat([chunks[:, :, -1:], chunks[:, :, :-1]], dim=2)
    forward = torch.cat([chunks[:, :, 1:], chunks[:, :, :1]], dim=2)
    return torch.cat([chunks, back, forward], dim=3)


class ReleasedBucketAttention(nn.Module):
    """An NLSA or GLA block (its parameters, projections and generator, shared) whose attention
    is computed the released way (section comment above). For benchmarks only.

    ``stable_sort=True`` sorts ties in position order, as nlsr does, so that the output can be
    checked against the block's own; the release's default sort is unstable.
    """

    def __init__(self, block: nn.Module, stable_sort: bool = False):
        super().__init__()
        from nlsr.attention.gla import GlobalLearnableAttention
        from nlsr.attention.nlsa import NonLocalSparseAttention

        if not isinstance(block, (NonLocalSparseAttention, GlobalLearnableAttention)):
            raise BenchError(f"--baseline released: no released form of {type(block).__name__}")
        self.block = block
        self.stable_sort = stable_sort

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``res_scale * attention(input) + input``, computed as released."""
        from nlsr.attention.buckets import KEY_EPS, bucket_count, effective_chunk
        from nlsr.attention.gla import GlobalLearnableAttention

        b = self.block
        n, _, h, w = input.shape
        length = h * w
        x = b.conv_match(input).view(n, -1, length).permute(0, 2, 1)  # [N, L, d]
        y = b.conv_assembly(input).view(n, -1, length).permute(0, 2, 1)  # [N, L, C]
        signed = not isinstance(b, GlobalLearnableAttention)  # NLSA: spherical LSH
        learnable = not signed and b.learnable
        n_buckets = bucket_count(length, b.chunk_size, minimum=2 if signed else 1)
        codes = _released_hash(b, x.detach(), n_buckets, signed)  # [N, R, L]
        rounds = codes.shape[1]
        offsets = (torch.arange(rounds, device=codes.device) * n_buckets).view(1, -1, 1)
        codes = (codes + offsets).reshape(n, -1)  # flat [N, R*L], as released
        indices = codes.sort(dim=-1, stable=self.stable_sort).indices
        undo = indices.sort(dim=-1).indices
        positions = indices % length

        def gather(t: torch.Tensor) -> torch.Tensor:  # [N, L, F] -> [N, R*L, F] in sorted order
            return t.gather(1, positions.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        chunk = effective_chunk(length, b.chunk_size)
        padding = (-length) % chunk

        def chunked(t: torch.Tensor) -> torch.Tensor:  # tail-padded [N, R, nc, c, F]
            t = t.reshape(n, rounds, length, -1)
            if padding:
                t = torch.cat([t, t[:, :, length - padding :].clone()], dim=2)
            return t.reshape(n, rounds, -1, chunk, t.shape[-1])

        queries = chunked(gather(x))
        keys = _with_neighbours(F.normalize(queries, p=2, dim=-1, eps=KEY_EPS))
        values = _with_neighbours(chunked(gather(y)))
        scores = torch.einsum("bhkie,bhkje->bhkij", queries, keys)  # [N, R, nc, c, 3c]
        if learnable:
            fc = b.fc(b.conv_assembly_fc(input).view(n, -1, length).permute(0, 2, 1))
            term = _with_neighbours(chunked(gather(fc[..., :chunk])))  # [N, R, nc, 3c, c]
            scores = scores + term.transpose(-1, -2)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        out = torch.einsum("bukij,bukje->bukie", probs, values).reshape(n, rounds, -1, y.shape[-1])
        out = out[:, :, :length].reshape(n, rounds * length, -1)
        lse = lse.reshape(n, rounds, -1)[:, :, :length].reshape(n, rounds * length)
        out = out.gather(1, undo.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        lse = lse.gather(1, undo)
        weights = torch.softmax(lse.view(n, rounds, length, 1), dim=1)
        out = (out.view(n, rounds, length, -1) * weights).sum(dim=1)
        return out.permute(0, 2, 1).reshape(n, -1, h, w) * b.res_scale + input


def released_sparsemax_threshold(
    z: torch.Tensor, topk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tau and support size of every row of ``z`` ``[B, L]`` (row maxima already subtracted) as
    released: the doubling search over whole rows from ``topk`` sorted entries (None: a full
    sort), without nlsr's pruning of the rows."""
    from nlsr.attention.hspa import doubling_threshold

    return doubling_threshold(z, z.shape[-1] if topk is None else topk)


class _ReleasedSparsemax(torch.autograd.Function):
    """Sparsemax over the last axis of a whole score tensor, as released: the output is saved and
    the backward is ``(g - mean of g over the support)`` on the support, zero elsewhere."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, topk: int) -> torch.Tensor:
        shape = scores.shape
        z = scores.reshape(-1, shape[-1])
        z = z - z.amax(dim=-1, keepdim=True)
        tau, _ = released_sparsemax_threshold(z, topk)
        out = torch.clamp(z - tau, min=0).view(shape)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        support = out > 0
        mean = (grad * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
        return torch.where(support, grad - mean, torch.zeros_like(grad)), None


class ReleasedHSPA(nn.Module):
    """An HSPA block (its parameters, shared) computed as released: the whole ``[N, L, L]``
    float32 score matrix at once, sparsemax over it (topk-started search), ``P g``. For
    benchmarks only."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``res_scale * sparsemax(theta^T phi) g + x`` in one piece."""
        b = self.block
        n, c, h, w = x.shape
        theta = b.conv_match1(x).flatten(2).transpose(1, 2)  # [N, L, d]
        phi = b.conv_match2(x).flatten(2)  # [N, d, L]
        g = b.conv_assembly(x).flatten(2).transpose(1, 2)  # [N, L, C]
        weights = _ReleasedSparsemax.apply(torch.bmm(theta, phi), b.topk or 128)
        y = torch.bmm(weights, g)
        return b.res_scale * y.transpose(1, 2).reshape(n, c, h, w) + x


def released_baseline(model: nn.Module) -> nn.Module:
    """``model`` (a block or a network) with every NLSA, GLA and HSPA block computed the released
    way; the parameters are shared, not copied."""
    from nlsr.attention.gla import GlobalLearnableAttention
    from nlsr.attention.hspa import HSPA
    from nlsr.attention.nlsa import NonLocalSparseAttention

    def released(block: nn.Module) -> nn.Module:
        return ReleasedHSPA(block) if isinstance(block, HSPA) else ReleasedBucketAttention(block)

    kinds = (NonLocalSparseAttention, GlobalLearnableAttention, HSPA)
    if isinstance(model, kinds):
        return released(model)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, kinds)
    ]
    if not targets:
        raise BenchError(f"--baseline released: {type(model).__name__} has no NLSA/GLA/HSPA block")
    for parent, name, child in targets:
        setattr(parent, name, released(child))
    return model


def baseline_ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """For every measured ``NAME@BASELINE`` row with a measured ``NAME`` row of the same size
    and mode: the baseline's CPU time and extra memory divided by nlsr's."""
    ours = {(r.kind, r.name, r.size, r.mode): r for r in rows if r.status == "ok"}
    ratios = []
    for r in rows:
        name, _, baseline = r.name.partition("@")
        mine = ours.get((r.kind, name, r.size, r.mode))
        if not baseline or r.status != "ok" or mine is None:
            continue
        ratios.append(
            {
                "kind": r.kind,
                "name": name,
                "baseline": baseline,
                "size": r.size,
                "mode": r.mode,
                "cpu_ratio": (r.cpu_median_s or 0.0) / (mine.cpu_median_s or float("inf")),
                "memory_ratio": None
                if not (r.extra_bytes and mine.extra_bytes)
                else r.extra_bytes / mine.extra_bytes,
            }
        )
    return ratios


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured (or skipped) combination of target, size and mode."""

    kind: str  # "block" or "model"
    name: str
    size: int
    positions: int
    channels: int
    mode: str
    status: str  # "ok", "skipped" or "error"
    note: str = ""
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    cpu_times_s: list[float] = field(default_factory=list)
    cpu_median_s: float | None = None
    peak_bytes: int | None = None
    extra_bytes: int | None = None
    input_bytes: int = 0
    parameters: int = 0
    profile: list[dict[str, Any]] | None = None


@dataclass
class Fit:
    """Scaling exponent ``p`` of ``metric ~ positions**p`` for one target and mode."""

    kind: str
    name: str
    mode: str
    metric: str  # "time" (median wall), "cpu" (median process CPU time), "memory" (extra)
    exponent: float
    sizes: list[int]


@dataclass
class Settings:
    """What :func:`run_suite` measures and its limits."""

    blocks: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    channels: int = 64
    modes: list[str] = field(default_factory=lambda: list(MODES))
    repeat: int = 5
    warmup: int = 1
    device: str = "cpu"
    config: str = "small"
    scale: int = 2
    batch: int = 1
    max_memory: int | None = 4 * 2**30
    max_seconds: float | None = 30.0
    fit_range: tuple[int, int] = (96, 384)
    profile_top: int = 0
    seed: int = 0
    baseline: str | None = None  # one of BASELINES: also measure NAME@BASELINE targets


@dataclass
class Report:
    """Environment, settings, rows and fitted exponents of one run."""

    environment: dict[str, Any]
    settings: Settings
    rows: list[Row]
    fits: list[Fit]

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout written by :func:`write_json`."""
        settings = asdict(self.settings)
        settings["fit_range"] = list(self.settings.fit_range)
        return {
            "schema": SCHEMA_VERSION,
            "environment": self.environment,
            "settings": settings,
            "rows": [asdict(r) for r in self.rows],
            "fits": [asdict(f) for f in self.fits],
            "baseline_ratios": baseline_ratios(self.rows),
        }


def environment(device: torch.device, meter: MemoryMeter) -> dict[str, Any]:
    """Where the figures come from: versions, device, threads, memory method, date."""
    from nlsr import __version__

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "nlsr": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "memory_method": meter.method,
        "load_average_start": _load_average(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes competing for the CPU), if known."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:i]``; CUDA must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise BenchError(f"--device: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu, cuda or auto, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available in this torch installation")
    return device


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
) -> Iterator[tuple[str, str, Callable[[], nn.Module]]]:
    """(kind, name, builder) of every block and network to measure."""
    from nlsr.attention import create_attention

    if settings.baseline is not None and settings.baseline not in BASELINES:
        raise BenchError(
            f"--baseline must be one of {', '.join(BASELINES)}, got {settings.baseline!r}"
        )
    released = settings.baseline == "released"
    for name in settings.blocks:
        if name == REFERENCE_BLOCK:
            from nlsr.models.common import ResBlock

            yield "block", name, lambda: ResBlock(settings.channels).to(device)
            continue
        yield "block", name, lambda n=name: create_attention(n, settings.channels).to(device)
        if released and name in ("nlsa", "gla", "hspa"):
            yield (
                "block",
                f"{name}@released",
                lambda n=name: released_baseline(create_attention(n, settings.channels).to(device)),
            )
    for spec in settings.models:
        yield (
            "model",
            spec,
            lambda s=spec: build_model(s, settings.scale, settings.config).to(device),
        )
        if released:
            yield (
                "model",
                f"{spec}@released",
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
    meter = MemoryMeter(device)
    env = environment(device, meter)
    rows: list[Row] = []
    sizes = sorted(set(settings.sizes))
    for kind, name, build in _targets(settings, device):
        for mode in settings.modes:
            history: list[tuple[int, float, int | None]] = []
            stop = ""
            for size in sizes:
                positions = size * size
                row = Row(
                    kind,
                    name,
                    size,
                    positions,
                    settings.channels if kind == "block" else 3,
                    mode,
                    "ok",
                )
                if not history and not stop and size >= PROBE_FROM:
                    history = _probe(kind, name, mode, size, build, settings, device, meter, log)
                row.note = stop or _skip_reason(settings, history, positions)
                if row.note:
                    row.status = "skipped"
                else:
                    _measure_row(row, build, settings, device, meter)
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
                    log(_row_line(row))
    env["load_average_end"] = _load_average()
    return Report(env, settings, rows, fit_rows(rows, settings.fit_range))


def _probe(
    kind: str,
    name: str,
    mode: str,
    size: int,
    build: Callable[[], nn.Module],
    settings: Settings,
    device: torch.device,
    meter: MemoryMeter,
    log: Callable[[str], None] | None,
) -> list[tuple[int, float, int | None]]:
    """One untimed-warm-up run at sides ``size // 8`` and ``size // 4`` (not reported), so that
    a large first size is checked against the limits before it runs; returns their history."""
    quick = replace(settings, repeat=1, warmup=0, profile_top=0)
    history: list[tuple[int, float, int | None]] = []
    for side in (size // 8, size // 4):
        row = Row(
            kind, name, side, side * side, settings.channels if kind == "block" else 3, mode, "ok"
        )
        _measure_row(row, build, quick, device, meter)
        gc.collect()
        if log:
            log(f"(probe) {_row_line(row)}")
        if row.status != "ok":
            break
        history.append((row.positions, row.median_s or 0.0, row.extra_bytes))
    return history


def _measure_row(
    row: Row,
    build: Callable[[], nn.Module],
    settings: Settings,
    device: torch.device,
    meter: MemoryMeter,
) -> None:
    """Build the target, time it and fill ``row`` (status "error" with the message on failure)."""
    torch.manual_seed(settings.seed)
    try:
        module = build()
        row.parameters = sum(p.numel() for p in module.parameters())
        shape = (settings.batch, row.channels, row.size, row.size)
        inputs = (
            torch.randn(shape, device=device)
            if row.kind == "block"
            else torch.rand(shape, device=device)
        )
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
    except BenchError:
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


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_bytes(n: float | None) -> str:
    """Human-readable byte count (binary units), '-' for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_bytes(text: str) -> int:
    """'512M', '4G', '1.5GiB', '1000000' -> bytes (binary multiples)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in "KMGT" else (t, "")
    try:
        value = float(number)
    except ValueError:
        raise BenchError(f"--max-memory: cannot read {text!r} (e.g. 512M, 4G)") from None
    if value <= 0:
        raise BenchError(f"--max-memory must be positive, got {text!r}")
    return int(value * units[unit])


def _row_line(r: Row) -> str:
    if r.status != "ok":
        return f"{r.kind:<5} {r.name:<12} {r.size:>5} {r.mode:<5}  {r.status}: {r.note}"
    return (
        f"{r.kind:<5} {r.name:<12} {r.size:>5} {r.mode:<5}  median {r.median_s:.4f} s  "
        f"min {r.min_s:.4f} s  cpu {r.cpu_median_s:.4f} s  extra {format_bytes(r.extra_bytes)}"
    )


def format_table(report: Report) -> str:
    """The rows as a fixed-width table, followed by the fitted exponents."""
    head = (
        f"{'kind':<5} {'name':<12} {'size':>5} {'positions':>9} {'mode':<5} "
        f"{'median s':>9} {'min s':>9} {'cpu s':>9} {'peak':>10} {'extra':>10}  note"
    )
    lines = [head, "-" * len(head)]
    for r in report.rows:
        med = f"{r.median_s:.4f}" if r.median_s is not None else "-"
        mn = f"{r.min_s:.4f}" if r.min_s is not None else "-"
        cpu = f"{r.cpu_median_s:.4f}" if r.cpu_median_s is not None else "-"
        lines.append(
            f"{r.kind:<5} {r.name:<12} {r.size:>5} {r.positions:>9} {r.mode:<5} {med:>9} {mn:>9} "
            f"{cpu:>9} "
            f"{format_bytes(r.peak_bytes):>10} {format_bytes(r.extra_bytes):>10}  "
            f"{r.note if r.status != 'ok' else ''}".rstrip()
        )
    lo, hi = report.settings.fit_range
    lines.append("")
    lines.append(f"Scaling exponents p (value ~ positions**p), sizes {lo}..{hi}:")
    if not report.fits:
        lines.append("  none (needs two measured sizes inside the range; see --fit-range)")
    for f in report.fits:
        sizes = ",".join(str(s) for s in f.sizes)
        lines.append(
            f"  {f.kind:<5} {f.name:<12} {f.mode:<5} {f.metric:<6} p = {f.exponent:.3f}"
            f"  (sizes {sizes})"
        )
    ratios = baseline_ratios(report.rows)
    if ratios:
        lines.append("")
        lines.append("Baseline / nlsr (CPU time, extra memory; > 1: nlsr is faster / leaner):")
    for q in ratios:
        memory = "-" if q["memory_ratio"] is None else f"{q['memory_ratio']:.2f}x"
        lines.append(
            f"  {q['kind']:<5} {q['name']:<12} {q['size']:>5} {q['mode']:<5} "
            f"{q['baseline']}: time {q['cpu_ratio']:.2f}x  memory {memory}"
        )
    return "\n".join(lines)


def format_profile(row: Row) -> str:
    """The profiled top operators of ``row`` as a small table."""
    lines = [
        f"Top ops: {row.kind} {row.name} size {row.size} {row.mode}",
        f"  {'self s':>8} {'share':>6} {'calls':>6}  op",
    ]
    for op in row.profile or []:
        share = f"{op['self_fraction']:.1%}"
        lines.append(f"  {op['self_s']:>8.4f} {share:>6} {op['calls']:>6}  {op['op']}")
    return "\n".join(lines)


def write_json(report: Report, path: str | Path) -> Path:
    """Write ``report.to_dict()`` to ``path`` atomically; returns the path."""
    text = json.dumps(report.to_dict(), indent=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, (text + "\n").encode("utf-8"))


def read_json(paths: Sequence[str | Path]) -> Report:
    """The reports written by :func:`write_json` to ``paths``, merged into one (rows and fits in
    order; environment and settings of the first), to re-print or re-plot saved results."""
    if not paths:
        raise BenchError("read_json: no files given")
    reports = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BenchError(f"{path}: cannot read benchmark JSON: {err}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            raise BenchError(f"{path}: not an nlsr bench JSON of schema {SCHEMA_VERSION}")
        reports.append(data)
    first = dict(reports[0]["settings"])
    first["fit_range"] = tuple(first["fit_range"])
    return Report(
        environment=reports[0]["environment"],
        settings=Settings(**first),
        rows=[Row(**r) for d in reports for r in d["rows"]],
        fits=[Fit(**f) for d in reports for f in d["fits"]],
    )


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on a non-interactive backend, or a BenchError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib, an optional extra: pip install 'nlsr[bench]' "
            "(or pip install matplotlib)"
        ) from None
    return plt


def plot(report: Report, path: str | Path) -> Path:
    """Log-log plot of median time and extra memory against positions, one line per target and
    mode, written atomically to ``path`` (PNG); needs matplotlib. On CPU the time is the process
    CPU time (steadier than the wall clock on a shared machine), elsewhere the wall time."""
    plt = require_matplotlib()
    cpu = report.environment.get("device") == "cpu"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    series: dict[tuple[str, str], list[Row]] = {}
    for r in report.rows:
        if r.status == "ok":
            series.setdefault((r.name, r.mode), []).append(r)
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(n for n, _ in series))}
    for (name, mode), rs in sorted(series.items()):
        style = {
            "color": colors[name],
            "linestyle": "-" if mode == "infer" else "--",
            "marker": "o",
            "label": f"{name} {mode}",
        }
        times = [r.cpu_median_s if cpu else r.median_s for r in rs]
        ax_t.plot([r.positions for r in rs], times, **style)
        mem = [(r.positions, r.extra_bytes / 2**20) for r in rs if r.extra_bytes]
        if mem:
            ax_m.plot(*zip(*mem, strict=True), **style)
    env = report.environment
    time_label = "median CPU time (s)" if cpu else "median time (s)"
    for ax, ylabel in ((ax_t, time_label), (ax_m, "extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("positions (H*W)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        f"nlsr bench: {env['device_name']}, {env['threads']} threads, torch {env['torch']}"
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return out
