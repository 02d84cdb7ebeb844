"""Adding an architecture is one module plus one registry line: a toy architecture registered from
this file alone (its network and its ``ArchSpec``) is detected in a state dict, listed by
``nlsr models``, converted by ``nlsr convert``, evaluated by ``nlsr eval --weights`` and measured
by ``nlsr bench``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from nlsr.checkpoint import read_state_dict
from nlsr.cli import main
from nlsr.evaluation import evaluate
from nlsr.models import (
    ArchSpec,
    PaperPreset,
    available,
    create,
    detect,
    load,
    register,
    small_config,
    unregister,
)

NAME = "toynet"


class ToyNet(nn.Module):
    """A head convolution, a tail convolution to ``3 * scale**2`` channels and a pixel shuffle."""

    def __init__(self, scale: int = 2, n_feats: int = 8):
        super().__init__()
        self.scale = scale
        self.toy_head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.toy_tail = nn.Conv2d(n_feats, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.toy_tail(torch.relu(self.toy_head(x))))


def _read(sd: Mapping[str, Tensor]) -> tuple[int, dict[str, Any]]:
    """The scale from the tail's output channels, ``n_feats`` from the head's."""
    scale = math.isqrt(int(sd["toy_tail.weight"].shape[0]) // 3)
    return scale, {"n_feats": int(sd["toy_head.weight"].shape[0])}


SPEC = ArchSpec(
    name=NAME,
    network=ToyNet,
    description="toy network: two convolutions and a pixel shuffle",
    matches=lambda sd: "toy_head.weight" in sd,
    read=_read,
    priority=100,
    preset=PaperPreset("example/toynet", {"n_feats": 8}, "0.00M"),
    small={"n_feats": 4},
)


@pytest.fixture
def toy() -> Iterator[ArchSpec]:
    """The toy architecture, registered for one test and taken out again after it."""
    register(SPEC)
    try:
        yield SPEC
    finally:
        unregister(NAME)
    assert NAME not in available()


def _toy_model(scale: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return create(NAME, scale, n_feats=6)


def test_detection(toy: ArchSpec) -> None:
    for scale in (2, 3):
        assert detect(_toy_model(scale).state_dict()) == (NAME, scale, {"n_feats": 6})
    assert small_config(NAME) == {"n_feats": 4}


def test_models_command_lists_it(toy: ArchSpec, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"name": NAME, "description": SPEC.description} in listing["architectures"]
    (preset,) = [p for p in listing["presets"] if p["arch"] == NAME]
    assert preset["repository"] == "example/toynet" and preset["options"] == {"n_feats": 8}
    assert preset["parameters"] == sum(p.numel() for p in create(NAME, 2, n_feats=8).parameters())
    assert main(["models"]) == 0
    assert SPEC.description in capsys.readouterr().out


def test_convert_a_saved_checkpoint(
    toy: ArchSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _toy_model(3).eval()
    src = tmp_path / "toy_x3.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "toy_x3.safetensors"
    assert main(["convert", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{NAME} (from the weights); options read: n_feats=6" in printed
    assert f"loaded strictly as {NAME} x3" in printed
    _, config = read_state_dict(out)
    assert (config["arch"], config["scale"], config["options"]) == (NAME, 3, {"n_feats": 6})
    x = torch.rand(1, 3, 5, 7)
    with torch.no_grad():
        assert torch.equal(load(out)(x), model(x))


def test_eval_with_weights(
    toy: ArchSpec, tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _toy_model(2).eval()
    weights = tmp_path / "toy.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "res.json"
    argv = ["eval", "--weights", str(weights), "--data", "Toy", "--scale", "2"]
    assert main([*argv, "--data-root", str(toy_root), "--json", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"model: {NAME} ({weights})"
    (result,) = json.loads(out.read_text())["results"]
    direct = evaluate(model, "Toy", 2, data_root=toy_root)
    assert result["model"] == NAME and direct.model == NAME
    assert result["psnr"] == pytest.approx(direct.psnr, abs=1e-9)
    assert result["ssim"] == pytest.approx(direct.ssim, abs=1e-9)


def test_bench_measures_it_in_its_small_configuration(toy: ArchSpec, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--models", NAME, "--blocks", "none", "--sizes", "16", "--repeat", "1"]
    assert main([*argv, "--warmup", "0", "--mode", "infer", "--quiet", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["kind"], row["name"], row["size"], row["status"]) == ("model", NAME, 16, "ok")
    small = sum(p.numel() for p in ToyNet(2, **small_config(NAME)).parameters())
    assert row["parameters"] == small != sum(p.numel() for p in ToyNet(2).parameters())
