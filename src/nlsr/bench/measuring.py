"""Measuring one callable: its times, its peak memory, and the power law they follow.

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
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: What a measurement runs: forward only, or forward + backward.
MODES = ("infer", "train")

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
# Where the figures come from
# --------------------------------------------------------------------------------------------


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
        "load_average_start": load_average(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_average() -> list[float] | None:
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
