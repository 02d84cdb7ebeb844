"""Shipped pretrained weights: manifest validation, SHA-256 checks, ``create(pretrained=True)``,
and the default model of ``nlsr upscale`` / ``nlsr eval`` with and without a shipped model.

Every test builds its own weights folder (tiny random networks installed with
``nlsr.train.publish.install``) and points ``$NLSR_WEIGHTS_DIR`` at it, so nothing depends on what
the package ships, except the last tests, which check the packaged manifest itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from nlsr.checkpoint import read_state_dict
from nlsr.cli import main
from nlsr.evaluation import evaluate
from nlsr.inference import upscale
from nlsr.io import read_image, write_image
from nlsr.models import create, pretrained, resolve_model, save
from nlsr.models.pretrained import (
    MANIFEST,
    WEIGHTS_ENV,
    PretrainedError,
    available_pretrained,
    default_model,
    read_manifest,
)
from nlsr.resize import imresize
from nlsr.train.publish import install, record_choice, set_scores

NAME = "nlsr-test-s"
#: Hand-written run provenance, as ``nlsr train`` puts it into its exports.
TRAINING = {
    "training": {
        "weights": "ema",
        "iterations": 1234,
        "loss": "L1",
        "optimizer": "Adam",
        "config": {
            "data": {"batch_size": 16, "patch_size": 96, "augment": True},
            "optim": {"lr": 1e-4, "milestones": [100, 200], "gamma": 0.5, "ema": 0.999},
            "train": {"seed": 0, "device": "cpu", "threads": 2, "finetune_from": None},
            "model": {"options": {"n_feats": 8}},
        },
        "data": {
            "train_dirs": ["/secret/place/T91", "/secret/place/BSD200"],
            "images_used": 290,
            "degradation": "BI",
        },
        "best": {"mean_psnr": 30.5, "step": 1000, "sets": ["Set5"]},
        "git_commit": "abc123",
        "nlsr_version": "0.1.0",
        "torch_version": torch.__version__,
    }
}


def tiny_edsr(scale: int, seed: int = 0) -> torch.nn.Module:
    """A deterministic network small enough to train nothing and run in milliseconds."""
    torch.manual_seed(seed)
    return create("edsr", scale, n_resblocks=1, n_feats=8, res_scale=1.0)


def export(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model`` as ``nlsr train`` exports it (nlsr format + training provenance)."""
    return save(model, path, metadata=TRAINING)


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[int, torch.nn.Module]:
    """A weights folder shipping NAME (tiny EDSR) at x2 and x3, made the active one."""
    folder = tmp_path / "weights"
    models = {s: tiny_edsr(s, seed=s) for s in (2, 3)}
    for s, m in models.items():
        install(export(m, tmp_path / f"run_x{s}.safetensors"), NAME, weights_dir=folder)
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    return models


def manifest_path() -> Path:
    return Path(os.environ[WEIGHTS_ENV]) / MANIFEST


