"""nlsr train: config schema, exact data pipeline, atomic checkpoints, bitwise kill-and-resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image as PILImage
from safetensors import safe_open
from safetensors.torch import load_file

from nlsr.cli import main
from nlsr.resize import degrade, modcrop
from nlsr.train import (
    ConfigError,
    DataError,
    load_config,
    parse_config,
    train,
)
from nlsr.train import state as train_state
from nlsr.train.config import DataSection, all_keys
from nlsr.train.data import PatchDataset, StepBatchSampler, TrainImages

REPO = Path(__file__).resolve().parents[1]
TINY = {"n_resblocks": 2, "n_feats": 8, "res_scale": 1.0}


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, learnable colour image (gradients and low-frequency waves)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    f = rng.uniform(0.05, 0.3, size=(3, 2))
    ph = rng.uniform(0, 2 * np.pi, size=3)
    chans = [127 + 100 * np.sin(f[c, 0] * y + f[c, 1] * x + ph[c]) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8)


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Five synthetic HR images (one in a sub-folder, odd sizes so modcrop matters)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "hr"
    for i, (h, w) in enumerate([(41, 50), (48, 37), (36, 36), (45, 45), (52, 40)]):
        sub = folder / "sub" if i == 4 else folder
        _write_png(sub / f"img{i}.png", _smooth_image(rng, h, w))
    return folder


def _raw(image_dir: Path, run_dir: Path, **sections: dict) -> dict:
    raw = {
        "model": {"arch": "edsr", "scale": 2, "options": dict(TINY)},
        "data": {"train_dirs": [str(image_dir)], "patch_size": 16, "batch_size": 4, "workers": 0},
        "optim": {"lr": 1e-3, "milestones": [7], "ema": 0.9, "grad_clip": 1.0},
        "train": {
            "iterations": 12,
            "threads": 1,
            "deterministic": True,
            "log_every": 2,
            "checkpoint_every": 4,
        },
        "val": {"every": 0},
        "run_dir": str(run_dir),
    }
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def _events(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- config


def test_yaml_overrides_and_path_resolution(tmp_path: Path, image_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = _raw(Path("hr"), Path("runs/x"))
    cfg = load_config(
        _write_config(tmp_path / "c.yaml", raw),
        [
            "train.iterations=2000",
            "model.n_feats=32",
            "optim.milestones=[500, 1500]",
            "optim.ema=null",
            "optim.lr=2e-4",
            "model.options.n_resblocks=3",
        ],
    )
    assert cfg.train.iterations == 2000
    assert cfg.model.options == {"n_resblocks": 3, "n_feats": 32, "res_scale": 1.0}
    assert cfg.optim.milestones == [500, 1500] and cfg.optim.ema is None
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.eps == 1e-8 and cfg.optim.gamma == 0.5
    assert cfg.data.train_dirs == [str(image_dir)]
    assert cfg.run_dir == str(tmp_path / "runs" / "x")
    # the resolved config round-trips through the same validation
    assert parse_config(cfg.to_dict()) == cfg


def test_toml_is_the_same_schema(tmp_path: Path, image_dir: Path) -> None:
    text = textwrap.dedent(f"""
        run_dir = "{tmp_path / "run"}"
        [model]
        arch = "edsr"
        scale = 3
        options = {{ n_resblocks = 2, n_feats = 8 }}
        [data]
        train_dirs = ["{image_dir}"]
        patch_size = 24
        degradation = "DN"
        noise_sigma = 15
        [optim]
        betas = [0.8, 0.99]
        [train]
        iterations = 1e3
    """)
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.model.scale, cfg.data.patch_size, cfg.data.degradation) == (3, 24, "DN")
    assert cfg.data.noise_sigma == 15.0 and cfg.optim.betas == (0.8, 0.99)
    assert cfg.train.iterations == 1000 and cfg.val.sets == ["Set5"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", ["unknown key optim.lrr", "did you mean 'lr'"]),
        ("trian.seed=1", ["unknown section 'trian'", "did you mean 'train'"]),
        ("train.iterations=many", ["train.iterations", "must be an integer", "'many'"]),
        ("train.amp=1", ["train.amp", "true/false"]),
        ("data.degradation=BX", ["data.degradation", "one of BI, BD, DN", "'BX'"]),
        ("data.patch_size=15", ["data.patch_size", "multiple of model.scale"]),
        ("data.noise_sigma=5", ["data.noise_sigma", "only used with degradation DN"]),
        ("data.degradation=DN", ["data.noise_sigma", "must be > 0 for DN"]),
        ("optim.betas=[0.9]", ["optim.betas", "a list of 2 numbers"]),
        ("optim.milestones=[5, 3]", ["optim.milestones", "strictly increasing"]),
        ("optim.ema=1.5", ["optim.ema", "(0, 1)"]),
        ("model.arch=edsrr", ["model.arch", "did you mean 'edsr'"]),
        ("model.n_feat=4", ["model.options.n_feat", "did you mean 'n_feats'", "allowed:"]),
        ("train.device=gpu", ["train.device", "auto, cpu, cuda"]),
        ("train.device=cuda:x", ["train.device", "cuda:N"]),
        ("data.train_dirs=[]", ["data.train_dirs", "at least one"]),
        ("train.iterations", ["must look like key=value"]),
        ("data.lr_dirs=[a, b]", ["data.lr_dirs", "one LR folder per"]),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, override: str, expected: list[str]) -> None:
    path = _write_config(tmp_path / "bad.yaml", _raw(tmp_path, tmp_path / "run"))
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for part in expected:
        assert part in message, message


def test_required_keys_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.train_dirs is required"):
        parse_config({"model": {"arch": "edsr"}})
    with pytest.raises(ConfigError, match=r"model\.arch is required"):
        parse_config({"data": {"train_dirs": ["x"]}})
    bad = tmp_path / "c.yaml"
    bad.write_text("model: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"must be \.yaml"):
        load_config(_write_config(tmp_path / "c.json", {}))


def test_docs_and_shipped_configs_follow_the_schema() -> None:
    doc = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [k for k in all_keys() if f"`{k}`" not in doc]
    assert not missing, f"docs/training.md does not document {missing}"
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        load_config(path)  # every shipped config is valid
    recipes = {p.stem: load_config(p) for p in sorted((REPO / "configs").glob("*_x2.yaml"))}
    assert {c.model.arch for c in recipes.values()} >= {
        "edsr",
        "rcan",
        "nlsn",
        "dlsn",
        "hspan",
        "lcoan",
        "csnln",
    }
    for name, cfg in recipes.items():  # the published recipe
        assert (cfg.data.batch_size, cfg.data.patch_size) == (16, 48 * cfg.model.scale), name
        assert (cfg.optim.lr, cfg.optim.gamma, cfg.train.iterations) == (1e-4, 0.5, 1_000_000)
        assert cfg.optim.milestones == [200_000, 400_000, 600_000, 800_000], name
    tiny = load_config(REPO / "configs" / "compact" / "edsr_tiny_x2.yaml")
    assert (tiny.model.options["n_resblocks"], tiny.model.options["n_feats"]) == (8, 32)
    assert tiny.train.iterations == 2000 and tiny.train.checkpoint_every == 200


def test_cli_print_config_and_error_exit(tmp_path: Path, image_dir: Path, capsys) -> None:
    path = _write_config(tmp_path / "c.yaml", _raw(image_dir, tmp_path / "run"))
    assert main(["train", "--config", str(path), "--print-config", "train.seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 7 and printed["model"]["options"]["n_feats"] == 8
    assert main(["train", "--config", str(path), "optim.lrr=3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean 'lr'" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations/reflections of an HxWxC array, built with np.rot90 / np.fliplr."""
    return [np.rot90(b, k) for b in (a, np.fliplr(a)) for k in range(4)]


