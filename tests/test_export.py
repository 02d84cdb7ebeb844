"""ONNX export (nlsr.export, ``nlsr export``) and running the file through onnxruntime
(``resolve_model("x.onnx")``, ``nlsr upscale --weights x.onnx``): every architecture against
PyTorch at several input sizes, with the export's fixed hash projections, and on the official
fixtures with their recorded projections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, require

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'nlsr[onnx]')")
ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'nlsr[onnx]')"
)

import nlsr  # noqa: E402
from nlsr.attention.hashing import HashingAttention  # noqa: E402
from nlsr.export import export_onnx, fixed_projections, use_leading_columns  # noqa: E402
from nlsr.models import create, resolve_model, small_config  # noqa: E402

#: Aim and bound of |onnxruntime - PyTorch| (issue 18).
AIM, BOUND = 1e-5, 1e-4
#: Fewer blocks than the small configurations, so that each export takes seconds.
FEWER: dict[str, dict[str, int]] = {
    "edsr": {"n_resblocks": 2, "n_feats": 16},
    "rcan": {"n_resgroups": 1, "n_resblocks": 2, "n_feats": 16},
    "nlsn": {"n_resblocks": 2, "n_feats": 16},
    "dlsn": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16},
    "lcoan": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16},
    "hspan": {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16},
    "csnln": {"n_feats": 16, "depth": 1},
}
ARCHS = ["edsr", "rcan", "nlsn", "dlsn", "lcoan", "csnln", "hspan", "bicubic"]
#: Input sizes (N, H, W): a few chunks, more chunks and a batch, and smaller than half a chunk.
SIZES = [(1, 13, 17), (2, 30, 26), (1, 5, 6)]


def _tiny(arch: str) -> torch.nn.Module:
    """A seeded small network of ``arch``, its k-means centroids (LCoA) initialised."""
    torch.manual_seed(0)
    options = {**small_config(arch), **FEWER.get(arch, {})}
    model = create(arch, 2, **options).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16))
    return model


def _pytorch(model: torch.nn.Module, fixed: dict, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's output on ``x`` with the hash projections the export stored."""
    use_leading_columns(fixed, x.shape[-2] * x.shape[-1])
    with torch.no_grad():
        return model(x)


def _onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_pytorch_at_several_sizes(arch: str, tmp_path: Path) -> None:
    model = _tiny(arch)
    result = export_onnx(model, tmp_path / f"{arch}.onnx", seed=3)
    assert result.metadata["scale"] == "2" and result.metadata["arch"] == arch
    fixed = fixed_projections(model, 3)
    assert all(isinstance(b, HashingAttention) for b in fixed)
    generator = torch.Generator().manual_seed(1)
    for n, h, w in SIZES:
        x = torch.rand(n, 3, h, w, generator=generator)
        expected = _pytorch(model, fixed, x)
        out = _onnx(result.path, x)
        assert out.shape == (n, 3, 2 * h, 2 * w)
        diff = float(np.abs(out - expected.numpy()).max())
        print(f"{arch} {n}x{h}x{w}: max |onnxruntime - pytorch| = {diff:.2e}")
        assert diff <= BOUND


@pytest.mark.shared
@pytest.mark.parametrize(
    "case", ["edsr_x2", "rcan_x2", "nlsn_x2", "dlsn_x2", "lcoan_x2", "csnln_x2", "hspan_x2"]
)
def test_export_reproduces_official_fixture(case: str, tmp_path: Path) -> None:
    require(FIXTURES)
    folder = FIXTURES / case
    if not (folder / "case.json").is_file():
        pytest.skip(f"{folder}: no official fixture case")
    info = json.loads((folder / "case.json").read_text())
    model = nlsr.load(folder / "checkpoint.pt", **info["not_inferable_from_weights"])
    draws = None
    if (folder / "projections.pt").exists():
        draws = torch.load(folder / "projections.pt", weights_only=True)
    path = export_onnx(model, tmp_path / "m.onnx", projections=draws).path
    x = torch.load(folder / "input.pt", weights_only=True)
    stable = folder / "output_stable_sort.pt"
    expected = torch.load(stable if stable.exists() else folder / "output.pt", weights_only=True)
    diff = float(np.abs(_onnx(path, x) - expected.numpy()).max())
    print(f"{case}: max |onnxruntime - official| = {diff:.2e}")
    assert diff <= BOUND


