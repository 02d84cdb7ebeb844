"""nlsr explain: the attention rows it reports are the ones the blocks used.

Every architecture (small configs): the rows of all positions, applied to the block's own values,
give the block's output on the captured input (so they are the run's rows, draws included);
planted inputs and float64 dense references check the rows themselves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nlsr.attention import create_attention
from nlsr.attention.cross_scale import ASSEMBLY_DIVISOR, CrossScaleAttention, same_pad
from nlsr.attention.lcoa import LCoA
from nlsr.attention.reference import naive_sparsemax
from nlsr.explain import attention_blocks, explain
from nlsr.explain.capture import capture
from nlsr.explain.rows import attention_rows
from nlsr.models import create
from nlsr.models.resolve import resolve_model
from nlsr.padding import pad_to_multiple

SMALL = {
    "dlsn": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16, "chunk_size": 32, "n_hashes": 2},
    "nlsn": {"n_resblocks": 2, "n_feats": 16, "chunk_size": 32, "n_hashes": 2},
    "hspan": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16},
    "lcoan": {
        "n_resgroups": 2,
        "n_resblocks": 1,
        "n_feats": 16,
        "n_clusters": 4,
        "window_size": 32,
    },
    "csnln": {"n_feats": 16, "depth": 1},
    "edsr": {"n_resblocks": 2, "n_feats": 16, "attention": "nla"},
    "rcan": {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 16, "attention": "hspa"},
}


def _network(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create(arch, 2, **SMALL[arch]).eval()


def _all_rows(c, h: int, w: int):
    positions = torch.arange(h * w)
    return attention_rows(c.block, c.kind, c.input, positions, c.generator_state)


def _values(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's values ``[L, C]`` (its ``conv_assembly``)."""
    return block.conv_assembly(x)[0].flatten(1).t()


def _block_output(c, x: torch.Tensor) -> torch.Tensor:
    """The block run on its captured input with the run's generator state."""
    saved = getattr(c.block, "generator", None)
    if c.generator_state is not None:
        c.block.generator = torch.Generator()
        c.block.generator.set_state(c.generator_state)
    try:
        return c.block(x)
    finally:
        if c.generator_state is not None:
            c.block.generator = saved


def _cross_scale_output(block: CrossScaleAttention, x: torch.Tensor, weights: torch.Tensor):
    """The released paste: key-grid weights ``[L, kh, kw]`` of every query as a transposed
    convolution with the value patches (stride ``s``), divided by 6."""
    s, k = block.scale, block.ksize
    h0, w0 = x.shape[-2:]
    x, _, _ = pad_to_multiple(x, s)
    h, w = x.shape[-2:]
    embed = block.conv_assembly(x)
    raw = F.unfold(same_pad(embed, k * s, s), k * s, stride=s)
    raw = raw.view(1, embed.shape[1], k * s, k * s, -1).permute(0, 4, 1, 2, 3)[0]
    maps = torch.zeros(1, weights[0].numel(), h, w, dtype=weights.dtype)
    maps[0, :, :h0, :w0] = weights.reshape(h0, w0, -1).permute(2, 0, 1)
    out = F.conv_transpose2d(maps, raw, stride=s, padding=(k - 1) * s // 2)
    return (out / ASSEMBLY_DIVISOR)[..., : s * h0, : s * w0]


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_rows_reproduce_every_block(arch: str) -> None:
    """For each block: rows sum to 1, and rows @ values (+ the block's residual) equal the
    block's own output on the captured input (its kernel, an independent computation)."""
    model = _network(arch)
    lr = torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(1))
    captured, _ = capture(resolve_model(model), lr)
    assert len(captured) == len(attention_blocks(model)) > 0
    patterns = {}
    for c in captured:
        x = c.input
        h, w = x.shape[-2:]
        with torch.inference_mode():
            if c.shared_from is not None:  # LCoAN: this block applies an earlier block's pattern
                owner = next(o for o in captured if o.index == c.shared_from)
                rows = _all_rows(owner, h, w)
                expected = c.block.forward_shared(x, patterns[c.shared_from])[0]
            else:
                rows = _all_rows(c, h, w)
                expected = _block_output(c, x)
                if isinstance(c.block, LCoA):
                    patterns[c.index] = c.block.make_pattern(x)
            weights = rows.weights.reshape(h * w, -1).double()
            ones = torch.ones(h * w, dtype=torch.float64)
            torch.testing.assert_close(weights.sum(1), ones, rtol=0, atol=1e-6)  # float32 rows
            if c.kind == "csna":
                got = _cross_scale_output(c.block, x, weights.float())
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                continue
            attended = (weights @ _values(c.block, x).double()).t().reshape(1, -1, h, w)
            res_scale = getattr(c.block, "res_scale", None)
            got = attended if c.kind == "in-scale" else x.double() + res_scale * attended
            torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-5)
            if "round_weights" in rows.extras:
                rw = rows.extras["round_weights"].double()
                torch.testing.assert_close(rw.sum(1), ones, rtol=0, atol=1e-6)
                assert bool(rows.extras["seen"].reshape(h * w, rw.shape[1], -1).any(-1).all())


