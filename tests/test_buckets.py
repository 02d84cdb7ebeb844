"""Bucketed attention (nlsr.attention.buckets, .backends, .lcoa_pattern, .hashing) against a
naive per-round, per-query reference."""

from __future__ import annotations

import math

import pytest
import torch

from nlsr.attention import buckets, hashing
from nlsr.attention.backends import bucket_attention, choose_backend
from nlsr.attention.buckets import bucket_count, effective_chunk, pad_order, stable_sort
from nlsr.attention.gla import KeyBiasMLP
from nlsr.attention.hashing import hash_codes
from nlsr.attention.lcoa_pattern import apply_pattern, attention_pattern
from nlsr.attention.reference import naive_bucket_attention


@pytest.mark.parametrize(
    ("n", "length", "rounds", "chunk", "buckets"),
    [(1, 40, 2, 8, 4), (2, 30, 3, 8, 3), (1, 9, 1, 8, 2), (1, 17, 2, 8, 5), (2, 12, 2, 4, 6)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_naive_reference(n, length, rounds, chunk, buckets, with_bias):
    g = torch.Generator().manual_seed(length * 7 + rounds)
    q = torch.randn(n, length, 5, generator=g, dtype=torch.float64)
    v = torch.randn(n, length, 3, generator=g, dtype=torch.float64)
    codes = torch.randint(0, buckets, (n, rounds, length), generator=g)
    bias = (
        torch.randn(n, length, chunk + 2, generator=g, dtype=torch.float64) if with_bias else None
    )
    got = bucket_attention(q, v, codes, chunk, key_bias=bias)
    want = naive_bucket_attention(q, v, codes, chunk, bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_stable_tie_order():
    codes = torch.tensor([[[2, 0, 1, 0, 2, 1, 0, 2]]])
    order = stable_sort(codes)
    assert order.tolist() == [[[1, 3, 6, 2, 5, 0, 4, 7]]]
    many = torch.randint(0, 3, (2, 4, 500), generator=torch.Generator().manual_seed(1))
    key = many * 1000 + torch.arange(500)  # unique keys reproduce the stable order
    assert torch.equal(stable_sort(many), key.argsort(dim=-1))


def test_pad_repeats_tail_and_sizes():
    order = torch.arange(10).view(1, 1, 10)
    assert pad_order(order, 4).tolist() == [[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8, 9]]]
    assert pad_order(order, 5) is order
    assert effective_chunk(576, 144) == 144
    assert effective_chunk(100, 144) == 144  # pad 44 <= 100: released tail padding
    assert effective_chunk(50, 144) == 50  # released code would crash: one dense chunk
    assert bucket_count(576, 144) == 4
    assert bucket_count(576, 128) == 4
    assert bucket_count(100000, 144) == 128
    assert bucket_count(10, 144) == 1 and bucket_count(10, 144, minimum=2) == 2


def test_single_chunk_is_dense_attention():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 11, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 11, 6, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 4, (2, 3, 11), generator=g)
    k = torch.nn.functional.normalize(q, dim=-1, eps=5e-5)
    dense = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    torch.testing.assert_close(bucket_attention(q, v, codes, 64), dense, rtol=0, atol=1e-12)


def test_merge_of_identical_rounds_equals_one_round():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 50, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 50, 3, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 5, (1, 1, 50), generator=g)
    one = bucket_attention(q, v, codes, 8)
    single = attention_pattern(q, codes, 8)
    pattern = attention_pattern(q, codes.expand(1, 3, 50), 8)
    torch.testing.assert_close(pattern.lse, single.lse + math.log(3), rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_pattern(pattern, v), one, rtol=0, atol=1e-12)
    torch.testing.assert_close(bucket_attention(q, v, codes.expand(1, 3, 50), 8), one)


