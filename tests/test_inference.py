"""nlsr.inference: whole image, chop geometry, seamless tiles, x8 self-ensemble, and the
array/Image front end. Tiny hand-made models make the expected outputs exact."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlsr.inference import forward, select_device, tile_count, to_array, to_tensor, upscale
from nlsr.io import Image
from nlsr.resize import imresize


class Nearest(nn.Module):
    """Pointwise and flip/transpose-equivariant: per-channel gain, then nearest upsampling."""

    def __init__(self, scale: int = 2, gains: tuple[float, ...] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.scale = scale
        self.register_buffer("gain", torch.tensor(gains).view(1, -1, 1, 1))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return F.interpolate(x * self.gain, scale_factor=self.scale, mode="nearest")


class PixelShuffle(nn.Module):
    """Pointwise but not equivariant: 1x1 conv to s^2 sub-pixels per channel."""

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(3, 3 * scale * scale, 1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return F.pixel_shuffle(self.conv(x), self.scale)


class Local(nn.Module):
    """Two 3x3 convolutions (receptive radius 2), then pixel shuffle: neither pointwise nor
    equivariant."""

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh())
        self.tail = nn.Conv2d(8, 3 * scale * scale, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.pixel_shuffle(self.tail(self.body(x)), self.scale)


def seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return model


def coords(n: int, h: int, w: int) -> torch.Tensor:
    """Channel 0: row index, 1: column index, 2: batch index: every pixel is unique."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.stack([y, x, torch.full_like(y, i)]).float() for i in range(n)])


def transform(a: np.ndarray, k: int) -> np.ndarray:
    """NumPy reference of the 8 variants on (N, C, H, W)."""
    if k & 1:
        a = a[..., ::-1]
    if k & 2:
        a = a[..., ::-1, :]
    if k & 4:
        a = np.swapaxes(a, -1, -2)
    return np.ascontiguousarray(a)


def untransform(a: np.ndarray, k: int) -> np.ndarray:
    if k & 4:
        a = np.swapaxes(a, -1, -2)
    if k & 2:
        a = a[..., ::-1, :]
    if k & 1:
        a = a[..., ::-1]
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------------------------
# tiles


@pytest.mark.parametrize(
    "n,h,w,tile,overlap",
    [
        (1, 37, 53, 16, 5),
        (2, 23, 41, 7, 0),
        (1, 29, 31, 10, 9),
        (1, 5, 70, 16, 4),
        (1, 9, 9, 64, 8),
    ],
)
def test_tiles_equal_whole_image_for_a_pointwise_model(
    n: int, h: int, w: int, tile: int, overlap: int
) -> None:
    model = seeded(PixelShuffle(2))
    x = torch.rand(n, 3, h, w)
    whole = forward(model, x)
    model.calls.clear()
    tiled = forward(model, x, tile=tile, overlap=overlap)
    assert tiled.shape == (n, 3, 2 * h, 2 * w)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    th, tw = min(tile, h), min(tile, w)
    batch_limit = max(th * tw * n, 256 * 256)  # one tile, or up to 256x256 LR pixels a batch
    assert all(c[2:] == (th, tw) and c[0] * th * tw <= batch_limit for c in model.calls)


@pytest.mark.parametrize("h,w,tile,overlap", [(37, 53, 16, 5), (9, 9, 64, 8), (20, 300, 8, 2)])
def test_progress_reports_every_tile_once(h: int, w: int, tile: int, overlap: int) -> None:
    """on_progress sees the running count of tiles up to tile_count, which counts the tiles
    the model really ran (one call per batch of tiles)."""
    model = seeded(PixelShuffle(2))
    seen: list[tuple[int, int]] = []
    forward(
        model,
        torch.rand(1, 3, h, w),
        tile=tile,
        overlap=overlap,
        on_progress=lambda *a: seen.append(a),
    )
    ran = sum(c[0] for c in model.calls)
    assert ran == tile_count(h, w, tile, overlap)
    assert [t for _, t in seen] == [ran] * len(seen) and seen[-1][0] == ran
    assert len(seen) == len(model.calls) and all(a < b for (a, _), (b, _) in pairwise(seen))


def test_tile_blending_is_seamless_for_a_local_model() -> None:
    """With a receptive field the blend differs from the whole image only near tile borders,
    and much less than pasting tiles without overlap."""
    model = seeded(Local(2))
    x = torch.rand(1, 3, 48, 48)
    whole = forward(model, x)
    blended = forward(model, x, tile=16, overlap=8)
    abutting = forward(model, x, tile=16, overlap=0)
    assert (blended - whole).abs().max() < 0.5 * (abutting - whole).abs().max()


