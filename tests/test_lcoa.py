"""LCoA attention and the LCoAN network: official parity, k-means, collaborative attention."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nlsr.attention import create_attention
from nlsr.attention.lcoa import LCoA, kmeans_step
from nlsr.attention.reference import naive_lcoa
from nlsr.models import create
from nlsr.models.lcoan import LCoAN


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscribing the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lcoan(**options: object) -> LCoAN:
    """A small LCoAN (3 groups, 8 channels, windows of 16) for fast tests."""
    opts = {"n_resgroups": 3, "n_resblocks": 1, "n_feats": 8, "n_clusters": 6, "window_size": 16}
    opts.update(options)
    return create("lcoan", 2, **opts)  # type: ignore[return-value]


def load_case(fixtures: Path, case: str) -> tuple[LCoAN, dict, dict[str, torch.Tensor]]:
    """Build the case's model from its official_args and strictly load its checkpoint."""
    folder = fixtures / case
    meta = json.loads((folder / "case.json").read_text())
    args = dict(meta["official_args"])
    model = create("lcoan", args.pop("scale"), **args)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval(), meta, state  # type: ignore[return-value]


# ---------------------------------------------------------------- official fixtures


@pytest.mark.shared
@pytest.mark.parametrize("case", ["lcoan_x2", "lcoan_x2_40x40"])
def test_official_parity_stable_sort(fixtures_dir: Path, case: str) -> None:
    model, meta, _ = load_case(fixtures_dir, case)
    assert bool(model.body[0].attention[0].kmeans.initted)
    assert not bool(model.body[1].attention[0].kmeans.initted)
    x = torch.load(fixtures_dir / case / "input.pt", weights_only=True)
    ref = torch.load(fixtures_dir / case / "output_stable_sort.pt", weights_only=True)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape == torch.Size(meta["output_shape"])
    err = (out - ref).abs().max().item()
    assert err <= 1e-5, f"{case}: max abs err {err:.3g}"


@pytest.mark.shared
def test_kmeans_init_reproduces_released_centroids(fixtures_dir: Path) -> None:
    """Re-initialising group 0's k-means on kmeans_init_input.pt with the recorded seed (one
    train-mode forward) gives the checkpoint's centroids."""
    model, meta, state = load_case(fixtures_dir, "lcoan_x2")
    att = model.body[0].attention[0]
    att.kmeans.initted.fill_(False)
    att.kmeans.means.normal_()
    att.generator = torch.Generator().manual_seed(meta["seeds"]["forward"])
    x = torch.load(fixtures_dir / "lcoan_x2" / "kmeans_init_input.pt", weights_only=True)
    model.train()
    with torch.no_grad():
        model(x)
    assert bool(att.kmeans.initted)
    expected = state["body.0.attention.0.kmeans.means"]
    assert torch.allclose(att.kmeans.means, expected, atol=1e-6, rtol=0)
    # Later groups never initialise: their buffers are exactly as loaded.
    later = model.body[1].attention[0].kmeans.means
    assert torch.equal(later, state["body.1.attention.0.kmeans.means"])


# ---------------------------------------------------------------- naive reference


@pytest.mark.parametrize(("h", "w", "window"), [(7, 9, 16), (5, 5, 16), (3, 4, 32), (6, 6, 5)])
def test_lcoa_block_matches_naive_reference(h: int, w: int, window: int) -> None:
    torch.manual_seed(0)
    block = create_attention("lcoa", 6, n_clusters=5, window_size=window).double()
    block.kmeans.means.copy_(torch.randn(1, 5, 6, dtype=torch.float64))
    block.kmeans.initted.fill_(True)
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        q = block.conv_match(x).flatten(2).transpose(1, 2)
        v = block.conv_assembly(x).flatten(2).transpose(1, 2)
        means = block.kmeans.means[0]
        for b in range(2):
            codes = (F.normalize(q[b], dim=-1) @ means.T).argmax(-1).tolist()
            ref = naive_lcoa(q[b], v[b], codes, window).T.reshape(6, h, w) * 0.1 + x[b]
            assert torch.allclose(out[b], ref, atol=1e-10, rtol=0)


def test_standalone_in_edsr() -> None:
    torch.manual_seed(0)
    model = create(
        "edsr",
        2,
        n_resblocks=2,
        n_feats=8,
        attention="lcoa",
        attention_options={"n_clusters": 4, "window_size": 8},
    )
    out = model(torch.rand(1, 3, 9, 11))
    assert out.shape == (1, 3, 18, 22)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- collaborative attention


def test_later_groups_reuse_first_pattern() -> None:
    torch.manual_seed(0)
    model = tiny_lcoan().eval()
    x = torch.rand(1, 3, 10, 9)
    with torch.no_grad():
        base = model(x)  # initialises group 0's centroids
        later = model.body[2].attention[0]
        later.conv_match[0].weight.add_(torch.randn_like(later.conv_match[0].weight))
        later.kmeans.means.normal_()
        assert torch.equal(model(x), base)
        later.conv_assembly[0].weight.mul_(2.0)  # its values do matter
        assert not torch.equal(model(x), base)
        first = model.body[0].attention[0]
        first.conv_match[0].weight.mul_(1.5)
        changed = model(x)
    assert not torch.equal(changed, base)
    assert not bool(later.kmeans.initted)


def test_gradients_reach_first_block_through_shared_pattern() -> None:
    torch.manual_seed(0)
    first, second = (LCoA(8, n_clusters=4, window_size=8) for _ in range(2))
    x0, x1 = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    _, pattern = first.forward_shared(x0)
    out, same = second.forward_shared(x1, pattern)
    assert same is pattern
    out.square().sum().backward()
    assert first.conv_match[0].weight.grad is not None
    assert first.conv_match[0].weight.grad.abs().sum() > 0
    assert first.conv_assembly[0].weight.grad is None
    assert second.conv_match[0].weight.grad is None
    assert second.conv_assembly[0].weight.grad.abs().sum() > 0


