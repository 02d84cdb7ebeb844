"""nlsr upscale under torchrun: 2 Gloo processes share a folder out, each good input is written
once with the bytes of the single-process run, and the bad one is reported once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nlsr.cli import main
from nlsr.io import write_image

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_write_what_one_process_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no Gloo backend")
    from nlsr.models import create

    torch.manual_seed(0)  # a hashing network: its seeded draws must not depend on the rank
    model = create("edsr", 2, n_resblocks=1, n_feats=8, attention="nlsa")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    rng = np.random.default_rng(3)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = ["a.png", "b.jpg", "c.tif", "sub/d.png"]
    for i, name in enumerate(good):
        write_image(src / name, rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8))
    (src / "bad.png").write_text("not an image\n")
    options = ["--weights", str(tmp_path / "tiny.pt"), "--precision", "fp32", "--device", "cpu"]

    assert main(["upscale", str(src), "-o", str(tmp_path / "one"), *options]) == 1
    assert "4 ok, 1 failed" in capsys.readouterr().out

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "nlsr", "upscale", str(src), "-o", str(tmp_path / "two"), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a file failed: as in one process

    one, two = tmp_path / "one", tmp_path / "two"
    written = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert written == sorted(good)  # nothing else: no temporary files
    for name in good:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
        assert proc.stdout.count(f"{src / name} -> {two / name} (") == 1  # done by one rank
    assert proc.stderr.count(f"{src / 'bad.png'}: ") == 1
    assert proc.stdout.count("all 2 processes: 4 ok, 1 failed, 0 skipped") == 1
    ranks = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 2 and [line.split(":")[0] for line in ranks] == ["rank 0", "rank 1"]
    done = [int(line.split(": ")[1].split(" ok")[0]) for line in ranks]
    assert sorted(done) == [2, 2]  # the five inputs sorted, every other one per rank