def test_merge_weights_are_softmax_of_round_lse():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 24, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 24, 2, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 3, (1, 2, 24), generator=g)
    pattern = attention_pattern(q, codes, 8)
    singles = [attention_pattern(q, codes[:, r : r + 1], 8) for r in range(2)]
    rounds = [apply_pattern(p, v) for p in singles]
    lse = torch.stack([p.lse for p in singles], dim=1)  # [N, R, L]
    w = torch.softmax(lse, dim=1).unsqueeze(-1)
    want = w[:, 0] * rounds[0] + w[:, 1] * rounds[1]
    torch.testing.assert_close(apply_pattern(pattern, v), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(bucket_attention(q, v, codes, 8), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(pattern.lse, torch.logsumexp(lse, dim=1), rtol=0, atol=1e-12)
    assert pattern.n_chunks == 3 and pattern.chunk_size == 8 and pattern.n_rounds == 2


def test_pattern_applies_to_other_values_and_probabilities_sum_to_one():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 37, 4, generator=g)
    codes = torch.randint(0, 4, (2, 2, 37), generator=g)
    pattern = attention_pattern(q, codes, 8)
    assert pattern.probs.shape == (2 * 2, 5, 8, 24)  # 37 -> 40 = 5 chunks of 8, 3 chunks of keys
    # Per position, the probabilities of all its (unpadded) slots over all rounds sum to one.
    rows = pattern.layout.rows[:, 8:-8].reshape(2, 2, 40)[..., :37]
    slot_sums = pattern.probs.sum(-1).reshape(2, 2, 40)
    assert (slot_sums[..., 37:] == 0).all()  # padded query copies are dropped
    total = torch.zeros(2 * 37).index_add_(0, rows.reshape(-1), slot_sums[..., :37].reshape(-1))
    torch.testing.assert_close(total, torch.ones_like(total))
    for channels in (3, 9):
        v = torch.randn(2, 37, channels, generator=g)
        torch.testing.assert_close(apply_pattern(pattern, v), bucket_attention(q, v, codes, 8))
    with pytest.raises(ValueError, match="do not match"):
        apply_pattern(pattern, torch.randn(2, 36, 3))


@pytest.mark.parametrize("one_chunk_blocks", [False, True])
def test_key_bias_mlp_matches_the_bias_tensor(monkeypatch, one_chunk_blocks):
    """A key bias given as a :class:`KeyBiasMLP` (never stored whole; recomputed per block in
    the backward pass) gives the output and gradients of its evaluated tensor, and passes
    gradcheck for the features and all four weights."""
    if one_chunk_blocks:
        monkeypatch.setattr(buckets, "BLOCK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 23, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 23, 2, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 3, (2, 2, 23), generator=g)
    shapes = [(2, 23, 4), (6, 4), (6,), (8, 6), (8,)]  # 8 query slots >= the chunk (5)
    parts = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    parts[0] = parts[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    def attend(q, v, *mlp):
        return bucket_attention(q, v, codes, 5, key_bias=KeyBiasMLP(*mlp))

    def attend_tensor(q, v, *mlp):
        return bucket_attention(q, v, codes, 5, key_bias=KeyBiasMLP(*mlp).evaluate())

    inputs = [t.clone().requires_grad_() for t in (q, v)] + parts
    weight = torch.randn(2, 23, 2, generator=g, dtype=torch.float64)
    got, want = attend(*inputs), attend_tensor(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad((got * weight).sum(), inputs),
        torch.autograd.grad((want * weight).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(attend, inputs, fast_mode=True)


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 3, (1, 2, 10), generator=g)
    assert torch.autograd.gradcheck(
        lambda q, v, b: bucket_attention(q, v, codes, 4, key_bias=b), (q, v, bias), fast_mode=True
    )


@pytest.mark.parametrize("bias_scale", [None, 1.0, 100.0])
def test_one_chunk_per_block_matches_naive_reference(monkeypatch, bias_scale):
    """Blocks of a single chunk (as at large sizes) give the same result and gradients, with the
    folded softmax shift (no bias, small bias spread) and with row maxima (large spread)."""
    monkeypatch.setattr(buckets, "BLOCK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    q[0, :3] *= 1e-6  # norms below the key eps: keys are q / eps there
    v = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 4, (2, 3, 30), generator=g)
    with_bias = bias_scale is not None
    bias = None
    if with_bias:
        bias = bias_scale * torch.randn(2, 30, 8, generator=g, dtype=torch.float64)
        spread = float(bias[..., :8].max() - bias[..., :8].min())
        assert (spread > buckets._max_spread(torch.float64)) == (bias_scale > 10)
    assert buckets.bucket_layout(codes, 8).chunks_per_block() == 1
    want = naive_bucket_attention(q, v, codes, 8, bias)
    torch.testing.assert_close(
        bucket_attention(q, v, codes, 8, key_bias=bias), want, rtol=0, atol=1e-10
    )
    inputs = [t.clone().requires_grad_() for t in (q, v) + ((bias,) if with_bias else ())]
    assert torch.autograd.gradcheck(
        lambda q, v, *b: bucket_attention(q, v, codes, 8, key_bias=b[0] if b else None),
        inputs,
        fast_mode=True,
    )
    if not with_bias:
        torch.testing.assert_close(apply_pattern(attention_pattern(q, codes, 8), v), want)


def test_shared_pattern_gradients_match_finite_differences(monkeypatch):
    """A pattern applied to two layers' values (as in LCoAN): exact gradients for the queries
    that made the pattern and for both values, with blocks of one and of several chunks."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 21, 3, generator=g, dtype=torch.float64)
    q[0, 5] *= 1e-6  # a norm below the key eps
    q.requires_grad_()
    v1 = torch.randn(1, 21, 2, generator=g, dtype=torch.float64, requires_grad=True)
    v2 = torch.randn(1, 21, 2, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 3, (1, 2, 21), generator=g)

    def shared(q, v1, v2):
        pattern = attention_pattern(q, codes, 4)
        return apply_pattern(pattern, v1) * apply_pattern(pattern, v2)

    assert torch.autograd.gradcheck(shared, (q, v1, v2))
    monkeypatch.setattr(buckets, "BLOCK_ELEMENTS", 1)
    assert torch.autograd.gradcheck(shared, (q, v1, v2), fast_mode=True)


def test_extreme_scores_stay_finite():
    """Query norms of 1e3 (the folded shift) and a key bias spread of 1e3 (the row-maximum
    shift) neither overflow nor underflow: same as the naive log-sum-exp reference."""
    g = torch.Generator().manual_seed(10)
    q = 1e3 * torch.randn(1, 20, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 20, 3, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 3, (1, 2, 20), generator=g)
    bias = 1e3 * torch.randn(1, 20, 8, generator=g, dtype=torch.float64)
    for b in (None, bias):
        got = bucket_attention(q, v, codes, 8, key_bias=b)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, naive_bucket_attention(q, v, codes, 8, b))
    small = bucket_attention(q.float(), v.float(), codes, 8, key_bias=bias.float())
    assert torch.isfinite(small).all()


@pytest.mark.parametrize("signed", [False, True])
def test_hash_codes_equal_released_argmax(monkeypatch, signed):
    """Blocked codes equal the released einsum + argmax, including ties (zero embeddings, as
    after GLA's ReLU, go to the first index)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 50, 6, generator=g)
    x[0, :7] = 0.0
    w = torch.randn(6, 3, 5, generator=g)
    rotated = torch.einsum("btf,bfhi->bhti", x, w.unsqueeze(0).expand(2, -1, -1, -1))
    if signed:
        rotated = torch.cat([rotated, -rotated], dim=-1)
    want = rotated.argmax(dim=-1)
    assert torch.equal(hash_codes(x, w, signed), want)
    assert (want[0, :, :7] == 0).all()
    monkeypatch.setattr(hashing, "BLOCK_ELEMENTS", 16)  # blocks of one position
    assert torch.equal(hash_codes(x, w, signed), want)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="codes"):
        attention_pattern(torch.randn(1, 5, 2), torch.zeros(1, 2, 6, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="length >= 1"):
        effective_chunk(0, 4)
    one = bucket_attention(
        torch.zeros(1, 1, 2), torch.ones(1, 1, 1), torch.zeros(1, 1, 1).long(), 4
    )
    assert one.shape == (1, 1, 1) and math.isclose(float(one), 1.0, abs_tol=1e-6)


# ---------------------------------------------------------------- the SDPA backend


def _output_and_grads(backend, q, v, codes, chunk, bias):
    """Output and gradients (w.r.t. q, v and bias if given) of a fixed random projection."""
    inputs = [t.clone().requires_grad_() for t in (q, v) + (() if bias is None else (bias,))]
    out = bucket_attention(
        inputs[0],
        inputs[1],
        codes,
        chunk,
        key_bias=inputs[2] if bias is not None else None,
        backend=backend,
    )
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = weight.to(out.dtype)
    return out, torch.autograd.grad((out * weight).sum(), inputs)


@pytest.mark.parametrize(
    ("n", "length", "chunk"),
    # no padding (5 chunks); tail padding; L < 3 * chunk with 3, 2 and 1 padded chunks; a chunk
    # shrunk to L (padding would exceed L)
    [(2, 40, 8), (2, 37, 8), (1, 20, 8), (1, 9, 8), (1, 5, 8), (2, 3, 8)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sdpa_backend_matches_blocked_and_naive(n, length, chunk, with_bias):
    g = torch.Generator().manual_seed(100 + length)
    q = torch.randn(n, length, 5, generator=g, dtype=torch.float64)
    q[0, :1] *= 1e-6  # a norm below the key eps
    v = torch.randn(n, length, 3, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 4, (n, 1, length), generator=g)
    bias = (
        torch.randn(n, length, chunk + 2, generator=g, dtype=torch.float64) if with_bias else None
    )
    got, got_grads = _output_and_grads("sdpa", q, v, codes, chunk, bias)
    want, want_grads = _output_and_grads("blocked", q, v, codes, chunk, bias)
    assert got.shape == want.shape == (n, length, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    naive = naive_bucket_attention(q, v, codes, effective_chunk(length, chunk), bias)
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-10)
    assert len(got_grads) == len(want_grads) == (3 if with_bias else 2)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_backend_errors():
    q, v = torch.randn(1, 12, 4), torch.randn(1, 12, 2)
    codes = torch.zeros(1, 2, 12, dtype=torch.long)
    with pytest.raises(ValueError, match="single hash round, got 2 rounds"):
        bucket_attention(q, v, codes, 4, backend="sdpa")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        bucket_attention(q, v, codes[:, :1], 4, backend="flash")
    assert choose_backend("auto", q, 2) == "blocked"
    assert choose_backend("sdpa", q, 1) == "sdpa"


def test_auto_on_cpu_is_the_blocked_path():
    """Bitwise the blocked result and gradients, in its channel-major layout (SDPA's is
    row-major), for one round and several."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 37, 4, generator=g)
    v = torch.randn(2, 37, 3, generator=g)
    bias = torch.randn(2, 37, 8, generator=g)
    for rounds in (1, 2):
        codes = torch.randint(0, 4, (2, rounds, 37), generator=g)
        auto, auto_grads = _output_and_grads("auto", q, v, codes, 8, bias)
        blocked, blocked_grads = _output_and_grads("blocked", q, v, codes, 8, bias)
        assert torch.equal(auto, blocked)
        assert all(map(torch.equal, auto_grads, blocked_grads))
        assert auto.transpose(1, 2).is_contiguous() and not auto.is_contiguous()
    assert choose_backend("auto", q, 1) == "blocked"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("backend", "rounds"), [("blocked", 1), ("blocked", 2), ("sdpa", 1)])
def test_half_precision_on_cpu(dtype, backend, rounds):
    """Half-precision inputs work on both paths and stay close to the float64 result: both
    compute (and return) float32, as under autocast; gradients come back in the input dtype."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 37, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 37, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 37, 8, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 4, (2, rounds, 37), generator=g)
    want, want_grads = _output_and_grads("blocked", q, v, codes, 8, bias)
    half = [t.to(dtype) for t in (q, v, bias)]
    got, got_grads = _output_and_grads(backend, half[0], half[1], codes, 8, half[2])
    assert got.dtype == torch.float32
    assert all(t.dtype == dtype for t in got_grads)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=6e-2)
