"""Same input, same output: seeded inference, bitwise kill-and-resume and bf16 for every network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BENCHMARK, require
from PIL import Image as PILImage
from safetensors.torch import load_file
from test_train import _raw

import nlsr
from nlsr.cli import main
from nlsr.evaluation import evaluate
from nlsr.inference import forward
from nlsr.models import create
from nlsr.models.pretrained import WEIGHTS_ENV
from nlsr.train import parse_config, train
from nlsr.train import state as train_state

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "nlsr" / "assets" / "sample.png"

#: Tiny configurations of every architecture, small enough that hashing blocks still see several
#: buckets (chunks of 16 on 8x8 LR patches) and clustering blocks several clusters.
TINY: dict[str, dict] = {
    "edsr": {"n_resblocks": 2, "n_feats": 8, "res_scale": 1.0},
    "rcan": {"n_resgroups": 1, "n_resblocks": 2, "n_feats": 8, "reduction": 4},
    "nlsn": {"n_resblocks": 2, "n_feats": 8, "chunk_size": 16, "n_hashes": 2},
    "dlsn": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 8, "chunk_size": 16, "n_hashes": 2},
    "hspan": {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "topk": 16},
    "lcoan": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 8, "n_clusters": 4, "window_size": 16},
    "csnln": {"n_feats": 8, "depth": 1},
}
#: Networks whose forward pass draws random numbers: hash projections at every call (NLSN,
#: DLSN), the k-means initialisation at the first call of an untrained model (LCoAN).
RANDOM = ("nlsn", "dlsn", "lcoan")


def _image(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth, textured colour image (waves plus mild noise), uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [
        127 + 90 * np.sin(rng.uniform(0.1, 0.6) * y + rng.uniform(0.1, 0.6) * x + c)
        for c in range(3)
    ]
    noisy = np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3))
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def _tiny(arch: str, scale: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return create(arch, scale, **TINY[arch]).eval()


# ------------------------------------------------------------------------------ seeded inference


@pytest.mark.parametrize("arch", RANDOM)
def test_seeded_forward_is_the_same_whatever_ran_before(arch: str) -> None:
    lr = nlsr.inference.to_tensor(_image(1, 24, 20))
    torch.manual_seed(123)
    first = forward(_tiny(arch), lr)
    torch.manual_seed(456)
    model = _tiny(arch)
    assert torch.equal(first, forward(model, lr))  # a fresh model: the same draws
    torch.rand(1000)  # another state of the global RNG: no influence on the seeded draws
    assert torch.equal(first, forward(model, lr))
    assert torch.equal(
        forward(model, lr, tile=12, overlap=4), forward(model, lr, tile=12, overlap=4)
    )
    assert torch.equal(
        forward(model, lr, chop=True, chop_min_size=100),
        forward(model, lr, chop=True, chop_min_size=100),
    )
    # The seed matters, and without one every call draws afresh (the authors' behaviour).
    if arch == "lcoan":  # clusters drawn once, at the first call: the seed chooses them
        torch.manual_seed(0)
        other = forward(_tiny(arch), lr, seed=7)
    else:
        other = forward(model, lr, seed=7)
        assert not torch.equal(forward(model, lr, seed=None), forward(model, lr, seed=None))
    assert not torch.equal(first, other)
    # The blocks' own generators are left as they were.
    assert all(m.generator is None for m in model.modules() if hasattr(m, "generator"))


def test_seed_is_checked() -> None:
    model = _tiny("dlsn")
    lr = torch.zeros(1, 3, 8, 8)
    for bad in (-1, 2**63, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed"):
            forward(model, lr, seed=bad)


def _benchmark_set(root: Path, count: int) -> None:
    hr = root / "Tiny" / "HR"
    hr.mkdir(parents=True)
    for i in range(count):
        PILImage.fromarray(_image(10 + i, 30 + 2 * i, 28)).save(hr / f"im{i}.png")


def test_evaluate_scores_do_not_depend_on_order_or_runs(tmp_path: Path) -> None:
    _benchmark_set(tmp_path, 3)
    model = _tiny("dlsn")
    full = evaluate(model, "Tiny", 2, data_root=tmp_path)
    torch.rand(10)
    again = evaluate(model, "Tiny", 2, data_root=tmp_path)
    assert full.to_dict() == again.to_dict()
    # Each image's score is its own: scoring only the first gives the same number for it.
    first = evaluate(model, "Tiny", 2, data_root=tmp_path, max_images=1)
    assert first.per_image[0] == full.per_image[0]
    assert full.settings["seed"] == 0


@pytest.fixture
def packaged_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(resources.files("nlsr").joinpath("weights")))


@pytest.mark.slow
def test_two_cli_upscale_runs_of_the_sample_are_identical(tmp_path: Path, packaged_weights) -> None:
    outputs = []
    for name in ("a.png", "b.png"):
        torch.rand(int(name[0] == "b") + 1)  # a different global RNG state before each run
        assert main(["upscale", str(SAMPLE), "-o", str(tmp_path / name)]) == 0
        outputs.append(np.asarray(PILImage.open(tmp_path / name)))
    assert outputs[0].shape == (512, 512, 3)
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.slow
@pytest.mark.shared
def test_two_eval_runs_of_set5_with_the_default_model_are_identical(packaged_weights) -> None:
    root = require(BENCHMARK)
    model = nlsr.models.create("nlsr-dlsn-s", 2, pretrained=True)
    a = evaluate(model, "Set5", 2, data_root=root)
    torch.rand(3)
    b = evaluate(model, "Set5", 2, data_root=root)
    assert a.to_dict() == b.to_dict()


# ------------------------------------------------------------------------------ bf16


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_network_runs_in_bf16_close_to_fp32(arch: str) -> None:
    """bf16 autocast on the CPU (attention in float32): within a few grey levels of fp32."""
    model = _tiny(arch)
    image = _image(3, 20, 24)
    fp32 = nlsr.upscale(model, image, precision="fp32").astype(np.int16)
    bf16 = nlsr.upscale(model, image, precision="bf16").astype(np.int16)
    assert bf16.shape == fp32.shape
    diff = np.abs(bf16 - fp32)
    assert diff.mean() < BF16_MEAN_LEVELS and diff.max() <= BF16_MAX_LEVELS, (
        diff.mean(),
        diff.max(),
    )


#: Documented bf16 tolerance (docs/models.md): grey levels of 255 against fp32, same seed.
BF16_MEAN_LEVELS = 1.0
BF16_MAX_LEVELS = 8


def _gradients(arch: str, bf16: bool) -> dict[str, torch.Tensor]:
    """Parameter gradients of one L1 step on a fixed batch (same hash draws in both precisions)."""
    model = _tiny(arch).train()
    torch.manual_seed(5)
    x, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    torch.manual_seed(9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    (y.float() - target).abs().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_network_trains_a_step_under_bf16_autocast(arch: str) -> None:
    """Same parameters reached, float32 and finite gradients, and the gradient within a few per
    cent of float32's (measured: at most 5%, cosine >= 0.998)."""
    fp32, bf16 = _gradients(arch, False), _gradients(arch, True)
    assert fp32.keys() == bf16.keys()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in bf16.values())
    a = torch.cat([g.flatten() for g in fp32.values()])
    b = torch.cat([bf16[k].flatten() for k in fp32])
    assert float((a - b).norm() / a.norm()) < 0.15
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99


