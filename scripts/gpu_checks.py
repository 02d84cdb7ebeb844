"""Device checks of ``scripts/gpu_run.sh`` (stage "checks"): what only a GPU can tell.

    python scripts/gpu_checks.py --device cuda --json checks.json [--deadline SECONDS] [--quick]
        [--only NAME,...] [--fixtures DIR] [--ship-config FILE] [--ship-batch N]

Each check runs even when an earlier one failed; its result (``passed``: true, false, or null
when skipped, ``seconds`` and the figures) is written to the JSON file as soon as it is done, so
a run cut short keeps what it measured. Checks, in order:

``env``
    torch, CUDA and cuDNN versions, the GPU, the SDPA kernels torch has enabled.
``ship_rate``
    training iterations per second of the shipped model's config (``configs/ship/dlsn_s_x2.yaml``)
    at ``--ship-batch`` with bf16 autocast, with and without channels-last, and in float32:
    ``gpu_run.sh`` sizes the training stage from the best of them.
``fixtures``
    the authors' parity fixtures (``$NLSR_SHARED/fixtures/official``, as ``tests/test_fixtures.py``)
    on the device in float32 with TF32 off (max abs error against the official output, passed at
    1e-5 like the test), and the same forward under bf16 autocast (error in grey levels).
``archs``
    every architecture in a tiny configuration (and DLSN/NLSN with one hash round, which takes the
    SDPA path on CUDA): ``nlsr.inference.forward`` in fp32 and ``precision="bf16"`` (difference in
    grey levels), one Adam step in float32 and one under bf16 autocast (finite loss and
    gradients, step time).
``sdpa``
    NLSA, GLA (one hash round) and LCoA (one round): ``attention_backend="sdpa"`` against
    ``"blocked"`` (outputs and gradients, float32, TF32 off), which of PyTorch's SDPA kernels
    (flash, memory-efficient, cuDNN, math) accept the call in float32 and under bf16 autocast,
    the dtype SDPA computes in under autocast, and both backends' forward and forward+backward
    times.
``trainer``
    ``nlsr.train`` on the device with a tiny DLSN (one round), bf16 autocast, channels-last, EMA,
    DataLoader workers, validation and checkpoints: a straight run, and the same run stopped
    halfway and resumed (``train.deterministic`` on; whether the two end bitwise equal is
    reported, not required).

``--quick`` shrinks every size (the CPU test of ``gpu_run.sh``). The exit status is 0 when every
check that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NLSR_SHARED", REPO.parent / "shared"))
#: Tolerance of the parity fixtures (``tests/test_fixtures.py``).
FIXTURE_TOLERANCE = 1e-5
#: Tiny configurations of every architecture (as ``tests/test_reproducible.py``), plus the
#: one-round hashing networks, whose attention takes the SDPA path on CUDA.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "edsr": ("edsr", {"n_resblocks": 2, "n_feats": 8, "res_scale": 1.0}),
    "rcan": ("rcan", {"n_resgroups": 1, "n_resblocks": 2, "n_feats": 8, "reduction": 4}),
    "nlsn": ("nlsn", {"n_resblocks": 2, "n_feats": 8, "chunk_size": 16, "n_hashes": 2}),
    "nlsn-1round": ("nlsn", {"n_resblocks": 2, "n_feats": 8, "chunk_size": 16, "n_hashes": 1}),
    "dlsn": (
        "dlsn",
        {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 8, "chunk_size": 16, "n_hashes": 2},
    ),
    "dlsn-1round": (
        "dlsn",
        {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 8, "chunk_size": 16, "n_hashes": 1},
    ),
    "hspan": ("hspan", {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "topk": 16}),
    "lcoan": (
        "lcoan",
        {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 8, "n_clusters": 4, "window_size": 16},
    ),
    "csnln": ("csnln", {"n_feats": 8, "depth": 1}),
}
#: One-round configurations of the bucketed blocks (the only ones SDPA can compute).
SDPA_BLOCKS: dict[str, dict[str, Any]] = {
    "nlsa": {"n_hashes": 1},
    "gla": {"n_hashes": 1},
    "lcoa": {"n_rounds": 1},
}


class Skip(Exception):
    """The check (or the rest of it) did not run; the message says why."""


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.deadline = time.monotonic() + args.deadline
        self.fixtures = args.fixtures
        self.ship_config = args.ship_config
        self.ship_batch = args.ship_batch

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, what: str) -> None:
        if self.time_left() <= 0:
            raise Skip(f"out of time before {what}")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in matrix products and convolutions (the float32 comparisons)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(ctx: Context, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=enabled)


def adam_step(
    ctx: Context,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    hr: torch.Tensor,
    amp: bool,
) -> float:
    """One L1 training step (forward under bf16 autocast with ``amp``); the loss, NaN when a
    gradient is not finite."""
    with autocast(ctx, amp):
        sr = model(x)
    loss = F.l1_loss(sr.float(), hr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    opt.step()
    return float(loss.detach()) if finite else float("nan")


def median_seconds(ctx: Context, fn: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ctx.sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Difference of two [0, 1] images after quantisation to 8 bits, in grey levels."""
    qa = a.detach().float().clamp(0, 1).mul(255).round()
    qb = b.detach().float().clamp(0, 1).mul(255).round()
    d = (qa - qb).abs()
    return {
        "max": float(d.max()),
        "mean": float(d.mean()),
        "fraction_over_1": float((d > 1).float().mean()),
    }


