"""Checkpoints: reading (authors' .pt, BasicSR, DataParallel, nlsr safetensors; nlsr.checkpoint),
detection, strict loading with explanatory errors and saving (nlsr.models), refusal of pickled
objects, ``nlsr convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, require
from PIL import Image as PILImage
from test_models_common import SMALL, small

import nlsr
from nlsr.checkpoint import MAX_BLOCKS_ENV, MAX_PARAMETERS_ENV, CheckpointError, read_state_dict
from nlsr.cli import main
from nlsr.models import OPTION_RULES, check_options, detect, load, resolve_model, save

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
    assert resolve_model(loaded).arch == "rcan" and loaded.scale == 3
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
        assert resolve_model(loaded).source.metadata == {"trained_on": "noise"}
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
    first, second = resolve_model(original), resolve_model(again)
    assert (second.arch, second.scale, second.options) == (first.arch, first.scale, first.options)
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

    assert main(["convert", str(src), str(out)]) == 2  # exists
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--scale", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "use scale=2" in err[1]
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--opt", "3"]) == 2
    assert "key=value" in capsys.readouterr().err


# --------------------------------------------------------------------------- untrusted files


def _nlsr_file(path: Path, sd: dict[str, torch.Tensor], arch: str, options: Any) -> Path:
    """An nlsr-format file with any header options (save() only writes valid ones)."""
    from safetensors.torch import save_file

    header = {"arch": arch, "scale": 2, "options": options}
    tensors = {k: v.contiguous() for k, v in sd.items()}
    save_file(tensors, path, metadata={"nlsr_config": json.dumps(header), "format": "pt"})
    return path


def test_every_model_option_has_a_rule() -> None:
    for arch in nlsr.models.available():
        missing = set(nlsr.models.options(arch)) - set(OPTION_RULES)
        assert not missing, f"{arch}: add rules for {missing} to nlsr.models.OPTION_RULES"


@pytest.mark.parametrize(
    ("arch", "key", "value", "says"),
    [
        ("edsr", "n_feats", -5, "integer >= 1"),
        ("edsr", "n_feats", "64", "got '64' (str)"),
        ("edsr", "n_feats", True, "got True (bool)"),
        ("edsr", "n_feats", 16.0, "integer >= 1"),
        ("edsr", "n_resblocks", 2**40, "below 2**31"),
        ("edsr", "res_scale", float("nan"), "finite number"),
        ("edsr", "rgb_range", 0, "finite number > 0"),
        ("edsr", "attention", "zzz", "attention block name"),
        ("edsr", "attention_options", [1], "mapping"),
        ("rcan", "reduction", 0, "integer >= 1"),
        ("hspan", "topk", 0, "or null"),
        ("lcoan", "ema_decay", 2, "<= 1"),
        ("lcoan", "centroid_update", "EMA", "one of 'none', 'ema'"),
        ("dlsn", "super_bit", 1, "true or false"),
    ],
)
def test_header_options_are_type_and_range_checked(
    tmp_path: Path, arch: str, key: str, value: Any, says: str
) -> None:
    path = _nlsr_file(tmp_path / "m.safetensors", small(arch).state_dict(), arch, SMALL[arch])
    bad = _nlsr_file(tmp_path / "bad.safetensors", small(arch).state_dict(), arch, {})
    _nlsr_file(bad, small(arch).state_dict(), arch, {**SMALL[arch], key: value})
    with pytest.raises(CheckpointError) as info:
        load(bad)
    text = str(info.value)
    assert text.startswith(str(bad)) and f"option {key!r}" in text, text
    assert says in text and "from the file's nlsr header" in text, text
    load(path)  # the same file with valid options loads


def test_given_inferred_and_converted_options_are_checked(tmp_path: Path) -> None:
    sd = small("nlsn").state_dict()
    with pytest.raises(CheckpointError, match=r"'n_hashes'.*got 'abc' \(str\), as passed"):
        load(sd, n_hashes="abc")
    for scale in (0, True, 32, 2.0):
        with pytest.raises(CheckpointError, match="scale must be an integer from 1 to 16"):
            load(sd, scale=scale)
    # a squeeze conv wider than the features implies reduction 0: refused, not built
    odd = dict(sd, **{"body.0.conv_match.0.weight": torch.zeros(32, 16, 3, 3)})
    with pytest.raises(CheckpointError, match=r"'reduction'.*got 0 \(int\), read from the"):
        load(odd)
    assert check_options("edsr", {"n_feats": torch.tensor(3).item()}) == {"n_feats": 3}


def test_model_size_is_limited_before_allocating(tmp_path: Path, monkeypatch) -> None:
    sd = small("edsr").state_dict()
    deep = _nlsr_file(tmp_path / "deep.safetensors", sd, "edsr", {"n_resblocks": 10**6})
    with pytest.raises(CheckpointError, match=r"n_resblocks=1000000.*1,000,001 residual blocks"):
        load(deep)
    wide = _nlsr_file(tmp_path / "wide.safetensors", sd, "edsr", {"n_feats": 10**5})
    with pytest.raises(CheckpointError) as info:
        load(wide)
    text = str(info.value)
    assert "option n_feats=100000 (from the file's nlsr header)" in text
    assert "limit of 500,000,000 (NLSR_MAX_PARAMETERS)" in text
    # both limits can be changed (here: lowered) through the environment
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "1000")
    with pytest.raises(CheckpointError, match=r"more than the limit of 1,000"):
        load(sd)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "lots")
    with pytest.raises(CheckpointError, match="NLSR_MAX_PARAMETERS='lots': must be a positive"):
        load(sd)
    monkeypatch.delenv(MAX_PARAMETERS_ENV)
    monkeypatch.setenv(MAX_BLOCKS_ENV, "2")
    with pytest.raises(CheckpointError, match=r"3 residual blocks, more than the limit of 2"):
        load(sd)


def test_file_declaring_too_many_values_is_refused(tmp_path: Path) -> None:
    sd = small("edsr").state_dict()
    path = tmp_path / "views.pt"
    torch.save({**sd, "head.0.weight": torch.zeros(1).expand(10**10)}, path)  # 4 bytes stored
    with pytest.raises(CheckpointError, match=r"hold 10,000,[\d,]+ values, more than the limit"):
        load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path, bad: float) -> None:
    sd = small("edsr").state_dict()
    sd["tail.1.weight"] = sd["tail.1.weight"].clone()
    sd["tail.1.weight"][0, 0, 1, 1] = bad
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"'tail.1.weight' holds 1 non-finite \(NaN/Inf\)"):
        load(tmp_path / "m.pt")


def test_dtype_conversions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = small("edsr").eval()
    sd = model.state_dict()
    for dtype in (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool):
        with pytest.raises(CheckpointError, match=r"'head.0.weight' holds \w+ values where"):
            load(dict(sd, **{"head.0.weight": sd["head.0.weight"].to(dtype)}))
    x = torch.rand(1, 3, 5, 4)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = {k: v.to(dtype) for k, v in sd.items()}
        loaded = load(low)
        assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
        assert torch.equal(loaded.head[0].weight, low["head.0.weight"].float())
        assert list(resolve_model(loaded).source.notes) == [
            f"{len(sd)} tensor(s) stored as {str(dtype).removeprefix('torch.')}, "
            f"{'rounded' if dtype == torch.float64 else 'converted exactly'} to the model's dtype"
        ]
    assert list(resolve_model(load(sd)).source.notes) == []
    assert torch.allclose(
        _forward(load({k: v.half() for k, v in sd.items()}), x), _forward(model, x), atol=1e-2
    )
    big = dict(sd, **{"tail.1.bias": torch.full((3,), 1e300, dtype=torch.float64)})
    with pytest.raises(CheckpointError, match=r"'tail.1.bias' holds 3 value\(s\) beyond the range"):
        load(big)
    # bool buffers (LCoAN's k-means flags) take integers that are 0 or 1, nothing else
    lcoan = small("lcoan").state_dict()
    flag = next(k for k, v in lcoan.items() if v.dtype == torch.bool)
    load(dict(lcoan, **{flag: lcoan[flag].to(torch.uint8)}))
    with pytest.raises(CheckpointError, match=f"{flag}.*do not fit bool"):
        load(dict(lcoan, **{flag: torch.tensor(2, dtype=torch.uint8)}))
    with pytest.raises(CheckpointError, match=f"{flag}.*holds float32 values where"):
        load(dict(lcoan, **{flag: torch.tensor(1.0)}))
    # nlsr convert says so
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pt")
    assert main(["convert", str(tmp_path / "half.pt"), str(tmp_path / "h.safetensors")]) == 0
    assert f"note: {len(sd)} tensor(s) stored as float16" in capsys.readouterr().out
    # and so do nlsr upscale and nlsr eval, on stderr
    image = tmp_path / "in.png"
    PILImage.fromarray(np.zeros((6, 5, 3), np.uint8)).save(image)
    half = str(tmp_path / "half.pt")
    assert main(["upscale", str(image), "-o", str(tmp_path / "o.png"), "--weights", half]) == 0
    assert f"half.pt: note: {len(sd)} tensor(s) stored as float16" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
def test_odd_tensors_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = small("edsr").state_dict()
    key = "body.0.body.0.weight"
    odd = {
        "sparse_coo tensor": sd[key].to_sparse(),
        "sparse_csr tensor": sd["head.0.bias"].reshape(4, 4).to_sparse_csr(),
        "dtype complex64": sd[key].to(torch.complex64),
        "meta tensor": torch.empty(sd[key].shape, device="meta"),
    }
    for what, tensor in odd.items():
        with pytest.raises(CheckpointError, match=rf"{key} \(.*{what}"):
            load({**sd, key: tensor})
    torch.save({**sd, key: odd["sparse_coo tensor"]}, tmp_path / "sparse.pt")
    with pytest.raises(CheckpointError, match="sparse_coo tensor, not a dense one"):
        load(tmp_path / "sparse.pt")
    # safetensors: an unsupported dtype is refused from the header, before reading data
    save_file({**sd, key: sd[key].to(torch.float8_e4m3fn)}, tmp_path / "f8.safetensors")
    with pytest.raises(CheckpointError, match=rf"dtype nlsr does not accept: {key} \(F8_E4M3\)"):
        load(tmp_path / "f8.safetensors")


def test_odd_shapes_are_reported_not_crashed_on() -> None:
    sd = small("rcan").state_dict()
    for key in ("head.0.weight", "body.0.body.0.body.3.conv_du.0.weight", "tail.0.0.weight"):
        for shape in ((), (0,), (0, 16, 1, 1)):
            with pytest.raises(CheckpointError):
                load(dict(sd, **{key: torch.zeros(shape)}))


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = small("edsr").state_dict()
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(tmp_path / "m.pt"), str(out), "--opt", "n_feats=abc"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # named before the input is read
    assert captured.err.splitlines() == [
        f"nlsr convert: error: {tmp_path / 'm.pt'}: model option 'n_feats' must be an integer "
        ">= 1 (below 2**31), got 'abc' (str), from --opt"
    ]
    assert not out.exists()
    # weights full of NaN: nlsr upscale refuses them instead of writing a black image
    nan = {
        k: (torch.full_like(v, float("nan")) if k == "tail.1.weight" else v) for k, v in sd.items()
    }
    torch.save(nan, tmp_path / "nan.pt")
    from PIL import Image

    Image.new("RGB", (8, 8), (90, 120, 30)).save(tmp_path / "in.png")
    image_out = tmp_path / "out.png"
    args = ["upscale", str(tmp_path / "in.png"), "-o", str(image_out)]
    assert main([*args, "--weights", str(tmp_path / "nan.pt")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tail.1.weight' holds 432 non-finite" in err[0], err
    assert not image_out.exists()
