"""One error policy for every command: a user's error is one line on stderr naming the file or
option, with the exit status of ``nlsr.cli.EXIT_CODES``; ``nlsr --debug`` shows the traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nlsr.cli import EXIT_CODES, describe_error, main
from nlsr.io import write_image
from nlsr.train import state as train_state

REPO = Path(__file__).resolve().parents[1]
#: what the ``nlsr`` console script runs
CONSOLE = "import sys; from nlsr.cli import main; sys.exit(main())"


def nlsr(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the ``nlsr`` console script in a fresh process (so that import-time settings such as
    ``NLSR_MAX_PIXELS`` are read again)."""
    return subprocess.run(
        [sys.executable, "-c", CONSOLE, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def one_line(err: str) -> str:
    """The single line of ``err``; fails on a traceback or several lines."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def image(path: Path, h: int = 6, w: int = 7) -> Path:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 20 + y * 7 + 50 * c) % 256 for c in range(3)], 2)
    return write_image(path, a.astype(np.uint8))


# ----------------------------------------------------------------------------- the policy


def test_exit_codes_are_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit status", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    assert rows[1:] == [str(code) for code in EXIT_CODES], "README's exit status table"
    for text in ("--debug", "--skip-existing", "--seed"):
        assert text in readme


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (ValueError("--tile: bad"), 2, "--tile: bad"),
        (OSError(errno.ENOSPC, "No space left on device", "run/c.pt"), 1, "run/c.pt: No space"),
        (PermissionError(errno.EACCES, "Permission denied"), 1, "Permission denied"),
        (MemoryError(), 1, "out of memory"),
        (RuntimeError("CUDA out of\nmemory"), 1, "CUDA out of memory"),
        (TypeError("oops"), 1, "internal error: TypeError: oops"),
    ],
)
def test_describe_error(exc: BaseException, status: int, message: str) -> None:
    got_status, got = describe_error(exc)
    assert got_status == status and message in got and "\n" not in got


def test_bad_environment_variable_is_one_line() -> None:
    env = {"NLSR_MAX_PIXELS": "abc"}
    done = nlsr("--help", env=env)
    assert done.returncode == 0 and "upscale" in done.stdout and not done.stderr
    done = nlsr("upscale", "--help", env=env)
    assert done.returncode == 0 and "--max-pixels" in done.stdout and not done.stderr
    done = nlsr("upscale", env=env)  # the missing arguments are reported first
    assert done.returncode == 2
    assert "the following arguments are required" in one_line(done.stderr)
    done = nlsr("upscale", "in.png", "-o", "out.png", env=env)
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        "nlsr upscale: error: NLSR_MAX_PIXELS='abc': must be a positive whole number of pixels"
    )


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["upscale", "a.png", "-o", "b.png", "--tile", "many"])
    assert info.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("nlsr upscale: error: argument --tile") and "--help" in line
    assert main([]) == 2
    assert "give a command" in one_line(capsys.readouterr().err)


def test_debug_shows_the_exception(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = image(tmp_path / "a.png")
    args = ["upscale", str(src), "-o", str(tmp_path / "b.png"), "--tile", "-1"]
    assert main(args) == 2
    assert "--tile must be" in one_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="--tile must be"):
        main(["--debug", *args])
    with pytest.raises(ValueError, match="--tile must be"):
        main([*args, "--debug"])  # after the command too (python -m nlsr.train --debug ...)
    done = nlsr("--debug", *args[:-2], "--tile", "-1")
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError" in done.stderr


def test_interrupted_batch_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nlsr.inference as inference

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "upscale", interrupt)
    src = image(tmp_path / "a.png")
    assert main(["upscale", str(src), "-o", str(tmp_path / "b.png")]) == 130
    captured = capsys.readouterr()
    assert "interrupted: 0 ok" in captured.out
    assert one_line(captured.err) == "nlsr upscale: interrupted"


# ----------------------------------------------------------------------------- upscale


def test_unicode_names_on_an_ascii_stdout(tmp_path: Path) -> None:
    """A name the terminal cannot encode is escaped; the batch goes on past it."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["a.png", "ü.png", "日本.png", "z.png"]
    for name in names:
        image(folder / name)
    raw = os.path.join(os.fsencode(folder), b"\xff-latin1.png")  # not UTF-8: surrogate escapes
    with open(raw, "wb") as fh:
        fh.write((folder / "a.png").read_bytes())
    env = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    done = nlsr("upscale", folder, "-o", tmp_path / "out", env=env)
    assert done.returncode == 0, done.stderr
    assert "5 ok, 0 failed" in done.stdout
    assert "\\xfc.png" in done.stdout and "\\u65e5\\u672c.png" in done.stdout
    assert "\\udcff-latin1.png" in done.stdout
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"a.png", "ü.png", "日本.png", "z.png"}
    assert os.path.exists(os.path.join(os.fsencode(out), b"\xff-latin1.png"))
    # the errors of such files are escaped the same way
    done = nlsr("upscale", folder, "-o", tmp_path / "out", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "\\xfc.png: output" in done.stderr and "already exists" in done.stderr


def test_unreadable_sub_folder_is_reported_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    (folder / "ok").mkdir(parents=True)
    image(folder / "ok" / "a.png")
    locked = folder / "locked"
    locked.mkdir()
    image(locked / "b.png")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anyway: the system refuses it instead
            real = os.scandir

            def scandir(path: object = ".") -> object:
                if Path(os.fsdecode(path)) == locked:
                    raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
                return real(path)

            monkeypatch.setattr(os, "scandir", scandir)
        assert main(["upscale", str(folder), "-o", str(tmp_path / "out")]) == 1
    finally:
        locked.chmod(0o755)
    captured = capsys.readouterr()
    assert one_line(captured.err) == f"{locked}: cannot read the folder (Permission denied)"
    assert "1 ok, 1 failed" in captured.out
    assert (tmp_path / "out" / "ok" / "a.png").is_file()


# ----------------------------------------------------------------------------- eval


@pytest.fixture
def tiny_set(tmp_path: Path) -> Path:
    hr = tmp_path / "data" / "Tiny" / "HR"
    hr.mkdir(parents=True)
    image(hr / "big.png", 24, 26)
    image(hr / "small.png", 16, 40)
    return tmp_path / "data"


def test_eval_names_an_hr_image_too_small(
    tiny_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--data-root", str(tiny_set), "--data", "Tiny", "--model", "bicubic"]
    assert main([*argv, "--scale", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--scale", "3"]) == 2
    line = one_line(capsys.readouterr().err)
    small = tiny_set / "Tiny" / "HR" / "small.png"
    assert line.startswith(f"nlsr eval: error: {small}: HR image too small to score at x3")
    assert "39x15" in line and "17x17" in line


def test_eval_unreadable_set_folder(
    tiny_set: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hr = tiny_set / "Tiny" / "HR"
    real = Path.iterdir

    def iterdir(self: Path) -> object:
        if self == hr:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    argv = ["eval", "--data-root", str(tiny_set), "--data", "Tiny", "--scale", "2"]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == (
        f"nlsr eval: error: dataset 'Tiny': cannot read the folder {hr.resolve()} "
        "(Permission denied)"
    )


def test_evaluate_says_the_scale_attribute_is_missing(tiny_set: Path) -> None:
    from nlsr.evaluation import evaluate

    with pytest.raises(ValueError, match="has no 'scale' attribute"):
        evaluate(torch.nn.Conv2d(3, 3, 1), "Tiny", 2, data_root=tiny_set)
    model = torch.nn.Conv2d(3, 3, 1)
    model.scale = 3
    with pytest.raises(ValueError, match="upscales x3, but scale 2"):
        evaluate(model, "Tiny", 2, data_root=tiny_set)


# ----------------------------------------------------------------------------- train


def _config(tmp_path: Path, **top: object) -> Path:
    rng = np.random.default_rng(0)
    hr = tmp_path / "hr"
    hr.mkdir(exist_ok=True)
    for i in range(3):
        write_image(hr / f"{i}.png", rng.integers(0, 256, (36, 36, 3), dtype=np.uint8))
    raw = {
        "model": {"arch": "edsr", "scale": 2, "options": {"n_resblocks": 1, "n_feats": 8}},
        "data": {"train_dirs": [str(hr)], "patch_size": 16, "batch_size": 2, "workers": 0},
        "train": {"iterations": 4, "threads": 1, "log_every": 2, "checkpoint_every": 2},
        "val": {"every": 0},
        "run_dir": str(tmp_path / "run"),
        **top,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_train_rejects_a_bad_model_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert main(["train", "--config", str(config), "model.n_feats=-1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == f"nlsr train: error: {config}: model.options.n_feats: must be a positive " + (
        "integer, got -1"
    )
    assert main(["train", "--config", str(config), "model.res_scale=.nan"]) == 2
    assert "model.options.res_scale: must be finite" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_train_checks_the_run_folder_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    config = _config(tmp_path)
    assert main(["train", "--config", str(config), f"run_dir={blocker}"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"nlsr train: error: run_dir: {blocker} is a file, not a folder"
    )
    below = blocker / "run"  # unwritable for every user, root included
    assert main(["train", "--config", str(config), f"run_dir={below}"]) == 2
    assert f"cannot be created: {blocker} is not a folder" in one_line(capsys.readouterr().err)


def test_train_in_a_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (see the file test)")
        config = _config(tmp_path)
        assert main(["train", "--config", str(config), f"run_dir={locked / 'run'}"]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"run_dir: {locked / 'run'} cannot be created in {locked}" in line
    finally:
        locked.chmod(0o755)


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_alias_bombs_and_huge_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nlsr.train.config import MAX_CONFIG_BYTES, ConfigError, load_yaml

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS, encoding="utf-8")
    assert main(["train", "--config", str(bomb)]) == 2
    assert "expands to more than 100000 values" in one_line(capsys.readouterr().err)
    config = _config(tmp_path)
    assert main(["train", "--config", str(config), "model.x=&a [*a]"]) == 2
    assert "alias refers to itself" in one_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match="more than 100000 values"):
        load_yaml("{" + BILLION_LAUGHS.strip().replace("\n", ", ") + "}", "flow")
    # ordinary aliases still work
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "ok") == {"a": [1, 2], "b": [1, 2]}
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert main(["train", "--config", str(huge)]) == 2
    assert "larger than 1024 KiB" in one_line(capsys.readouterr().err)


def test_disk_full_while_writing_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The write fails half-way: one line, exit 1, the previous checkpoint intact, no temporary
    file left, and the run resumes."""
    real = train_state.atomic_write
    calls: list[Path] = []

    def full_disk(path: Path, data: object, **kwargs: object) -> Path:
        calls.append(Path(path))
        if len(calls) == 2:

            def half(fh: object) -> None:
                fh.write(b"\0" * 4096)  # type: ignore[attr-defined]
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return real(path, half, **kwargs)
        return real(path, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_state, "atomic_write", full_disk)
    config = _config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err  # the trainer's progress, then the error
    line = one_line(err[err.index("nlsr train: error:") :])
    assert line.startswith(f"nlsr train: error: {run / 'checkpoint.pt'}: No space left on device")
    assert line.endswith(
        f"previous checkpoint is intact: fix this, then `nlsr train --resume {run}`"
    )
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(train_state, "atomic_write", real)
    stale = run / f".checkpoint.pt.nlsr{2**30}-killed.tmp"  # what a killed writer leaves
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    assert main(["train", "--resume", str(run)]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not stale.exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().out


def test_closed_stdout_exits_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nlsr.cli.models as models

    def closed(args: object) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(models, "run", closed)
    assert main(["models"]) == 141
    assert capsys.readouterr().err == ""
