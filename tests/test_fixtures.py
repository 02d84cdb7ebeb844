"""Official-model parity: every case in ../shared/fixtures/official loads through ``nlsr.load``
and reproduces the output the authors' code computed (max abs error <= 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, require

import nlsr

TOLERANCE = 1e-5
CASES = sorted(p.parent.name for p in FIXTURES.glob("*/case.json")) if FIXTURES.is_dir() else []


def _run(model: torch.nn.Module, folder: Path) -> torch.Tensor:
    """Forward the case input, replaying the recorded hashing projections in forward order."""
    projections = folder / "projections.pt"
    if projections.exists():
        draws = torch.load(projections, weights_only=True)
        hashing = [m for m in model.modules() if hasattr(m, "projections")]
        assert len(hashing) == len(draws), "one recorded draw per hashing attention module"
        for module, draw in zip(hashing, draws, strict=True):
            module.projections = draw
    x = torch.load(folder / "input.pt", weights_only=True)
    with torch.no_grad():
        return model(x)


def _reference(folder: Path) -> torch.Tensor:
    stable = folder / "output_stable_sort.pt"
    return torch.load(stable if stable.exists() else folder / "output.pt", weights_only=True)


@pytest.fixture(params=CASES or [None], ids=CASES or ["no-fixtures"])
def case_dir(request: pytest.FixtureRequest) -> Path:
    require(FIXTURES)
    if request.param is None:
        pytest.skip(f"no case folders in {FIXTURES}")
    return FIXTURES / request.param


@pytest.mark.shared
@pytest.mark.parametrize("explicit_arch", [True, False], ids=["arch-given", "arch-detected"])
def test_official_parity(case_dir: Path, explicit_arch: bool) -> None:
    case = json.loads((case_dir / "case.json").read_text())
    kwargs = dict(case["not_inferable_from_weights"])
    if explicit_arch:
        kwargs.update(arch=case["arch"], scale=case["scale"])
    model = nlsr.load(case_dir / "checkpoint.pt", **kwargs)
    assert not model.training
    assert nlsr.resolve_model(model).arch == case["arch"]
    assert model.scale == case["scale"]
    out = _run(model, case_dir)
    ref = _reference(case_dir)
    assert out.shape == ref.shape == tuple(case["output_shape"])
    err = (out - ref).abs().max().item()
    assert err <= TOLERANCE, f"{case_dir.name}: max abs error {err:.3g} > {TOLERANCE}"