def _identity_embedding(block: torch.nn.Module, channels: int) -> None:
    """theta = phi = x: identity 1x1 convs, PReLU slope 1."""
    with torch.no_grad():
        for conv in (block.conv_match1, block.conv_match2):
            conv[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            conv[0].bias.zero_()
            conv[1].weight.fill_(1.0)


def test_planted_match_is_found() -> None:
    """A query whose feature is repeated at exactly one other place, everything else small:
    NLA gives (almost) all its weight to itself and that place."""
    c = 8
    block = create_attention("nla", c, reduction=1).eval()
    _identity_embedding(block, c)
    g = torch.Generator().manual_seed(2)
    x = 0.05 * torch.randn(1, c, 9, 10, generator=g)
    planted = torch.zeros(c)
    planted[3] = 4.0
    x[0, :, 2, 7] = planted
    x[0, :, 6, 1] = planted
    rows = attention_rows(block, "nla", x, torch.tensor([2 * 10 + 7]))
    w = rows.weights[0]
    top = set(torch.topk(w.flatten(), 2).indices.tolist())
    assert top == {2 * 10 + 7, 6 * 10 + 1}
    assert float(w[2, 7] + w[6, 1]) > 0.99


def test_hspa_support_is_the_dense_sparsemax_support() -> None:
    """HSPA's reported support equals that of a float64 dense sparsemax of the query's row."""
    c = 8
    torch.manual_seed(3)
    block = create_attention("hspa", c, reduction=2).eval()
    x = torch.randn(1, c, 12, 11, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([0, 17, 65, 131])
    rows = attention_rows(block, "hspa", x, positions)
    theta = block.conv_match1(x)[0].flatten(1).t().double()
    phi = block.conv_match2(x)[0].flatten(1).t().double()
    with torch.no_grad():
        dense = naive_sparsemax(theta[positions] @ phi.t())
    assert torch.equal(rows.extras["support"].reshape(len(positions), -1), dense > 0)
    torch.testing.assert_close(
        rows.weights.reshape(len(positions), -1).double(), dense, atol=1e-5, rtol=0
    )
    assert int((dense > 0).sum(1).max()) < 12 * 11  # sparse: not every key


def test_explain_api_and_cli(tmp_path: Path) -> None:
    """explain() on a network returns per-block arrays for the queries; the CLI writes a figure
    and JSON whose top key is the array's argmax."""
    from nlsr.cli import main
    from nlsr.io import write_image

    torch.manual_seed(0)  # options a checkpoint records (n_hashes is not one: the default)
    model = create("dlsn", 2, n_resgroups=2, n_resblocks=1, n_feats=16, chunk_size=32).eval()
    image = (np.random.default_rng(5).random((14, 15, 3)) * 255).astype(np.uint8)
    result = explain(model, image, [(2, 3), (14, 13)], blocks=[1])
    assert [r.index for r in result] == [1]
    r = result[0]
    assert r.kind == "gla" and r.weights.shape == (2, 14, 15)
    np.testing.assert_allclose(r.weights.reshape(2, -1).sum(1), 1.0, rtol=1e-5)
    assert r.extras["codes"].shape == (2, 3) and r.extras["seen"].shape == (2, 3, 14, 15)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    write_image(tmp_path / "in.png", image)
    fig, js = tmp_path / "fig.png", tmp_path / "out.json"
    args = ["explain", str(tmp_path / "in.png"), "--weights", str(weights), "--scale", "2"]
    args += ["--query", "2,3", "--block", "1", "-o", str(fig), "--json", str(js)]
    assert main(args) == 0
    assert fig.stat().st_size > 0
    data = json.loads(js.read_text())
    top = data["blocks"][0]["queries"][0]["top_keys"][0]
    flat = int(np.argmax(r.weights[0]))
    assert (top["y"], top["x"]) == divmod(flat, 15)
    assert main([*args[:-4], "--query", "99,3", "-o", str(fig)]) == 2


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * torch.where(w > 0, w.log(), torch.zeros_like(w))).sum(-1)


def test_statistics_match_a_direct_dense_computation() -> None:
    """HSPA: support sizes and entropies of every query equal those of the float64 dense
    sparsemax; GLA on a map smaller than half a chunk (one chunk, slot = position): the merged
    weights are softmax_j(q.k_j/|k_j| + fc(f_j)[slot]) over all keys, computed densely here."""
    from nlsr.explain.stats import block_statistics

    torch.manual_seed(6)
    x = torch.randn(1, 8, 7, 9, generator=torch.Generator().manual_seed(7))
    hspa = create_attention("hspa", 8, reduction=2).eval()
    got = block_statistics(hspa, "hspa", x, threshold=0.0)
    with torch.no_grad():
        theta = hspa.conv_match1(x)[0].flatten(1).t().double()
        phi = hspa.conv_match2(x)[0].flatten(1).t().double()
        dense = naive_sparsemax(theta @ phi.t())
    np.testing.assert_array_equal(got.support, (dense > 0).sum(1).numpy())
    np.testing.assert_allclose(got.entropy, _entropy(dense).numpy(), atol=1e-5)
    assert got.promoted is None

    gla = create_attention("gla", 8, reduction=2, chunk_size=128, n_hashes=2).eval()
    x = torch.randn(1, 8, 6, 7, generator=torch.Generator().manual_seed(8))  # 42 <= 128 / 2
    gla.generator = torch.Generator().manual_seed(9)
    got = block_statistics(gla, "gla", x, gla.generator.get_state(), threshold=1e-2, promote_k=2)
    with torch.no_grad():
        q = gla.conv_match(x)[0].flatten(1).t().double()
        k = q / q.norm(dim=1, keepdim=True).clamp_min(5e-5)
        fc = gla.fc(gla.conv_assembly_fc(x)[0].flatten(1).t()).double()  # [L, chunk]
        raw = q @ k.t()
        scores = raw + fc[:, : q.shape[0]].t()  # row p: the bias of each key at slot p
        weights = torch.softmax(scores, dim=1)
    np.testing.assert_array_equal(got.support, (weights > 1e-2).sum(1).numpy())
    np.testing.assert_allclose(got.entropy, _entropy(weights).numpy(), atol=1e-5)
    others = ~torch.eye(len(q), dtype=torch.bool)  # the query's own position left out
    second = raw.masked_fill(~others, -math.inf).topk(2, dim=1).values[:, 1]
    best = weights.masked_fill(~others, -1.0).argmax(1, keepdim=True)
    expected = raw.gather(1, best)[:, 0] < second
    np.testing.assert_array_equal(got.promoted, expected.numpy())
    assert 0 < expected.sum() < len(expected)  # the case distinguishes promoted from not


def test_explain_lcoan_shared_pattern_is_the_first_groups() -> None:
    """LCoAN's second group applies the first group's pattern: explain() reports it as shared,
    with the first group's rows and cluster."""
    model = _network("lcoan")
    image = (np.random.default_rng(10).random((12, 13, 3)) * 255).astype(np.uint8)
    both = explain(model, image, [(4, 5)])
    second = explain(model, image, [(4, 5)], blocks=[1])[0]
    assert both[0].shared_from is None and both[1].shared_from == 0
    assert second.shared_from == 0
    np.testing.assert_array_equal(second.weights, both[0].weights)
    np.testing.assert_array_equal(second.extras["members"], both[0].extras["members"])
    assert bool(both[0].extras["members"][0, 0, 5, 4])  # the query is in its own cluster
