"""`nlsr train` iterations per second for numeric variants (fp32, bf16 autocast, channels-last).

    python scripts/train_speed.py [--config configs/ship/dlsn_s_x2.yaml] [--iterations 12]
        [--repeat 3] [--threads 2] [--variants fp32,bf16,bf16+cl] [KEY=VALUE ...]

Each variant runs ``nlsr train`` in a fresh process on the config (validation off, a temporary
run folder), the variants interleaved ``--repeat`` times so that changes of the machine's load
hit all alike. The speed of a run is its steps after the first logging window (warm-up) divided
by their wall time, as ``nlsr train`` logs it; the script prints each variant's median and its
ratio to the first variant, with the load average before and after. Extra ``KEY=VALUE``
overrides go to every run (e.g. ``model.options.n_feats=32``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: Variant name -> config overrides.
VARIANTS = {
    "fp32": ["train.amp=false", "train.channels_last=false"],
    "bf16": ["train.amp=true", "train.channels_last=false"],
    "cl": ["train.amp=false", "train.channels_last=true"],
    "bf16+cl": ["train.amp=true", "train.channels_last=true"],
}


def run_speed(config: Path, overrides: list[str], iterations: int, threads: int) -> float:
    """Iterations per second of one ``nlsr train`` run, after its first logging window."""
    window = max(1, iterations // 4)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable,
            "-m",
            "nlsr",
            "train",
            "--config",
            str(config),
            f"train.iterations={iterations}",
            f"train.log_every={window}",
            f"train.checkpoint_every={iterations}",
            f"train.threads={threads}",
            "val.every=0",
            f"run_dir={tmp}/run",
            *overrides,
        ]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").open()]
    speeds = [r["it_per_s"] for r in records if r["event"] == "train"][1:]
    return len(speeds) / sum(1 / s for s in speeds)  # steps / time over the later windows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("configs/ship/dlsn_s_x2.yaml"))
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="fp32,bf16,bf16+cl")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    load_before = os.getloadavg()[0]
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeat):
        for n in names:
            overrides = [*VARIANTS[n], *args.overrides]
            speeds[n].append(run_speed(args.config, overrides, args.iterations, args.threads))
            print(f"{n}: {speeds[n][-1]:.3f} it/s", file=sys.stderr, flush=True)
    base = statistics.median(speeds[names[0]])
    print(
        f"{args.config} {' '.join(args.overrides)} ({args.threads} threads, {args.iterations} it)"
    )
    print("| variant | median it/s | runs | vs " + names[0] + " |")
    print("|---|---|---|---|")
    for n in names:
        med = statistics.median(speeds[n])
        runs = ", ".join(f"{s:.3f}" for s in speeds[n])
        print(f"| {n} | {med:.3f} | {runs} | {med / base:.2f}x |")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
