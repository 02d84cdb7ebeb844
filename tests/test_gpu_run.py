"""``scripts/gpu_run.sh`` end to end on the CPU with tiny stages, so that the first minute of a
lent GPU is not spent on a typo: every stage runs, the training is stopped by its time limit and
exported, and ``$OUT`` holds what the run tool brings back (at most 8 files of 16 MiB)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_script

from nlsr.io import write_image

BUDGET = 150
pytestmark = pytest.mark.skipif(
    shutil.which("timeout") is None or shutil.which("tar") is None,
    reason="gpu_run.sh needs GNU timeout and tar",
)


def _image(seed: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    waves = [
        127 + 90 * np.sin(rng.uniform(0.1, 0.5) * y + rng.uniform(0.1, 0.5) * x + c)
        for c in range(3)
    ]
    return np.clip(np.stack(waves, -1) + rng.normal(0, 6, (side, side, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The layout scripts/pack_gpu_data.py writes, tiny, without parity fixtures."""
    root = tmp_path / "data"
    train = root / "datasets" / "train"
    (train / "T91").mkdir(parents=True)
    (train / "BSD200").mkdir()
    write_image(train / "T91" / "a.png", _image(0, 40))
    write_image(train / "T91" / "b.webp", _image(1, 36))  # what the packer writes
    write_image(train / "BSD200" / "c.webp", _image(2, 44))
    (root / "datasets" / "benchmark" / "Set5" / "HR").mkdir(parents=True)
    write_image(root / "datasets" / "benchmark" / "Set5" / "HR" / "bird.png", _image(3, 24))
    return root


@pytest.mark.slow
def test_gpu_run_on_cpu(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "BUDGET": str(BUDGET),
        "OUT": str(out),
        "DATA": str(data),
        "TMPDIR": str(tmp_path),
        "THREADS": "1",
        "CHECKS_ARGS": "--quick",
        "BENCH_JOBS": "tiny 100 --blocks nlsa --sizes 12 --mode infer --repeat 1 --warmup 0 "
        "--baseline released --threads 1",
        "BATCH": "2",
        "WORKERS": "0",
        "TRAIN_ITERS": "1000000",  # never reached: the time limit stops it
        "TRAIN_SECONDS": "18",
        "TRAIN_ARGS": "data.patch_size=16 train.log_every=1",
        "LOAD_SECONDS": "0",
        "MARGIN": "30",
        "TRAIN_MIN_SECONDS": "10",
    }
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUDGET + 60,
        cwd=tmp_path,  # the script goes to the repository root itself
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed < BUDGET

    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.txt").read_text() in done.stdout
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "checks", "bench", "train", "eval", "package"]
    assert {k: s["status"] for k, s in stages.items()} == dict.fromkeys(stages, "ok"), stages
    assert summary["ok"] and summary["elapsed_s"] <= BUDGET

    checks = summary["checks"]
    ran = ("env", "ship_rate", "archs", "sdpa", "trainer")
    assert [checks[k]["passed"] for k in ran] == [True] * len(ran), checks
    assert checks["fixtures"]["passed"] is None
    assert "no parity fixtures" in checks["fixtures"]["skipped"]
    assert checks["ship_rate"]["best"]["it_per_s"] > 0

    bench = summary["bench"]["tiny"]
    assert bench["points"]["ok"] == 2  # nlsa and nlsa@released
    assert bench["released_over_nlsr"][0]["time_ratio"] > 0

    train = summary["train"]
    assert train["stopped"]["signal"] == "SIGINT" and train["stopped"]["step"] >= 1
    assert train["finished"] and train["last_step"] == train["stopped"]["step"]
    for kind in ("warm", "ema"):  # the shipped weights and the new EMA, on the tiny Set5
        assert 10 < train[f"set5_{kind}"]["psnr"] < 100

    files = {f["file"] for f in summary["out_files"]}
    assert files - {"best.safetensors"} == {
        "summary.json",
        "summary.txt",
        "checks.json",
        "bench.json",
        "results.tar.gz",
        "checkpoint.pt",
        "ema.safetensors",
    }
    assert len(files) <= 8 and not summary["out_problems"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {
        "logs/train.log",
        "logs/checks.log",
        "bench/tiny.json",
        "bench/tiny.txt",
        "train/log.jsonl",
        "train/config.yaml",
        "train/final.safetensors",
        "stages.tsv",
    } <= names

    from nlsr.checkpoint import read_state_dict

    _, config = read_state_dict(out / "ema.safetensors")
    assert (config["arch"], config["scale"]) == ("dlsn", 2)
    training = config["training"]
    assert training["iterations"] == train["last_step"]
    assert training["config"]["train"]["warm_start"].endswith("nlsr-dlsn-s-x2.safetensors")


@pytest.fixture
def report():
    yield from load_script("gpu_report")


def test_plan_sizes_training_from_the_measured_rate(tmp_path: Path, report, capsys) -> None:
    checks = tmp_path / "checks.json"
    best = {"amp": True, "channels_last": True, "it_per_s": 10.0}
    checks.write_text(json.dumps({"checks": {"ship_rate": {"passed": True, "best": best}}}))

    def plan(*args: str) -> dict[str, str]:
        report.main(["plan", "--checks", str(checks), "--seconds", "100", *args])
        return dict(kv.split("=") for kv in capsys.readouterr().out.split())

    measured = plan()
    assert measured["iterations"] == str(int(10 * report.EFFICIENCY * 100))
    assert (measured["amp"], measured["channels_last"], measured["rate_source"]) == (
        "true",
        "true",
        "measured",
    )
    assert plan("--rate", "2")["iterations"] == "200"
    assert plan("--iterations", "7")["iterations"] == "7"
    checks.write_text("{}")  # nothing measured: an assumed rate, bf16 on CUDA only
    assumed = plan("--device", "cuda")
    assert (assumed["rate_source"], assumed["amp"]) == ("assumed", "true")
    assert plan("--device", "cpu")["amp"] == "false"


def test_summary_flags_what_the_run_tool_would_not_bring_back(tmp_path: Path, report) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "stages.tsv").write_text("env\tok\t1\t\nchecks\tfailed\t3\texit status 1\n")
    (out / "big.pt").write_bytes(b"\0" * (16 * 2**20 + 1))
    for i in range(7):
        (out / f"f{i}.json").write_text("{}")
    report.main(
        ["summary", "--work", str(work), "--out", str(out), "--budget", "9", "--elapsed", "5"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"]
    assert [s["status"] for s in summary["stages"]] == ["ok", "failed"]
    problems = " ".join(summary["out_problems"])
    assert "big.pt" in problems and "10 files" in problems