def test_pattern_size_mismatch_is_an_error() -> None:
    block = LCoA(4, n_clusters=3, window_size=4)
    _, pattern = block.forward_shared(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError):
        block.forward_shared(torch.randn(1, 4, 4, 4), pattern)


# ---------------------------------------------------------------- k-means


def test_kmeans_init_deterministic_and_nearest_assignment() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 40, 5) * torch.rand(2, 40, 1) * 3
    results = []
    for seed in (7, 7, 8):
        block = LCoA(5, n_clusters=6)
        block.kmeans.initialise(x, torch.Generator().manual_seed(seed))
        results.append(block.kmeans.means.clone())
        assert bool(block.kmeans.initted)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    # Each point goes to the centroid nearest (Euclidean) to its direction when centroids are unit.
    block.kmeans.means.copy_(F.normalize(torch.randn(1, 6, 5), dim=-1))
    codes = block.kmeans.assign(x)
    dists = torch.cdist(F.normalize(x, dim=-1), block.kmeans.means[0].expand(2, -1, -1))
    assert torch.equal(codes[:, 0], dists.argmin(-1))


def test_kmeans_step_closed_form() -> None:
    means = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    x = torch.tensor([[[[3.0, 1.0], [1.0, 0.0], [0.0, 2.0]]]])
    new = kmeans_step(x, means)
    expected = torch.tensor([[[4.0, 1.0], [0.0, 2.0], [-1.0, -1.0]]])
    expected[0, :2] = F.normalize(expected[0, :2], dim=-1)
    assert torch.allclose(new, expected)


def ema_block(decay: float, update: str) -> LCoA:
    """A 2-channel LCoA whose match embedding is the identity, with centroids e1 and e2."""
    block = LCoA(2, n_clusters=3, window_size=4, ema_decay=decay, centroid_update=update, k_size=1)
    with torch.no_grad():
        block.conv_match[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        block.conv_match[0].bias.zero_()
        block.kmeans.means.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]]))
        block.kmeans.initted.fill_(True)
    return block


def test_ema_update_closed_form() -> None:
    decay = 0.9
    # Points (3, 1), (1, 0) go to e1; (0, 2), (1, 3) go to e2; cluster 3 gets nothing.
    x = torch.tensor([[3.0, 1.0, 0.0, 1.0], [1.0, 0.0, 2.0, 3.0]]).view(1, 2, 1, 4)
    block = ema_block(decay, "ema").train()
    block(x)
    u = F.normalize(torch.tensor([[3.0, 1.0], [1.0, 0.0], [0.0, 2.0], [1.0, 3.0]]), dim=-1)
    target1 = F.normalize(u[0] + u[1], dim=0)
    target2 = F.normalize(u[2] + u[3], dim=0)
    expected = torch.stack(
        [
            decay * torch.tensor([1.0, 0.0]) + (1 - decay) * target1,
            decay * torch.tensor([0.0, 1.0]) + (1 - decay) * target2,
            torch.tensor([-1.0, -1.0]),
        ]
    ).unsqueeze(0)
    assert torch.allclose(block.kmeans.means, expected, atol=1e-6)
    # Released behaviour and evaluation leave the centroids alone.
    for block in (ema_block(decay, "none").train(), ema_block(decay, "ema").eval()):
        before = block.kmeans.means.clone()
        block(x)
        assert torch.equal(block.kmeans.means, before)


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize(("h", "w"), [(1, 1), (5, 7), (13, 200), (64, 64)])
def test_any_input_size(h: int, w: int) -> None:
    torch.manual_seed(0)
    model = tiny_lcoan(n_resgroups=2, window_size=384).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, h, w))
    assert out.shape == (1, 3, 2 * h, 2 * w)
    assert torch.isfinite(out).all()


def test_training_step_lowers_loss() -> None:
    torch.manual_seed(0)
    model = tiny_lcoan(centroid_update="ema").train()
    x = torch.rand(2, 3, 12, 12)
    target = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    optim = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = F.l1_loss(model(x), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_paper_size_parameter_count() -> None:
    model = create("lcoan", 2)
    n_params = sum(p.numel() for p in model.parameters())
    assert math.isclose(n_params / 1e6, 15.67, abs_tol=0.005)
    assert model.chop_min_size == 120000
    assert model.body[0].attention[0].kmeans.means.shape == (1, 128, 128)


def test_bad_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="centroid_update"):
        create("lcoan", 2, centroid_update="sgd")
    with pytest.raises(ValueError, match="ema_decay"):
        create("lcoan", 2, n_feats=8, n_resgroups=1, ema_decay=1.5)


def test_standalone_sdpa_backend_equals_blocked() -> None:
    """One round (the default): LCoA's standalone forward gives the same output and input
    gradient with SDPA as with the blocked path; unknown backends are rejected."""
    torch.manual_seed(0)
    blocked = create_attention("lcoa", 6, n_clusters=5, window_size=8, attention_backend="blocked")
    sdpa = create_attention("lcoa", 6, n_clusters=5, window_size=8, attention_backend="sdpa")
    blocked.double()
    blocked.kmeans.means.copy_(torch.randn(1, 5, 6, dtype=torch.float64))
    blocked.kmeans.initted.fill_(True)
    sdpa.double().load_state_dict(blocked.state_dict())
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)  # 35 positions: a padded last window
    outs, grads = [], []
    for block in (blocked, sdpa):
        xi = x.clone().requires_grad_()
        out = block(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out)
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        LCoA(6, attention_backend="dense")
