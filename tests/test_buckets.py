"""Bucketed attention (nlsr.attention.buckets) against a naive per-round, per-query reference."""

from __future__ import annotations

import math

import pytest
import torch

from nlsr.attention.buckets import (
    apply_pattern,
    attention_pattern,
    bucket_attention,
    bucket_count,
    effective_chunk,
    pad_order,
    stable_sort,
)


def naive_bucket_attention(q, v, codes, chunk, bias=None, eps=5e-5):
    """Explicit loops: Python-sorted rounds, tail padding, each chunk over [own, prev, next]."""
    n, length, _ = q.shape
    rounds = codes.shape[1]
    out = torch.zeros(n, rounds, length, v.shape[-1], dtype=q.dtype)
    lse = torch.zeros(n, rounds, length, dtype=q.dtype)
    for b in range(n):
        k = q[b] / q[b].norm(dim=-1, keepdim=True).clamp_min(eps)
        for r in range(rounds):
            order = sorted(range(length), key=lambda p: (int(codes[b, r, p]), p))
            pad = (-length) % chunk
            order = order + order[length - pad :]
            chunks = [order[i : i + chunk] for i in range(0, len(order), chunk)]
            nc = len(chunks)
            for c_idx, members in enumerate(chunks):
                keys = members + chunks[(c_idx - 1) % nc] + chunks[(c_idx + 1) % nc]
                for slot, p in enumerate(members):
                    if c_idx * chunk + slot >= length:  # padded copy of a query: dropped
                        continue
                    s = torch.stack([q[b, p] @ k[j] for j in keys])
                    if bias is not None:
                        s = s + torch.stack([bias[b, j, slot] for j in keys])
                    lse[b, r, p] = torch.logsumexp(s, 0)
                    w = torch.softmax(s, 0)
                    out[b, r, p] = sum(w[t] * v[b, j] for t, j in enumerate(keys))
    weights = torch.softmax(lse, dim=1).unsqueeze(-1)
    return (out * weights).sum(1)


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


def test_stable_tie_order_and_inverse():
    codes = torch.tensor([[[2, 0, 1, 0, 2, 1, 0, 2]]])
    order, undo = stable_sort(codes)
    assert order.tolist() == [[[1, 3, 6, 2, 5, 0, 4, 7]]]
    x = torch.arange(8).view(1, 1, 8) * 10
    sorted_x = x.gather(-1, order)
    assert torch.equal(sorted_x.gather(-1, undo), x)
    many = torch.randint(0, 3, (2, 4, 500), generator=torch.Generator().manual_seed(1))
    order, undo = stable_sort(many)
    key = many * 1000 + torch.arange(500)  # unique keys reproduce the stable order
    assert torch.equal(order, key.argsort(dim=-1))
    assert torch.equal(order.gather(-1, undo), torch.arange(500).expand(2, 4, 500))


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
    pattern = attention_pattern(q, codes.expand(1, 3, 50), 8)
    torch.testing.assert_close(pattern.round_weights, torch.full((1, 3, 50), 1 / 3, dtype=q.dtype))
    torch.testing.assert_close(apply_pattern(pattern, v), one, rtol=0, atol=1e-12)


def test_merge_weights_are_softmax_of_round_lse():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 24, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 24, 2, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 3, (1, 2, 24), generator=g)
    pattern = attention_pattern(q, codes, 8)
    rounds = [apply_pattern(attention_pattern(q, codes[:, r : r + 1], 8), v) for r in range(2)]
    w = torch.softmax(pattern.lse, dim=1).unsqueeze(-1)
    want = w[:, 0] * rounds[0] + w[:, 1] * rounds[1]
    torch.testing.assert_close(apply_pattern(pattern, v), want, rtol=0, atol=1e-12)
    assert pattern.n_chunks == 3 and pattern.chunk_size == 8 and pattern.n_rounds == 2


def test_pattern_applies_to_other_values_and_probabilities_sum_to_one():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 37, 4, generator=g)
    codes = torch.randint(0, 4, (2, 2, 37), generator=g)
    pattern = attention_pattern(q, codes, 8)
    total = sum(p.sum(-1) for p in pattern.probs)
    torch.testing.assert_close(total, torch.ones_like(total))
    for channels in (3, 9):
        v = torch.randn(2, 37, channels, generator=g)
        torch.testing.assert_close(apply_pattern(pattern, v), bucket_attention(q, v, codes, 8))
    with pytest.raises(ValueError, match="do not match"):
        apply_pattern(pattern, torch.randn(2, 36, 3))


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 3, (1, 2, 10), generator=g)
    assert torch.autograd.gradcheck(
        lambda q, v, b: bucket_attention(q, v, codes, 4, key_bias=b), (q, v, bias), fast_mode=True
    )


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="codes"):
        attention_pattern(torch.randn(1, 5, 2), torch.zeros(1, 2, 6, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="length >= 1"):
        effective_chunk(0, 4)
    one = bucket_attention(
        torch.zeros(1, 1, 2), torch.ones(1, 1, 1), torch.zeros(1, 1, 1).long(), 4
    )
    assert one.shape == (1, 1, 1) and math.isclose(float(one), 1.0, abs_tol=1e-6)
