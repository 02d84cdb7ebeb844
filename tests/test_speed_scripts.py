"""scripts/infer_speed.py and scripts/train_speed.py: what their figures rest on."""

from __future__ import annotations

import pytest
from conftest import load_script

from nlsr.models import create


@pytest.fixture(scope="module")
def infer_speed():
    yield from load_script("infer_speed")


@pytest.fixture(scope="module")
def train_speed():
    yield from load_script("train_speed")


def test_multiply_adds_of_the_imdn_cost_reference_match_the_closed_form(infer_speed) -> None:
    """EDSR 7x64 at x2, per output pixel: on LR pixels (4 output pixels each) the mean shift
    (3x3 1x1), head (3 -> 64), 14 block convs and the trunk conv (64 -> 64), the upsampler conv
    (64 -> 256); on HR pixels the tail conv (64 -> 3) and the mean shift back."""
    k = 9
    per_lr = 3 * 3 + 64 * 3 * k + 15 * 64 * 64 * k + 256 * 64 * k
    per_hr = 3 * 64 * k + 3 * 3
    expected = per_lr / 4 + per_hr
    model = create("edsr", 2, **infer_speed.REFERENCE)
    assert infer_speed.macs_per_output_pixel(model, 2) == expected
    imdn = infer_speed.IMDN_MACS_720P / (1280 * 720)
    assert 1.0 < expected / imdn < 1.05  # "a network of IMDN's cost"


def test_train_speed_names_unknown_variants(train_speed, capsys) -> None:
    with pytest.raises(SystemExit):
        train_speed.main(["--variants", "fp32,fp8"])
    assert "unknown fp8" in capsys.readouterr().err