def test_resolve_and_upscale_run_the_onnx_file(tmp_path: Path) -> None:
    """``nlsr export`` on a checkpoint, then resolve_model and ``nlsr upscale --weights``."""
    from nlsr.cli import main
    from nlsr.io import read_image, write_image

    model = _tiny("nlsn")
    weights = nlsr.save(model, tmp_path / "tiny.safetensors")
    onnx_path = tmp_path / "tiny.onnx"
    assert main(["export", str(weights), "-o", str(onnx_path), "--check"]) == 0
    found = resolve_model(onnx_path)
    assert (found.scale, found.arch, found.rgb_range) == (2, "nlsn", 1.0)
    image = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    write_image(tmp_path / "in.png", image)
    out_dir = tmp_path / "out"
    assert (
        main(["upscale", str(tmp_path / "in.png"), "-o", str(out_dir), "--weights", str(onnx_path)])
        == 0
    )
    produced = read_image(next(out_dir.iterdir())).pixels
    assert produced.shape == (24, 20, 3)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    fixed = fixed_projections(model, 0)
    expected = _pytorch(model, fixed, x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255
    assert np.abs(produced.astype(float) - expected).max() <= 1.0  # rounding to uint8


def test_bad_export_arguments_fail_with_one_line(tmp_path: Path, capsys) -> None:
    from nlsr.cli import main

    assert main(["export", "edsr", "-o", str(tmp_path / "m.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match=r"bad\.onnx"):
        resolve_model(tmp_path / "bad.onnx")


@pytest.mark.parametrize("rounds", [1, 3])
def test_export_attention_equals_the_blocked_kernel_eagerly(rounds: int) -> None:
    """The traceable bucketed attention against the blocked kernel (and its released layout) at
    lengths below half a chunk (one dense chunk), below a chunk, and over several chunks."""
    from nlsr.attention.backends import bucket_attention, exported_attention

    generator = torch.Generator().manual_seed(rounds)
    for length in [1, 5, 7, 8, 9, 15, 16, 17, 40, 100]:
        q = torch.randn(2, length, 4, generator=generator)
        v = torch.randn(2, length, 5, generator=generator)
        codes = torch.randint(0, 4, (2, rounds, length), generator=generator)
        for bias in (None, torch.randn(2, length, 16, generator=generator)):
            blocked = bucket_attention(q, v, codes, 16, key_bias=bias, backend="blocked")
            traced = exported_attention(q, v, codes, 16, bias)
            assert (blocked - traced).abs().max() <= 1e-5, (length, bias is None)


def test_traceable_padding_and_bicubic_equal_the_eager_ones() -> None:
    """The gather form of pad_to_multiple and the tensor form of MATLAB bicubic (both used only
    while exporting) against the eager code, on sizes where reflect gives way to replicate and
    on 8-bit-grid and off-grid images."""
    from nlsr.models.bicubic import Bicubic, traceable_imresize
    from nlsr.padding import _traceable_pad, pad_to_multiple

    generator = torch.Generator().manual_seed(0)
    for h in range(1, 7):
        for w in (1, 2, 5):
            x = torch.rand(1, 2, h, w, generator=generator)
            for multiple, least in ((2, 1), (4, 1), (3, 7)):
                assert torch.equal(
                    _traceable_pad(x, multiple, least), pad_to_multiple(x, multiple, least)[0]
                )
    for scale in (2, 3, 4):
        off_grid = torch.rand(1, 3, 5, 4, generator=generator)
        on_grid = (off_grid * 255).round() / 255
        x = torch.cat([off_grid, on_grid])
        diff = (Bicubic(scale)(x).double() - traceable_imresize(x, scale)).abs().max()
        assert diff <= 1e-7  # float32 rounding of the eager output
