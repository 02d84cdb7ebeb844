"""Dense non-local attention: blocked computation against the naive full softmax attention."""

from __future__ import annotations

import pytest
import torch

from nlsr.attention import create_attention
from nlsr.attention.nla import NonLocalAttention, attend_blocked, auto_block_size
from nlsr.attention.reference import naive_nla


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small tensors: one intra-op thread is faster on a shared machine than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("h", "w", "block"), [(1, 1, 1), (5, 7, 4), (13, 200, 333), (64, 64, 500)])
def test_nla_blocked_equals_dense(h: int, w: int, block: int) -> None:
    torch.manual_seed(0)
    module = NonLocalAttention(16, reduction=2, res_scale=0.5, block_size=block)
    x = torch.randn(2 if h * w < 5000 else 1, 16, h, w)
    with torch.no_grad():
        got, ref = module(x), naive_nla(module, x)
    assert got.shape == x.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_nla_single_position_is_pointwise() -> None:
    # With one key the softmax weight is 1: out = res_scale * g(x) + x.
    torch.manual_seed(1)
    module = NonLocalAttention(8, res_scale=0.3)
    x = torch.randn(3, 8, 1, 1)
    with torch.no_grad():
        assert torch.allclose(module(x), 0.3 * module.conv_assembly(x) + x, atol=1e-6)


def test_nla_gradients_equal_dense_autograd() -> None:
    torch.manual_seed(2)
    module = NonLocalAttention(8, reduction=2, block_size=6)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    upstream = torch.randn(2, 8, 5, 7)
    params = [x, *module.parameters()]
    got = torch.autograd.grad(module(x), params, upstream)
    ref = torch.autograd.grad(naive_nla(module, x), params, upstream)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_blocked_softmax_attention_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 7, c, generator=gen, dtype=torch.float64).requires_grad_() for c in (2, 2, 3)
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: attend_blocked(q, k, v, block_size=3), (q, k, v)
    )


def test_auto_block_size_bounds_memory() -> None:
    assert auto_block_size(1, 576) == 576
    big = auto_block_size(1, 192 * 192)
    assert 1 <= big < 192 * 192 and big * 192 * 192 <= 2**23
    assert auto_block_size(4, 10, block_size=3) == 3
    assert auto_block_size(1, 10, block_size=50) == 10


def test_nla_options_and_registry() -> None:
    with pytest.raises(ValueError, match="reduction"):
        NonLocalAttention(4, reduction=0)
    with pytest.raises(ValueError, match="block_size"):
        NonLocalAttention(4, block_size=-1)
    block = create_attention("nla", 8, res_scale=0.2)
    assert isinstance(block, NonLocalAttention) and block.res_scale == 0.2
    keys = set(block.state_dict())
    assert {"conv_match1.0.weight", "conv_match2.1.weight", "conv_assembly.0.bias"} <= keys
