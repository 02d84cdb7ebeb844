"""Sparsemax, HSPA and HSPAN: closed forms, naive dense references, the official fixture."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nlsr.attention import create_attention, hspa
from nlsr.attention.hspa import (
    HSPA,
    candidate_columns,
    candidates,
    sparsemax,
    sparsemax_normaliser,
    sparsemax_rows,
    sparsemax_sorted,
    sparsemax_threshold,
)
from nlsr.attention.nla import SparseRows, attend_blocked
from nlsr.attention.reference import (
    ReleasedHSPA,
    naive_hspa,
    naive_sparsemax,
    released_sparsemax_threshold,
)
from nlsr.bench.inputs import capture, capture_all
from nlsr.models import create


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small tensors: one intra-op thread is faster on a shared machine than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loop_sparsemax(row: list[float]) -> list[float]:
    """Closed form on one row, in plain Python floats: sort, largest valid k, tau, clip."""
    srt = sorted(row, reverse=True)
    k, total, cumsum = 0, 0.0, 0.0
    for m, value in enumerate(srt, start=1):
        cumsum += value
        if 1 + m * value > cumsum:
            k, total = m, cumsum
    tau = (total - 1) / k
    return [max(v - tau, 0.0) for v in row]


# ---------------------------------------------------------------- sparsemax itself


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([0.0, 0.0], [0.5, 0.5]),
        ([1.0, 0.0], [1.0, 0.0]),
        ([0.5, 0.0], [0.75, 0.25]),
        ([3.0, 3.0, 3.0, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]),
        ([0.1, 0.2, 0.3], [0.1 + 0.4 / 3, 0.2 + 0.4 / 3, 0.3 + 0.4 / 3]),
        ([7.0], [1.0]),
    ],
)
def test_sparsemax_known_examples(row: list[float], expected: list[float]) -> None:
    got = sparsemax(torch.tensor([row], dtype=torch.float64))[0]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert loop_sparsemax(row) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("topk", [None, 1, 3, 16])
@pytest.mark.parametrize("spread", [0.01, 1.0, 30.0])
def test_sparsemax_matches_closed_form(topk: int | None, spread: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 37, generator=gen, dtype=torch.float64) * spread
    got = sparsemax(x, topk=topk)
    ref = torch.tensor([loop_sparsemax(r) for r in x.tolist()], dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-12)
    assert (got >= 0).all()
    assert torch.allclose(got.sum(-1), torch.ones(20, dtype=torch.float64), atol=1e-12)


def test_topk_never_caps_the_support() -> None:
    # Supports of ~all 300 keys, exactly topk keys, and ties straddling the topk cut.
    gen = torch.Generator().manual_seed(2)
    wide = 1e-3 * torch.randn(4, 300, generator=gen)
    exact = torch.full((1, 300), -10.0)
    exact[0, :4] = 0.0
    ties = torch.zeros(1, 300)
    ties[0, :3], ties[0, 3:9] = 0.2, 0.1
    flat = torch.zeros(1, 300)
    x = torch.cat([wide, exact, ties, flat])
    _, full_support = sparsemax_threshold(x - x.max(-1, keepdim=True).values, None)
    assert full_support[:4].min() > 200 and full_support[4].item() == 4
    assert full_support[6].item() == 300
    ref = naive_sparsemax(x)
    for topk in (1, 4, 5, 8, 299, 300, 1000):
        _, support = sparsemax_threshold(x - x.max(-1, keepdim=True).values, topk)
        assert torch.equal(support, full_support)
        assert torch.allclose(sparsemax_rows(x, topk), ref, atol=1e-7)
    assert torch.allclose(ref[6], torch.full((300,), 1 / 300))


@pytest.mark.parametrize("length", [50, 64, 130, 1000, 5000])
@pytest.mark.parametrize("spread", [1e-3, 0.3, 30.0])
def test_threshold_search_equals_released_bit_for_bit(length: int, spread: float) -> None:
    """Pruned groups + doubling from a few entries give the released tau and support exactly,
    for supports from one entry to the whole row."""
    gen = torch.Generator().manual_seed(length)
    x = spread * torch.randn(16, length, generator=gen)
    x[0] = 0.0  # all tied: the whole row is the support
    x[1, ::7] = x[1].max()  # ties at the maximum
    z = x - x.amax(-1, keepdim=True)
    for topk in (None, 1, 8, 128):
        want_tau, want_size = released_sparsemax_threshold(z, topk)
        tau, size = sparsemax_threshold(z, topk)
        assert torch.equal(size, want_size) and torch.equal(tau, want_tau)


def test_candidates_keep_the_support_and_prune_the_rest() -> None:
    gen = torch.Generator().manual_seed(12)
    z = 5.0 * torch.randn(32, 6000, generator=gen)
    z -= z.amax(-1, keepdim=True)
    kept, groups = candidates(z)
    tau, size = released_sparsemax_threshold(z, None)
    assert torch.equal((kept > tau).sum(-1, keepdim=True), size)  # every support entry kept
    assert kept.shape[-1] < 6000 // 4  # and most groups dropped (small supports here)
    at = torch.arange(kept.shape[-1]).expand_as(kept)
    columns = candidate_columns(at, groups, z.shape[-1])
    assert torch.equal(z.gather(-1, columns), kept)  # the columns name the kept entries
    assert all(len(set(row.tolist())) == columns.shape[-1] for row in columns)  # no repeats
    short = torch.randn(3, 100, generator=gen)
    kept, columns = candidates(short)
    assert kept is short and columns is None  # fewer than two groups: nothing to prune


def test_sparsemax_dim_and_shift_invariance() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    along1 = sparsemax(x, dim=1)
    assert torch.allclose(along1, sparsemax(x.transpose(1, 2)).transpose(1, 2))
    assert torch.allclose(sparsemax(x + 123.0, dim=1), along1, atol=1e-12)


def test_sparsemax_backward_is_the_exact_jacobian() -> None:
    gen = torch.Generator().manual_seed(4)
    x = (2 * torch.randn(8, 11, generator=gen, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(8, 11, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(sparsemax(x, topk=2), x, upstream)
    (ref,) = torch.autograd.grad(naive_sparsemax(x), x, upstream)
    assert torch.allclose(got, ref, atol=1e-12)
    # Closed form: on the support g - mean_support(g), zero elsewhere.
    support = sparsemax(x.detach()) > 0
    mean = (upstream * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
    assert torch.allclose(got, torch.where(support, upstream - mean, 0.0), atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, topk=3), (x,))


@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["dense-rows", "sparse-rows"])
def test_blocked_sparsemax_attention_gradcheck(
    fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of multiplying a block of rows: dense, and by their supports (SparseRows)."""
    monkeypatch.setattr(hspa, "SPARSE_FRACTION", fraction)
    monkeypatch.setattr(hspa, "SPARSE_MIN_KEYS", 1)
    kept, _ = sparsemax_normaliser().forward(torch.randn(2, 3, 7))
    assert isinstance(kept, SparseRows) == (fraction == 1.0)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 7, c, generator=gen, dtype=torch.float64) for c in (2, 2, 3))
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend_blocked(q, k, v, sparsemax_normaliser(), block_size=3)

    assert torch.autograd.gradcheck(blocked, (q, k, v))
    dense = naive_sparsemax(q @ k.transpose(1, 2)) @ v
    assert torch.allclose(blocked(q, k, v), dense, atol=1e-12)


