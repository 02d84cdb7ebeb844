"""Behaviour every network shares: EDSR/RCAN official parity, any input size, training reduces
the loss, RCAN's attention insertion, and the paper-size parameter counts (``nlsr models``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import FIXTURES, require

from nlsr.cli import main
from nlsr.cli.models import count_parameters
from nlsr.models import available, create

#: Small configurations of every architecture (fast on CPU, same code paths as the paper sizes).
SMALL: dict[str, dict[str, Any]] = {
    "edsr": {"n_resblocks": 2, "n_feats": 16},
    "rcan": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16, "reduction": 4},
    "nlsn": {"n_resblocks": 2, "n_feats": 16, "chunk_size": 16, "n_hashes": 2},
    "dlsn": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16, "chunk_size": 16, "n_hashes": 2},
    "hspan": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16, "topk": 16},
    "lcoan": {
        "n_resgroups": 2,
        "n_resblocks": 1,
        "n_feats": 16,
        "n_clusters": 8,
        "window_size": 16,
    },
    "csnln": {"n_feats": 8, "depth": 2},
}

#: Parameter counts the papers report for their x2 models, in millions (and the digits shown).
PAPER_MILLIONS = {
    "edsr": (40.7, 1),
    "rcan": (15.4, 1),
    "nlsn": (41.80, 2),
    "dlsn": (69.84, 2),
    "hspan": (32.29, 2),
    "lcoan": (15.67, 2),
    "csnln": (3.06, 2),
}
PAPER_OPTIONS: dict[str, dict[str, Any]] = {
    "edsr": {"n_resblocks": 32, "n_feats": 256},
    "rcan": {"n_resgroups": 10, "n_resblocks": 20, "n_feats": 64, "reduction": 16},
    "nlsn": {"n_resblocks": 32, "n_feats": 256},
    "dlsn": {"n_resgroups": 10, "n_resblocks": 4, "n_feats": 256, "chunk_size": 128},
    "hspan": {"n_resgroups": 10, "n_resblocks": 4, "n_feats": 192, "reduction": 2},
    "lcoan": {"n_resgroups": 10, "n_resblocks": 4, "n_feats": 128, "n_clusters": 128},
    "csnln": {"n_feats": 128, "depth": 12},
}


def small(arch: str, scale: int = 2, **extra: Any) -> torch.nn.Module:
    """A small, seeded instance of ``arch``."""
    torch.manual_seed(0)
    return create(arch, scale, **{**SMALL[arch], **extra})


def _seed_hashing(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every random hashing draw repeatable (same draws at every forward)."""
    for m in model.modules():
        if hasattr(m, "generator"):
            m.generator = torch.Generator().manual_seed(seed)


@pytest.mark.shared
@pytest.mark.parametrize("arch", ["edsr", "rcan"])
def test_backbone_official_parity(arch: str) -> None:
    folder = require(FIXTURES / f"{arch}_x2")
    case = json.loads((folder / "case.json").read_text())
    options = {
        k: v for k, v in case["official_args"].items() if k in SMALL[arch] or k == "res_scale"
    }
    if arch == "rcan":
        options.pop("res_scale")  # RCAN ignores it (the released RCAB never scales)
    model = create(arch, case["scale"], **options).eval()
    model.load_state_dict(torch.load(folder / "checkpoint.pt", weights_only=True), strict=True)
    with torch.no_grad():
        out = model(torch.load(folder / "input.pt", weights_only=True))
    err = (out - torch.load(folder / "output.pt", weights_only=True)).abs().max().item()
    assert err <= 1e-6, f"{arch}: max abs error {err:.3g}"


@pytest.mark.parametrize("arch", list(SMALL))
def test_any_input_size(arch: str) -> None:
    model = small(arch).eval()
    for h, w in [(1, 1), (5, 7), (13, 200), (64, 64)]:
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, 3, 2 * h, 2 * w), f"{arch} {h}x{w} -> {tuple(y.shape)}"
        assert torch.isfinite(y).all()


@pytest.mark.parametrize(("arch", "scale"), [("edsr", 3), ("rcan", 3), ("rcan", 4)])
def test_backbone_scales(arch: str, scale: int) -> None:
    model = small(arch, scale).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 5, 7))
    assert y.shape == (1, 3, 5 * scale, 7 * scale)


@pytest.mark.parametrize("arch", list(SMALL))
def test_training_step_reduces_loss(arch: str) -> None:
    model = small(arch).train()
    g = torch.Generator().manual_seed(1)
    lr, hr = torch.rand(1, 3, 10, 10, generator=g), torch.rand(1, 3, 20, 20, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        _seed_hashing(model)
        return torch.nn.functional.l1_loss(model(lr), hr)

    first = loss()
    for _ in range(3):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        last = loss()
    assert last.item() < first.item(), f"{arch}: loss {first.item():.4f} -> {last.item():.4f}"


def test_rcan_structure_and_attention() -> None:
    plain = small("rcan")
    assert plain.chop_min_size == 160000 and plain.scale == 2 and plain.rgb_range == 1
    # key layout of the released code: group g, RCAB b, channel attention at body.3
    keys = set(plain.state_dict())
    assert "body.1.body.0.body.3.conv_du.0.weight" in keys and "body.1.body.1.weight" in keys
    assert "body.2.weight" in keys and "body.3.weight" not in keys
    from nlsr.models.rcan import ResidualGroup

    middle = small("rcan", attention="nla")  # once, before the middle group
    assert [isinstance(m, ResidualGroup) for m in middle.body] == [True, False, True, False]
    every = small("rcan", attention="nla", attention_every=1)  # before every group
    assert [isinstance(m, ResidualGroup) for m in every.body] == [False, True, False, True, False]
    assert not isinstance(every.body[0], torch.nn.Conv2d)
    with torch.no_grad():
        assert every.eval()(torch.rand(1, 3, 9, 6)).shape == (1, 3, 18, 12)


@pytest.mark.parametrize("arch", list(PAPER_MILLIONS))
def test_paper_parameter_counts(arch: str) -> None:
    reported, digits = PAPER_MILLIONS[arch]
    assert round(count_parameters(arch, 2, **PAPER_OPTIONS[arch]) / 1e6, digits) == reported


def test_models_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {a["name"] for a in listing["architectures"]} == set(available())
    assert {"nla", "nlsa", "gla", "hspa", "lcoa", "csna"} <= {
        b["name"] for b in listing["attention"]
    }
    counts = {p["arch"]: p["parameters"] for p in listing["presets"]}
    for arch, (reported, digits) in PAPER_MILLIONS.items():
        assert round(counts[arch] / 1e6, digits) == reported, arch
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "41.80M" in text and "69.84M" in text and "gla" in text


def test_small_configs_cover_every_network() -> None:
    assert set(SMALL) == set(available()) - {"bicubic"}
