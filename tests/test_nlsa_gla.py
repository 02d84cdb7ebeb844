"""NLSA / GLA blocks and the NLSN / DLSN networks: official parity, hashing, sizes, training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, require

import nlsr.models as models
from nlsr.attention import create_attention
from nlsr.attention.buckets import bucket_count
from nlsr.attention.gla import GlobalLearnableAttention
from nlsr.attention.nlsa import NonLocalSparseAttention
from nlsr.attention.reference import ReleasedBucketAttention, released_baseline

HASHING = {"nlsn": NonLocalSparseAttention, "dlsn": GlobalLearnableAttention}


def _load(path):
    return torch.load(path, weights_only=True)


def _official_model(case: str):
    folder = require(FIXTURES / case)
    meta = json.loads((folder / "case.json").read_text())
    args = {k: v for k, v in meta["official_args"].items() if not k.endswith("_note")}
    model = models.create(meta["arch"], **args).eval()
    model.load_state_dict(_load(folder / "checkpoint.pt"), strict=True)
    blocks = [m for m in model.modules() if isinstance(m, HASHING[meta["arch"]])]
    return folder, model, blocks


@pytest.mark.shared
@pytest.mark.parametrize("case", ["nlsn_x2", "dlsn_x2"])
def test_official_parity_stable_sort(case):
    folder, model, blocks = _official_model(case)
    projections = _load(folder / "projections.pt")
    assert len(blocks) == len(projections)
    for block, proj in zip(blocks, projections, strict=True):
        block.projections = proj
    with torch.no_grad():
        out = model(_load(folder / "input.pt"))
    err = (out - _load(folder / "output_stable_sort.pt")).abs().max().item()
    print(f"{case}: max abs error vs output_stable_sort.pt = {err:.3g}")
    assert err <= 1e-5
    # The hashing matters: fresh projections move the output by ~1e-4 (README).
    for block in blocks:
        block.projections = None
        block.generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        fresh = model(_load(folder / "input.pt"))
    assert (fresh - out).abs().max().item() > 1e-5


@pytest.mark.shared
@pytest.mark.parametrize("case", ["nlsn_x2", "dlsn_x2"])
def test_global_rng_draws_as_released(case):
    """With the fixture's forward seed, the blocks draw exactly the recorded projections."""
    folder, _, blocks = _official_model(case)
    torch.manual_seed(1234)
    for block, proj in zip(blocks, _load(folder / "projections.pt"), strict=True):
        n_buckets = proj.shape[-1] * (2 if case == "nlsn_x2" else 1)
        drawn = block.draw_projections(n_buckets, torch.device("cpu"))
        torch.testing.assert_close(drawn, proj, rtol=0, atol=1e-6)


def test_paper_parameter_counts():
    with torch.device("meta"):
        counts = {name: models.create(name, 2) for name in ("nlsn", "dlsn")}
    millions = {k: sum(p.numel() for p in m.state_dict().values()) / 1e6 for k, m in counts.items()}
    assert round(millions["nlsn"], 2) == 41.80
    assert round(millions["dlsn"], 2) == 69.84
    assert all(m.chop_min_size == 120000 for m in counts.values())


@pytest.mark.parametrize("name", ["nlsa", "gla"])
def test_blocks_any_size(name):
    block = create_attention(name, 8, chunk_size=16, n_hashes=2)
    for h, w in [(1, 1), (5, 7), (13, 200), (64, 64)]:
        x = torch.randn(2, 8, h, w)
        with torch.no_grad():
            y = block(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["nlsn", "dlsn"])
def test_networks_any_size(name):
    small = {"nlsn": {"n_resblocks": 1}, "dlsn": {"n_resgroups": 1, "n_resblocks": 1}}[name]
    for scale in (2, 3):
        model = models.create(name, scale, n_feats=8, chunk_size=16, **small).eval()
        for h, w in [(1, 1), (5, 7), (13, 200)]:
            with torch.no_grad():
                y = model(torch.rand(1, 3, h, w))
            assert y.shape == (1, 3, scale * h, scale * w)


@pytest.mark.parametrize("name", ["nlsa", "gla"])
def test_generator_determinism_and_fresh_draws(name):
    torch.manual_seed(0)
    block = create_attention(name, 8, chunk_size=16).eval()
    x = torch.randn(1, 8, 24, 24)
    with torch.no_grad():
        block.generator = torch.Generator().manual_seed(5)
        a = block(x)
        block.generator = torch.Generator().manual_seed(5)
        b = block(x)
        block.generator = None
        c, d = block(x), block(x)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)