def test_lr_is_the_whole_image_degraded_and_patches_align(image_dir: Path) -> None:
    images = TrainImages(DataSection(train_dirs=[str(image_dir)], patch_size=12), 3, seed=0)
    assert len(images) == 5 and images.lr_patch == 4
    hr0 = np.asarray(PILImage.open(images.paths[0]).convert("RGB"))
    np.testing.assert_array_equal(images.hr[0], modcrop(hr0, 3))
    np.testing.assert_array_equal(images.lr[0], degrade(hr0, 3, "BI"))
    ds = PatchDataset(images)
    top, left = 3, 5
    lr_crop = images.lr[1][top : top + 4, left : left + 4]
    hr_crop = images.hr[1][9:21, 15:27]
    found = set()
    for code in range(8):
        lr_t, hr_t = ds[(1, top, left, code)]
        assert lr_t.dtype == torch.float32 and lr_t.shape == (3, 4, 4) and hr_t.shape == (3, 12, 12)
        lr_a = (lr_t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        hr_a = (hr_t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        matches = [i for i, t in enumerate(_dihedral(lr_crop)) if np.array_equal(t, lr_a)]
        assert matches, f"code {code}: LR patch is not a transform of the aligned LR crop"
        # the same transform, applied to the aligned HR crop, gives the HR patch
        assert any(np.array_equal(_dihedral(hr_crop)[i], hr_a) for i in matches), code
        found.add(matches[0])
    assert len(found) == 8  # all eight transforms occur


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    sizes = [(10, 12), (8, 8), (20, 9)]
    make = dict(batch_size=4, lr_patch=6, seed=3)
    full = list(StepBatchSampler(sizes, **make, end=9))
    resumed = list(StepBatchSampler(sizes, **make, start=5, end=9))
    assert resumed == full[5:]
    # 2 ranks: each gets half of the same global batch
    shards = [list(StepBatchSampler(sizes, **make, end=9, rank=r, world_size=2)) for r in (0, 1)]
    assert all(a + b == g for a, b, g in zip(*shards, full, strict=True))
    flat = [spec for batch in full for spec in batch]
    # every pass over the data visits each image once; crops stay inside the LR image
    for start in range(0, 33, 3):
        assert sorted(s[0] for s in flat[start : start + 3]) == [0, 1, 2]
    for index, top, left, code in flat:
        h, w = sizes[index]
        assert 0 <= top <= h - 6 and 0 <= left <= w - 6 and 0 <= code < 8
    assert list(StepBatchSampler(sizes, **{**make, "seed": 4}, end=9)) != full
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        StepBatchSampler(sizes, batch_size=3, lr_patch=6, seed=0, end=2, world_size=2)


def test_bad_and_small_images_are_skipped_and_counted(
    tmp_path: Path, image_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = (image_dir / "img0.png").read_bytes()
    (image_dir / "truncated.png").write_bytes(good[: len(good) // 3])
    (image_dir / "empty.png").write_bytes(b"")
    _write_png(image_dir / "tiny.png", np.zeros((10, 30, 3), np.uint8))
    (image_dir / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="nlsr.train"):
        images = TrainImages(DataSection(train_dirs=[str(image_dir)], patch_size=16), 2, seed=0)
    r = images.report
    assert (r.found, r.used, len(r.unreadable), len(r.too_small)) == (8, 5, 2, 1)
    assert sorted(Path(p).name for p in r.unreadable) == ["empty.png", "truncated.png"]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 3
    for name in ("empty.png", "truncated.png", "tiny.png"):
        assert sum(name in w for w in warnings) == 1


def test_empty_or_too_small_dataset_fails_before_training(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        train(parse_config(_raw(empty, tmp_path / "run1")))
    small = tmp_path / "small"
    _write_png(small / "a.png", np.zeros((12, 40, 3), np.uint8))
    with pytest.raises(DataError, match=r"smaller than data.patch_size=16"):
        train(parse_config(_raw(small, tmp_path / "run2")))
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        train(parse_config(_raw(tmp_path / "missing", tmp_path / "run3")))


def test_lr_dirs_pairing_dn_noise_and_memory_map(tmp_path: Path, image_dir: Path) -> None:
    lr_dir = tmp_path / "lr"
    for p in image_dir.rglob("*.png"):
        hr = np.asarray(PILImage.open(p))
        lr = hr[: hr.shape[0] // 2, : hr.shape[1] // 2] // 2
        if p.stem != "img2":  # one HR image has no LR partner
            _write_png(lr_dir / p.parent.relative_to(image_dir) / f"{p.stem}x2.png", lr)
    data = DataSection(train_dirs=[str(image_dir)], lr_dirs=[str(lr_dir)], patch_size=16)
    paired = TrainImages(data, 2, seed=0)
    assert paired.report.used == 4 and len(paired.report.unpaired) == 1
    for hr, lr in zip(paired.hr, paired.lr, strict=True):
        assert hr.shape == (lr.shape[0] * 2, lr.shape[1] * 2, 3)
    dn = DataSection(
        train_dirs=[str(image_dir)], degradation="DN", noise_sigma=10.0, cache=False, patch_size=16
    )
    a = TrainImages(dn, 2, seed=5, cache_dir=tmp_path / "cache")
    b = TrainImages(
        DataSection(train_dirs=[str(image_dir)], degradation="DN", noise_sigma=10.0, patch_size=16),
        2,
        5,
    )
    bi = TrainImages(DataSection(train_dirs=[str(image_dir)], patch_size=16), 2, seed=5)
    assert isinstance(a.lr[0], np.memmap) and len(list((tmp_path / "cache").glob("*.npy"))) == 10
    for x, y, z in zip(a.lr, b.lr, bi.lr, strict=True):
        np.testing.assert_array_equal(x, y)  # seeded: the same noise each time
        assert np.abs(x.astype(int) - z).mean() > 3  # but noise there is


# ----------------------------------------------------------------------------- checkpoints


def test_atomic_checkpoint_survives_a_failed_write(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    train_state.save_checkpoint({"step": 4, "w": torch.arange(5.0)}, path)
    before = path.read_bytes()

    def broken_save(obj: object, fh, *args: object, **kwargs: object) -> None:
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train_state.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_state.save_checkpoint({"step": 8, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and torch.equal(state["w"], torch.arange(5.0))
    path.write_bytes(b"garbage")
    with pytest.raises(train_state.ResumeError, match="not a readable training checkpoint"):
        train_state.load_checkpoint(path)


def test_rng_state_round_trips_as_plain_data(tmp_path: Path) -> None:
    import random

    state = train_state.capture_rng()
    first = (random.random(), np.random.rand(3), torch.rand(3))
    path = tmp_path / "rng.pt"
    train_state.save_checkpoint({"rng": state}, path)
    train_state.restore_rng(torch.load(path, weights_only=True)["rng"])
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1], again[1])
    assert torch.equal(first[2], again[2])


_KILLER = """
import os, signal, sys, torch
real_save = torch.save
calls = []

def save(obj, fh, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("format") == "nlsr-train-checkpoint":
        calls.append(obj["step"])
        if len(calls) == 2:  # die in the middle of writing the second checkpoint
            fh.write(b"torn")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, fh, *args, **kwargs)

torch.save = save
from nlsr.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""

_INTERRUPTER = """
import os, signal, sys
from nlsr.train import loop
step = loop.Trainer._train_step

def interrupted_step(self, lr, hr):
    if self.step == 5:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would
    return step(self, lr, hr)

loop.Trainer._train_step = interrupted_step
from nlsr.cli import main
sys.exit(main(["train", "--resume", sys.argv[1], "data.workers=1"]))
"""


def _run_script(code: str, arg: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, str(script), str(arg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_sigkill_sigint_and_resume_end_bitwise_equal(tmp_path: Path, image_dir: Path) -> None:
    reference = train(parse_config(_raw(image_dir, tmp_path / "straight")))
    assert reference.step == 12 and not reference.interrupted

    run = tmp_path / "killed"
    config = _write_config(tmp_path / "c.yaml", _raw(image_dir, run, data={"workers": 2}))
    killed = _run_script(_KILLER, config, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert train_state.load_checkpoint(run / "checkpoint.pt")["step"] == 4  # the one before
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the torn temporary file should be there"

    stopped = _run_script(_INTERRUPTER, run, tmp_path)
    assert stopped.returncode == 130, stopped.stderr
    assert "stopped by SIGINT at step 6" in stopped.stderr
    assert train_state.load_checkpoint(run / "checkpoint.pt")["step"] == 6

    assert main(["train", "--resume", str(run)]) == 0
    for name in ("final", "ema"):
        a, b = (
            load_file(reference.run_dir / f"{name}.safetensors"),
            load_file(run / f"{name}.safetensors"),
        )
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after kill + resume"
    ca = torch.load(reference.run_dir / "checkpoint.pt", weights_only=True)
    cb = torch.load(run / "checkpoint.pt", weights_only=True)
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], cb["optimizer"]["state"][k]["exp_avg_sq"])
    assert ca["scheduler"] == cb["scheduler"] and ca["scheduler"]["_last_lr"] == [1e-3 * 0.5]
    steps = [r["step"] for r in _events(run, "train")]
    assert steps == [2, 4, 6, 8, 10, 12]  # records of the lost steps were pruned on resume
    with pytest.raises(ConfigError, match="already holds a run"):
        train(parse_config(_raw(image_dir, run)))


# ----------------------------------------------------------------------------- optimisation


def test_loss_decreases_and_exports_carry_provenance(tmp_path: Path, image_dir: Path) -> None:
    from nlsr.models import load

    raw = _raw(
        image_dir,
        tmp_path / "run",
        train={
            "iterations": 60,
            "log_every": 10,
            "checkpoint_every": 60,
            "deterministic": False,
            "channels_last": True,
        },
        optim={"lr": 2e-3, "milestones": [40], "ema": None, "grad_clip": None},
    )
    result = train(parse_config(raw))
    losses = [r["loss"] for r in _events(result.run_dir, "train")]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert result.ema is None and result.best is None
    with safe_open(result.final, "pt") as f:
        meta = json.loads(f.metadata()["nlsr_config"])
    assert (meta["arch"], meta["scale"], meta["options"]) == ("edsr", 2, TINY)
    assert meta["training"]["iterations"] == 60 and meta["training"]["weights"] == "final"
    assert meta["training"]["config"]["optim"]["lr"] == 2e-3
    assert meta["training"]["data"]["images_used"] == 5
    model = load(result.final)
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_finetune_loads_everything_but_the_upsampler(tmp_path: Path, image_dir: Path) -> None:
    from nlsr.models import create, save
    from nlsr.train.weights import load_initial_weights

    torch.manual_seed(1)
    x2 = create("edsr", 2, **TINY)
    save(x2, tmp_path / "x2.safetensors")
    cfg = parse_config(
        _raw(
            image_dir,
            tmp_path / "r",
            model={"scale": 3},
            data={"patch_size": 12},
            train={"finetune_from": str(tmp_path / "x2.safetensors")},
        )
    )
    x3 = create("edsr", 3, **TINY)
    fresh = {k: v.clone() for k, v in x3.state_dict().items()}
    load_initial_weights(x3, cfg)
    for k, v in x3.state_dict().items():
        expected = fresh[k] if k.startswith("tail.0.") else x2.state_dict()[k]
        assert torch.equal(v, expected), k
    warm = parse_config(
        _raw(
            image_dir,
            tmp_path / "r",
            model={"scale": 3},
            data={"patch_size": 12},
            train={"warm_start": str(tmp_path / "x2.safetensors")},
        )
    )
    with pytest.raises(ConfigError, match=r"train\.warm_start"):
        load_initial_weights(create("edsr", 3, **TINY), warm)


def test_validation_tracks_the_best_weights(tmp_path: Path, image_dir: Path) -> None:
    from nlsr.evaluation import evaluate
    from nlsr.models import load

    rng = np.random.default_rng(1)
    bench = tmp_path / "bench"
    for name, n in (("Set5", 3), ("Tiny", 2)):
        for i in range(n):
            _write_png(bench / name / "HR" / f"{name}{i}.png", _smooth_image(rng, 30, 26))
    raw = _raw(
        image_dir,
        tmp_path / "run",
        train={"iterations": 20, "log_every": 5, "checkpoint_every": 10, "deterministic": False},
        val={"every": 5, "sets": ["Set5", "Tiny"], "data_root": str(bench), "max_images": 2},
        optim={"lr": 2e-3, "ema": 0.5},
    )
    result = train(parse_config(raw))
    vals = _events(result.run_dir, "val")
    assert [v["step"] for v in vals] == [5, 10, 15, 20]
    assert all(v["weights"] == "ema" and set(v["sets"]) == {"Set5", "Tiny"} for v in vals)
    best = max(vals, key=lambda v: v["mean_psnr"])
    assert result.best_psnr == best["mean_psnr"] and best["best"]
    # the exported best weights reproduce the logged score on the first 2 images of the set
    with torch.no_grad():
        again = evaluate(load(result.best), "Set5", 2, data_root=bench, max_images=2)
    assert again.psnr == pytest.approx(best["sets"]["Set5"]["psnr"], abs=1e-6)
    full = evaluate(load(result.best), "Set5", 2, data_root=bench)
    assert len(full.per_image) == 3 and len(again.per_image) == 2


def test_ema_decay_is_warmed_up() -> None:
    from nlsr.train.ema import ModelEMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, 0.999)
    for n, w in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        before = float(ema.module.weight)
        ema.update(model, n)
        d = min(0.999, (1 + n) / (10 + n))
        assert float(ema.module.weight) == pytest.approx(d * before + (1 - d) * w, rel=1e-6)
    assert ema.decay_at(10**6) == 0.999


def test_cosine_schedule_anneals_to_min_lr(tmp_path: Path, image_dir: Path) -> None:
    import math

    raw = _raw(
        image_dir,
        tmp_path / "run",
        optim={"lr": 1e-3, "schedule": "cosine", "min_lr": 1e-5, "ema": None},
    )
    result = train(parse_config(raw))
    logged = {r["step"]: r["lr"] for r in _events(result.run_dir, "train")}
    assert sorted(logged) == [2, 4, 6, 8, 10, 12]
    for step, lr in logged.items():
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * step / 12)) / 2
        assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12)
    with pytest.raises(ConfigError, match=r"optim\.schedule"):
        parse_config(_raw(image_dir, tmp_path / "r2", optim={"schedule": "linear"}))


def test_amp_by_default_where_bf16_is_native(tmp_path: Path, image_dir: Path) -> None:
    """``train.amp`` null (the default) is bf16 autocast exactly where the CPU has native bf16
    (its /proc/cpuinfo flags, where Linux gives them); true/false are taken as given. The start
    event records the choice; channels-last is on by default."""
    from nlsr.inference import native_bf16

    cpu = torch.device("cpu")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(cpuinfo.read_text(encoding="utf-8").split())
        assert native_bf16(cpu) == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert native_bf16(torch.device("meta")) is False
    for amp, expected in ((None, native_bf16(cpu)), (False, False), (True, True)):
        settings = {"iterations": 2} if amp is None else {"iterations": 2, "amp": amp}
        run = tmp_path / f"amp-{amp}"
        train(parse_config(_raw(image_dir, run, train=settings)))
        (start,) = _events(run, "start")
        assert (start["amp"], start["channels_last"]) == (expected, True)