def verdict(rows: dict[str, dict[str, Any]]) -> bool | None:
    """False if any part failed, None if none ran, else True."""
    ran = [r["passed"] for r in rows.values() if r.get("passed") is not None]
    return None if not ran else all(ran)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------- checks


def check_env(ctx: Context) -> dict[str, Any]:
    import nlsr

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nlsr": nlsr.__version__,
        "device": str(ctx.device),
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    if ctx.device.type == "cuda":
        if not torch.cuda.is_available():
            return {**info, "passed": False, "error": "DEVICE=cuda but torch sees no CUDA device"}
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            sdpa_enabled={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
                "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
            },
        )
    return {**info, "passed": True}


def _ship_options(ctx: Context) -> tuple[str, dict[str, Any], int, int]:
    import yaml

    raw = yaml.safe_load(Path(ctx.ship_config).read_text(encoding="utf-8"))
    model = raw["model"]
    return model["arch"], model.get("options", {}), model.get("scale", 2), raw["data"]["patch_size"]


def check_ship_rate(ctx: Context) -> dict[str, Any]:
    from nlsr.models import create

    arch, options, scale, patch = _ship_options(ctx)
    batch = ctx.ship_batch
    if ctx.quick:
        patch = 8 * scale
    lr_side = patch // scale
    variants = [(True, False), (True, True), (False, False)]
    if ctx.device.type != "cuda":
        variants = [(False, False)]  # keep the CPU dry run short
    steps = 2 if ctx.quick else 15
    results = []
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as the trainer does on CUDA
    try:
        for amp, channels_last in variants:
            if results and ctx.time_left() <= 0:
                break
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            torch.manual_seed(0)
            model = create(arch, scale, **options).to(ctx.device).train()
            model.to(memory_format=fmt)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            x = torch.rand(batch, 3, lr_side, lr_side, device=ctx.device)
            x = x.contiguous(memory_format=fmt)
            y = torch.rand(batch, 3, patch, patch, device=ctx.device)

            def step(model=model, opt=opt, x=x, y=y, amp=amp) -> float:
                return adam_step(ctx, model, opt, x, y, amp)

            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            seconds = median_seconds(ctx, step, steps, warmup=1 if ctx.quick else 3)
            row = {"amp": amp, "channels_last": channels_last, "it_per_s": 1.0 / seconds}
            if ctx.device.type == "cuda":
                row["peak_memory_mib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
            results.append(row)
            del model, opt
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    best = max(results, key=lambda r: r["it_per_s"])
    return {
        "passed": True,
        "config": str(ctx.ship_config),
        "batch": batch,
        "patch": patch,
        "variants": results,
        "best": best,
    }


def _fixture_forward(model: torch.nn.Module, folder: Path, ctx: Context, bf16: bool):
    projections = folder / "projections.pt"
    if projections.exists():
        draws = torch.load(projections, weights_only=True)
        hashing = [m for m in model.modules() if hasattr(m, "projections")]
        for module, draw in zip(hashing, draws, strict=True):
            module.projections = draw.to(ctx.device)
    x = torch.load(folder / "input.pt", weights_only=True).to(ctx.device)
    with torch.no_grad(), autocast(ctx, bf16):
        return model(x).float().cpu()


def check_fixtures(ctx: Context) -> dict[str, Any]:
    import nlsr

    root = Path(ctx.fixtures)
    cases = sorted(p.parent for p in root.glob("*/case.json")) if root.is_dir() else []
    if not cases:
        raise Skip(f"no parity fixtures in {root} (pack them: scripts/pack_gpu_data.py)")
    rows: dict[str, Any] = {}
    for folder in cases:
        if ctx.time_left() <= 0:
            rows[folder.name] = {"passed": None, "skipped": "out of time"}
            continue
        case = json.loads((folder / "case.json").read_text())
        try:
            model = nlsr.load(
                folder / "checkpoint.pt",
                arch=case["arch"],
                scale=case["scale"],
                **case["not_inferable_from_weights"],
            ).to(ctx.device)
            stable = folder / "output_stable_sort.pt"
            ref = torch.load(stable if stable.exists() else folder / "output.pt", weights_only=True)
            with exact_float32():
                out = _fixture_forward(model, folder, ctx, bf16=False)
            err = float((out - ref).abs().max())
            out16 = _fixture_forward(model, folder, ctx, bf16=True)
            rows[folder.name] = {
                "passed": bool(out.shape == ref.shape and err <= FIXTURE_TOLERANCE),
                "max_abs_error": err,
                "bf16_finite": bool(torch.isfinite(out16).all()),
                "bf16_grey_levels": grey_levels(out16, ref),
            }
        except Exception as exc:
            rows[folder.name] = {"passed": False, "error": first_line(exc)}
    return {
        "passed": verdict(rows),
        "tolerance": FIXTURE_TOLERANCE,
        "fixtures": str(root),
        "cases": rows,
    }


def check_archs(ctx: Context) -> dict[str, Any]:
    from nlsr.inference import forward
    from nlsr.models import create

    side = 12 if ctx.quick else 48
    rows: dict[str, Any] = {}
    for name, (arch, options) in TINY.items():
        if ctx.time_left() <= 0:
            rows[name] = {"passed": None, "skipped": "out of time"}
            continue
        row: dict[str, Any] = {}
        try:
            torch.manual_seed(0)
            model = create(arch, 2, **options).to(ctx.device)
            x = torch.rand(2, 3, side, side, device=ctx.device)
            hr = torch.rand(2, 3, 2 * side, 2 * side, device=ctx.device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            for amp in (False, True):
                model.train()

                def step(model=model, opt=opt, amp=amp, x=x, hr=hr) -> float:
                    return adam_step(ctx, model, opt, x, hr, amp)

                loss = step()
                seconds = median_seconds(ctx, step, 1 if ctx.quick else 3, warmup=0)
                key = "train_bf16" if amp else "train_fp32"
                row[key] = {"loss": loss, "finite": bool(np.isfinite(loss)), "seconds": seconds}
            with exact_float32():
                y32 = forward(model, x, seed=0, precision="fp32")
            y16 = forward(model, x, seed=0, precision="bf16")
            row["infer"] = {
                "shape_ok": tuple(y16.shape) == tuple(y32.shape) == tuple(hr.shape),
                "bf16_finite": bool(torch.isfinite(y16).all()),
                "bf16_vs_fp32_grey_levels": grey_levels(y16, y32),
            }
            row["passed"] = bool(
                row["train_fp32"]["finite"]
                and row["train_bf16"]["finite"]
                and row["infer"]["shape_ok"]
                and row["infer"]["bf16_finite"]
            )
        except Exception as exc:
            row.update(passed=False, error=first_line(exc))
        rows[name] = row
    return {"passed": verdict(rows), "input": side, "archs": rows}


def _sdpa_backends() -> dict[str, Any]:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    names = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _block_pass(block: torch.nn.Module, x0: torch.Tensor, backend: str, bf16: bool, ctx: Context):
    """Output, input gradient and parameter gradients of one forward+backward with the block's
    random draws seeded (the same hashes for every backend)."""
    block.attention_backend = backend
    block.generator = torch.Generator().manual_seed(0)
    block.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    with autocast(ctx, bf16):
        out = block(x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check_sdpa(ctx: Context) -> dict[str, Any]:
    from nlsr.attention import backends, create_attention

    channels = 16 if ctx.quick else 64
    side = 12 if ctx.quick else 48
    timing_sides = [12] if ctx.quick else [96, 192]
    rows: dict[str, Any] = {}
    # Which computation SDPA runs under autocast (the blocked path is float32 by design).
    seen_dtypes: list[str] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen_dtypes.append(str(args[0].dtype))
        return original(*args, **kwargs)

    for name, options in SDPA_BLOCKS.items():
        if ctx.time_left() <= 0:
            rows[name] = {"passed": None, "skipped": "out of time"}
            continue
        row: dict[str, Any] = {}
        try:
            torch.manual_seed(0)
            block = create_attention(name, channels, **options).to(ctx.device).train()
            x0 = torch.randn(2, channels, side, side, device=ctx.device)
            _block_pass(block, x0, "blocked", False, ctx)  # LCoA: k-means initialisation
            with exact_float32():
                ref = _block_pass(block, x0, "blocked", False, ctx)
                got = _block_pass(block, x0, "sdpa", False, ctx)
            row["fp32_relative_difference"] = {
                "output": _relative(got[0], ref[0]),
                "input_grad": _relative(got[1], ref[1]),
                # over all parameters at once: some gradients are zero up to rounding (GLA's
                # last bias shifts every score of a query alike, which softmax ignores)
                "param_grads": _relative(
                    torch.cat([got[2][k].flatten() for k in ref[2]]),
                    torch.cat([ref[2][k].flatten() for k in ref[2]]),
                ),
            }
            seen_dtypes.clear()
            torch.nn.functional.scaled_dot_product_attention = spy
            try:
                amp = _block_pass(block, x0, "sdpa", True, ctx)
            finally:
                torch.nn.functional.scaled_dot_product_attention = original
            blocked_amp = _block_pass(block, x0, "blocked", True, ctx)
            row["bf16_autocast"] = {
                "sdpa_input_dtype": seen_dtypes[0] if seen_dtypes else None,
                "sdpa_vs_fp32_output": _relative(amp[0], ref[0]),
                "blocked_vs_fp32_output": _relative(blocked_amp[0], ref[0]),
                "finite": bool(torch.isfinite(amp[0]).all() and torch.isfinite(amp[1]).all()),
            }
            kernels: dict[str, Any] = {}
            from_torch = _sdpa_backends()
            if from_torch:
                from torch.nn.attention import sdpa_kernel

                for kname, kernel in from_torch.items():
                    for label, bf16 in (("fp32", False), ("bf16", True)):
                        try:
                            with sdpa_kernel([kernel]):
                                _block_pass(block, x0, "sdpa", bf16, ctx)
                            kernels[f"{kname}/{label}"] = "ok"
                        except Exception as exc:
                            kernels[f"{kname}/{label}"] = first_line(exc)
            row["kernels"] = kernels
            timings = []
            for tside in timing_sides:
                if ctx.time_left() <= 0:
                    break
                xt = torch.randn(1, channels, tside, tside, device=ctx.device)
                for backend in ("blocked", "sdpa"):
                    for bf16 in (False, True):
                        block.attention_backend = backend

                        def infer(block=block, xt=xt, bf16=bf16) -> None:
                            with torch.inference_mode(), autocast(ctx, bf16):
                                block(xt)

                        def train(block=block, xt=xt, bf16=bf16) -> None:
                            x = xt.clone().requires_grad_(True)
                            with autocast(ctx, bf16):
                                out = block(x)
                            out.float().sum().backward()

                        repeat = 1 if ctx.quick else 5
                        timings.append(
                            {
                                "side": tside,
                                "backend": backend,
                                "precision": "bf16" if bf16 else "fp32",
                                "infer_ms": 1e3 * median_seconds(ctx, infer, repeat, 1),
                                "train_ms": 1e3 * median_seconds(ctx, train, repeat, 1),
                            }
                        )
            row["timings"] = timings
            diff = row["fp32_relative_difference"]
            row["passed"] = bool(max(diff.values()) < 1e-4 and row["bf16_autocast"]["finite"])
        except Exception as exc:
            row.update(passed=False, error=first_line(exc))
        rows[name] = row
    return {
        "passed": verdict(rows),
        "auto_backend_on_this_device": backends.choose_backend(
            "auto", torch.empty(1, device=ctx.device), 1
        ),
        "channels": channels,
        "side": side,
        "blocks": rows,
    }


def _tiny_images(folder: Path, count: int, side: int, seed: int) -> Path:
    from nlsr.io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    for i in range(count):
        waves = [
            127 + 90 * np.sin(rng.uniform(0.1, 0.6) * y + rng.uniform(0.1, 0.6) * x + c)
            for c in range(3)
        ]
        img = np.clip(np.stack(waves, -1) + rng.normal(0, 8, (side, side, 3)), 0, 255)
        write_image(folder / f"img{i}.png", img.round().astype(np.uint8))
    return folder


def check_trainer(ctx: Context) -> dict[str, Any]:
    from safetensors.torch import load_file

    from nlsr.train import parse_config, resume_config, train

    arch, options = TINY["dlsn-1round"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hr = _tiny_images(root / "hr", 3, 40, 1)
        _tiny_images(root / "bench" / "Set5" / "HR", 1, 40, 2)

        def raw(run: str, iterations: int, deterministic: bool) -> dict[str, Any]:
            return {
                "model": {"arch": arch, "scale": 2, "options": options},
                "data": {
                    "train_dirs": [str(hr)],
                    "patch_size": 16,
                    "batch_size": 4,
                    "workers": 0 if ctx.quick else 2,
                },
                "optim": {"lr": 1e-3, "ema": 0.9, "milestones": [100]},
                "train": {
                    "iterations": iterations,
                    "device": str(ctx.device),
                    "amp": True,
                    "channels_last": True,
                    "deterministic": deterministic,
                    "log_every": 2,
                    "checkpoint_every": 2,
                },
                "val": {"every": 2, "sets": ["Set5"], "data_root": str(root / "bench")},
                "run_dir": str(root / run),
            }

        result: dict[str, Any] = {}
        for deterministic in (True, False):
            tag = "det" if deterministic else "nondet"
            try:
                ctx.check_time("trainer")
                straight = train(parse_config(raw(f"straight_{tag}", 4, deterministic)))
                ctx.check_time("trainer resume")
                train(parse_config(raw(f"split_{tag}", 2, deterministic)))
                split = train(
                    resume_config(root / f"split_{tag}", ["train.iterations=4"]), resume=True
                )
            except Skip:
                raise
            except Exception as exc:
                result[f"deterministic_{deterministic}"] = {
                    "error": first_line(exc),
                    "traceback": traceback.format_exc()[-1500:],
                }
                continue
            a, b = load_file(str(straight.final)), load_file(str(split.final))
            differ = [k for k in a if not torch.equal(a[k], b[k])]
            result[f"deterministic_{deterministic}"] = {
                "steps": [straight.step, split.step],
                "exported": [p.name for p in (straight.final, straight.ema, straight.best) if p],
                "best_psnr": straight.best_psnr,
                "resume_bitwise_equal": not differ,
                "tensors_differing": len(differ),
            }
            break  # the deterministic run worked: no need for the other
        ran = [r for r in result.values() if "error" not in r]
        return {"passed": bool(ran), "arch": arch, "options": options, **result}


CHECKS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "env": check_env,
    "ship_rate": check_ship_rate,
    "fixtures": check_fixtures,
    "archs": check_archs,
    "sdpa": check_sdpa,
    "trainer": check_trainer,
}


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, required=True, help="results file")
    parser.add_argument(
        "--deadline",
        type=float,
        default=120.0,
        help="seconds after which the remaining checks are skipped (default 120)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--only", default="", help="comma-separated checks (default: all)")
    parser.add_argument("--fixtures", type=Path, default=SHARED / "fixtures" / "official")
    parser.add_argument(
        "--ship-config", type=Path, default=REPO / "configs" / "ship" / "dlsn_s_x2.yaml"
    )
    parser.add_argument("--ship-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown checks {unknown}; available: {', '.join(CHECKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(args)
    started = time.monotonic()
    results: dict[str, Any] = {"device": args.device, "quick": args.quick, "checks": {}}
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        t0 = time.monotonic()
        try:
            ctx.check_time(name)
            res = check(ctx)
        except Skip as exc:
            res = {"passed": None, "skipped": str(exc)}
        except Exception as exc:
            res = {
                "passed": False,
                "error": first_line(exc),
                "traceback": traceback.format_exc()[-3000:],
            }
        res["seconds"] = round(time.monotonic() - t0, 2)
        results["checks"][name] = res
        results["seconds"] = round(time.monotonic() - started, 2)
        write(args.json, results)
        state = {True: "passed", False: "FAILED", None: "skipped"}[res["passed"]]
        note = res.get("error") or res.get("skipped") or ""
        print(f"check {name}: {state} ({res['seconds']:.1f} s) {note}".rstrip(), flush=True)
    failed = [n for n, r in results["checks"].items() if r["passed"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
