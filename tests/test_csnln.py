"""CSNLN and its attention blocks: official parity, naive-loop references, any input size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, require

import nlsr
from nlsr.attention import create_attention, cross_scale
from nlsr.attention.cross_scale import CrossScaleAttention, InScaleNonLocalAttention
from nlsr.attention.reference import (
    ReleasedCrossScaleAttention,
    ReleasedFormError,
    released_baseline,
)
from nlsr.io import read_image
from nlsr.models import create


def _perturb_prelus(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every PReLU a distinct slope so that a swapped or skipped PReLU changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(-0.5, 0.5, generator=g)


def _bilinear_down(x: torch.Tensor, s: int) -> torch.Tensor:
    """Closed form of half-pixel bilinear 1/s downscaling (source coordinate s*d + (s-1)/2):
    the mean of the two middle pixels of each s x s cell for even s, the middle pixel for odd s."""
    h, w = x.shape[-2:]
    cells = x.reshape(*x.shape[:-2], h // s, s, w // s, s)
    mid = [s // 2] if s % 2 else [s // 2 - 1, s // 2]
    return cells[..., mid, :, :][..., mid].mean(dim=(-1, -3))


def _naive_cross_scale(m: CrossScaleAttention, x: torch.Tensor) -> torch.Tensor:
    """Cross-scale attention of one image by explicit loops over query and key patches (3x3)."""
    s = m.scale
    _, _, big_h, big_w = x.shape
    h, w = big_h // s, big_w // s
    q = F.pad(m.conv_match_1(x)[0], (1, 1, 1, 1))
    r = F.pad(m.conv_match_2(_bilinear_down(x, s))[0], (1, 1, 1, 1))
    e = F.pad(m.conv_assembly(x)[0], (s, s, s, s))
    keys, values = [], []
    for p in range(h):
        for t in range(w):
            key = r[:, p : p + 3, t : t + 3]
            keys.append(key / max(float(key.norm()), 1e-4))
            values.append(e[:, s * p : s * p + 3 * s, s * t : s * t + 3 * s])
    canvas = torch.zeros(x.shape[1], s * big_h + 2 * s, s * big_w + 2 * s, dtype=x.dtype)
    for i in range(big_h):
        for j in range(big_w):
            patch = q[:, i : i + 3, j : j + 3]
            scores = torch.stack([(patch * key).sum() for key in keys]) * m.softmax_scale
            weights = torch.softmax(scores, dim=0)
            if not m.average:
                weights = (weights == weights.max()).to(x.dtype)
            for a, value in zip(weights, values, strict=True):
                canvas[:, s * i : s * i + 3 * s, s * j : s * j + 3 * s] += a * value
    return canvas[None, :, s : s + s * big_h, s : s + s * big_w] / 6


@pytest.mark.parametrize(
    ("scale", "hw", "average"), [(2, (4, 6), True), (3, (6, 9), True), (2, (6, 4), False)]
)
def test_cross_scale_attention_matches_naive_loops(scale, hw, average):
    torch.manual_seed(0)
    m = CrossScaleAttention(4, scale=scale, average=average).double()
    _perturb_prelus(m)
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        ref = torch.cat([_naive_cross_scale(m, x[i : i + 1]) for i in range(2)])
    assert out.shape == (2, 4, scale * hw[0], scale * hw[1])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def _released_cross_scale(m: CrossScaleAttention, x: torch.Tensor) -> torch.Tensor:
    """The released arithmetic: key patches as conv2d filters over the padded query map, softmax
    over the key axis, and a transposed convolution (stride s) pasting the value patches."""
    s, k, t = m.scale, m.ksize, m.stride
    n = x.shape[0]
    query = m.conv_match_1(x)
    ref = m.conv_match_2(F.interpolate(x, scale_factor=1 / s, mode="bilinear", align_corners=False))
    keys = F.unfold(F.pad(ref, _same_pads(ref, k, t)), k, stride=t)
    n_keys = keys.shape[-1]
    keys = keys.view(n, -1, k, k, n_keys).permute(0, 4, 1, 2, 3)
    keys = keys / keys.pow(2).sum(dim=(2, 3, 4), keepdim=True).sqrt().clamp_min(1e-4)
    kv = k * s
    values = m.conv_assembly(x)
    values = F.unfold(F.pad(values, _same_pads(values, kv, t * s)), kv, stride=t * s)
    values = values.view(n, -1, kv, kv, n_keys).permute(0, 4, 1, 2, 3)
    out = []
    for b in range(n):
        scores = F.conv2d(F.pad(query[b : b + 1], _same_pads(query, k, 1)), keys[b])
        attn = torch.softmax(scores * m.softmax_scale, dim=1)
        out.append(F.conv_transpose2d(attn, values[b], stride=s, padding=(k - 1) * s // 2))
    return torch.cat(out) / 6


def _same_pads(x: torch.Tensor, ksize: int, stride: int) -> list[int]:
    """TensorFlow 'SAME' padding (left, right, top, bottom) for ``ksize`` windows at ``stride``."""
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max(0, (-(-size // stride) - 1) * stride + ksize - size)
        pads += [total // 2, total - total // 2]
    return pads


@pytest.mark.parametrize(
    ("scale", "hw", "stride"), [(2, (12, 10), 1), (3, (9, 12), 1), (2, (10, 14), 2)]
)
def test_cross_scale_attention_matches_released_transposed_convolution(scale, hw, stride):
    """The matmul + fold assembly equals the released conv2d / conv_transpose2d formulation."""
    torch.manual_seed(3)
    m = CrossScaleAttention(6, scale=scale, stride=stride).double()
    _perturb_prelus(m)
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _released_cross_scale(m, x), rtol=1e-10, atol=1e-10)


def _real_features(channels: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[2, channels, size, size]``: two crops of the bundled sample through a fixed seeded
    3x3 convolution, normalised per channel (features of a real image, not noise)."""
    pixels = read_image(Path(nlsr.__file__).parent / "assets" / "sample.png").pixels
    img = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].to(dtype) / 255
    crops = torch.cat([img[..., :size, :size], img[..., -size:, -size:]])
    head = torch.nn.Conv2d(3, channels, 3, padding=1).to(dtype)
    with torch.no_grad():
        x = head(crops)
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def _outputs_and_grads(module, x, grad):
    """The output of ``module(x)`` and the gradients of ``(out * grad).sum()`` w.r.t. ``x`` and
    every parameter (zeros where a parameter gets none)."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    params = list(module.parameters())
    grads = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
    filled = [
        torch.zeros_like(t) if g is None else g for t, g in zip([x, *params], grads, strict=True)
    ]
    return [out.detach(), *filled]


@pytest.mark.parametrize("block_elements", [2**22, 1, 300])
@pytest.mark.parametrize(
    ("scale", "hw", "average", "ksize"),
    [(2, (10, 12), True, 3), (3, (9, 7), True, 3), (2, (8, 10), False, 3), (2, (7, 9), True, 5)],
)
def test_blocked_kernel_matches_released_form_with_gradients(
    block_elements, scale, hw, average, ksize, monkeypatch
):
    """The blocked kernel (whole image, one query row, a few rows per block) equals the released
    conv2d / softmax / conv_transpose2d form in float64: outputs and all gradients."""
    monkeypatch.setattr(cross_scale, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(5)
    m = CrossScaleAttention(6, scale=scale, average=average, ksize=ksize).double()
    _perturb_prelus(m)
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    grad = torch.randn(2, 6, scale * hw[0], scale * hw[1], dtype=torch.float64)
    ours = _outputs_and_grads(m, x, grad)
    released = _outputs_and_grads(ReleasedCrossScaleAttention(m), x, grad)
    for a, b in zip(ours, released, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_matches_float64_released_form_on_real_features(monkeypatch):
    """On features of a real image, the float32 kernel (in blocks of rows) equals the float64
    released form to 1e-5 relative to each tensor's largest entry (at least 1), outputs and
    gradients (the weight gradients reach ~100; the released form in float32 is as far)."""
    monkeypatch.setattr(cross_scale, "BLOCK_ELEMENTS", 5000)
    torch.manual_seed(2)
    m = CrossScaleAttention(16, scale=2)
    x = _real_features(16, 20, torch.float64)
    grad = torch.randn(2, 16, 40, 40, dtype=torch.float64)
    ours = _outputs_and_grads(m, x.float(), grad.float())
    released = _outputs_and_grads(ReleasedCrossScaleAttention(m.double()), x, grad)
    for a, b in zip(ours, released, strict=True):
        tol = 1e-5 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol)


def test_released_form_rejects_strided_keys():
    with pytest.raises(ReleasedFormError, match="stride 1"):
        released_baseline(CrossScaleAttention(4, stride=2))


@pytest.mark.shared
def test_released_form_reproduces_official_fixture():
    """The released form, swapped into CSNLN by released_baseline, reproduces the official
    output: it computes what the authors' code computes."""
    case = require(FIXTURES / "csnln_x2")
    model = create("csnln", 2, n_feats=32, depth=2).eval()
    model.load_state_dict(torch.load(case / "checkpoint.pt", weights_only=True), strict=True)
    model = released_baseline(model)
    assert any(isinstance(m, ReleasedCrossScaleAttention) for m in model.modules())
    with torch.no_grad():
        out = model(torch.load(case / "input.pt", weights_only=True))
    expected = torch.load(case / "output.pt", weights_only=True)
    assert (out - expected).abs().max().item() <= 1e-5