def test_tile_options_are_validated() -> None:
    model = Nearest()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        forward(model, x, tile=8, overlap=8)
    with pytest.raises(ValueError, match="tile"):
        forward(model, x, tile=0)
    with pytest.raises(ValueError, match="alternatives"):
        forward(model, x, tile=8, chop=True)


# ----------------------------------------------------------------------------------------------
# chop


def chop_reference(h: int, w: int, shave: int, min_size: int) -> int:
    """Quadrant count of the authors' forward_chop, counted directly."""
    hs, ws = min(h // 2 + shave, h), min(w // 2 + shave, w)
    if hs * ws < min_size or (hs, ws) == (h, w):
        return 4
    return 4 * chop_reference(hs, ws, shave, min_size)


@pytest.mark.parametrize(
    "h,w,min_size,calls",
    [(40, 40, 1000, 4), (40, 40, 800, 16), (60, 61, 1000, 16), (3, 5, 160000, 4), (1, 1, 1, 4)],
)
def test_chop_pastes_every_pixel_from_its_own_quadrant(
    h: int, w: int, min_size: int, calls: int
) -> None:
    model = Nearest(3)
    x = coords(2, h, w)
    whole = forward(model, x)
    model.calls.clear()
    chopped = forward(model, x, chop=True, chop_min_size=min_size)
    assert torch.equal(chopped, whole)
    assert len(model.calls) == calls == chop_reference(h, w, 10, min_size)
    hs, ws = min(h // 2 + 10, h), min(w // 2 + 10, w)
    if calls == 4:
        assert all(c[2:] == (hs, ws) for c in model.calls)


def test_chop_overlap_hides_the_receptive_field_but_a_tiny_shave_does_not() -> None:
    model = seeded(Local(2))
    x = torch.rand(1, 3, 30, 26)
    whole = forward(model, x)
    torch.testing.assert_close(forward(model, x, chop=True), whole, atol=1e-6, rtol=0)
    assert model.calls == 1 + 4  # chop always splits at least once
    assert (forward(model, x, chop=True, chop_shave=1) - whole).abs().max() > 1e-3


def test_chop_threshold_defaults_to_the_model_attribute() -> None:
    model = Nearest(2)
    model.chop_min_size = 1000
    forward(model, coords(1, 60, 60), chop=True)
    assert len(model.calls) == chop_reference(60, 60, 10, 1000) == 16


def test_chop_stops_when_quadrants_no_longer_shrink() -> None:
    """h//2 + shave == h at h = 20: the authors' code would recurse forever on min_size <= 400."""
    model = Nearest(2)
    x = coords(1, 20, 20)
    assert torch.equal(forward(model, x, chop=True, chop_min_size=1), forward(model, x))


# ----------------------------------------------------------------------------------------------
# self-ensemble


def test_self_ensemble_of_an_equivariant_model_is_the_model() -> None:
    model = Nearest(2, gains=(0.5, 1.0, 2.0))
    x = torch.rand(2, 3, 11, 17)
    whole = forward(model, x)
    torch.testing.assert_close(forward(model, x, self_ensemble=True), whole)
    torch.testing.assert_close(forward(model, x, self_ensemble=True, tile=8, overlap=3), whole)
    torch.testing.assert_close(forward(model, x, self_ensemble=True, chop=True), whole)


def test_self_ensemble_is_the_mean_of_the_eight_inverted_variants() -> None:
    model = seeded(Local(2))
    x = torch.rand(1, 3, 9, 14)
    expected = np.mean(
        [
            untransform(forward(model, torch.from_numpy(transform(x.numpy(), k))).numpy(), k)
            for k in range(8)
        ],
        axis=0,
    )
    got = forward(model, x, self_ensemble=True)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert (forward(model, x) - got).abs().max() > 1e-3  # the model is not equivariant


# ----------------------------------------------------------------------------------------------
# model handling


def test_forward_uses_rgb_range_eval_mode_and_returns_float() -> None:
    class Sqrt(nn.Module):
        scale, rgb_range = 2, 255.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training
            return F.interpolate(x.sqrt(), scale_factor=2, mode="nearest")

    model = Sqrt().train()
    x = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    y = forward(model, x)
    assert model.training and y.dtype == torch.float32
    expected = F.interpolate((x * 255).sqrt() / 255, scale_factor=2, mode="nearest").float()
    torch.testing.assert_close(y, expected)


def test_progress_bar_counts_pieces(capsys: pytest.CaptureFixture[str]) -> None:
    forward(Nearest(2), torch.rand(1, 3, 20, 20), chop=True, self_ensemble=True, progress=True)
    assert "0/32" in capsys.readouterr().err  # 8 variants x 4 quadrants


def test_model_without_scale_or_wrong_output_is_reported() -> None:
    with pytest.raises(ValueError, match="scale"):
        forward(nn.Identity(), torch.rand(1, 3, 4, 4))

    class Liar(Nearest):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, scale_factor=2, mode="nearest")

    wrong = Liar(3)  # claims 3x, returns 2x
    with pytest.raises(ValueError, match="expected 3x"):
        forward(wrong, torch.rand(1, 3, 4, 4))


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="bogus"):
        select_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


