"""The bookkeeping of ``scripts/gpu_run.sh``; the standard library only, so that a summary is
written even where torch or nlsr cannot be imported.

    python scripts/gpu_report.py plan --checks checks.json --device cuda --seconds S
        [--rate IT_PER_S] [--iterations N]
    python scripts/gpu_report.py summary --work WORK --out OUT --budget S --elapsed S

``plan`` prints the training plan as shell assignments (``iterations=... amp=... ...``): the
iterations that fit ``S`` seconds at the rate the checks measured for the shipped config (the
best of bf16 autocast with/without channels-last and float32, times :data:`EFFICIENCY` for the
data loader, EMA, validation and checkpoints), or at ``--rate``; and how often to validate, save
and log. ``summary`` gathers the stage table, the checks, the benchmarks, the training log and
the evaluations into ``OUT/summary.json`` and ``OUT/summary.txt`` (also printed), with the files
of ``OUT`` checked against what the run tool brings back (8 files of at most 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

#: Share of the measured model-step rate that training reaches (loader, EMA, val, checkpoints).
EFFICIENCY = 0.8
#: Iterations per second assumed when nothing was measured.
DEFAULT_RATE = {"cuda": 5.0, "cpu": 0.2}
#: What the run tool brings back from $OUT.
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace) -> int:
    checks = read_json(args.checks) or {}
    ship = checks.get("checks", {}).get("ship_rate", {})
    best = ship.get("best") if ship.get("passed") else None
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    amp, channels_last = device == "cuda", False
    if best:
        amp, channels_last = bool(best["amp"]), bool(best["channels_last"])
    if args.rate:
        rate, source = args.rate, "TRAIN_RATE"
    elif best:
        rate, source = best["it_per_s"] * EFFICIENCY, "measured"
    else:
        rate, source = DEFAULT_RATE[device], "assumed"
    iterations = args.iterations or max(1, int(rate * max(args.seconds, 0)))
    values = {
        "iterations": iterations,
        "amp": str(amp).lower(),
        "channels_last": str(channels_last).lower(),
        "rate": f"{rate:.3g}",
        "rate_source": source,
        "every": max(1, iterations // 4),
        "checkpoint_every": max(1, iterations // 10),
        "log_every": max(1, iterations // 50),
    }
    print(" ".join(f"{k}={v}" for k, v in values.items()))
    return 0


# ------------------------------------------------------------------------------------- summary


def stages(work: Path) -> list[dict[str, Any]]:
    rows = []
    path = work / "stages.tsv"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for line in text.splitlines():
        name, status, seconds, note = ([*line.split("\t"), "", "", ""])[:4]
        rows.append({"stage": name, "status": status, "seconds": int(seconds or 0), "note": note})
    return rows


def checks_summary(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {"error": "no checks.json"}
    out: dict[str, Any] = {}
    for name, res in data.get("checks", {}).items():
        item = {"passed": res.get("passed"), "seconds": res.get("seconds")}
        for key in ("error", "skipped"):
            if res.get(key):
                item[key] = res[key]
        parts = res.get("cases") or res.get("archs") or res.get("blocks")
        if isinstance(parts, dict):
            item["failed"] = {
                k: v.get("error", "failed") for k, v in parts.items() if v.get("passed") is False
            }
        if name == "ship_rate" and res.get("best"):
            item["best"] = res["best"]
        if name == "fixtures" and parts:
            item["max_abs_error"] = {k: v.get("max_abs_error") for k, v in parts.items()}
        if name == "sdpa" and parts:
            item["kernels"] = {k: v.get("kernels") for k, v in parts.items()}
        out[name] = item
    return out


def bench_summary(work: Path) -> dict[str, Any]:
    """Per job: measured/skipped points and the released/nlsr ratios of wall time (the figure
    that means something on a GPU) and extra memory."""
    jobs: dict[str, Any] = {}
    for path in sorted((work / "bench").glob("*.json")):
        data = read_json(path)
        if not isinstance(data, dict):
            continue
        rows = data.get("rows", [])
        ours = {
            (r["kind"], r["name"], r["size"], r["mode"]): r for r in rows if r.get("status") == "ok"
        }
        ratios = []
        for r in rows:
            name, _, baseline = r["name"].partition("@")
            mine = ours.get((r["kind"], name, r["size"], r["mode"]))
            if not baseline or r.get("status") != "ok" or mine is None:
                continue
            ratios.append(
                {
                    "name": name,
                    "size": r["size"],
                    "mode": r["mode"],
                    "time_ratio": round(r["median_s"] / mine["median_s"], 3)
                    if r.get("median_s") and mine.get("median_s")
                    else None,
                    "memory_ratio": round(r["extra_bytes"] / mine["extra_bytes"], 3)
                    if r.get("extra_bytes") and mine.get("extra_bytes")
                    else None,
                }
            )
        jobs[path.stem] = {
            "points": {
                s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")
            },
            "released_over_nlsr": ratios,
        }
    return jobs


def train_summary(work: Path) -> dict[str, Any]:
    run = work / "train"
    records = []
    log = run / "log.jsonl"
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records:
        return {}
    trains = [r for r in records if r.get("event") == "train"]
    vals = [r for r in records if r.get("event") == "val"]
    out: dict[str, Any] = {
        "start_step": next((r["step"] for r in records if r.get("event") == "start"), None),
        "last_step": max(r.get("step", 0) for r in records),
        "finished": any(r.get("event") == "end" for r in records),
        "val_psnr": [[r["step"], round(r["mean_psnr"], 4)] for r in vals],
    }
    if trains:
        out["last_loss"] = trains[-1]["loss"]
        out["it_per_s"] = round(trains[-1]["it_per_s"], 2)
    text = work / "logs" / "train.log"
    stopped = re.findall(
        r"stopped by (\S+) at step (\d+)",
        text.read_text(errors="replace") if text.is_file() else "",
    )
    if stopped:
        out["stopped"] = {"signal": stopped[-1][0], "step": int(stopped[-1][1])}
    for kind in ("warm", "ema"):
        data = read_json(run / f"eval_{kind}.json")
        if isinstance(data, dict) and data.get("results"):
            r = data["results"][0]
            out[f"set5_{kind}"] = {"psnr": r.get("psnr"), "ssim": r.get("ssim")}
    return out


def out_files(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    files, problems = [], []
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out)
        size = p.stat().st_size
        files.append({"file": str(rel), "bytes": size})
        if size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {size / 2**20:.1f} MiB is over 16 MiB: it will not come back")
        if not all(NAME_OK.match(part) for part in rel.parts) or len(rel.parts) > 3:
            problems.append(f"{rel}: name or depth the run tool does not bring back")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in OUT: the run tool brings back {MAX_FILES}")
    return files, problems


def render(s: dict[str, Any]) -> str:
    lines = [
        f"gpu_run summary: {'ALL STAGES OK' if s['ok'] else 'SOME STAGES NOT OK'} "
        f"({s['elapsed_s']} s of {s['budget_s']} s, device {s['device']})",
        "",
    ]
    lines.append(f"{'stage':<9} {'status':<8} {'seconds':>7}  note")
    for st in s["stages"]:
        lines.append(f"{st['stage']:<9} {st['status']:<8} {st['seconds']:>7}  {st['note']}")
    lines.append("")
    state = {True: "passed", False: "FAILED", None: "skipped"}
    for name, c in s["checks"].items():
        if not isinstance(c, dict):
            lines.append(f"check {name}: {c}")
            continue
        extra = c.get("error") or c.get("skipped") or ""
        if c.get("failed"):
            extra += f" failed: {c['failed']}"
        if name == "ship_rate" and c.get("best"):
            extra += f" best {c['best']}"
        lines.append(
            f"check {name}: {state.get(c.get('passed'), c.get('passed'))} "
            f"({c.get('seconds')} s) {extra}".rstrip()
        )
    for job, b in s["bench"].items():
        ratios = ", ".join(
            f"{r['name']}@{r['size']} {r['mode']} {r['time_ratio']}x"
            for r in b["released_over_nlsr"]
        )
        lines.append(f"bench {job}: points {b['points']}; released/nlsr wall time: {ratios or '-'}")
    t = s["train"]
    if t:
        lines.append(
            f"train: steps {t.get('start_step')} -> {t.get('last_step')}, "
            f"finished {t.get('finished')}, last loss {t.get('last_loss')}, "
            f"{t.get('it_per_s')} it/s, val PSNR {t.get('val_psnr')}, "
            f"stopped {t.get('stopped')}"
        )
        for kind in ("warm", "ema"):
            if f"set5_{kind}" in t:
                lines.append(f"Set5 x2, {kind} weights: {t[f'set5_{kind}']}")
    lines.append("")
    lines.append(
        "OUT: " + ", ".join(f"{f['file']} ({f['bytes'] / 2**20:.2f} MiB)" for f in s["out_files"])
    )
    lines += [f"WARNING: {p}" for p in s["out_problems"]]
    if s.get("missing_modules"):
        lines.append(f"WARNING: missing modules: {s['missing_modules']}")
    return "\n".join(lines) + "\n"


def summary(args: argparse.Namespace) -> int:
    work, out = args.work, args.out
    env = read_json(work / "env.json") or {}
    checks = read_json(work / "checks.json")
    result: dict[str, Any] = {
        "budget_s": args.budget,
        "elapsed_s": args.elapsed,
        "device": (checks or {}).get("device", "?"),
        "python": env.get("python"),
        "missing_modules": env.get("missing"),
        "stages": stages(work),
        "checks": checks_summary(checks),
        "bench": bench_summary(work),
        "train": train_summary(work),
    }
    result["ok"] = all(st["status"] == "ok" for st in result["stages"])
    # summary.json and summary.txt are counted before they exist: they will be there.
    for name in ("summary.json", "summary.txt"):
        (out / name).touch()
    result["out_files"], result["out_problems"] = out_files(out)
    text = render(result)
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    (out / "summary.txt").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the training plan as shell assignments")
    p.add_argument("--checks", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, required=True, help="training time available")
    p.add_argument("--rate", type=float, help="iterations per second (default: measured)")
    p.add_argument("--iterations", type=int, help="iterations (default: from the rate)")
    s = sub.add_parser("summary", help="write OUT/summary.json and OUT/summary.txt")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--elapsed", type=int, required=True)
    args = parser.parse_args(argv)
    return plan(args) if args.command == "plan" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