def edit_manifest(edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to the active manifest's JSON and write it back."""
    path = manifest_path()
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


# ---------------------------------------------------------------------------- the manifest


def test_install_writes_a_verified_manifest(shipped: dict[int, torch.nn.Module]) -> None:
    folder = manifest_path().parent
    raw = json.loads(manifest_path().read_text())
    entry = raw["models"][NAME]
    assert entry["arch"] == "edsr" and sorted(entry["scales"]) == ["2", "3"]
    for s, model in shipped.items():
        e = entry["scales"][str(s)]
        data = (folder / e["file"]).read_bytes()
        assert e["file"] == f"{NAME}-x{s}.safetensors"
        assert (folder / e["file"]).stat().st_mode & 0o044 == 0o044  # readable by all
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["parameters"] == sum(p.numel() for p in model.parameters())
        assert e["options"] == {"n_resblocks": 1, "n_feats": 8, "res_scale": 1.0}
        t = e["training"]
        assert t["iterations"] == 1234 and t["weights"] == "ema"
        assert t["data"]["train_sets"] == ["T91", "BSD200"]
        assert t["recipe"]["milestones"] == [100, 200] and t["recipe"]["ema"] == 0.999
        assert (t["recipe"]["loss"], t["recipe"]["optimizer"]) == ("L1", "Adam")
        # the header of the shipped file carries the same provenance, without local paths
        _, config = read_state_dict(folder / e["file"])
        assert config["arch"] == "edsr" and config["scale"] == s
        assert config["training"] == t and config["pretrained"] == NAME
        assert b"/secret/place" not in data
    assert "/secret/place" not in manifest_path().read_text()
    assert available_pretrained() == [NAME]
    assert available_pretrained(3) == [NAME] and available_pretrained(4) == []


def test_shipped_model_is_the_trained_weights(shipped: dict[int, torch.nn.Module]) -> None:
    for s, original in shipped.items():
        found = resolve_model(NAME, s)
        model = found.module
        assert not model.training and model.scale == s and found.source.shipped == NAME
        expected = original.state_dict()
        got = model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_sha256_is_checked_on_load(shipped: dict[int, torch.nn.Module]) -> None:
    file = manifest_path().parent / f"{NAME}-x2.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    file.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match=r"SHA-256 [0-9a-f]{64} does not match"):
        resolve_model(NAME, 2)
    resolve_model(NAME, 3)  # the other scale is intact


def test_missing_weight_file(shipped: dict[int, torch.nn.Module]) -> None:
    (manifest_path().parent / f"{NAME}-x3.safetensors").unlink()
    with pytest.raises(PretrainedError, match=r"x3\.safetensors: weight file .* is missing"):
        resolve_model(NAME, 3)


def test_manifest_must_match_the_file(shipped: dict[int, torch.nn.Module]) -> None:
    """Right hash, wrong description: the file's header and parameter count are checked."""

    def swap(raw: dict) -> None:  # x2's entry pointing at the (intact) x3 file
        scales = raw["models"][NAME]["scales"]
        scales["2"]["file"], scales["2"]["sha256"] = scales["3"]["file"], scales["3"]["sha256"]

    edit_manifest(swap)
    with pytest.raises(PretrainedError, match="holds edsr x3, but the manifest lists edsr x2"):
        resolve_model(NAME, 2)

    def miscount(raw: dict) -> None:
        raw["models"][NAME]["scales"]["3"]["parameters"] += 1

    edit_manifest(miscount)
    with pytest.raises(PretrainedError, match="parameters, but the manifest states"):
        resolve_model(NAME, 3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("format"), '"format": 1'),
        (lambda r: r["models"][NAME].update(arch="nope"), r"models\.nlsr-test-s\.arch"),
        (lambda r: r["models"].update(edsr=r["models"][NAME]), "name of an architecture"),
        (lambda r: r["models"].update({"Bad Name": {}}), "lower-case letters"),
        (lambda r: r["models"][NAME]["scales"]["2"].update(sha256="abc"), r"2\.sha256"),
        (lambda r: r["models"][NAME]["scales"]["2"].update(file="../x.safetensors"), r"2\.file"),
        (lambda r: r["models"][NAME]["scales"]["2"].update(parameters=-1), r"2\.parameters"),
        (lambda r: r["models"][NAME]["scales"]["2"].update(scores={"Set5": "hi"}), "scores"),
        (lambda r: r["models"][NAME]["scales"].update(two={}), r"scales\.two"),
        (lambda r: r["models"][NAME].update(scales={}), "non-empty"),
    ],
)
def test_bad_manifests_are_named(
    shipped: dict, edit: Callable[[dict], object], message: str
) -> None:
    edit_manifest(edit)
    with pytest.raises(PretrainedError, match=message) as info:
        read_manifest()
    assert str(manifest_path()) in str(info.value)