# ----------------------------------------------------------------------------------------------
# arrays and images


def test_to_tensor_to_array_round_trip() -> None:
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        a = np.random.default_rng(0).integers(0, top + 1, (5, 6, 3)).astype(dtype)
        t = to_tensor(a)
        assert t.shape == (1, 3, 5, 6) and t.dtype == torch.float32
        assert float(t.max()) <= 1 and np.array_equal(to_array(t, dtype), a)
    assert np.array_equal(to_array(torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1)), [[[0, 128, 255]]])
    with pytest.raises(ValueError, match="HxWx3"):
        to_tensor(np.zeros((4, 4), np.uint8))


def test_upscale_rgb_uint8_and_uint16_are_exact() -> None:
    rng = np.random.default_rng(1)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        a = rng.integers(0, top + 1, (7, 9, 3)).astype(dtype)
        out = upscale(Nearest(2), a)
        assert out.dtype == dtype and np.array_equal(out, a.repeat(2, 0).repeat(2, 1))
        rgba = np.concatenate([a, rng.integers(0, top + 1, (7, 9, 1)).astype(dtype)], axis=2)
        out = upscale(Nearest(2), rgba, tile=4, overlap=1)
        assert out.shape == (14, 18, 4) and out.dtype == dtype
        assert np.array_equal(out[:, :, :3], a.repeat(2, 0).repeat(2, 1))
        assert np.array_equal(out[:, :, 3], imresize(rgba[:, :, 3], 2))


def test_upscale_grey_returns_the_rounded_channel_mean() -> None:
    g = np.random.default_rng(2).integers(0, 256, (6, 8)).astype(np.uint8)
    model = Nearest(2, gains=(0.5, 1.0, 1.5))  # channel mean = the input
    up = g.repeat(2, 0).repeat(2, 1)
    out = upscale(model, g)
    assert out.shape == (12, 16) and np.array_equal(out, up)
    assert np.array_equal(upscale(model, g[:, :, None]), up[:, :, None])
    ga = np.stack([g, g[::-1]], axis=2)
    out = upscale(model, ga)
    assert out.shape == (12, 16, 2) and np.array_equal(out[:, :, 0], up)
    assert np.array_equal(out[:, :, 1], imresize(g[::-1], 2))
    skewed = upscale(Nearest(2, gains=(0.0, 0.0, 0.6)), g)  # mean 0.2 * g, rounded
    assert np.array_equal(skewed, np.floor(0.2 * up + 0.5).astype(np.uint8))


def test_upscale_image_keeps_kind_alpha_and_grayscale() -> None:
    g16 = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    img = Image(np.repeat(g16[:, :, None], 3, axis=2), alpha=g16[::-1].copy(), grayscale=True)
    out = upscale(Nearest(3), img)
    assert isinstance(out, Image) and out.grayscale and out.pixels.dtype == np.uint16
    assert np.array_equal(out.pixels[:, :, 0], g16.repeat(3, 0).repeat(3, 1))
    assert np.array_equal(out.alpha, imresize(g16[::-1].copy(), 3))


def test_upscale_by_model_name_is_matlab_bicubic() -> None:
    a = np.random.default_rng(3).integers(0, 256, (10, 13, 3)).astype(np.uint8)
    assert np.array_equal(upscale("bicubic", a, scale=3, device="cpu"), imresize(a, 3))
    with pytest.raises(ValueError, match="does not match"):
        upscale(Nearest(2), a, scale=4)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        upscale(Nearest(2), a.astype(np.float32))