def test_sparse_and_dense_blocks_mixed_equal_dense_autograd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Peaked query rows (narrow supports: blocks kept as SparseRows) next to flat ones (wide
    supports: dense blocks), against autograd through the naive dense form, float32 to 1e-5."""
    gen = torch.Generator().manual_seed(11)
    length, d, c = 640, 8, 12
    q = torch.randn(2, length, d, generator=gen)
    q[:, : length // 2] *= 6.0  # peaked rows: supports of a few keys
    q[:, length // 2 :] *= 0.02  # flat rows: supports of most keys
    k, v = torch.randn(2, length, d, generator=gen), torch.randn(2, length, c, generator=gen)
    monkeypatch.setattr(hspa, "SPARSE_MIN_KEYS", 512)
    norm = sparsemax_normaliser()
    kinds = [
        isinstance(norm.forward(q[:, s : s + 64] @ k.transpose(1, 2))[0], SparseRows)
        for s in (0, length - 64)
    ]
    assert kinds == [True, False]  # the case exercises both kinds of block
    upstream = torch.randn(2, length, c, generator=gen)
    grads = []
    for fn in (
        lambda a, b, e: attend_blocked(a, b, e, norm, block_size=64),
        lambda a, b, e: naive_sparsemax(a @ b.transpose(1, 2)) @ e,
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        grads.append((out, torch.autograd.grad(out, leaves, upstream)))
    (ours, g_ours), (ref, g_ref) = grads
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the HSPA block


@pytest.mark.parametrize(("h", "w", "block"), [(1, 1, 1), (5, 7, 4), (13, 200, 333), (64, 64, 500)])
def test_hspa_blocked_equals_dense(h: int, w: int, block: int) -> None:
    torch.manual_seed(6)
    module = HSPA(16, reduction=2, topk=8, block_size=block)
    x = torch.randn(2 if h * w < 5000 else 1, 16, h, w)
    with torch.no_grad():
        got, ref = module(x), naive_hspa(module, x)
    assert got.shape == x.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_hspa_gradients_equal_dense_autograd() -> None:
    torch.manual_seed(7)
    module = HSPA(8, reduction=2, topk=2, block_size=6)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    upstream = torch.randn(2, 8, 5, 7)
    params = [x, *module.parameters()]
    got = torch.autograd.grad(module(x), params, upstream)
    ref = torch.autograd.grad(naive_hspa(module, x), params, upstream)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_hspa_key_names_and_options() -> None:
    keys = set(HSPA(8).state_dict())
    for part in ("conv_match1", "conv_match2", "conv_assembly"):
        assert {f"{part}.0.weight", f"{part}.0.bias", f"{part}.1.weight"} <= keys
    with pytest.raises(ValueError, match="topk"):
        HSPA(8, topk=0)
    with pytest.raises(ValueError, match="reduction"):
        HSPA(8, reduction=16)
    with pytest.raises(ValueError, match="block_size"):
        HSPA(8, block_size=0)


def test_registry_builds_hspa() -> None:
    block = create_attention("hspa", 8, topk=4)
    assert isinstance(block, HSPA) and block.topk == 4


# ---------------------------------------------------------------- the HSPAN network


def test_hspan_paper_parameter_count() -> None:
    model = create("hspan", scale=2)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 32.29
    assert model.chop_min_size == 120000 and model.scale == 2


@pytest.mark.parametrize(("h", "w"), [(1, 1), (5, 7), (13, 200)])
def test_hspan_any_size(h: int, w: int) -> None:
    torch.manual_seed(8)
    model = create("hspan", scale=2, n_resgroups=1, n_resblocks=1, n_feats=8).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, h, w))
    assert out.shape == (1, 3, 2 * h, 2 * w) and torch.isfinite(out).all()


def test_hspan_training_step_lowers_loss() -> None:
    torch.manual_seed(9)
    model = create("hspan", scale=2, n_resgroups=2, n_resblocks=1, n_feats=8, topk=4)
    lr, hr = torch.rand(2, 3, 10, 10), torch.rand(2, 3, 20, 20)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.l1_loss(model(lr), hr)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]
    grad = model.body[0].body[1].conv_match1[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.shared
def test_hspan_official_fixture(fixtures_dir: Path) -> None:
    case_dir = fixtures_dir / "hspan_x2"
    if not case_dir.exists():
        pytest.skip(f"needs {case_dir} (the shared research material, not part of the repo)")
    case = json.loads((case_dir / "case.json").read_text())
    args = dict(case["official_args"])
    model = create("hspan", **args).eval()
    state = torch.load(case_dir / "checkpoint.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    x = torch.load(case_dir / "input.pt", weights_only=True)
    expected = torch.load(case_dir / "output.pt", weights_only=True)

    with torch.no_grad():
        out = model(x)
    captured = capture_all(model, HSPA, x)
    # Same arithmetic in float32 lands near 1e-7; capping the sparsemax support at topk
    # (the classic mistake) is off by ~5e-6 here, so exact parity is asserted at 1e-6.
    assert (out - expected).abs().max().item() <= 1e-6

    # The case is the one where supports exceed topk (README): check that we see the same.
    topk = args["topk"]
    for (module, feats), stats in zip(
        captured, case["checks"]["hspan_sparsemax_support"], strict=True
    ):
        with torch.no_grad():
            theta = module.conv_match1(feats).flatten(2).transpose(1, 2)
            s = theta @ module.conv_match2(feats).flatten(2)
        _, support = sparsemax_threshold(s - s.max(-1, keepdim=True).values, module.topk)
        assert support.min().item() == stats["support_min"]
        assert support.max().item() == stats["support_max"] > topk
        assert int((support >= topk).sum()) == stats["rows_needing_recursion"]


def test_released_baseline_equals_the_block_with_gradients() -> None:
    """The benchmark's released-style HSPA (whole score matrix, topk-started search, analytic
    backward) and nlsr's blocked HSPA agree in output and every gradient."""
    torch.manual_seed(0)
    block = create_attention("hspa", 8, topk=4, block_size=7).double()
    baseline = ReleasedHSPA(block)
    x = (3.0 * torch.randn(2, 8, 6, 5, dtype=torch.float64)).requires_grad_()
    grads = []
    for module in (block, baseline):
        out = module(x)
        weight = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        params = [x, *block.parameters()]
        grads.append((out, torch.autograd.grad((out * weight).sum(), params)))
    (ours, g_ours), (theirs, g_theirs) = grads
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert (ours - x).abs().max().item() > 1e-3  # the attention is not negligible