def test_in_scale_attention_matches_naive_loops():
    torch.manual_seed(1)
    m = InScaleNonLocalAttention(6).double()
    _perturb_prelus(m)
    x = torch.randn(1, 6, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        theta, phi, g = m.conv_match1(x)[0], m.conv_match2(x)[0], m.conv_assembly(x)[0]
        ref = torch.zeros_like(out)
        pos = [(i, j) for i in range(3) for j in range(5)]
        for i, j in pos:
            scores = torch.stack([(theta[:, i, j] * phi[:, a, b]).sum() for a, b in pos])
            weights = torch.softmax(scores, dim=0)
            ref[0, :, i, j] = sum(wt * g[:, a, b] for wt, (a, b) in zip(weights, pos, strict=True))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("scale", "hw", "stride"), [(2, (1, 1), 1), (2, (5, 7), 1), (3, (4, 2), 1), (2, (9, 6), 2)]
)
def test_create_attention_csna_upsamples_any_size(scale, hw, stride):
    block = create_attention("csna", 8, scale=scale, stride=stride)
    assert isinstance(block, CrossScaleAttention)
    x = torch.rand(1, 8, *hw)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (1, 8, scale * hw[0], scale * hw[1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [{"ksize": 2}, {"scale": 0}, {"reduction": 9}])
def test_csna_rejects_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_attention("csna", 8, **bad)


@pytest.mark.shared
def test_official_fixture_parity():
    case = require(FIXTURES / "csnln_x2")
    state = torch.load(case / "checkpoint.pt", weights_only=True)
    x = torch.load(case / "input.pt", weights_only=True)
    expected = torch.load(case / "output.pt", weights_only=True)
    model = create("csnln", 2, n_feats=32, depth=2).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape
    err = (out - expected).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g}"


