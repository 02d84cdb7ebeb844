"""Ship trained weights and write their model card (docs/model-card.md).

    python scripts/model_card.py install NAME x2=RUN/ema.safetensors [x3=... x4=...]
        [--option n_hashes=1] [--hardware TEXT] [--description TEXT] [--weights-dir DIR]
    python scripts/model_card.py card NAME [--data-root DIR] [--sets Set5,Set14,B100,Urban100]
        [--card docs/model-card.md] [--json FILE] [--weights-dir DIR] [--chop]

``install`` adds exported weights of ``nlsr train`` to the package's weights folder
(``src/nlsr/weights``; ``--weights-dir``/``$NLSR_WEIGHTS_DIR`` for another one) via
``nlsr.train.publish.install``. ``card`` runs ``nlsr eval`` for every shipped scale of NAME next to
bicubic on the benchmark sets, records the model's PSNRs in the manifest (they rank the default
model), times CPU inference of the x2 model (seconds per output megapixel, median of 3 runs on a
512x512 input) and rewrites the generated parts of the card between their markers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlsr.atomic import atomic_write

#: Scores per scale, method and set: (PSNR, SSIM).
Measured = dict[int, dict[str, dict[str, tuple[float, float]]]]

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "docs" / "model-card.md"
SETS = ("Set5", "Set14", "B100", "Urban100")
#: Markers delimiting the generated parts of the card.
MARKERS = {
    "model": ("<!-- model-card:model:start -->", "<!-- model-card:model:end -->"),
    "results": ("<!-- model-card:results:start -->", "<!-- model-card:results:end -->"),
}
#: Published PSNR (dB, Y channel) of compact references, as printed in their papers
#: (../shared/docs/reference-results.md): scale -> method -> (Set5, Set14, B100, Urban100).
PUBLISHED: dict[int, dict[str, tuple[float, float, float, float]]] = {
    2: {
        "FSRCNN": (37.05, 32.66, 31.53, 29.88),
        "VDSR": (37.53, 33.05, 31.90, 30.77),
        "IMDN": (38.00, 33.63, 32.19, 32.17),
    },
    3: {
        "FSRCNN": (33.18, 29.37, 28.53, 26.43),
        "VDSR": (33.67, 29.78, 28.83, 27.14),
        "IMDN": (34.36, 30.32, 29.09, 28.17),
    },
    4: {
        "FSRCNN": (30.72, 27.61, 26.98, 24.62),
        "VDSR": (31.35, 28.02, 27.29, 25.18),
        "IMDN": (32.21, 28.58, 27.56, 26.04),
    },
}
#: Published parameter counts (millions, x2).
PUBLISHED_PARAMS = {"FSRCNN": 0.01, "VDSR": 0.67, "IMDN": 0.69}
#: The project's quality targets: scale -> set -> minimum PSNR (dB).
TARGETS = {2: {"Set5": 37.0, "Urban100": 30.0}, 4: {"Set5": 30.8, "Urban100": 24.6}}
SPEED_SIZE = 512
SPEED_RUNS = 3


# --------------------------------------------------------------------------- install


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, booleans), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_weights(text: str) -> tuple[int, Path]:
    """``x2=path`` -> (2, path)."""
    scale, sep, path = text.partition("=")
    if not sep or not scale.startswith("x") or not scale[1:].isdigit():
        raise argparse.ArgumentTypeError(
            f"expected xS=FILE (e.g. x2=run/ema.safetensors), got {text!r}"
        )
    return int(scale[1:]), Path(path)


def cmd_install(args: argparse.Namespace) -> int:
    """Install each given file as NAME at its scale and print the manifest entries."""
    from nlsr.train.publish import install

    options = dict(args.option or [])
    for scale, path in sorted(args.weights):
        entry = install(
            path,
            args.name,
            weights_dir=args.weights_dir,
            description=args.description,
            options=options,
            hardware=args.hardware,
        )
        if entry.scale != scale:
            raise SystemExit(f"{path}: holds x{entry.scale} weights, not x{scale}")
        size = entry.file.stat().st_size / 1e6
        print(
            f"{entry.name} x{entry.scale}: {entry.file} ({entry.parameters} parameters, "
            f"{size:.2f} MB, sha256 {entry.sha256[:12]}..., "
            f"{entry.training.get('iterations')} iterations)"
        )
    return 0


# --------------------------------------------------------------------------- card


def run_eval(argv: list[str]) -> list[dict[str, Any]]:
    """Run ``nlsr eval`` in this process (its default seed fixes GLA's hash draws) and return its
    JSON results; its table goes to stderr as progress."""
    from nlsr.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            rc = main(["eval", *argv, "--json", str(out)])
        sys.stderr.write(table.getvalue())
        if rc != 0:
            raise SystemExit(f"nlsr eval {' '.join(argv)} failed (exit status {rc})")
        return json.loads(out.read_text())["results"]


def speed(name: str, weights_dir: Path | None) -> float:
    """Median seconds per output megapixel of ``nlsr.upscale`` with the x2 model on the CPU
    (one warm-up, then SPEED_RUNS timed runs on a 512x512 input)."""
    from nlsr.inference import upscale
    from nlsr.models import resolve_model

    model = resolve_model(name, 2, weights_dir=weights_dir)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SPEED_SIZE, SPEED_SIZE, 3), dtype=np.uint8)
    upscale(model, image[:64, :64], device="cpu", precision="fp32")
    times = []
    for _ in range(SPEED_RUNS):
        start = time.perf_counter()
        upscale(model, image, device="cpu", precision="fp32")
        times.append(time.perf_counter() - start)
    megapixels = (2 * SPEED_SIZE) ** 2 / 1e6
    return statistics.median(times) / megapixels


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _initialised_from(recipe: dict[str, Any]) -> str:
    """Where training started: the fine-tuned or warm-started weights, or scratch."""
    if recipe.get("finetune_from"):
        return f"fine-tuned from {recipe['finetune_from']}"
    if recipe.get("warm_start"):
        return f"warm start from {recipe['warm_start']}"
    return "scratch"


def _schedule(recipe: dict[str, Any]) -> str:
    """The learning-rate schedule in one cell."""
    if recipe.get("schedule") == "cosine":
        return f"cosine {recipe.get('lr')} -> {recipe.get('min_lr')}"
    return f"{recipe.get('lr')}, x{recipe.get('gamma')} at {recipe.get('milestones')}"


def model_section(name: str, shipped: dict[int, Any]) -> str:
    """Markdown: architecture, parameters, data, recipe, iterations and hardware per scale."""
    first = shipped[min(shipped)]
    opts = ", ".join(f"{k}={v}" for k, v in first.options.items())
    lines = [
        f"**{name}** - architecture `{first.arch}` ({opts}).",
        "",
        "| scale | parameters | file | iterations | weights | initialised from | training "
        "data (images) | HR patch | batch | learning rate | EMA | trained on | code |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scale, w in sorted(shipped.items()):
        t, r = w.training, w.training.get("recipe", {})
        data = t.get("data", {})
        sets = " + ".join(data.get("train_sets") or []) or "-"
        device = t.get("hardware") or f"{t.get('device')} ({t.get('threads')} threads)"
        lines.append(
            f"| x{scale} | {w.parameters / 1e6:.3f}M | {w.file.stat().st_size / 1e6:.2f} MB | "
            f"{t.get('iterations')} | {t.get('weights')} | {_initialised_from(r)} | "
            f"{sets} ({data.get('images_used')}, {data.get('degradation')}) | "
            f"{r.get('patch_size')} | {r.get('batch_size')} | "
            f"{_schedule(r)} | {r.get('ema')} | "
            f"{device} | {(t.get('git_commit') or '-')[:10]}, torch {t.get('torch_version')} |"
        )
    total = sum(w.file.stat().st_size for w in shipped.values()) / 1e6
    lines += ["", f"All scales together: {total:.2f} MB. Loss L1, optimizer Adam."]
    return "\n".join(lines)


def results_section(
    name: str,
    shipped: dict[int, Any],
    measured: dict[int, dict[str, dict[str, tuple[float, float]]]],
    sets: tuple[str, ...],
    seconds_per_mp: float | None,
    threads: int,
    chop: bool,
) -> str:
    """Markdown tables: per scale, bicubic and the model (measured, PSNR / SSIM) next to the
    published FSRCNN, VDSR and IMDN rows (PSNR), then the targets and the CPU speed."""
    how = "the authors' chop" if chop else "whole images and seed 0, i.e. the default command"
    lines = [
        "Measured with `nlsr eval` (BI, Y-channel PSNR dB / SSIM, `scale` px border cropped, "
        f"{how}) by `scripts/model_card.py card {name}` on {time.strftime('%Y-%m-%d')}; "
        "published rows are the papers' numbers.",
    ]
    for scale in sorted(shipped):
        cols = [s for s in sets if s in SETS] + [s for s in sets if s not in SETS]
        lines += [
            "",
            f"#### x{scale}",
            "",
            "| method | params | " + " | ".join(cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        row = measured[scale]
        for label, key, params in (
            ("bicubic (measured)", "bicubic", "-"),
            (f"**{name}** (measured)", name, f"{shipped[scale].parameters / 1e6:.2f}M"),
        ):
            cells = [f"{fmt(row[key][s][0])} / {fmt(row[key][s][1], 4)}" for s in cols]
            lines.append(f"| {label} | {params} | " + " | ".join(cells) + " |")
        for method, values in PUBLISHED[scale].items():
            by_set = dict(zip(SETS, values, strict=True))
            cells = [fmt(by_set.get(s)) for s in cols]
            lines.append(
                f"| {method} (published) | {PUBLISHED_PARAMS[method]:.2f}M | "
                + " | ".join(cells)
                + " |"
            )
    checks = []
    for scale, wanted in TARGETS.items():
        for s, target in wanted.items():
            got = measured.get(scale, {}).get(name, {}).get(s)
            if got is None:
                checks.append(f"x{scale} {s} >= {target}: not measured")
            else:
                verdict = "met" if got[0] >= target else "NOT met"
                checks.append(f"x{scale} {s} >= {target}: {got[0]:.2f} dB, {verdict}")
    lines += ["", "Targets: " + "; ".join(checks) + "."]
    if seconds_per_mp is not None:
        lines += [
            "",
            f"CPU speed (x2, {SPEED_SIZE}x{SPEED_SIZE} input, whole image, median of "
            f"{SPEED_RUNS}): **{seconds_per_mp:.2f} s per output megapixel** with {threads} "
            f"torch thread{'s' if threads != 1 else ''} on {cpu_name()} "
            f"({os.cpu_count()} cores visible).",
        ]
    return "\n".join(lines)


def replace_between(text: str, key: str, body: str, path: Path) -> str:
    """``text`` with the part between the ``key`` markers replaced by ``body``."""
    start, end = MARKERS[key]
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{path}: needs exactly one {start} ... {end} pair")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def _reused(path: Path, shipped: dict, sets: tuple[str, ...]) -> Measured:
    """The scores of an earlier ``card --json`` run for the scales whose shipped file is still
    the one measured (same SHA-256), so that only new or re-trained scales are evaluated."""
    payload = json.loads(path.read_text(encoding="utf-8"))
    out: Measured = {}
    for key, by_method in payload.get("results", {}).items():
        scale = int(key)
        if scale not in shipped:
            continue
        if payload.get("sha256", {}).get(key) != shipped[scale].sha256:
            print(
                f"{path}: x{scale} was measured with other weights: measuring it again",
                file=sys.stderr,
            )
            continue
        rows = {m: {n: (v[0], v[1]) for n, v in by.items()} for m, by in by_method.items()}
        if any(set(sets) - set(by) for by in rows.values()):
            raise ValueError(f"{path}: x{scale} lacks some of the sets {', '.join(sets)}")
        out[scale] = rows
    return out


def cmd_card(args: argparse.Namespace) -> int:
    """Evaluate, time, record the scores and rewrite the card."""
    from nlsr.models.pretrained import pretrained_weights, read_manifest
    from nlsr.train.publish import set_scores

    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.weights_dir)
    if args.name not in manifest:
        pretrained_weights(args.name, 2, weights_dir=args.weights_dir)  # raises, listing
    if args.weights_dir is not None:
        os.environ["NLSR_WEIGHTS_DIR"] = str(args.weights_dir)  # what nlsr eval reads
    shipped = manifest[args.name]
    sets = tuple(args.sets.split(","))
    common = ["--data", ",".join(sets), "--data-root", str(args.data_root)]
    if args.chop:
        common.append("--chop")
    measured = _reused(args.reuse, shipped, sets) if args.reuse is not None else {}
    for scale in sorted(set(shipped) - set(measured)):
        scale_args = [*common, "--scale", str(scale)]
        measured[scale] = {}
        for key in ("bicubic", args.name):
            results = run_eval(["--model", key, *scale_args])
            measured[scale][key] = {r["dataset"]: (r["psnr"], r["ssim"]) for r in results}
        set_scores(
            args.name,
            scale,
            {s: v[0] for s, v in measured[scale][args.name].items()},
            weights_dir=args.weights_dir,
        )
    seconds_per_mp = speed(args.name, args.weights_dir) if 2 in shipped else None
    shipped = read_manifest(args.weights_dir)[args.name]
    text = args.card.read_text(encoding="utf-8")
    text = replace_between(text, "model", model_section(args.name, shipped), args.card)
    results = results_section(
        args.name,
        shipped,
        measured,
        sets,
        seconds_per_mp,
        torch.get_num_threads(),
        args.chop,
    )
    text = replace_between(text, "results", results, args.card)
    atomic_write(args.card, text.encode("utf-8"))
    print(f"wrote {args.card}")
    if args.json is not None:
        payload = {
            "model": args.name,
            "results": {
                str(s): {k: {n: list(v) for n, v in by.items()} for k, by in row.items()}
                for s, row in measured.items()
            },
            "seconds_per_megapixel_x2": seconds_per_mp,
            "sha256": {str(s): shipped[s].sha256 for s in measured},
        }
        atomic_write(args.json, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The two sub-commands and their options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="add trained weights to the weights folder")
    p.add_argument("name", help="shipped model name, e.g. nlsr-dlsn-s")
    p.add_argument("weights", nargs="+", type=parse_weights, metavar="xS=FILE")
    p.add_argument(
        "--option",
        action="append",
        type=parse_option,
        metavar="KEY=VALUE",
        help="inference-only option to ship with, e.g. n_hashes=3 (repeatable)",
    )
    p.add_argument("--hardware", help="what it was trained on, e.g. '2-core Xeon CPU'")
    p.add_argument("--description", help="one line describing the model")
    p.add_argument("--weights-dir", type=Path, help="weights folder (default: the package's)")
    p.set_defaults(run=cmd_install)
    c = sub.add_parser("card", help="evaluate a shipped model and write its model card")
    c.add_argument("name", help="shipped model name")
    c.add_argument(
        "--data-root",
        type=Path,
        default=REPO.parent / "shared/datasets/benchmark",
        help="folder holding <Set>/HR (default: ../shared/datasets/benchmark)",
    )
    c.add_argument("--sets", default=",".join(SETS), help="comma-separated benchmark sets")
    c.add_argument("--card", type=Path, default=CARD, help="the model card to update")
    c.add_argument("--json", type=Path, help="also write the measured numbers as JSON")
    c.add_argument("--weights-dir", type=Path, help="weights folder (default: the package's)")
    c.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    c.add_argument(
        "--chop",
        action="store_true",
        help="the authors' chop instead of whole images (nlsr eval's default)",
    )
    c.add_argument(
        "--reuse",
        type=Path,
        metavar="JSON",
        help="take the scores of scales measured by an earlier --json run (same weights)",
    )
    c.set_defaults(run=cmd_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"model_card: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