@pytest.mark.parametrize("normaliser", ["softmax", "sparsemax"])
def test_recomputed_weights_are_bitwise_the_forward_weights(normaliser: str) -> None:
    """The backward pass rebuilds each block's weights from the saved row statistics; they must
    be exactly the forward's, support included (no threshold search is redone)."""
    from nlsr.attention.nla import SOFTMAX

    norm = SOFTMAX if normaliser == "softmax" else sparsemax_normaliser(4)
    gen = torch.Generator().manual_seed(9)
    scores = 4.0 * torch.randn(3, 5, 300, generator=gen)
    weights, stats = norm.forward(scores.clone())
    if isinstance(weights, SparseRows):  # kept by its supports: scatter back to whole rows
        weights = torch.zeros_like(scores).scatter_(-1, weights.index, weights.weights)
    assert stats.shape == (3, 5, 2)
    assert torch.equal(norm.recompute(scores.clone(), stats), weights)
    if normaliser == "sparsemax":
        assert torch.equal(weights, sparsemax_rows(scores, 4))
        assert 0 < int((weights > 0).sum()) < weights.numel() // 2  # a genuinely sparse case


# ---------------------------------------------------------------- real features, wide supports

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "nlsr" / "assets" / "sample.png"


def _real_features(side: int) -> list[tuple[HSPA, torch.Tensor]]:
    """Every HSPA block of a seeded HSPAN (48 channels) with the input it gets from a crop of
    the bundled sample image: the features the block sees in the network."""
    from nlsr.io import read_image

    pixels = torch.from_numpy(read_image(SAMPLE).pixels.astype("float32") / 255.0)
    image = pixels[40 : 40 + side, 60 : 60 + side].permute(2, 0, 1).unsqueeze(0)
    torch.manual_seed(0)
    model = create("hspan", 2, n_resgroups=2, n_resblocks=1, n_feats=48).eval()
    return capture_all(model, HSPA, image)  # type: ignore[return-value]