@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (13, 200), (64, 64)])
def test_any_input_size(hw):
    torch.manual_seed(0)
    model = create("csnln", 2, n_feats=16, depth=1).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *hw))
    assert out.shape == (1, 3, 2 * hw[0], 2 * hw[1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [3, 4])
def test_x3_x4_layout_and_run(scale):
    torch.manual_seed(0)
    model = create("csnln", scale, n_feats=8, depth=2).eval()
    keys = model.state_dict()
    sem = "SEM.down_sample_1.0.weight"
    assert keys[sem].shape[-1] == (9 if scale == 3 else 6)
    has_x4 = {
        "SEM.multi_source_projection_2.up_attention.escape_NaN",
        "SEM.down_sample_3.0.weight",
        "SEM.down_sample_4.0.weight",
        "SEM.error_encode_2.0.weight",
    }
    assert has_x4 <= set(keys) if scale == 4 else not has_x4 & set(keys)
    assert ("SEM.down_sample_2.0.weight" in keys) == (scale == 3)
    if scale == 4:
        assert keys["SEM.down_sample_3.0.weight"].shape[-1] == 8
    with torch.no_grad():
        out = model(torch.rand(1, 3, 7, 5))
    assert out.shape == (1, 3, 7 * scale, 5 * scale)
    assert torch.isfinite(out).all()


def test_paper_model_has_3_06m_parameters():
    model = create("csnln", 2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6, 2) == 3.06
    assert model.chop_min_size == 3600 and model.scale == 2 and model.rgb_range == 1


def test_training_step_lowers_loss():
    torch.manual_seed(0)
    model = create("csnln", 2, n_feats=8, depth=1).train()
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.l1_loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bad", [{"scale": 5}, {"n_feats": 0}, {"n_colors": 1}])
def test_csnln_rejects_bad_options(bad):
    options = {"scale": 2, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        create("csnln", **options)
