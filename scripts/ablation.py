"""Attention ablation at equal training budget: the same compact backbone
(``configs/ship/ablation_x2.yaml``) trained with no attention, dense NLA, GLA with and without its
learnable similarity term, HSPA and LCoA, then scored on Set5 and Urban100 x2.

    python scripts/ablation.py [--variants none,nla,gla,...] [--iterations N] [--runs DIR]
        [--data-root DIR] [--max-images N] [--tile N] [--report docs/ablation.md]

Resumable: a variant whose run has finished (its ``ema.safetensors`` holds ``--iterations``
iterations) is not trained again, an interrupted one resumes from its checkpoint, and a variant
whose scores for these settings exist (``scores.json``, or ``scores-first<N>.json`` with
``--max-images N``) is not evaluated again. Every variant gets the same data, patches, batch,
schedule, seed and iterations; only the attention differs. The results table in the report is
rewritten after every variant, between the markers ``ablation:results`` (all images) or
``ablation:results-first<N>`` (``--max-images N``), so both tables can sit in one page.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nlsr.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "ship" / "ablation_x2.yaml"
REPORT = REPO / "docs" / "ablation.md"
SETS = ("Set5", "Urban100")
SCALE = 2
#: variant -> (attention block or None, its options, what it tests).
VARIANTS: dict[str, tuple[str | None, dict[str, Any], str]] = {
    "none": (None, {}, "backbone only"),
    "nla": ("nla", {"reduction": 4}, "dense non-local attention"),
    "gla": (
        "gla",
        {"reduction": 4, "chunk_size": 64, "n_hashes": 1},
        "GLA (DLSN), as shipped",
    ),
    "gla-fixed": (
        "gla",
        {"reduction": 4, "chunk_size": 64, "n_hashes": 1, "learnable": False},
        "GLA without the learnable similarity term",
    ),
    "hspa": ("hspa", {"reduction": 4, "topk": 128}, "HSPA (HSPAN), sparsemax"),
    "lcoa": ("lcoa", {"reduction": 4}, "LCoA (LCoAN), k-means pattern"),
}


def variant_config(name: str, args: argparse.Namespace, run_dir: Path) -> Any:
    """The training configuration of variant ``name``: the base config plus its attention."""
    from nlsr.train import load_config

    block, options, _ = VARIANTS[name]
    base = load_config(BASE)
    # The base milestones are fractions of the base run: keep those fractions at any length.
    milestones = [
        max(1, round(m * args.iterations / base.train.iterations)) for m in base.optim.milestones
    ]
    overrides = [
        f"optim.milestones={json.dumps(sorted(set(milestones)))}",
        f"model.attention={json.dumps(block)}",
        f"model.attention_options={json.dumps(options or None)}",
        f"train.iterations={args.iterations}",
        f"train.threads={args.threads}",
        f"run_dir={run_dir}",
    ]
    if args.train_dirs:
        overrides.append(f"data.train_dirs={json.dumps(args.train_dirs.split(','))}")
    if args.patch_size:
        overrides.append(f"data.patch_size={args.patch_size}")
    return load_config(BASE, overrides)


def trained_iterations(run_dir: Path) -> int | None:
    """Iterations of the finished run's exported EMA weights, or None if it has not finished."""
    from nlsr.checkpoint import read_state_dict

    ema = run_dir / "ema.safetensors"
    if not ema.is_file():
        return None
    _, config = read_state_dict(ema)
    return int(((config or {}).get("training") or {}).get("iterations") or 0)


def train_variant(name: str, args: argparse.Namespace) -> Path:
    """Train (or resume, or skip) variant ``name``; returns its run folder."""
    from nlsr.train import resume_config, train

    run_dir = args.runs / name
    done = trained_iterations(run_dir)
    if done == args.iterations:
        print(f"{name}: trained ({done} iterations), skipping", flush=True)
        return run_dir
    if (run_dir / "checkpoint.pt").is_file():
        print(f"{name}: resuming {run_dir}", flush=True)
        cfg = resume_config(run_dir, [f"train.iterations={args.iterations}"])
        result = train(cfg, resume=True)
    else:
        print(f"{name}: training {args.iterations} iterations in {run_dir}", flush=True)
        result = train(variant_config(name, args, run_dir))
    if result.interrupted:
        raise SystemExit(f"{name}: interrupted at step {result.step}; run the script again")
    return run_dir


def subset_root(root: Path, max_images: int | None, folder: Path) -> Path:
    """``root`` itself, or a folder of links to the first ``max_images`` HR images of each set."""
    from nlsr.data import benchmark_images

    if max_images is None:
        return root
    for name in SETS:
        hr = folder / name / "HR"
        hr.mkdir(parents=True, exist_ok=True)
        for old in hr.iterdir():
            old.unlink()
        for path in benchmark_images(name, root)[:max_images]:
            (hr / path.name).symlink_to(Path(path).resolve())
    return folder