@pytest.mark.parametrize("name", ["nlsa", "gla"])
def test_projections_are_used_and_checked(name):
    torch.manual_seed(1)
    block = create_attention(name, 8, chunk_size=16, n_hashes=2).eval()
    x = torch.randn(1, 8, 12, 12)  # L = 144: 9 chunks -> 10 buckets
    cols = 5 if name == "nlsa" else 10
    block.projections = torch.randn(2, 2, cols + 1)
    with pytest.raises(ValueError, match="projections have shape"):
        block(x)
    block.projections = torch.randn(2, 2, cols, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y1, y2 = block(x), block(x)
        block.projections = -block.projections
        y3 = block(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_gla_learnable_term_and_ablation():
    torch.manual_seed(2)
    full = GlobalLearnableAttention(8, chunk_size=16, n_hashes=2).eval()
    plain = GlobalLearnableAttention(8, chunk_size=16, n_hashes=2, learnable=False).eval()
    assert not hasattr(plain, "fc")
    plain.load_state_dict(full.state_dict(), strict=False)
    proj = torch.randn(2, 2, 4)
    full.projections = plain.projections = proj
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(full(x), plain(x), atol=1e-6)
        full.fc[2].weight.zero_()
        full.fc[2].bias.zero_()
        torch.testing.assert_close(full(x), plain(x))


def test_gla_super_bit_orthogonalises_in_batches():
    block = GlobalLearnableAttention(16, chunk_size=4, n_hashes=2, super_bit=True)
    block.generator = torch.Generator().manual_seed(0)
    d = 4
    w = block.draw_projections(10, torch.device("cpu"))  # 10 directions: batches 4, 4, 2
    assert w.shape == (d, 2, 10)
    for r in range(2):
        for lo, hi in [(0, 4), (4, 8), (8, 10)]:
            cols = w[:, r, lo:hi]
            torch.testing.assert_close(cols.T @ cols, torch.eye(hi - lo), rtol=0, atol=1e-5)
    released = GlobalLearnableAttention(16, chunk_size=4, n_hashes=2)
    released.generator = torch.Generator().manual_seed(0)
    rows = released.draw_projections(10, torch.device("cpu"))[:, 0]  # 10 > d: orthonormal rows
    torch.testing.assert_close(rows @ rows.T, torch.eye(d), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["nlsn", "dlsn"])
def test_training_step_lowers_loss_and_reaches_hashing_embedding(name):
    torch.manual_seed(0)
    small = {"nlsn": {"n_resblocks": 1}, "dlsn": {"n_resgroups": 1, "n_resblocks": 1}}[name]
    model = models.create(name, 2, n_feats=8, chunk_size=16, **small)
    for m in model.modules():
        if isinstance(m, (NonLocalSparseAttention, GlobalLearnableAttention)):
            m.generator = torch.Generator().manual_seed(1)
    lr = torch.rand(2, 3, 12, 12)
    hr = torch.nn.functional.interpolate(lr, scale_factor=2, mode="nearest")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.l1_loss(model(lr), hr)
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            block = next(m for m in model.modules() if hasattr(m, "conv_match"))
            assert block.conv_match[0].weight.grad.abs().sum() > 0
            if name == "dlsn":
                assert block.fc[0].weight.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- the benchmark baseline


@pytest.mark.shared
@pytest.mark.parametrize("case", ["nlsn_x2", "dlsn_x2"])
@pytest.mark.parametrize(
    ("stable", "reference"), [(False, "output.pt"), (True, "output_stable_sort.pt")]
)
def test_released_baseline_reproduces_the_official_outputs(case, stable, reference):
    """The benchmark's re-implementation of the released approach (attention.reference)
    computes what the released code computed, even its as-run tie order with the default
    (unstable) sort."""
    folder, model, _ = _official_model(case)
    model = released_baseline(model)
    baselines = [m for m in model.modules() if isinstance(m, ReleasedBucketAttention)]
    for baseline, proj in zip(baselines, _load(folder / "projections.pt"), strict=True):
        baseline.block.projections = proj
        baseline.stable_sort = stable
    with torch.no_grad():
        out = model(_load(folder / "input.pt"))
    assert (out - _load(folder / reference)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["nlsa", "gla"])
def test_released_baseline_equals_the_blocks(name):
    """Same parameters and draws, ties in position order: the released approach and nlsr's
    blocked computation agree to float rounding, at sizes with and without tail padding."""
    torch.manual_seed(0)
    block = create_attention(name, 16, chunk_size=24, n_hashes=2)
    baseline = ReleasedBucketAttention(block, stable_sort=True)
    for hw in [(12, 12), (13, 17)]:
        x = torch.randn(2, 16, *hw)
        with torch.no_grad():
            block.generator = torch.Generator().manual_seed(3)
            ours = block(x)
            block.generator = torch.Generator().manual_seed(3)
            theirs = baseline(x)
        assert (ours - theirs).abs().max().item() <= 1e-5
        assert (ours - x).abs().max().item() > 1e-3  # the attention is not negligible


# ---------------------------------------------------------------- attention backends


@pytest.mark.parametrize("name", ["nlsa", "gla"])
def test_sdpa_backend_equals_blocked_in_the_blocks(name):
    """One hash round: the same block computed with SDPA and with the blocked path gives the same
    output and gradients (input and parameters), with and without tail padding."""
    torch.manual_seed(0)
    blocked = create_attention(name, 8, chunk_size=16, n_hashes=1, attention_backend="blocked")
    sdpa = create_attention(name, 8, chunk_size=16, n_hashes=1, attention_backend="sdpa")
    sdpa.load_state_dict(blocked.state_dict())
    blocked, sdpa = blocked.double(), sdpa.double()
    for hw in [(8, 8), (7, 9)]:  # 4 chunks; 63 positions -> 4 chunks, the last one padded
        x = torch.randn(2, 8, *hw, dtype=torch.float64)
        results = []
        for block in (blocked, sdpa):
            block.zero_grad()
            block.generator = torch.Generator().manual_seed(3)
            xi = x.clone().requires_grad_()
            out = block(xi)
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            (out * weight).sum().backward()
            grads = [xi.grad] + [p.grad for p in block.parameters()]
            results.append((out, grads))
        (out_b, grads_b), (out_s, grads_s) = results
        torch.testing.assert_close(out_s, out_b, rtol=0, atol=1e-10)
        assert (out_b - x).abs().max().item() > 1e-3  # the attention is not negligible
        for gs, gb in zip(grads_s, grads_b, strict=True):
            torch.testing.assert_close(gs, gb, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block", [NonLocalSparseAttention, GlobalLearnableAttention])
def test_attention_backend_option_is_checked(block):
    with pytest.raises(ValueError, match="attention backend must be one of"):
        block(8, chunk_size=16, attention_backend="fused")
    several = block(8, chunk_size=16, n_hashes=2, attention_backend="sdpa")
    with pytest.raises(ValueError, match="got 2 rounds"), torch.no_grad():
        several(torch.randn(1, 8, 6, 6))
    assert "attention_backend" not in " ".join(several.state_dict())


@pytest.mark.parametrize("grad", [False, True])
def test_gla_learnable_term_matches_fc_as_a_tensor(monkeypatch, grad):
    """GLA hands ``fc`` to the attention by its parts (evaluated in slices of positions,
    recomputed block by block in the backward pass); its output and every gradient equal
    those of the block whose bias ``fc(f)`` is made by ``nn.Sequential`` and passed whole."""
    from nlsr.attention import buckets, gla

    torch.manual_seed(0)
    block = create_attention("gla", 8, chunk_size=6, n_hashes=2).double()
    block.projections = block.draw_projections(
        bucket_count(60, 6), torch.device("cpu"), torch.float64
    )
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    weight = torch.randn(2, 8, 6, 10, dtype=torch.float64)

    def run() -> list[torch.Tensor]:
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = block(xi)
        if not grad:
            return [y]
        return [y.detach(), *torch.autograd.grad((y * weight).sum(), [xi, *block.parameters()])]

    monkeypatch.setattr(gla, "STORED_TERM_ELEMENTS", 0)  # never kept whole: recomputed
    monkeypatch.setattr(gla, "MLP_SLICE", 7)  # several slices per batch item
    monkeypatch.setattr(buckets, "BLOCK_ELEMENTS", 3 * 6 * 6)  # one chunk per block
    parts = run()
    monkeypatch.setattr(  # the reference: nn.Sequential on the whole map, a tensor bias
        block,
        "_learnable_term",
        lambda x: block.fc(block.conv_assembly_fc(x).flatten(2).transpose(1, 2)),
    )
    whole = run()
    assert len(parts) == (2 + len(list(block.parameters())) if grad else 1)
    for a, b in zip(parts, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if grad:
        monkeypatch.undo()
        assert torch.autograd.gradcheck(block, (x.clone().requires_grad_(),), fast_mode=True)


def test_gla_keeps_a_small_learnable_term_whole_and_recomputes_a_large_one(monkeypatch):
    """Training keeps ``fc(f)`` whole up to STORED_TERM_ELEMENTS values, beyond that hands it
    to the attention by its parts; inference always evaluates it (in slices)."""
    from nlsr.attention import gla
    from nlsr.attention.gla import KeyBiasMLP

    block = create_attention("gla", 8, chunk_size=6, n_hashes=1)
    x = torch.randn(2, 8, 5, 4)  # 2 x 20 positions x 6 slots = 240 values
    monkeypatch.setattr(gla, "STORED_TERM_ELEMENTS", 240)
    assert isinstance(block._learnable_term(x), torch.Tensor)
    monkeypatch.setattr(gla, "STORED_TERM_ELEMENTS", 239)
    assert isinstance(block._learnable_term(x), KeyBiasMLP)
    with torch.no_grad():
        term = block._learnable_term(x)
    assert isinstance(term, torch.Tensor) and term.shape == (2, 20, 6)
