"""HSPA on the HSPAN network's own features: nlsr's block against the released approach.

    python scripts/hspa_real.py [--image PATH] [--size 48] [--config paper|small]
        [--repeat 7] [--threads 1] [--modes infer,train] [--overhead]

Builds ``hspan`` x2 (seed 0) at the paper configuration (or the small one), feeds it a centred
``size`` x ``size`` crop of a real image (default: Set14's baboon under the shared benchmark
data, else the bundled sample), captures the input of every HSPA block
(:func:`nlsr.bench.inputs.capture_all`) and times each block against
:class:`~nlsr.attention.reference.ReleasedHSPA` on that input (same parameters; infer: forward
without autograd, train: forward and backward to the input and the parameters). Runs are
interleaved, CPU time (``time.process_time``), medians of ``repeat``. Prints the sparsemax
support sizes met (the released sorted search) per block.

With ``--overhead``: the network's attention overhead instead (issue 16's acceptance figure),
``(T(network) - T(identity)) / T(identity)`` for nlsr's network and for its released form
(:func:`~nlsr.attention.reference.released_baseline`), ``identity`` being the same network with
every HSPA block replaced by the identity; the three timed interleaved, inference only.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from nlsr.attention.hspa import HSPA
from nlsr.attention.reference import ReleasedHSPA, released_baseline
from nlsr.bench.inputs import capture_all, count_supports
from nlsr.io import read_image
from nlsr.models import create

REPO = Path(__file__).resolve().parents[1]
IMAGES = (
    REPO.parent / "shared/datasets/benchmark/Set14/HR/baboon.png",
    Path("/work/shared/datasets/benchmark/Set14/HR/baboon.png"),
    REPO / "src/nlsr/assets/sample.png",
)


def crop(path: Path, size: int) -> Tensor:
    """A centred ``size`` x ``size`` crop of the image at ``path``: ``(1, 3, size, size)`` in
    [0, 1]."""
    pixels = torch.from_numpy(read_image(path).pixels.astype("float32") / 255.0)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size].permute(2, 0, 1).unsqueeze(0)


def runner(module: nn.Module, x: Tensor, mode: str) -> Callable[[], None]:
    """One inference (no autograd) or one training step (backward to input and parameters)."""
    if mode == "infer":

        def infer() -> None:
            with torch.no_grad():
                module(x)

        return infer
    leaf = x.clone().requires_grad_()
    weight = torch.randn_like(x, generator=torch.Generator().manual_seed(1))

    def train() -> None:
        (module(leaf) * weight).sum().backward()

    return train


def without_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every HSPA block replaced by the identity."""
    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for name, child in parent.named_children():
            if isinstance(child, HSPA):
                setattr(parent, name, nn.Identity())
    return copied


def overhead(model: nn.Module, image: Tensor, repeat: int) -> None:
    """Print the attention overhead of ``model`` and of its released form on ``image``."""
    released = released_baseline(copy.deepcopy(model))
    nets = {"nlsr": model, "released": released, "identity": without_attention(model)}
    times = cpu_seconds([runner(net, image, "infer") for net in nets.values()], repeat)
    base = times[-1]
    for name, spent in zip(nets, times, strict=True):
        extra = f"  attention overhead {(spent - base) / base:6.1%}" if name != "identity" else ""
        print(f"{name:>9} {1e3 * spent:9.1f} ms{extra}")
    ours, theirs = ((t - base) / base for t in times[:2])
    print(f"overhead nlsr / released: {ours / theirs:.2f} (the issue asks <= 0.5)")


def cpu_seconds(fns: list[Callable[[], None]], repeat: int) -> list[float]:
    """Median CPU seconds of each of ``fns``, run interleaved ``repeat`` times after a warm-up."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeat):
        for fn, spent in zip(fns, times, strict=True):
            start = time.process_time()
            fn()
            spent.append(time.process_time() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--config", choices=["paper", "small"], default="paper")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--overhead", action="store_true", help="the network's attention overhead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.image or next(p for p in IMAGES if p.exists())
    torch.manual_seed(0)
    options = {} if args.config == "paper" else {"n_resgroups": 4, "n_resblocks": 2, "n_feats": 64}
    model = create("hspan", 2, **options).eval()
    image = crop(path, args.size)
    print(
        f"{path.name} {args.size}x{args.size}, hspan {args.config}, {args.threads} thread(s), "
        f"load {os.getloadavg()[0]:.2f}, medians of {args.repeat}, CPU ms"
    )
    if args.overhead:
        overhead(model, image, args.repeat)
        print(f"load after: {os.getloadavg()[0]:.2f}")
        return
    inputs = capture_all(model, HSPA, image)
    print(
        f"{'block':>5} {'support min/med/max':>20} "
        + " ".join(
            f"{m + ' nlsr':>11} {m + ' released':>15} {'ratio':>6}" for m in args.modes.split(",")
        )
    )
    totals: dict[str, list[float]] = {}
    for i, (block, x) in enumerate(inputs):
        size = count_supports(block, x)
        cells = []
        for mode in args.modes.split(","):
            ours, theirs = cpu_seconds(
                [runner(block, x, mode), runner(ReleasedHSPA(block), x, mode)], args.repeat
            )
            totals.setdefault(mode, [0.0, 0.0])
            totals[mode][0] += ours
            totals[mode][1] += theirs
            cells.append(f"{1e3 * ours:11.1f} {1e3 * theirs:15.1f} {theirs / ours:5.2f}x")
        low, mid, high = int(size.min()), int(size.median()), int(size.max())
        print(f"{i:>5} {f'{low}/{mid}/{high}':>20} " + " ".join(cells))
    print(
        f"{'all':>5} {'':>20} "
        + " ".join(f"{1e3 * a:11.1f} {1e3 * b:15.1f} {b / a:5.2f}x" for a, b in totals.values())
    )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