def test_bf16_precision_keeps_attention_in_float32() -> None:
    """bf16 autocast changes the convolutions (on a smooth input the output moves by under two
    grey levels) while the attention kernel still sees float32 with autocast off."""
    from nlsr.attention import nla
    from nlsr.models import create

    seen: list[tuple[torch.dtype, bool]] = []
    inner = nla._BlockedAttention.apply

    def spy(query: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return inner(query, *args)

    torch.manual_seed(0)
    model = create("edsr", 2, n_resblocks=2, n_feats=16, attention="nla").eval()
    y, x = torch.meshgrid(torch.linspace(0, 1, 20), torch.linspace(0, 1, 24), indexing="ij")
    lr = torch.stack([x, y, (x + y) / 2]).unsqueeze(0)
    full = forward(model, lr, precision="fp32")
    nla._BlockedAttention.apply = spy
    try:
        half = forward(model, lr, precision="bf16")
    finally:
        nla._BlockedAttention.apply = inner
    assert seen == [(torch.float32, False)]
    assert half.dtype == torch.float32
    diff = (half - full).abs().max().item()
    assert 0 < diff < 2 / 255, diff
    with pytest.raises(ValueError, match="precision"):
        forward(model, lr, precision="fp8")


def _nla_edsr() -> torch.nn.Module:
    from nlsr.models import create

    torch.manual_seed(0)
    return create("edsr", 2, n_resblocks=2, n_feats=16, attention="nla").eval()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_native_and_allowed(monkeypatch, native: bool) -> None:
    """The default "auto" gives exactly the bf16 output where the device computes bf16 natively
    and the model allows it, else exactly the fp32 output."""
    import dataclasses

    from nlsr import inference
    from nlsr.models import resolve_model

    model = _nla_edsr()
    lr = torch.rand(1, 3, 12, 14, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(inference, "native_bf16", lambda device: native)
    fp32, bf16 = forward(model, lr, precision="fp32"), forward(model, lr, precision="bf16")
    assert not torch.equal(fp32, bf16)
    assert torch.equal(forward(model, lr), bf16 if native else fp32)
    assert np.array_equal(
        upscale(model, to_array(lr)),
        upscale(model, to_array(lr), precision="bf16" if native else "fp32"),
    )
    no_bf16 = dataclasses.replace(resolve_model(model), bf16=False)
    assert torch.equal(forward(no_bf16, lr), fp32)
    for low in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"--precision {low}: .* reduced precision"):
            forward(no_bf16, lr, precision=low)


def test_fp16_needs_cuda() -> None:
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        forward(_nla_edsr(), torch.rand(1, 3, 8, 8), precision="fp16")


def test_float16_autocast_keeps_attention_in_float32() -> None:
    """Under float16 autocast (what precision="fp16" uses on CUDA; here on the CPU) the
    attention kernel still sees float32 with autocast off, and the output is near float32's."""
    from nlsr.attention import nla

    seen: list[tuple[torch.dtype, bool]] = []
    inner = nla._BlockedAttention.apply

    def spy(query: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return inner(query, *args)

    model = _nla_edsr()
    lr = torch.rand(1, 3, 12, 14, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(lr)
        nla._BlockedAttention.apply = spy
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                half = model(lr)
        finally:
            nla._BlockedAttention.apply = inner
    assert seen == [(torch.float32, False)]
    assert half.dtype == torch.float32  # the closing mean shift stays float32
    assert 0 < (half.float() - full).abs().max().item() < 2 / 255


def test_mean_shift_stays_float32_under_autocast() -> None:
    """The networks' first and last layer (the mean shift) is exact under bf16 autocast: a
    bfloat16 output would round pixels near 1.0 by up to half a grey level."""
    from nlsr.models.common import MeanShift

    shift = MeanShift(1.0, +1)
    x = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = shift(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, shift(x))
    assert torch.allclose(y, x + shift.bias.view(1, 3, 1, 1), atol=1e-7, rtol=0)


def test_outscale_is_the_model_output_then_matlab_bicubic() -> None:
    """upscale(outscale=F) equals the x2 output resized with imresize to round(F * side), halves
    up, for colour and alpha alike; F equal to the model's scale changes nothing."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    plain = upscale("bicubic", rgba, scale=2)
    got = upscale("bicubic", rgba, scale=2, outscale=3.5)
    assert got.shape == (32, 46, 4)  # 3.5 * 9 = 31.5 -> 32, 3.5 * 13 = 45.5 -> 46
    for c in range(4):
        expected = imresize(plain[..., c], output_shape=(32, 46))
        np.testing.assert_array_equal(got[..., c], expected)
    np.testing.assert_array_equal(upscale("bicubic", rgba, scale=2, outscale=2.0), plain)
