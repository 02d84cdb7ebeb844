"""``nlsr upscale`` batches that can be run again (--skip-existing, outputs never read back as
inputs, temporary files of killed runs removed), the -o file/folder rule, the progress bar,
``--seed``, and :mod:`nlsr.atomic`'s temporary files."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nlsr.atomic import TEMPORARY_PATTERN, atomic_write, remove_stale_temporaries
from nlsr.cli import main, parse_seed
from nlsr.io import write_image

#: larger than any process id (Linux's pid_max is at most 2**22)
DEAD_PID = 2**30


def image(path: Path, h: int = 6, w: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 20 + y * 7 + 50 * c) % 256 for c in range(3)], 2)
    return write_image(path, a.astype(np.uint8))


def upscale(*args: str | Path) -> int:
    return main(["upscale", *map(str, args)])


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- re-runs


def test_skip_existing_finishes_a_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for name in ("a.png", "b.png", "sub/c.png"):
        image(src / name)
    assert upscale(src / "a.png", "-o", out / "a.png") == 0  # an earlier, interrupted run
    capsys.readouterr()
    assert upscale(src, "-o", out) == 1  # without the option, existing outputs are failures
    captured = capsys.readouterr()
    assert "2 ok, 1 failed, 0 skipped" in captured.out
    assert "--skip-existing keeps it" in captured.err
    assert upscale(src, "-o", out, "--skip-existing") == 0
    captured = capsys.readouterr()
    assert "0 ok, 0 failed, 3 skipped" in captured.out and not captured.err
    assert f"{src / 'a.png'} -> {out / 'a.png'} (skipped: exists)" in captured.out
    with pytest.raises(SystemExit) as info:
        upscale(src, "-o", out, "--skip-existing", "--overwrite")
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_outputs_inside_the_input_tree_are_not_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "photos"
    image(src / "a.png")
    image(src / "trip" / "b.jpg")
    # -o inside the input folder
    assert upscale(src, "-o", src / "x2") == 0
    assert upscale(src, "-o", src / "x2", "--skip-existing") == 0
    assert "0 ok, 0 failed, 2 skipped" in capsys.readouterr().out
    assert files(src / "x2") == ["a.png", "trip/b.jpg"]
    # the same with a glob whose fixed part holds the output folder
    assert upscale(f"{src}/**/*.*", "-o", src / "x2", "--skip-existing") == 0
    assert "0 ok, 0 failed, 2 skipped" in capsys.readouterr().out
    # a folder that only holds earlier outputs is an input like any other
    assert upscale(src / "x2", "-o", src / "x2" / "again", "--skip-existing") == 0
    assert "2 ok" in capsys.readouterr().out
    # -o the input folder itself, outputs told apart by their suffix
    other = tmp_path / "other"
    image(other / "a.png")
    image(other / "trip" / "b.jpg")
    assert upscale(other, "-o", other, "--suffix", "_x2") == 0
    assert upscale(other, "-o", other, "--suffix", "_x2", "--skip-existing") == 0
    captured = capsys.readouterr()
    assert "0 ok, 0 failed, 2 skipped" in captured.out.splitlines()[-1]
    assert "_x2_x2" not in captured.out and not captured.err
    assert files(other) == ["a.png", "a_x2.png", "trip/b.jpg", "trip/b_x2.jpg"]


def test_temporary_files_of_a_killed_run_are_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # a writer killed in the middle of atomic_write
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from nlsr.atomic import atomic_write\n"
            "def slow(fh):\n    fh.write(b'x' * 1000); fh.flush(); print('writing', flush=True)\n"
            "    time.sleep(600)\n"
            "atomic_write(sys.argv[1], slow)",
            str(out / "a.png"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    (left,) = [p.name for p in out.iterdir()]
    match = TEMPORARY_PATTERN.match(left)
    assert match and match["name"] == "a.png" and int(match["pid"]) == writer.pid
    old = time.time() - 60
    os.utime(out / left, (old, old))
    # a file being written now by a live process, and files that are not nlsr's
    live = out / f".b.png.nlsr{os.getpid()}-abc123.tmp"
    others = [".c.png.tmp", ".d.png.k3j4l5.tmp", "notes.tmp", ".e.png.nlsr12x.tmp"]
    for p in [live, *(out / n for n in others)]:
        p.write_bytes(b"partial")
        os.utime(p, (old, old))
    src = image(tmp_path / "a.png")
    assert upscale(src, "-o", out / "a.png") == 0
    assert "removed 1 temporary file(s) left by an interrupted run" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", live.name, *others])


def test_remove_stale_temporaries_rules(tmp_path: Path) -> None:
    now = time.time()
    dead = tmp_path / f".a.png.nlsr{DEAD_PID}-x1.tmp"
    fresh_dead = tmp_path / f".b.png.nlsr{DEAD_PID}-x2.tmp"  # may be another machine's
    alive_old = tmp_path / f".c.png.nlsr{os.getpid()}-x3.tmp"
    alive = tmp_path / f".d.png.nlsr{os.getpid()}-x4.tmp"
    for p, age in ((dead, 60), (fresh_dead, 1), (alive_old, 7200), (alive, 60)):
        p.write_bytes(b"")
        os.utime(p, (now - age, now - age))
    assert remove_stale_temporaries(tmp_path, now=now) == sorted([dead, alive_old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh_dead.name, alive.name])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_atomic_write_errors_name_the_target(tmp_path: Path) -> None:
    target = tmp_path / "c.bin"
    target.write_bytes(b"old")

    def full(fh: object) -> None:
        fh.write(b"new")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["c.bin"]
    with pytest.raises(FileNotFoundError) as missing:
        atomic_write(tmp_path / "nowhere" / "d.bin", b"x")
    assert missing.value.filename == str(tmp_path / "nowhere" / "d.bin")
    with pytest.raises(FileExistsError):
        atomic_write(target, b"x", overwrite=False)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["c.bin"]


# ----------------------------------------------------------------------------- -o


def test_output_file_or_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = image(tmp_path / "a.png")
    assert upscale(src, "-o", tmp_path / "result.gif") == 2
    err = capsys.readouterr().err
    assert "-o " in err and "cannot write .gif images" in err and err.count("\n") == 1
    assert not (tmp_path / "result.gif").exists()
    assert upscale(src, "-o", f"{tmp_path / 'folder.png'}/") == 0  # a trailing / means folder
    assert (tmp_path / "folder.png" / "a.png").is_file()
    assert upscale(src, "-o", tmp_path / "plain") == 0  # no extension: a folder
    assert (tmp_path / "plain" / "a.png").is_file()
    assert upscale(src, "-o", tmp_path / "b.webp") == 0
    assert (tmp_path / "b.webp").is_file()
    assert upscale(f"{tmp_path}/a.*", "-o", tmp_path / "c.png") == 2  # a glob: not one file
    assert "names an image file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- progress


def test_progress_bar_and_per_file_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image(tmp_path / "in" / "a.png")
    image(tmp_path / "in" / "b.png")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert upscale(tmp_path / "in", "-o", tmp_path / "out") == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if " -> " in line]
    assert len(lines) == 2 and all(line.endswith(" s)") for line in lines)
    assert "2/2" in captured.err and "file" in captured.err and "MP out" in captured.err


# ----------------------------------------------------------------------------- --seed


def test_parse_seed() -> None:
    assert parse_seed("0") == 0 and parse_seed("123") == 123 and parse_seed("Random") is None
    assert parse_seed(str(2**63 - 1)) == 2**63 - 1
    for bad in ("-1", "1.5", "abc", "", str(2**63)):
        with pytest.raises(argparse.ArgumentTypeError, match="or 'random'"):
            parse_seed(bad)


def test_seed_is_passed_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nlsr.evaluation as evaluation
    import nlsr.inference as inference

    seeds: list[object] = []
    real_upscale, real_evaluate = inference.upscale, evaluation.evaluate

    def spy_upscale(*args: object, **kwargs: object) -> object:
        seeds.append(kwargs["seed"])
        return real_upscale(*args, **kwargs)  # type: ignore[arg-type]

    def spy_evaluate(*args: object, **kwargs: object) -> object:
        seeds.append(kwargs["seed"])
        return real_evaluate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inference, "upscale", spy_upscale)
    monkeypatch.setattr(evaluation, "evaluate", spy_evaluate)
    src = image(tmp_path / "a.png")
    assert upscale(src, "-o", tmp_path / "o1.png") == 0
    assert upscale(src, "-o", tmp_path / "o2.png", "--seed", "7") == 0
    assert upscale(src, "-o", tmp_path / "o3.png", "--seed", "random") == 0
    image(tmp_path / "data" / "Toy" / "HR" / "x.png", 20, 20)
    argv = ["eval", "--data-root", str(tmp_path / "data"), "--data", "Toy", "--scale", "2"]
    assert main([*argv, "--seed", "5"]) == 0
    assert seeds == [0, 7, None, 5]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--seed", "-3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --seed: expected an integer" in err


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_torchrun_shares_cover_every_job_once_whatever_the_order(world_size: int) -> None:
    from nlsr.cli.upscale_plan import Job, shard

    rng = np.random.default_rng(world_size)
    jobs = [Job(Path(f"in/{i:02d}.png"), Path(f"out/{i:02d}.png")) for i in range(5)]
    shares = [shard(jobs, rank, world_size) for rank in range(world_size)]
    shuffled = [jobs[i] for i in rng.permutation(len(jobs))]
    assert shares == [shard(shuffled, rank, world_size) for rank in range(world_size)]
    done = [job for share in shares for job in share]
    assert len(done) == len(jobs) and set(done) == set(jobs)  # each exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # rank r takes the sorted jobs r, r + N, r + 2N, ...
    assert all([jobs.index(j) % world_size for j in share] == [r] * len(share)
               for r, share in enumerate(shares))  # fmt: skip
