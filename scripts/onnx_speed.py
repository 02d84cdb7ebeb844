"""onnxruntime against PyTorch on the CPU: the shipped model and two paper networks, exported
with ``nlsr.export_onnx`` and timed on a real crop (docs/deploy.md).

    python scripts/onnx_speed.py [--models nlsr-dlsn-s,edsr,nlsn] [--sizes 48,96]
        [--repeat 5] [--image PATH] [--small]

A shipped model (``nlsr models``) runs with its weights; an architecture name means its paper
configuration (``--small``: the small benchmark size), untrained and seeded (speed only), at x2.
Both sides run float32 on one thread (``torch.set_num_threads(1)``, onnxruntime
``intra_op_num_threads=1``) on the same input (the centred crop of the bundled sample, or
``--image``), with the same hash projections (the export's, drawn from seed 0). Runs are
interleaved (PyTorch, onnxruntime, PyTorch, ...), one warm-up each, CPU time
(``time.process_time``), medians of ``--repeat``; the table also gives the largest
|onnxruntime - PyTorch| and the export time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nlsr.bench.inputs import load_source, real_images
from nlsr.export import export_onnx, fixed_projections, use_leading_columns
from nlsr.models import create, resolve_model, small_config
from nlsr.models.pretrained import available_pretrained
from nlsr.models.registry import spec


def build(name: str, small: bool) -> torch.nn.Module:
    """The shipped model ``name`` x2, else architecture ``name`` at its paper (or small)
    configuration, seeded."""
    if name in available_pretrained():
        return resolve_model(name, 2).module.eval()
    torch.manual_seed(0)
    preset = spec(name).preset
    options = small_config(name) if small or preset is None else dict(preset.options)
    return create(name, 2, **options).eval()


def cpu_time(call) -> float:
    """CPU seconds of one call."""
    start = time.process_time()
    call()
    return time.process_time() - start


def measure(name: str, sizes: list[int], repeat: int, source: torch.Tensor, small: bool) -> None:
    """Export ``name`` and print one row per size."""
    import onnxruntime

    model = build(name, small)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "m.onnx").path
        exported = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options)
    fixed = fixed_projections(model, 0)
    for side in sizes:
        x = real_images(source, side)
        use_leading_columns(fixed, side * side)  # the export's projections

        def torch_run(x: torch.Tensor = x) -> np.ndarray:
            with torch.no_grad():
                return model(x).numpy()

        def ort_run(x: torch.Tensor = x) -> np.ndarray:
            return session.run(None, {"lr": x.numpy()})[0]

        diff = float(np.abs(torch_run() - ort_run()).max())
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for _ in range(repeat):
            times["torch"].append(cpu_time(torch_run))
            times["ort"].append(cpu_time(ort_run))
        t, o = (statistics.median(times[k]) for k in ("torch", "ort"))
        print(
            f"{name:<14} {side:>4} {t:>10.3f} {o:>10.3f} {t / o:>7.2f} {diff:>10.1e} "
            f"{exported:>9.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="nlsr-dlsn-s,edsr,nlsn")
    parser.add_argument("--sizes", default="48,96")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--image", help="source image (default: the bundled sample)")
    parser.add_argument("--small", action="store_true", help="small configurations (quick)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = load_source(args.image)
    print(f"load average {os.getloadavg()[0]:.2f}; CPU seconds, median of {args.repeat}")
    print(
        f"{'model':<14} {'side':>4} {'pytorch':>10} {'onnxrt':>10} {'speedup':>7} "
        f"{'max diff':>10} {'export s':>9}"
    )
    for name in args.models.split(","):
        measure(
            name.strip(), [int(s) for s in args.sizes.split(",")], args.repeat, source, args.small
        )


if __name__ == "__main__":
    main()
