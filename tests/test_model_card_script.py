"""scripts/model_card.py: ``card --reuse`` takes earlier scores only for the scales whose
shipped file is the one that was measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "model_card.py"


@pytest.fixture(scope="module")
def model_card():
    spec = importlib.util.spec_from_file_location("model_card_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


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