@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["dense-rows", "sparse-rows"])
def test_hspa_equals_float64_dense_on_real_features(
    fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the features of a real image (supports of tens to hundreds of keys), the block
    (fixed-point threshold, blocked, dense or sparse rows) equals the float64 dense sparsemax
    attention: in float32 to 1e-6 (output; input gradient relative to its largest entry), in
    float64 to 1e-10 (output and every gradient, parameters included: their float32 sums over
    positions round above 1e-6)."""
    monkeypatch.setattr(hspa, "SPARSE_FRACTION", fraction)
    monkeypatch.setattr(hspa, "SPARSE_MIN_KEYS", 1)
    for block, x in _real_features(32):
        _, size = sparsemax_threshold(*_zeroed_scores(block, x))
        assert size.max().item() > 64 and size.float().median().item() > 8  # wide supports
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).double()
        exact = HSPA(48, topk=128).double()
        exact.load_state_dict(block.state_dict())
        ref, g_ref = _output_and_gradients(lambda t, m=exact: naive_hspa(m, t), exact, x, upstream)
        block.block_size = 300  # several query blocks, the last one short
        ours, g_ours = _output_and_gradients(block, block, x.float(), upstream.float())
        assert (ours.double() - ref).abs().max().item() <= 1e-6
        scale = max(1.0, g_ref[0].abs().max().item())  # the skip passes upstream (~2.5) on
        assert (g_ours[0].double() - g_ref[0]).abs().max().item() <= 1e-6 * scale
        wide = copy.deepcopy(block).double()
        ours, g_ours = _output_and_gradients(wide, wide, x, upstream)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
        for a, b in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _output_and_gradients(
    fn: Callable[[torch.Tensor], torch.Tensor],
    module: torch.nn.Module,
    x: torch.Tensor,
    upstream: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``fn(x)`` and the gradients of ``<fn(x), upstream>`` to ``x`` and ``module``'s
    parameters, in ``x``'s precision."""
    leaf = x.to(upstream.dtype).clone().requires_grad_()
    out = fn(leaf)
    return out, torch.autograd.grad(out, [leaf, *module.parameters()], upstream)


def _zeroed_scores(block: HSPA, x: torch.Tensor) -> tuple[torch.Tensor]:
    """The block's scores on ``x``, row maxima subtracted."""
    with torch.no_grad():
        theta = block.conv_match1(x).flatten(2).transpose(1, 2)
        s = theta @ block.conv_match2(x).flatten(2)
    return (s - s.amax(-1, keepdim=True),)


def test_fixed_point_falls_back_to_a_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows still moving after MAX_STEPS get their threshold from a full sort: same weights."""
    block, x = _real_features(24)[0]
    (z,) = _zeroed_scores(block, x)
    want = naive_sparsemax(z.double())
    for steps in (1, 2, 3, 64):
        monkeypatch.setattr(hspa, "MAX_STEPS", steps)
        torch.testing.assert_close(sparsemax_rows(z).double(), want, rtol=0, atol=1e-6)


def test_fixed_point_sizes_count_the_weights() -> None:
    """The support sizes the fixed point reports are the nonzero weights it writes, and the
    weights are the float64 sparsemax (rows whose size would grow back by float rounding at
    the threshold stop there instead of cycling)."""
    for block, x in _real_features(24)[:2]:
        (z,) = _zeroed_scores(block, x)
        rows = z.reshape(-1, z.shape[-1]).contiguous()
        weights = torch.empty_like(rows)
        _, size = hspa.fixed_point_threshold(rows, weights)
        torch.testing.assert_close(
            weights.double(), naive_sparsemax(rows.double()), rtol=0, atol=1e-6
        )
        assert torch.equal(size.flatten().long(), (weights > 0).sum(dim=-1))


def test_sorted_sparsemax_equals_float64_dense_on_real_features() -> None:
    """The traceable sparsemax (full sort, no search loop) equals the float64 dense sparsemax on
    the scores of real features with wide supports: its weights in float32 to 1e-6; computed in
    float64, its weights and autograd gradient to 1e-10."""
    for block, x in _real_features(24)[:2]:
        (z,) = _zeroed_scores(block, x)
        exact = z.double().requires_grad_()
        want = naive_sparsemax(exact)
        assert (want > 0).sum(-1).max().item() > 64  # wide supports
        ours = sparsemax_sorted(z + 3.0)  # shift-invariant: the row maxima are subtracted
        assert (ours.double() - want).abs().max().item() <= 1e-6
        upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).double()
        leaf = z.double().requires_grad_()
        ours = sparsemax_sorted(leaf)
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-10)
        (grad,) = torch.autograd.grad(ours, leaf, upstream)
        (grad_want,) = torch.autograd.grad(want, exact, upstream)
        torch.testing.assert_close(grad, grad_want, rtol=0, atol=1e-10)


def test_hspa_exports_through_the_sorted_sparsemax() -> None:
    """Under ``torch.export`` the block takes the traceable path (a graph with a sort and no
    search loop), and that graph computes the float64 dense HSPA to 1e-6 on real features."""
    block, x = _real_features(16)[0]
    program = torch.export.export(block, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("sort" in t for t in targets)
    exact = copy.deepcopy(block).double()
    want = naive_hspa(exact, x.double())
    assert (program.module()(x).double() - want).abs().max().item() <= 1e-6


def test_capture_all_finds_every_block_in_order() -> None:
    """``capture_all`` returns every HSPA block of the network with its input, in forward order,
    each input equal to what ``capture`` takes for that call."""
    from nlsr.io import read_image

    pixels = torch.from_numpy(read_image(SAMPLE).pixels.astype("float32") / 255.0)
    image = pixels[:16, :16].permute(2, 0, 1).unsqueeze(0)
    torch.manual_seed(0)
    model = create("hspan", 2, n_resgroups=3, n_resblocks=1, n_feats=16).eval()
    captured = capture_all(model, HSPA, image)
    assert [m for m, _ in captured] == [m for m in model.modules() if isinstance(m, HSPA)]
    assert len(captured) == 3
    for i, (_, x) in enumerate(captured):
        assert torch.equal(x, capture(model, HSPA, image, i))


@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["all-keys", "used-keys"])
def test_hspa_inference_equals_float64_dense_on_real_features(
    fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference (no autograd: each query block's product with the values over only the keys
    its rows weigh, or over all keys) equals the float64 dense HSPA to 1e-6 on real features,
    a batch of two different inputs, several query blocks."""
    monkeypatch.setattr(hspa, "USED_KEYS_FRACTION", fraction)
    (block, x), (_, other) = _real_features(32)[:2]
    batch = torch.cat([x, other])
    exact = copy.deepcopy(block).double()
    with torch.no_grad():
        want = naive_hspa(exact, batch.double())
        (z,) = _zeroed_scores(block, batch)
    used = (naive_sparsemax(z[:, :128].double()) > 0).any(dim=1)  # the first query block
    assert used.sum(-1).max().item() < 0.8 * z.shape[-1]  # the pruned product skips keys
    block.block_size = 128
    with torch.no_grad():
        got = block(batch)
    assert (got.double() - want).abs().max().item() <= 1e-6
