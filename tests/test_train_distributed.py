"""nlsr train under torchrun: 2 Gloo processes follow the same loss curve as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image as PILImage
from safetensors.torch import load_file

from nlsr.train import parse_config, train

REPO = Path(__file__).resolve().parents[1]


def _records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path: Path) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no Gloo backend")
    rng = np.random.default_rng(0)
    for i in range(4):
        img = rng.integers(0, 256, size=(4, 5, 3)).astype(np.float64)
        big = np.kron(img, np.ones((10, 10, 1)))[: 36 + i, :44]  # blocky, learnable
        PILImage.fromarray(big.astype(np.uint8)).save(tmp_path / f"{i}.png")

    def raw(run: str) -> dict:
        return {
            "model": {"arch": "edsr", "scale": 2, "options": {"n_resblocks": 2, "n_feats": 8}},
            "data": {
                "train_dirs": [str(tmp_path)],
                "patch_size": 16,
                "batch_size": 4,
                "workers": 0,
            },
            "optim": {"lr": 1e-3, "ema": 0.9},
            # float32 and the plain memory format: the curves must agree to float rounding
            "train": {
                "iterations": 6,
                "threads": 1,
                "log_every": 1,
                "checkpoint_every": 3,
                "amp": False,
                "channels_last": False,
            },
            "val": {"every": 0},
            "run_dir": str(tmp_path / run),
        }

    single = train(parse_config(raw("one")))
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw("two")), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "nlsr.train",
        "--config",
        str(config),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = tmp_path / "two"
    assert _records(two, "start")[0]["world_size"] == 2
    one_loss = [r["loss"] for r in _records(single.run_dir, "train")]
    two_loss = [r["loss"] for r in _records(two, "train")]
    assert [r["step"] for r in _records(two, "train")] == [1, 2, 3, 4, 5, 6]  # rank 0 logs alone
    np.testing.assert_allclose(two_loss, one_loss, rtol=1e-5)
    assert len(set(one_loss)) == 6  # the curve really moves
    for name in ("final", "ema"):
        a, b = (
            load_file(single.run_dir / f"{name}.safetensors"),
            load_file(two / f"{name}.safetensors"),
        )
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    state = torch.load(two / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng"]) == 2