def speed(run_dir: Path) -> float | None:
    """Median training it/s of the logged windows (the first, with the warm-up, left out)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return None
    rates = [
        r["it_per_s"]
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("event") == "train"
    ]
    return statistics.median(rates[1:] or rates) if rates else None


def subset_key(args: argparse.Namespace) -> str:
    """``""`` when every image is scored, ``"-first<N>"`` with ``--max-images N``."""
    return "" if args.max_images is None else f"-first{args.max_images}"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a cached score must have been computed with to be reused."""
    return {"iterations": args.iterations, "max_images": args.max_images, "tile": args.tile}


def scores_file(run_dir: Path, args: argparse.Namespace) -> Path:
    """Where the variant's scores for these settings are kept."""
    return run_dir / f"scores{subset_key(args)}.json"


def cached_scores(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The variant's scores for these settings, if they were computed before."""
    path = scores_file(run_dir, args)
    if not path.is_file():
        return None
    cached = json.loads(path.read_text())
    return cached if cached.get("settings") == settings_of(args) else None


def score_variant(name: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """PSNR/SSIM of the variant's EMA weights on SETS (cached, see :func:`cached_scores`)."""
    from nlsr.evaluation import evaluate
    from nlsr.models import load

    cached = cached_scores(run_dir, args)
    if cached is not None:
        return cached
    model = load(run_dir / "ema.safetensors")
    root = subset_root(args.data_root, args.max_images, run_dir / "eval_subset")
    sets = {}
    for set_name in SETS:
        torch.manual_seed(0)  # hashing blocks draw projections from the global generator
        start = time.perf_counter()
        r = evaluate(
            model,
            set_name,
            SCALE,
            data_root=root,
            chop=args.tile is None,
            tile=args.tile,
            device="cpu",
        )
        sets[set_name] = {
            "psnr": r.psnr,
            "ssim": r.ssim,
            "images": len(r.per_image),
            "seconds": time.perf_counter() - start,
        }
        print(f"{name}: {set_name} x{SCALE} {r.psnr:.3f} dB / {r.ssim:.4f}", flush=True)
    scores = {
        "variant": name,
        "settings": settings_of(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_it_per_s": speed(run_dir),
        "sets": sets,
    }
    atomic_write(scores_file(run_dir, args), (json.dumps(scores, indent=2) + "\n").encode("utf-8"))
    return scores


def table(scores: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown results table (PSNR dB / SSIM; difference to the backbone alone)."""
    base = scores.get("none")
    lines = [
        f"{args.iterations} iterations per variant; EMA weights; x{SCALE} BI, Y-channel PSNR "
        f"(dB) / SSIM; {f'first {args.max_images}' if args.max_images else 'all'} "
        f"image(s) of each set; {'tiles of ' + str(args.tile) + ' px' if args.tile else 'chop'}; "
        f"written by `scripts/ablation.py` on {time.strftime('%Y-%m-%d')}.",
        "",
        "| variant | attention | params | train it/s | Set5 | Urban100 | Set5 vs none | "
        "Urban100 vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, what) in VARIANTS.items():
        s = scores.get(name)
        if s is None:
            lines.append(f"| {name} | {what} | - | - | not scored | not scored | - | - |")
            continue
        cells = []
        for set_name in SETS:
            v = s["sets"][set_name]
            cells.append(f"{v['psnr']:.3f} / {v['ssim']:.4f}")
        for set_name in SETS:
            if base is None:
                cells.append("-")
            else:
                diff = s["sets"][set_name]["psnr"] - base["sets"][set_name]["psnr"]
                cells.append(f"{diff:+.3f}")
        rate = s.get("train_it_per_s")
        lines.append(
            f"| {name} | {what} | {s['parameters'] / 1e6:.3f}M | "
            f"{'-' if rate is None else f'{rate:.3f}'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def write_report(path: Path, body: str, key: str = "") -> None:
    """Replace the part of ``path`` between the ``ablation:results<key>`` markers with ``body``."""
    text = path.read_text(encoding="utf-8")
    start, end = (f"<!-- ablation:results{key}:{edge} -->" for edge in ("start", "end"))
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"{path}: needs exactly one {start} ... {end} pair")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    atomic_write(path, f"{head}{start}\n{body}\n{end}{tail}".encode())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--iterations", type=int, default=10000, help="per variant (default 10000)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "ablation", help="run folders")
    p.add_argument("--train-dirs", help="comma-separated HR folders (default: the base config's)")
    p.add_argument("--patch-size", type=int, help="HR patch (default: the base config's, 64)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=REPO.parent / "shared" / "datasets" / "benchmark",
        help="folder holding Set5/HR and Urban100/HR",
    )
    p.add_argument("--max-images", type=int, help="score only the first N images of each set")
    p.add_argument("--tile", type=int, help="evaluate in tiles of N LR px (default: the chop)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--report", type=Path, default=REPORT, help="Markdown file with the markers")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Train, score and report every requested variant; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    args.runs.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        cached = cached_scores(args.runs / name, args)
        if name not in args.variants.split(",") and cached is not None:
            scores[name] = cached
    try:
        for name in args.variants.split(","):
            run_dir = train_variant(name, args)
            scores[name] = score_variant(name, run_dir, args)
            write_report(args.report, table(scores, args), subset_key(args))
    except ValueError as e:
        print(f"ablation: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