# ------------------------------------------------------------------------------ kill and resume

_KILL_AT = """
import os, signal, sys
from nlsr.train import loop
step = loop.Trainer._train_step
kill_at = int(sys.argv[2])

def killed_step(self, lr, hr):
    if self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, lr, hr)

loop.Trainer._train_step = killed_step
from nlsr.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def _config(image_dir: Path, run_dir: Path, arch: str) -> dict:
    """test_train's tiny run for ``arch``: batch 2, 10 iterations, a checkpoint every 3."""
    return _raw(
        image_dir,
        run_dir,
        model={"arch": arch, "options": TINY[arch]},
        data={"batch_size": 2},
        train={"iterations": 10, "checkpoint_every": 3},
    )


#: Every architecture, and DLSN trained under CPU bf16 autocast.
RESUME_CASES = [*sorted(TINY), "dlsn+amp"]


@pytest.fixture(scope="module")
def train_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train_hr")
    for i, (h, w) in enumerate([(40, 36), (34, 44), (38, 38)]):
        PILImage.fromarray(_image(20 + i, h, w)).save(folder / f"t{i}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", RESUME_CASES)
def test_sigkill_at_a_random_step_and_resume_is_bitwise_the_straight_run(
    arch: str, train_images: Path, tmp_path: Path
) -> None:
    """Every architecture, and DLSN under CPU bf16 autocast (``train.amp``)."""
    kill_at = int(np.random.default_rng(RESUME_CASES.index(arch)).integers(4, 9))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    runs = {}
    for name in ("straight", "killed"):
        config = tmp_path / f"{name}.yaml"
        raw = _config(train_images, tmp_path / name, arch.removesuffix("+amp"))
        raw["train"]["amp"] = arch.endswith("+amp")
        config.write_text(yaml.safe_dump(raw))
        script = tmp_path / "kill.py"
        script.write_text(_KILL_AT, encoding="utf-8")
        stop = kill_at if name == "killed" else -1
        done = subprocess.run(
            [sys.executable, str(script), str(config), str(stop)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        runs[name] = tmp_path / name
        if name == "killed":
            assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
            saved = train_state.load_checkpoint(runs[name] / "checkpoint.pt")["step"]
            assert saved == 3 * (kill_at // 3)  # the last checkpoint before the kill
            resumed = subprocess.run(
                [sys.executable, "-m", "nlsr", "train", "--resume", str(runs[name])],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
            assert resumed.returncode == 0, resumed.stderr[-2000:]
        else:
            assert done.returncode == 0, done.stderr[-2000:]
    for name in ("final", "ema"):
        a = load_file(runs["straight"] / f"{name}.safetensors")
        b = load_file(runs["killed"] / f"{name}.safetensors")
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{arch} {name}: {len(differ)} of {len(a)} tensors differ: {differ[:3]}"
    ca = torch.load(runs["straight"] / "checkpoint.pt", weights_only=True)
    cb = torch.load(runs["killed"] / "checkpoint.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 10
    for k, v in ca["optimizer"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(v[field], cb["optimizer"]["state"][k][field]), (arch, k, field)
    for name in ("model", "ema"):
        for k, v in ca[name].items():
            assert torch.equal(v, cb[name][k]), (arch, name, k)


def test_cpu_amp_trains_in_bf16(train_images: Path, tmp_path: Path) -> None:
    """``train.amp`` on the CPU changes the numbers (bf16 convolutions) but not their quality."""
    finals = {}
    for amp in (False, True):
        raw = _config(train_images, tmp_path / f"amp{amp}", "dlsn")
        raw["train"].update(amp=amp, iterations=4, checkpoint_every=4)
        result = train(parse_config(raw))
        finals[amp] = load_file(result.run_dir / "final.safetensors")
    differ = [k for k in finals[False] if not torch.equal(finals[False][k], finals[True][k])]
    assert differ, "train.amp had no effect on the CPU"
    for k in differ:
        a, b = finals[False][k], finals[True][k]
        assert float((a - b).norm()) <= 0.05 * float(a.norm()) + 1e-6, k


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_with_a_checkpoint(
    train_images: Path, tmp_path: Path
) -> None:
    """``timeout`` and job schedulers signal the whole group: loader workers must outlive it."""
    raw = _config(train_images, tmp_path / "run", "edsr")
    raw["data"]["workers"] = 2
    raw["train"].update(iterations=100_000, log_every=1, checkpoint_every=100_000)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nlsr", "train", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and '"train"' in log.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert train_state.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] >= 1
