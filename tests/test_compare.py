"""nlsr compare: its numbers are nlsr eval's for the same images, and it draws a figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nlsr.cli import main
from nlsr.cli.compare import detailed_box
from nlsr.models import create


def _checkpoint(tmp_path: Path) -> Path:
    """A tiny DLSN (hashing attention: the seeded draws matter) saved as a checkpoint."""
    torch.manual_seed(0)
    model = create("dlsn", 2, n_resgroups=1, n_resblocks=1, n_feats=8, chunk_size=16)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def _eval(root: Path, out: Path, *model: str) -> dict[str, tuple[float, float]]:
    args = ["eval", "--data", "Toy", "--data-root", str(root), "--scale", "2", "--json", str(out)]
    assert main([*args, *model]) == 0
    per_image = json.loads(out.read_text())["results"][0]["per_image"]
    return {r["name"]: (r["psnr"], r["ssim"]) for r in per_image}


def test_compare_scores_equal_eval_json(toy_root: Path, tmp_path: Path) -> None:
    weights = _checkpoint(tmp_path)
    bicubic = _eval(toy_root, tmp_path / "bi.json", "--model", "bicubic")
    tiny = _eval(toy_root, tmp_path / "tiny.json", "--weights", str(weights))
    for image in ("a", "b"):
        fig, js = tmp_path / f"{image}.png", tmp_path / f"{image}.json"
        args = ["compare", "--data", "Toy", "--image", image, "--data-root", str(toy_root)]
        args += ["--models", f"bicubic,{weights}", "-o", str(fig), "--json", str(js)]
        assert main(args) == 0
        assert fig.stat().st_size > 0
        got = json.loads(js.read_text())["models"]
        assert (got[0]["psnr"], got[0]["ssim"]) == bicubic[image]
        assert (got[1]["psnr"], got[1]["ssim"]) == tiny[image]
    bad = ["compare", "--data", "Toy", "--image", "zz", "--data-root", str(toy_root)]
    assert main([*bad, "--models", "bicubic", "-o", str(tmp_path / "x.png")]) == 2
    box = ["--image", "a", "--box", "40,0,20,20"]
    assert (
        main(
            [
                *bad[:3],
                *box,
                "--data-root",
                str(toy_root),
                "--models",
                "bicubic",
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )


def test_detailed_box_finds_the_texture() -> None:
    """A flat image with one noisy square: the default box lies on it."""
    hr = np.full((64, 64, 3), 128, dtype=np.uint8)
    hr[32:48, 8:24] = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    x, y, w, h = detailed_box(hr, 16)
    assert (w, h) == (16, 16) and abs(x - 8) <= 8 and abs(y - 32) <= 8
