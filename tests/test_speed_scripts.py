"""scripts/infer_speed.py and scripts/train_speed.py: what their figures rest on."""

from __future__ import annotations

import json

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


@pytest.fixture(scope="module")
def network_speed():
    yield from load_script("network_speed")


def test_network_speed_table_at_tiny_size(network_speed, tmp_path, capsys) -> None:
    """A real run of the small networks on 12x12 crops: one row per network and mode, positive
    times, ratios consistent with them; nlsr's fp32 output equals the released form's (HSPA and
    cross-scale attention against their released computation), bf16 stays within a grey level;
    the grey-level table compares 8-bit outputs of the bundled sample."""
    from nlsr.bench.inputs import sample_path

    data = tmp_path / "bench"
    (data / "Tiny" / "HR").mkdir(parents=True)
    (data / "Tiny" / "HR" / "sample.png").write_bytes(sample_path().read_bytes())
    out = tmp_path / "speed.json"
    argv = ["--small", "--networks", "hspan,csnln,edsr", "--size", "12", "--repeat", "1"]
    argv += ["--grey", "Tiny", "--grey-size", "12", "--data", str(data), "--json", str(out)]
    report = network_speed.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    assert [(r["network"], r["mode"]) for r in rows] == [
        (n, m) for n in ("hspan", "csnln", "edsr") for m in ("infer", "train")
    ]
    assert [r["released_form"] for r in rows] == [True, True, True, True, False, False]
    for r in rows:
        s = r["seconds"]
        assert set(s) == {"released", "fp32", "auto"} and all(t > 0 for t in s.values())
        assert r["speedup"]["auto"] == pytest.approx(s["released"] / s["auto"])
        assert r["max_abs_diff"]["released"] == 0
        assert r["max_abs_diff"]["fp32"] < 1e-5, r
        assert r["max_abs_diff"]["auto"] < 1 / 255, r
    grey = report["grey"]
    assert [g["network"] for g in grey] == ["hspan", "csnln", "edsr"]
    for g in grey:
        assert g["images"] == 1 and 0 <= g["mean"] <= g["p99"] <= g["max"] <= 2, g
    table = capsys.readouterr().out
    assert table.count(" infer ") == 3 and table.count(" train ") == 3
    assert "edsr*" in table and "hspan*" not in table


def test_network_speed_names_unknown_networks(network_speed, capsys) -> None:
    with pytest.raises(SystemExit):
        network_speed.main(["--networks", "dlsn,vdsr"])
    assert "--networks: unknown vdsr" in capsys.readouterr().err
