"""How far bf16 inference is from float32, per architecture, on real image crops.

    python scripts/precision_check.py [--fixtures ../shared/fixtures/official] [--threads 2]

For each official parity fixture (the authors' checkpoint and its Set14 crop) and for the shipped
model on the bundled sample, it runs ``nlsr.inference.forward`` in fp32 and under bf16 autocast
(same seed, so the same hash draws) and prints the largest and mean difference of the 8-bit
outputs in grey levels, the PSNR between the two and the CPU seconds of each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import nlsr
from nlsr.inference import forward, to_array, to_tensor
from nlsr.io import read_image

REPO = Path(__file__).resolve().parents[1]


def compare(name: str, model: torch.nn.Module, lr: torch.Tensor) -> None:
    """Print one row: fp32 against bf16 for ``model`` on ``lr``."""
    outputs, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        start = time.process_time()
        outputs[precision] = to_array(forward(model, lr, precision=precision)).astype(np.int16)
        seconds[precision] = time.process_time() - start
    diff = np.abs(outputs["bf16"] - outputs["fp32"])
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    print(
        f"| {name} | {tuple(lr.shape[-2:])} | {diff.max()} | {diff.mean():.3f} | {psnr:.1f} | "
        f"{seconds['fp32']:.2f} | {seconds['bf16']:.2f} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=Path, default=REPO.parent / "shared/fixtures/official")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | LR size | max diff (levels) | mean diff | PSNR bf16 vs fp32 (dB) |", end="")
    print(" fp32 CPU s | bf16 CPU s |")
    print("|---|---|---|---|---|---|---|")
    for case in sorted(args.fixtures.glob("*_x2")) if args.fixtures.is_dir() else []:
        model = nlsr.load(case / "checkpoint.pt")
        lr = torch.load(case / "input.pt", weights_only=True)
        compare(f"{case.name} (authors' checkpoint)", model, lr)
    model = nlsr.models.create("nlsr-dlsn-s", 2, pretrained=True)
    compare(
        "nlsr-dlsn-s x2", model, to_tensor(read_image(REPO / "src/nlsr/assets/sample.png").pixels)
    )


if __name__ == "__main__":
    main()
