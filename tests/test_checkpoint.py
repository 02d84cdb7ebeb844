"""nlsr.checkpoint: reading (authors' .pt, BasicSR, DataParallel, nlsr safetensors), detection,
strict loading with explanatory errors, saving, refusal of pickled objects, ``nlsr convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, require
from test_models_common import SMALL, small

import nlsr
from nlsr.checkpoint import CheckpointError, detect, load, read_state_dict, save
from nlsr.cli import main

CASES = sorted(p.parent.name for p in FIXTURES.glob("*/case.json")) if FIXTURES.is_dir() else []
#: case.json "inferable" entries that are not constructor options nlsr reads back.
NOT_READ = {"res_scale", "ema_decay", "csnla_reduction", "csnla_softmax_scale_etc"}
#: case.json "not inferable" options that are nlsr constructor options (CSNLN's csnla_* constants
#: are hard-coded, as in the official code).
GIVEN = {"res_scale", "n_hashes", "chunk_size", "topk", "window_size"}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for m in model.modules():
        if hasattr(m, "generator"):
            m.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(x)


def _case(name: str) -> tuple[Path, dict[str, Any]]:
    folder = require(FIXTURES / name)
    return folder, json.loads((folder / "case.json").read_text())


# --------------------------------------------------------------------------- detection


@pytest.mark.shared
@pytest.mark.parametrize("name", CASES or ["edsr_x2"])
def test_detect_every_fixture(name: str) -> None:
    folder, case = _case(name)
    arch, scale, options = detect(torch.load(folder / "checkpoint.pt", weights_only=True))
    assert (arch, scale) == (case["arch"], case["scale"])
    official = case["official_args"]
    for key, value in options.items():
        assert official[key] == value, key
    for key in case["inferable_from_weights"]:
        if key in official and key not in NOT_READ and key not in ("scale", "attention_channel"):
            assert key in options, f"{name}: {key} is inferable but was not read"
    assert options.get("attention_channel", options["n_feats"]) == official.get(
        "attention_channel", options["n_feats"]
    )


@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_detect_reads_shapes_at_every_scale(arch: str, scale: int) -> None:
    model = small(arch, scale, rgb_range=255, n_colors=3)
    found_arch, found_scale, options = detect(model.state_dict())
    assert (found_arch, found_scale) == (arch, scale)
    assert options["rgb_range"] == 255
    shape_options = {"n_feats", "n_resblocks", "n_resgroups", "reduction", "depth", "n_clusters"}
    if arch == "dlsn":
        shape_options.add("chunk_size")
    for key in shape_options & set(SMALL[arch]):
        assert options[key] == SMALL[arch][key], (arch, key)


def test_detect_edsr_baseline_uses_published_res_scale() -> None:
    sd = small("edsr", n_resblocks=16, n_feats=64).state_dict()
    assert detect(sd)[2]["res_scale"] == 1.0
    assert "res_scale" not in detect(small("edsr").state_dict())[2]


def test_detect_rejects_unknown_and_attention_backbones() -> None:
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        detect({"encoder.weight": torch.zeros(2, 2)})
    with_attention = small("edsr", n_resblocks=4, attention="nla").state_dict()
    with pytest.raises(CheckpointError, match=r"body\.2.*attention"):
        detect(with_attention)


# --------------------------------------------------------------------------- reading


def test_wrappers_and_prefixes(tmp_path: Path) -> None:
    model = small("edsr").eval()
    sd = model.state_dict()
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
    x = torch.rand(1, 3, 6, 5)
    ref = _forward(model, x)
    variants = {
        "basicsr": {"params": decoy, "params_ema": sd},  # EMA weights are preferred
        "dataparallel": {f"module.{k}": v for k, v in sd.items()},
        "lightning": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
    }
    for name, obj in variants.items():
        read, config = read_state_dict(obj)
        assert config is None and list(read) == list(sd), name
        torch.save(obj, tmp_path / f"{name}.pth")
        loaded = load(tmp_path / f"{name}.pth", res_scale=0.1)
        assert not loaded.training
        assert torch.equal(_forward(loaded, x), ref), name


def test_plain_safetensors_state_dict_is_detected(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = small("rcan", 3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    _, config = read_state_dict(tmp_path / "w.safetensors")
    assert config is None
    loaded = load(tmp_path / "w.safetensors")
    assert loaded.nlsr_config["arch"] == "rcan" and loaded.scale == 3
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(_forward(loaded, x), _forward(model.eval(), x))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "not a state dict"),
        ({"epoch": 1, "weight": torch.zeros(1)}, r"not tensors: epoch \(int\)"),
        ({}, "empty"),
        (torch.zeros(3), "single tensor"),
        ({"params": {}}, "empty"),
    ],
)
def test_non_checkpoint_content(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "c.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_non_checkpoint_files(tmp_path: Path) -> None:
    cases = {
        "text.pt": b"hello, I am not a checkpoint",
        "empty.pth": b"",
        "png.pt": b"\x89PNG\r\n\x1a\n" + bytes(64),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            read_state_dict(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        read_state_dict(tmp_path)
    whole = tmp_path / "whole.pt"
    torch.save(small("edsr").state_dict(), whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load(cut)


class _Payload:
    """Unpickling this object opens (creates) a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused.*pickled Python objects"):
        load(path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()
    # the payload is live: an unrestricted unpickler would have run it
    torch.load(path, weights_only=False)["payload"].close()
    assert marker.exists()


# --------------------------------------------------------------------------- strict loading


def test_truncated_state_dict_names_missing_keys() -> None:
    sd = small("edsr", n_resblocks=3).state_dict()
    del sd["body.1.body.2.weight"], sd["body.1.body.2.bias"]
    with pytest.raises(CheckpointError) as info:
        load(sd)
    text = str(info.value)
    assert "2 missing" in text and "body.1.body.2.weight" in text and "truncated" in text
    del sd["tail.1.weight"], sd["tail.1.bias"]
    sd = {k: v for k, v in sd.items() if not k.startswith("tail.")}
    with pytest.raises(CheckpointError, match="no upsampler keys"):
        load(sd)


def test_extra_and_wrong_arch_keys() -> None:
    sd = small("edsr").state_dict()
    with pytest.raises(CheckpointError, match=r"1 unexpected.*stray"):
        load({**sd, "stray": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"wrong architecture.*'edsr'"):
        load(sd, arch="rcan")
    with pytest.raises(CheckpointError, match=r"wrong option: n_resblocks=3.*n_resblocks=2"):
        load(sd, n_resblocks=3)
    with pytest.raises(CheckpointError, match="unknown arch 'srcnn'"):
        load(sd, arch="srcnn")
    with pytest.raises(CheckpointError, match="does not accept"):
        load(sd, chunk_size=3)


@pytest.mark.shared
def test_dlsn_checkpoint_as_scale_3() -> None:
    folder, _ = _case("dlsn_x2")
    with pytest.raises(CheckpointError) as info:
        load(folder / "checkpoint.pt", scale=3, n_hashes=3)
    text = str(info.value)
    assert str(folder / "checkpoint.pt") in text
    assert "tail.0.0.weight (checkpoint 128x32x3x3, model 288x32x3x3)" in text
    assert "upsampler shapes mismatch" in text and "use scale=2" in text


@pytest.mark.shared
def test_dlsn_chunk_size_mismatch() -> None:
    folder, _ = _case("dlsn_x2")
    with pytest.raises(CheckpointError) as info:
        load(folder / "checkpoint.pt", chunk_size=64)
    text = str(info.value)
    assert "body.0.body.2.fc.0.weight (checkpoint 128x32, model 64x32)" in text
    assert "chunk_size=64 but the weights imply chunk_size=128" in text


# --------------------------------------------------------------------------- nlsr format


def test_round_trip_small_models(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 7, 9)
    for arch, extra in [("edsr", {}), ("rcan", {"attention": "nla", "attention_every": 1})]:
        model = small(arch, 3, **extra).eval()
        folder = tmp_path / arch
        path = save(model, folder / "m.safetensors", metadata={"trained_on": "noise"})
        assert list(folder.iterdir()) == [path], "written atomically, no temporary file left"
        _, config = read_state_dict(path)
        assert config == {"arch": arch, "scale": 3, "options": {**SMALL[arch], **extra}} | {
            "trained_on": "noise"
        }
        loaded = load(path)
        assert loaded.nlsr_metadata == {"trained_on": "noise"}
        assert torch.equal(_forward(loaded, x), _forward(model, x))
        # explicit options still override the recorded ones, strictly
        with pytest.raises(CheckpointError, match="mis-shaped"):
            load(path, n_feats=8)


@pytest.mark.shared
@pytest.mark.parametrize("name", CASES or ["edsr_x2"])
def test_round_trip_fixtures(tmp_path: Path, name: str) -> None:
    folder, case = _case(name)
    options = {k: v for k, v in case["not_inferable_from_weights"].items() if k in GIVEN}
    original = nlsr.load(folder / "checkpoint.pt", **options)
    path = nlsr.save(original, tmp_path / "m.safetensors")
    again = nlsr.load(path)  # nothing given: the header records everything
    assert again.nlsr_config == original.nlsr_config
    for k, v in original.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = torch.load(folder / "input.pt", weights_only=True)
    assert torch.equal(_forward(again, x), _forward(original, x))


def test_save_errors(tmp_path: Path) -> None:
    model = small("edsr")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save(model, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="may not set scale"):
        save(model, tmp_path / "m.safetensors", metadata={"scale": 4})
    with pytest.raises(CheckpointError, match="JSON"):
        save(model, tmp_path / "m.safetensors", metadata={"when": object()})
    with pytest.raises(CheckpointError, match="no nlsr_config"):
        save(torch.nn.Conv2d(1, 1, 1), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- nlsr convert


def test_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = small("rcan").eval()
    src = tmp_path / "RCAN_x2.pt"
    torch.save({"params_ema": model.state_dict()}, src)
    out = tmp_path / "rcan.safetensors"
    assert main(["convert", str(src), str(out), "--opt", "attention_options=null"]) == 0
    printed = capsys.readouterr().out
    assert "rcan (from the weights)" in printed and "n_resgroups=2" in printed
    assert f"wrote {out}" in printed
    _, config = read_state_dict(out)
    assert config["converted_from"] == "RCAN_x2.pt" and len(config["source_sha256"]) == 64
    x = torch.rand(1, 3, 5, 6)
    assert torch.equal(_forward(load(out), x), _forward(model, x))

    assert main(["convert", str(src), str(out)]) == 1  # exists
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--scale", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "use scale=2" in err[1]
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--opt", "3"]) == 1
    assert "key=value" in capsys.readouterr().err