def test_unreadable_manifest_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(PretrainedError, match="unreadable manifest"):
        read_manifest(tmp_path)
    with pytest.raises(PretrainedError, match="weights folder does not exist"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    assert read_manifest(tmp_path / "bare") == {}  # a folder without a manifest ships nothing


def test_unknown_name_or_scale_lists_what_is_shipped(shipped: dict) -> None:
    with pytest.raises(
        PretrainedError, match=r"no pretrained model 'nope'.*nlsr-test-s \(x2, x3\)"
    ):
        resolve_model("nope", 2)
    with pytest.raises(
        PretrainedError, match=r"has no x4 weights; shipped: nlsr-test-s \(x2, x3\)"
    ):
        resolve_model(NAME, 4)


def test_default_model_ranks_by_measured_set5(tmp_path: Path, shipped: dict) -> None:
    folder = manifest_path().parent
    install(export(tiny_edsr(2, seed=9), tmp_path / "other.safetensors"), "aaa", weights_dir=folder)
    assert default_model(2) == "aaa"  # nothing scored: by name
    set_scores(NAME, 2, {"Set5": 31.0})
    assert default_model(2) == NAME  # scored before unscored
    set_scores("aaa", 2, {"Set5": 31.5, "Urban100": 25.0})
    assert default_model(2) == "aaa"
    assert default_model(3) == NAME and default_model(4) is None
    assert default_model(2, arch="dlsn") is None
    assert read_manifest()["aaa"][2].scores == {"Set5": 31.5, "Urban100": 25.0}
    renewed = export(tiny_edsr(2, seed=5), tmp_path / "new.safetensors")
    install(renewed, "aaa", weights_dir=folder)
    assert read_manifest()["aaa"][2].scores == {}  # new weights: the old scores are dropped
    assert default_model(2) == NAME
    with pytest.raises(PretrainedError, match="not the name of an architecture"):
        install(renewed, "edsr", weights_dir=folder)


def test_record_choice_sets_the_option_and_keeps_its_evidence(shipped: dict) -> None:
    evidence = {"rule": "fewest within 0.02 dB", "measured": [{"rounds": 1, "Set5": [30.0, 0.9]}]}
    record_choice(NAME, 2, "res_scale", 0.5, evidence)
    set_scores(NAME, 2, {"Set5": 31.0})  # rewriting the manifest keeps the choice
    w = read_manifest()[NAME][2]
    assert w.options["res_scale"] == 0.5
    assert w.choices == {"res_scale": {"value": 0.5, **evidence}}
    assert resolve_model(NAME, 2).options["res_scale"] == 0.5
    assert read_manifest()[NAME][3].choices == {}
    edit_manifest(lambda raw: raw["models"][NAME]["scales"]["2"].update(choices=[1]))
    with pytest.raises(PretrainedError, match="choices: must be an object"):
        read_manifest()


# ---------------------------------------------------------------------------- create()


def test_create_pretrained(shipped: dict[int, torch.nn.Module]) -> None:
    model = create(NAME, 3, pretrained=True)
    assert resolve_model(model).source.shipped == NAME and model.scale == 3
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        assert torch.equal(model(x), shipped[3].eval()(x))
    best = create("edsr", 2, pretrained=True)  # the best edsr for x2
    assert resolve_model(best).source.shipped == NAME
    with pytest.raises(PretrainedError, match="no pretrained dlsn weights for x2"):
        create("dlsn", 2, pretrained=True)
    with pytest.raises(ValueError, match=r"options \(n_feats\) cannot be changed"):
        create(NAME, 2, pretrained=True, n_feats=4)
    with pytest.raises(KeyError, match=r"is a pretrained model: use create\("):
        create(NAME, 2)
    assert create("edsr", 2, n_resblocks=1, n_feats=8).training  # the plain API is unchanged


def test_a_trained_dlsn_ships_with_inference_options(tmp_path: Path) -> None:
    """Hash rounds are not in the weights: install may change them (train 1, infer 3)."""
    torch.manual_seed(0)
    opts = {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "chunk_size": 16, "n_hashes": 1}
    model = create("dlsn", 2, **opts)
    entry = install(
        export(model, tmp_path / "dlsn.safetensors"),
        "nlsr-dlsn-t",
        weights_dir=tmp_path / "w",
        options={"n_hashes": 3},
        hardware="2-core CPU",
    )
    assert entry.options["n_hashes"] == 3 and entry.training["hardware"] == "2-core CPU"
    found = resolve_model("nlsr-dlsn-t", 2, weights_dir=tmp_path / "w")
    loaded = found.module
    assert found.options["n_hashes"] == 3
    assert all(b.n_hashes == 3 for b in loaded.modules() if hasattr(b, "n_hashes"))
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


# ---------------------------------------------------------------------------- the CLIs


def test_upscale_default_is_bicubic_when_nothing_is_shipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # conftest's autouse fixture makes an empty weights folder the active one
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    write_image(tmp_path / "in.png", pixels)
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("no pretrained model is shipped for x2") == 1
    np.testing.assert_array_equal(read_image(tmp_path / "out.png").pixels, imresize(pixels, 2))


def test_upscale_default_is_the_shipped_model(
    tmp_path: Path, shipped: dict[int, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    src = write_image(tmp_path / "in.png", pixels)
    for args, scale in (([], 2), (["--scale", "3"], 3), (["--model", NAME, "--scale", "3"], 3)):
        target = tmp_path / f"out{scale}{len(args)}.png"
        assert main(["upscale", str(src), "-o", str(target), "--device", "cpu", *args]) == 0
        expected = upscale(shipped[scale].eval(), pixels, device="cpu")
        got = read_image(target).pixels
        assert got.shape == (9 * scale, 11 * scale, 3)
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(got, imresize(pixels, scale))
    assert f"model: {NAME} x2 (shipped pretrained weights)" in capsys.readouterr().out
    assert main(["upscale", str(src), "-o", str(tmp_path / "o4.png"), "--scale", "4"]) == 0
    assert "no pretrained model is shipped for x4" in capsys.readouterr().out


def eval_json(tmp_path: Path, root: Path, *args: str) -> tuple[int, list[dict]]:
    """Run ``nlsr eval`` on the Toy set; (exit status, the JSON results)."""
    out = tmp_path / "res.json"
    out.unlink(missing_ok=True)
    argv = ["eval", "--data", "Toy", "--data-root", str(root), "--json", str(out), *args]
    rc = main(argv)
    return rc, json.loads(out.read_text())["results"] if rc == 0 else []


def test_eval_defaults_per_scale(
    tmp_path: Path,
    toy_root: Path,
    shipped: dict[int, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, results = eval_json(tmp_path, toy_root, "--scale", "2,4")
    assert rc == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert title == (
        f"model: {NAME} x2 (shipped pretrained weights); "
        "bicubic (no pretrained model is shipped for x4)"
    )
    by_scale = {r["scale"]: r for r in results}
    x2 = evaluate(shipped[2].eval(), "Toy", 2, data_root=toy_root)
    x4 = evaluate("bicubic", "Toy", 4, data_root=toy_root)
    assert by_scale[2]["psnr"] == pytest.approx(x2.psnr, abs=1e-9)
    assert by_scale[4]["psnr"] == pytest.approx(x4.psnr, abs=1e-9)
    assert by_scale[4]["model"] == "bicubic"


def test_eval_model_name_loads_shipped_weights(
    tmp_path: Path,
    toy_root: Path,
    shipped: dict[int, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, results = eval_json(tmp_path, toy_root, "--model", NAME, "--scale", "2,3")
    assert rc == 0
    for r in results:
        direct = evaluate(shipped[r["scale"]].eval(), "Toy", r["scale"], data_root=toy_root)
        assert r["psnr"] == pytest.approx(direct.psnr, abs=1e-9)
        assert r["ssim"] == pytest.approx(direct.ssim, abs=1e-9)
    capsys.readouterr()
    assert eval_json(tmp_path, toy_root, "--model", NAME, "--scale", "4")[0] == 2  # usage
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no x4 weights; shipped: nlsr-test-s (x2, x3)" in err
    assert eval_json(tmp_path, toy_root, "--model", NAME, "--scale", "2", "--weights", "x.pt")[0]
    assert "drop --weights" in capsys.readouterr().err


def test_eval_default_without_shipped_model_is_bicubic(
    tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, results = eval_json(tmp_path, toy_root, "--scale", "2,3")
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model: bicubic (no pretrained model is shipped for x2, x3)"
    assert {r["model"] for r in results} == {"bicubic"}


def test_models_lists_shipped_weights(
    shipped: dict[int, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["pretrained"]
    assert [(w["name"], w["scale"], w["arch"]) for w in listing] == [
        (NAME, 2, "edsr"),
        (NAME, 3, "edsr"),
    ]
    assert listing[0]["parameters"] == sum(p.numel() for p in shipped[2].parameters())
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert f"{NAME:<14} x3  edsr" in text and "1234 iterations" in text


# ---------------------------------------------------------------------------- what is packaged


def test_packaged_manifest_is_valid_and_its_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder inside the installed package (importlib.resources): every listed file loads."""
    from importlib import resources

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    packaged = Path(str(resources.files("nlsr").joinpath("weights")))
    assert (packaged / MANIFEST).is_file(), "nlsr/weights/weights.json must be package data"
    assert pretrained.resolve_weights_dir() == packaged
    manifest = read_manifest()
    total = 0
    for name, scales in manifest.items():
        for scale, w in scales.items():
            total += w.file.stat().st_size
            model = resolve_model(name, scale).module
            assert model.scale == scale
    assert total <= 20_000_000  # every shipped scale together


def test_packaged_weights_reproduce_their_recorded_set5_scores(
    monkeypatch: pytest.MonkeyPatch, benchmark_dir: Path, tmp_path: Path
) -> None:
    """``nlsr eval`` with its defaults (whole images, seed 0), as ``scripts/model_card.py`` runs
    it, gives the Set5 score in the manifest for every shipped scale, so the card's numbers are
    what users get."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for name, scales in read_manifest().items():
        for scale, weights in scales.items():
            assert "Set5" in weights.scores, f"{name} x{scale}: no Set5 score recorded"
            out = tmp_path / f"{name}_x{scale}.json"
            argv = ["eval", "--model", name, "--scale", str(scale), "--data", "Set5"]
            assert main([*argv, "--data-root", str(benchmark_dir), "--json", str(out)]) == 0
            (result,) = json.loads(out.read_text())["results"]
            # Thread counts change float sums, and so, rarely, a hash bucket: hence 0.01 dB.
            assert result["psnr"] == pytest.approx(weights.scores["Set5"], abs=0.01), (name, scale)
