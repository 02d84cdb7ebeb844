"""What a benchmark run found and how it is shown: the rows, fits and settings of a report,
the text tables, the JSON files (written, read back and merged) and the log-log plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nlsr.atomic import atomic_write
from nlsr.bench.measuring import MODES, BenchError

#: Feature-map sides measured by default (positions = side**2).
DEFAULT_SIZES = (48, 96, 192, 384)
#: JSON layout version written by :meth:`Report.to_dict`.
SCHEMA_VERSION = 1


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
    #: Sparsemax support sizes met by its HSPA blocks (:func:`nlsr.bench.inputs.support_sizes`).
    supports: dict[str, Any] | None = None


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
    """What :func:`nlsr.bench.suite.run_suite` measures and its limits."""

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
    baseline: str | None = None  # one of suite.BASELINES: also measure NAME@BASELINE targets
    input: str = "real"  # one of inputs.INPUTS: what the targets are fed (nlsr.bench.inputs)
    input_image: str | None = None  # the source of real inputs; None: the bundled sample
    input_block: int = 0  # --input network: which call of the block inside its network


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


def format_supports(r: Row) -> str:
    """Median / largest sparsemax support (keys per query) of ``r``'s HSPA blocks, '-' if none."""
    if not r.supports:
        return "-"
    return f"{r.supports['median']:g}/{r.supports['max']}"


def format_row(r: Row) -> str:
    """One row as a progress line: its timings and extra memory, or its status and note."""
    if r.status != "ok":
        return f"{r.kind:<5} {r.name:<12} {r.size:>5} {r.mode:<5}  {r.status}: {r.note}"
    support = f"  support {format_supports(r)}" if r.supports else ""
    return (
        f"{r.kind:<5} {r.name:<12} {r.size:>5} {r.mode:<5}  median {r.median_s:.4f} s  "
        f"min {r.min_s:.4f} s  cpu {r.cpu_median_s:.4f} s  extra {format_bytes(r.extra_bytes)}"
        f"{support}"
    )


def format_table(report: Report) -> str:
    """The rows as a fixed-width table, followed by the fitted exponents."""
    head = (
        f"{'kind':<5} {'name':<12} {'size':>5} {'positions':>9} {'mode':<5} "
        f"{'median s':>9} {'min s':>9} {'cpu s':>9} {'peak':>10} {'extra':>10} "
        f"{'support':>9}  note"
    )
    lines = [head, "-" * len(head)]
    for r in report.rows:
        med = f"{r.median_s:.4f}" if r.median_s is not None else "-"
        mn = f"{r.min_s:.4f}" if r.min_s is not None else "-"
        cpu = f"{r.cpu_median_s:.4f}" if r.cpu_median_s is not None else "-"
        lines.append(
            f"{r.kind:<5} {r.name:<12} {r.size:>5} {r.positions:>9} {r.mode:<5} {med:>9} {mn:>9} "
            f"{cpu:>9} "
            f"{format_bytes(r.peak_bytes):>10} {format_bytes(r.extra_bytes):>10} "
            f"{format_supports(r):>9}  "
            f"{r.note if r.status != 'ok' else ''}".rstrip()
        )
    if any(r.supports for r in report.rows):
        lines.append(
            "support: median/largest sparsemax support of the HSPA blocks (keys per query)"
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
    first.setdefault("input", "random")  # written before --input existed: random inputs
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
