"""scripts/model_card.py: ``card --reuse`` takes earlier scores only for the scales whose
shipped file is the one that was measured."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def model_card():
    yield from load_script("model_card")


def test_reuse_skips_retrained_scales(model_card, tmp_path, capsys):
    sets = ("Set5", "Urban100")
    row = {"bicubic": {"Set5": [33.7, 0.93], "Urban100": [26.9, 0.84]}}
    payload = {
        "results": {"2": row, "4": row, "3": row},
        "sha256": {"2": "aaa", "4": "old", "3": "ccc"},
    }
    path = tmp_path / "card.json"
    path.write_text(json.dumps(payload))
    shipped = {2: SimpleNamespace(sha256="aaa"), 4: SimpleNamespace(sha256="new")}
    reused = model_card._reused(path, shipped, sets)
    # x2 is unchanged: reused; x4 was re-trained: measured again; x3 is no longer shipped.
    assert reused == {2: {"bicubic": {"Set5": (33.7, 0.93), "Urban100": (26.9, 0.84)}}}
    assert "x4 was measured with other weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lacks some of the sets"):
        model_card._reused(path, shipped, (*sets, "B100"))
