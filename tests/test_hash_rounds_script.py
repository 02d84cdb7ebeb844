"""scripts/hash_rounds.py: the rule that picks the inference hash rounds."""

from __future__ import annotations

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def hash_rounds():
    yield from load_script("hash_rounds")


def _row(scale: int, rounds: int, set5: float, set14: float) -> dict:
    return {"scale": scale, "rounds": rounds, "Set5": [set5, 0.9], "Set14": [set14, 0.8]}


def test_fewest_rounds_within_the_tolerance_of_the_best(hash_rounds) -> None:
    rows = [
        _row(2, 1, 37.00, 33.00),  # mean 35.000: 0.03 below the best
        _row(2, 2, 37.02, 33.02),  # mean 35.020: within 0.02 of the best
        _row(2, 3, 37.03, 33.03),  # the best, 35.030
        _row(4, 1, 31.00, 28.00),  # best already with one round
        _row(4, 2, 30.99, 28.00),
    ]
    assert hash_rounds.choose(rows, ["Set5", "Set14"], 0.02) == {2: 2, 4: 1}
    assert hash_rounds.choose(rows, ["Set5", "Set14"], 0.0) == {2: 3, 4: 1}
    assert hash_rounds.choose(rows, ["Set5"], 0.05) == {2: 1, 4: 1}
