"""The bicubic model, benchmark discovery, the evaluate() loop and ``nlsr eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BENCHMARK, require
from PIL import Image
from torch import nn

from nlsr.cli import main
from nlsr.data import BENCHMARKS, DatasetError, benchmark_images, resolve_data_root
from nlsr.evaluation import EvalResult, evaluate
from nlsr.metrics import psnr, ssim
from nlsr.models import create
from nlsr.resize import degrade, imresize, modcrop


def _pil_rgb(path: Path) -> np.ndarray:
    """HR as the protocol reads it: PIL, converted to RGB (grey replicated)."""
    return np.asarray(Image.open(path).convert("RGB"))


def _expected_bicubic(hr: np.ndarray, scale: int) -> tuple[float, float]:
    """Independent bicubic baseline score: modcrop, MATLAB down, MATLAB up, metrics on Y."""
    hr = modcrop(hr, scale)
    sr = imresize(imresize(hr, 1 / scale), scale)
    return psnr(sr, hr, scale), ssim(sr, hr, scale)


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    """A tiny data root: Toy/HR with an RGB, a palette and a grayscale image (odd sizes)."""
    rng = np.random.default_rng(0)
    hr = tmp_path / "data" / "Toy" / "HR"
    hr.mkdir(parents=True)
    smooth = np.clip(
        np.linspace(0, 255, 27)[:, None, None] * 0.6
        + np.linspace(0, 255, 31)[None, :, None] * 0.4
        + rng.normal(0, 8, (27, 31, 3)),
        0,
        255,
    ).astype(np.uint8)
    Image.fromarray(smooth).save(hr / "a.png")
    Image.fromarray(smooth).convert("P").save(hr / "b.png")
    Image.fromarray(rng.integers(0, 256, (25, 26), dtype=np.uint8), "L").save(hr / "c.png")
    (hr / "notes.txt").write_text("not an image")
    return tmp_path / "data"


# ---------------------------------------------------------------------------------------------
# the bicubic model


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_model_equals_imresize_on_uint8(scale: int) -> None:
    rng = np.random.default_rng(scale)
    imgs = rng.integers(0, 256, size=(2, 13, 17, 3), dtype=np.uint8)
    model = create("bicubic", scale)
    assert (model.scale, model.rgb_range, model.chop_min_size) == (scale, 1, 160000)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    y = model(x)
    assert y.shape == (2, 3, 13 * scale, 17 * scale) and y.dtype == torch.float32
    q = (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        np.testing.assert_array_equal(q[i], imresize(imgs[i], scale))


def test_bicubic_model_has_no_parameters() -> None:
    assert list(create("bicubic", 2).parameters()) == []


# ---------------------------------------------------------------------------------------------
# data


def test_resolve_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NLSR_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("NLSR_DATA")
    assert resolve_data_root(None) == Path("datasets")
    assert BENCHMARKS == ("Set5", "Set14", "B100", "Urban100", "Manga109")


def test_benchmark_images_lists_sorted_images(toy_root: Path) -> None:
    assert [p.name for p in benchmark_images("Toy", toy_root)] == ["a.png", "b.png", "c.png"]


def test_benchmark_images_missing_set_says_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'Manga109' not found.*Manga109[/\\]HR"):
        benchmark_images("Manga109", tmp_path)
    (tmp_path / "Empty" / "HR").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        benchmark_images("Empty", tmp_path)


# ---------------------------------------------------------------------------------------------
# evaluate()


@pytest.mark.parametrize("scale", [2, 3])
def test_evaluate_bicubic_matches_independent_computation(toy_root: Path, scale: int) -> None:
    r = evaluate("bicubic", "Toy", scale, data_root=toy_root)
    assert (r.model, r.dataset, r.scale, r.degradation) == ("bicubic", "Toy", scale, "BI")
    assert [s.name for s in r.per_image] == ["a", "b", "c"]
    for s in r.per_image:
        p, q = _expected_bicubic(_pil_rgb(toy_root / "Toy" / "HR" / f"{s.name}.png"), scale)
        assert s.psnr == pytest.approx(p, abs=1e-9)
        assert s.ssim == pytest.approx(q, abs=1e-9)
    assert r.psnr == pytest.approx(np.mean([s.psnr for s in r.per_image]), abs=1e-12)
    assert r.ssim == pytest.approx(np.mean([s.ssim for s in r.per_image]), abs=1e-12)


class _Nearest(nn.Module):
    """Tiny stand-in network: nearest-neighbour upscaling with a trainable-looking weight."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale
        self.rgb_range = 1.0
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="nearest") * self.gain


