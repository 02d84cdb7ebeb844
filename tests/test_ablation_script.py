"""scripts/ablation.py: every variant differs from the others only in its attention, the schedule
keeps its shape at any run length, the report table is computed from the scores, and scores
of the whole sets and of subsets are kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

from nlsr.models import create


@pytest.fixture(scope="module")
def ablation():
    yield from load_script("ablation")


def test_variants_differ_only_in_attention(ablation, tmp_path):
    args = ablation.parse_args(["--iterations", "800"])
    configs = {n: ablation.variant_config(n, args, tmp_path / n) for n in ablation.VARIANTS}
    reference = configs["none"]
    assert reference.model.options.get("attention") is None
    for name, cfg in configs.items():
        block, options, _ = ablation.VARIANTS[name]
        assert cfg.model.options.get("attention") == block
        assert (cfg.model.options.get("attention_options") or {}) == options
        assert Path(cfg.run_dir) == tmp_path / name
        for section in ("data", "optim", "train"):
            assert getattr(cfg, section) == getattr(reference, section), (name, section)
    # 10,000-iteration base milestones 6000/8000/9000 -> the same fractions of 800 iterations.
    assert reference.optim.milestones == [480, 640, 720]
    assert reference.train.iterations == 800


def test_gla_fixed_has_no_learnable_term(ablation, tmp_path):
    args = ablation.parse_args(["--iterations", "10"])
    sizes = {}
    for name in ("gla", "gla-fixed", "none"):
        cfg = ablation.variant_config(name, args, tmp_path / name)
        torch.manual_seed(0)
        net = create(cfg.model.arch, cfg.model.scale, **cfg.model.options)
        sizes[name] = sum(p.numel() for p in net.parameters())
    assert sizes["none"] < sizes["gla-fixed"] < sizes["gla"]


def test_unknown_variant_is_refused(ablation, capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--variants", "none,bogus"])
    assert "unknown bogus" in capsys.readouterr().err


def test_table_reports_differences_to_the_backbone(ablation):
    args = ablation.parse_args(["--iterations", "800", "--tile", "64"])

    def scores(set5: float, urban: float) -> dict:
        return {
            "parameters": 500_000,
            "train_it_per_s": 1.25,
            "sets": {
                "Set5": {"psnr": set5, "ssim": 0.9},
                "Urban100": {"psnr": urban, "ssim": 0.8},
            },
        }

    text = ablation.table({"none": scores(36.0, 29.0), "gla": scores(36.25, 29.5)}, args)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "+0.250 | +0.500 |" in rows["gla"]
    assert "+0.000 | +0.000 |" in rows["none"]
    assert "not scored" in rows["nla"]
    assert "800 iterations per variant" in text and "tiles of 64 px" in text


def test_subset_scores_have_their_own_file_and_table(ablation, tmp_path):
    full = ablation.parse_args(["--iterations", "800", "--tile", "64"])
    first20 = ablation.parse_args(["--iterations", "800", "--tile", "64", "--max-images", "20"])
    run = tmp_path / "gla"
    run.mkdir()
    for args, psnr in ((full, 27.9), (first20, 26.1)):
        record = {"settings": ablation.settings_of(args), "sets": {"Urban100": {"psnr": psnr}}}
        (run / f"scores{ablation.subset_key(args)}.json").write_text(json.dumps(record))
    assert ablation.cached_scores(run, full)["sets"]["Urban100"]["psnr"] == 27.9
    assert ablation.cached_scores(run, first20)["sets"]["Urban100"]["psnr"] == 26.1
    # Scores computed with other settings (here: another tile size) are not reused.
    other_tile = ablation.parse_args(["--iterations", "800", "--tile", "96"])
    assert ablation.cached_scores(run, other_tile) is None

    page = tmp_path / "ablation.md"
    page.write_text(
        "intro\n<!-- ablation:results:start -->\nold all\n<!-- ablation:results:end -->\n"
        "between\n<!-- ablation:results-first20:start -->\nold subset\n"
        "<!-- ablation:results-first20:end -->\nend\n"
    )
    ablation.write_report(page, "new subset", ablation.subset_key(first20))
    text = page.read_text()
    assert "old all" in text and "new subset" in text and "old subset" not in text
    assert text.startswith("intro\n") and text.endswith("end\n")
    with pytest.raises(SystemExit, match="ablation:results-first5"):
        ablation.write_report(page, "x", "-first5")
