"""Choose the inference hash rounds of a shipped model by measurement.

    python scripts/hash_rounds.py [--model nlsr-dlsn-s] [--scales 2,3,4] [--sets Set5,Set14]
        [--rounds 1,2,3,4] [--data-root ../shared/datasets/benchmark] [--threads 1]
        [--repeat 3] [--json FILE] [--from-json FILE] [--record] [--tolerance 0.02]

For each scale and number of hash rounds it prints the PSNR/SSIM that ``nlsr eval`` gives (default
seed, whole images) on the sets, and the CPU seconds per output megapixel of one forward pass of
the bundled sample (median of ``--repeat`` runs, the round counts interleaved). The rounds are
not part of the weights (training used 1). ``--record`` writes the choice into the manifest
(options and ``choices``, :func:`nlsr.train.publish.record_choice`): per scale, the fewest rounds
whose PSNR, averaged over the sets, is within ``--tolerance`` dB of the best count's (default
0.02 dB: the spread of Set5 x2 scores over hash seeds 0-3). ``--from-json`` takes the rows of an
earlier ``--json`` instead of measuring again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import nlsr
from nlsr.evaluation import evaluate
from nlsr.inference import forward, to_tensor
from nlsr.io import read_image
from nlsr.train.publish import record_choice

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "nlsr" / "assets" / "sample.png"


def set_rounds(model: torch.nn.Module, rounds: int) -> int:
    """Set ``n_hashes`` on every hashing block of ``model``; returns how many blocks."""
    blocks = [m for m in model.modules() if hasattr(m, "n_hashes") and hasattr(m, "generator")]
    for m in blocks:
        m.n_hashes = rounds
    return len(blocks)


def cpu_seconds_per_mp(model: torch.nn.Module, lr: torch.Tensor) -> float:
    """CPU seconds (all threads) of one forward pass per output megapixel."""
    start = time.process_time()
    out = forward(model, lr, precision="fp32")
    return (time.process_time() - start) / (out.shape[-1] * out.shape[-2] / 1e6)


def choose(rows: list[dict], sets: list[str], tolerance: float) -> dict[int, int]:
    """Per scale: the fewest rounds whose mean PSNR over ``sets`` is within ``tolerance`` dB of
    the best."""
    chosen = {}
    for scale in sorted({r["scale"] for r in rows}):
        mean = {
            r["rounds"]: sum(r[s][0] for s in sets) / len(sets) for r in rows if r["scale"] == scale
        }
        best = max(mean.values())
        chosen[scale] = min(r for r, v in mean.items() if v >= best - tolerance)
    return chosen


def measure(args: argparse.Namespace, rounds: list[int], sets: list[str]) -> list[dict]:
    """PSNR/SSIM on ``sets`` and CPU s/MP for every scale and round count (rows, printed)."""
    torch.set_num_threads(args.threads)
    lr = to_tensor(read_image(SAMPLE).pixels)
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        model = nlsr.models.create(args.model, scale, pretrained=True)
        times: dict[int, list[float]] = {r: [] for r in rounds}
        for _ in range(args.repeat):
            for r in rounds:  # interleaved: load changes hit every count alike
                set_rounds(model, r)
                times[r].append(cpu_seconds_per_mp(model, lr))
        for r in rounds:
            set_rounds(model, r)
            scores = {s: evaluate(model, s, scale, data_root=args.data_root) for s in sets}
            row = {
                "scale": scale,
                "rounds": r,
                **{s: [round(v.psnr, 4), round(v.ssim, 4)] for s, v in scores.items()},
                "cpu_s_per_mp": round(statistics.median(times[r]), 3),
            }
            rows.append(row)
            cells = " | ".join(f"{row[s][0]:.3f} / {row[s][1]:.4f}" for s in sets)
            print(f"| x{scale} | {r} | {cells} | {row['cpu_s_per_mp']:.2f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nlsr-dlsn-s")
    p.add_argument("--scales", default="2,3,4")
    p.add_argument("--sets", default="Set5,Set14")
    p.add_argument("--rounds", default="1,2,3,4")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets" / "benchmark"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the measured rows here")
    p.add_argument("--from-json", type=Path, help="rows of an earlier --json: no measuring")
    p.add_argument("--record", action="store_true", help="write the choice into the manifest")
    p.add_argument("--tolerance", type=float, default=0.02, help="dB (see the module doc)")
    args = p.parse_args(argv)
    rounds = [int(r) for r in args.rounds.split(",")]
    sets = args.sets.split(",")
    if args.from_json:
        rows = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        rows = measure(args, rounds, sets)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    chosen = choose(rows, sets, args.tolerance)
    print("chosen rounds:", ", ".join(f"x{s}: {r}" for s, r in chosen.items()))
    if args.record:
        for scale, value in chosen.items():
            evidence = {
                "rule": f"fewest rounds within {args.tolerance} dB of the best mean PSNR "
                f"over {', '.join(sets)}",
                "command": "python scripts/hash_rounds.py",
                "measured": [r for r in rows if r["scale"] == scale],
            }
            record_choice(args.model, scale, "n_hashes", value, evidence)


if __name__ == "__main__":
    main()