@pytest.mark.parametrize("degradation", ["BI", "BD", "DN"])
def test_evaluate_module_with_each_degradation(toy_root: Path, degradation: str) -> None:
    sigma = 15.0 if degradation == "DN" else 0.0
    r = evaluate(
        _Nearest(2), "Toy", 2, degradation=degradation, noise_sigma=sigma, data_root=toy_root
    )
    assert r.model == "_nearest" and r.degradation == degradation
    for index, s in enumerate(r.per_image):
        hr = modcrop(_pil_rgb(toy_root / "Toy" / "HR" / f"{s.name}.png"), 2)
        lr = degrade(hr, 2, degradation, noise_sigma=sigma, seed=index)
        sr = lr.repeat(2, axis=0).repeat(2, axis=1)
        assert s.psnr == pytest.approx(psnr(sr, hr, 2), abs=1e-9)
        assert s.ssim == pytest.approx(ssim(sr, hr, 2), abs=1e-9)


def test_evaluate_official_lr_and_save_images(toy_root: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hr_dir = toy_root / "Toy" / "HR"
    lr_dir = toy_root / "Toy" / "LR_bicubic" / "X3"
    lr_dir.mkdir(parents=True)
    lrs = {}
    for p in sorted(hr_dir.glob("*.png")):
        h, w = _pil_rgb(p).shape[:2]
        lrs[p.stem] = rng.integers(0, 256, (h // 3, w // 3, 3), dtype=np.uint8)
        Image.fromarray(lrs[p.stem]).save(lr_dir / f"{p.stem}x3.png")
    out = tmp_path / "sr"
    r = evaluate(_Nearest(3), "Toy", 3, data_root=toy_root, official_lr=True, save_images=out)
    for s in r.per_image:
        hr = modcrop(_pil_rgb(hr_dir / f"{s.name}.png"), 3)
        sr = lrs[s.name].repeat(3, axis=0).repeat(3, axis=1)
        assert s.psnr == pytest.approx(psnr(sr, hr, 3), abs=1e-9)
        saved = np.asarray(Image.open(out / "Toy" / "x3" / f"{s.name}.png"))
        np.testing.assert_array_equal(saved, sr)
    (lr_dir / "cx3.png").unlink()
    with pytest.raises(DatasetError, match=r"cx3\.png: official LR file missing"):
        evaluate(_Nearest(3), "Toy", 3, data_root=toy_root, official_lr=True)


def test_evaluate_max_images_scores_a_prefix(toy_root: Path) -> None:
    full = evaluate("bicubic", "Toy", 2, data_root=toy_root)
    first_two = evaluate("bicubic", "Toy", 2, data_root=toy_root, max_images=2)
    assert [s.name for s in first_two.per_image] == ["a", "b"]
    assert first_two.per_image == full.per_image[:2]
    assert first_two.psnr == pytest.approx((full.per_image[0].psnr + full.per_image[1].psnr) / 2)
    with pytest.raises(ValueError, match="max_images"):
        evaluate("bicubic", "Toy", 2, data_root=toy_root, max_images=0)


def test_evaluate_rejects_bad_arguments(toy_root: Path) -> None:
    with pytest.raises(ValueError, match="upscales x2, but scale 3"):
        evaluate(_Nearest(2), "Toy", 3, data_root=toy_root)
    with pytest.raises(ValueError, match="'bicubic'"):
        evaluate("nlsn", "Toy", 2, data_root=toy_root)
    with pytest.raises(ValueError, match="official LR files are BI"):
        evaluate("bicubic", "Toy", 2, degradation="BD", official_lr=True, data_root=toy_root)
    with pytest.raises(ValueError, match="degradation"):
        evaluate("bicubic", "Toy", 2, degradation="JPEG", data_root=toy_root)


def test_eval_result_to_dict_layout() -> None:
    from nlsr.evaluation import ImageScore

    r = EvalResult("bicubic", "Set5", 2, "BI", 33.0, 0.9, [ImageScore("baby", 34.0, 0.95)])
    assert r.to_dict() == {
        "model": "bicubic",
        "dataset": "Set5",
        "scale": 2,
        "degradation": "BI",
        "psnr": 33.0,
        "ssim": 0.9,
        "per_image": [{"name": "baby", "psnr": 34.0, "ssim": 0.95}],
    }


# ---------------------------------------------------------------------------------------------
# nlsr eval


def test_cli_table_and_json(toy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res.json"
    rc = main(
        [
            "eval",
            "--data",
            "Toy",
            "--scale",
            "2,3",
            "--data-root",
            str(toy_root),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["set", "scale", "degr."]
    data = json.loads(out.read_text())
    assert [(r["dataset"], r["scale"]) for r in data["results"]] == [("Toy", 2), ("Toy", 3)]
    for row, result in zip(lines[2:4], data["results"], strict=True):
        assert row.split()[:6] == [
            "Toy",
            f"x{result['scale']}",
            "BI",
            f"{result['psnr']:.4f}",
            f"{result['ssim']:.4f}",
            "3",
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "res.json"]  # no temp files


def test_cli_weights_file(toy_root: Path, tmp_path: Path) -> None:
    """``--weights`` loads the checkpoint for each scale and scores it like evaluate() does."""
    from nlsr.models import save

    torch.manual_seed(0)
    model = create("edsr", 2, n_resblocks=1, n_feats=8)
    weights = save(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "res.json"
    argv = ["eval", "--weights", str(weights), "--data", "Toy", "--scale", "2"]
    assert main([*argv, "--data-root", str(toy_root), "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    direct = evaluate(model, "Toy", 2, data_root=toy_root)
    assert result["model"] == "edsr"
    assert result["psnr"] == pytest.approx(direct.psnr, abs=1e-9)
    assert result["ssim"] == pytest.approx(direct.ssim, abs=1e-9)


def test_cli_precision_bf16_scores_bf16_outputs(toy_root: Path, tmp_path: Path) -> None:
    """``--precision bf16`` scores what the network gives under bfloat16 autocast, computed
    here directly, and records the precision; float32 stays the default."""
    from nlsr.inference import to_array, to_tensor
    from nlsr.models import save

    torch.manual_seed(0)
    model = create("edsr", 2, n_resblocks=1, n_feats=8).eval()
    weights = save(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "res.json"
    argv = ["eval", "--weights", str(weights), "--data", "Toy", "--scale", "2"]
    assert (
        main([*argv, "--data-root", str(toy_root), "--json", str(out), "--precision", "bf16"]) == 0
    )
    (result,) = json.loads(out.read_text())["results"]
    expected = []
    for hr_path in benchmark_images("Toy", toy_root):
        hr = modcrop(_pil_rgb(hr_path), 2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            sr = to_array(model(to_tensor(degrade(hr, 2, "BI"))).float(), hr.dtype)
        expected.append(psnr(sr, hr, 2))
    assert result["precision"] == "bf16"
    assert result["psnr"] == pytest.approx(sum(expected) / len(expected), abs=1e-9)
    fp32 = evaluate(model, "Toy", 2, data_root=toy_root)
    assert fp32.settings["precision"] == "fp32" and fp32.psnr != result["psnr"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "Nope", "--scale", "2"], "dataset 'Nope' not found"),
        (
            ["--model", "nlsn", "--data", "Toy", "--scale", "2"],
            "no pretrained weights for nlsn yet; pass --weights FILE",
        ),
        (["--model", "nope", "--data", "Toy", "--scale", "2"], "unknown model"),
        (["--data", "Toy", "--scale", "2", "--degradation", "DN"], "needs --noise-sigma"),
        (["--data", "Toy", "--scale", "2", "--noise-sigma", "5"], "only to --degradation DN"),
    ],
)
def test_cli_errors_are_one_line(
    toy_root: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    assert main(["eval", "--data-root", str(toy_root), *argv]) == 2  # usage error
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_set5_x2_matches_independent_bicubic(tmp_path: Path) -> None:
    """``nlsr eval --model bicubic --data Set5 --scale 2`` against imresize + metrics."""
    hr_dir = require(BENCHMARK / "Set5" / "HR")
    out = tmp_path / "out.json"
    rc = main(
        [
            "eval",
            "--model",
            "bicubic",
            "--data",
            "Set5",
            "--scale",
            "2",
            "--data-root",
            str(BENCHMARK),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    (result,) = json.loads(out.read_text())["results"]
    assert (result["model"], result["dataset"], result["scale"]) == ("bicubic", "Set5", 2)
    names = sorted(p.stem for p in hr_dir.glob("*.png"))
    assert [r["name"] for r in result["per_image"]] == names
    expected = [_expected_bicubic(_pil_rgb(hr_dir / f"{n}.png"), 2) for n in names]
    for row, (p, q) in zip(result["per_image"], expected, strict=True):
        assert row["psnr"] == pytest.approx(p, abs=1e-9)
        assert row["ssim"] == pytest.approx(q, abs=1e-9)
    assert result["psnr"] == pytest.approx(math.fsum(p for p, _ in expected) / 5, abs=1e-9)
    assert result["ssim"] == pytest.approx(math.fsum(q for _, q in expected) / 5, abs=1e-9)


def test_cli_save_images_keeps_the_scored_8bit_images(toy_root: Path, tmp_path: Path) -> None:
    """``nlsr eval --save-images``: one 8-bit PNG per image, and scoring it against the
    modcropped HR gives exactly the per-image numbers of ``--json``."""
    out, js = tmp_path / "sr", tmp_path / "r.json"
    args = ["eval", "--model", "bicubic", "--data", "Toy", "--data-root", str(toy_root)]
    assert main([*args, "--scale", "2", "--save-images", str(out), "--json", str(js)]) == 0
    per_image = json.loads(js.read_text())["results"][0]["per_image"]
    assert len(per_image) == len(benchmark_images("Toy", toy_root))
    for r in per_image:
        with Image.open(out / "Toy" / "x2" / f"{r['name']}.png") as saved:
            assert saved.mode == "RGB"
            sr = np.asarray(saved)
        hr = modcrop(_pil_rgb(toy_root / "Toy" / "HR" / f"{r['name']}.png"), 2)
        assert sr.dtype == np.uint8 and sr.shape == hr.shape
        assert (psnr(sr, hr, 2), ssim(sr, hr, 2)) == (r["psnr"], r["ssim"])
