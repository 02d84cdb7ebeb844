"""What the measured blocks and networks are fed, and the sparsemax supports HSPA meets on it.

``--input real`` (the default) takes every input from one image: the bundled test card
``nlsr/assets/sample.png`` (256x256) or ``--input-image FILE``. For a side ``s`` the image,
extended beyond its borders by mirror symmetry (``... 2 1 0 | 0 1 2 ... H-1 | H-1 H-2 ...``),
is cut to the ``s x s`` window centred on it (a centre crop, or the image with mirrored
margins when it is smaller than ``s``); item ``i`` of a batch is that window of the image
turned by the ``i mod 8``-th of the eight flips and quarter turns, so that items differ.

* Networks get these windows, RGB in ``[0, 1]``.
* Blocks get their features: the ``(s + 2) x (s + 2)`` window through a fixed 3x3 convolution
  3 -> C without padding (weights ``N(0, 1/27)`` drawn from a generator seeded with
  ``--seed``, no bias), then standardised per item and channel (zero mean, unit standard
  deviation), the statistics of the ``torch.randn`` map of ``--input random``: only the spatial
  structure of real content differs. Every block therefore sees the same input at each size.

``--input network`` feeds each block the features a network really gives it: the paper network
that uses the block (:data:`NETWORKS`, built with its paper options and untrained weights after
``torch.manual_seed(--seed)``) is run without gradients on the same window as ``--input real``
and the input of its ``--input-block``-th call of that block (0: the first) is captured with a
forward pre-hook; the rest of the network is not run. The block then has the network's channel
count (``--channels`` does not apply). Networks get the windows, as with ``real``. Unit-std
features understate HSPA's work: inside HSPAN the features have a per-channel std near 0.2 and
its sparsemax supports are several times wider.

``--input random`` is the former behaviour: ``torch.randn`` maps for blocks and ``torch.rand``
images for networks, drawn after ``torch.manual_seed(--seed)`` and building the target.

Real content widens HSPA's sparsemax supports (similar positions are many), which is what its
speed depends on, so every row holding HSPA blocks reports the support sizes they met
(:func:`support_sizes`).
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.bench.measuring import BenchError

#: Values of ``--input``.
INPUTS = ("real", "random", "network")
#: ``--input network``: the network (architecture, options beyond its paper defaults) whose
#: features each block is fed; ``resblock`` gets the residual blocks' inputs of EDSR.
NETWORKS: dict[str, tuple[str, dict[str, Any]]] = {
    "hspa": ("hspan", {}),
    "nlsa": ("nlsn", {}),
    "gla": ("dlsn", {}),
    "lcoa": ("lcoan", {}),
    "csna": ("csnln", {}),
    "nla": ("edsr", {"attention": "nla"}),
    "resblock": ("edsr", {}),
}
#: Captured feature maps kept for reuse within one run (the modes and baselines of a size).
_KEEP = 4
#: Queries whose supports are counted per HSPA call: all when there are at most this many
#: positions, else every ``ceil(L / SUPPORT_QUERIES)``-th one.
SUPPORT_QUERIES = 4096
#: Query rows scored at once when counting supports (float64 rows of all L keys).
_COUNT_ROWS = 64


def sample_path() -> Path:
    """The bundled test card, the default source of real inputs."""
    return Path(str(resources.files("nlsr").joinpath("assets", "sample.png")))


def load_source(path: str | Path | None = None) -> Tensor:
    """The image ``path`` (default: :func:`sample_path`) as a ``(3, H, W)`` float tensor in
    ``[0, 1]``."""
    from nlsr.io import read_image

    try:
        image = read_image(path or sample_path())
    except ValueError as err:
        raise BenchError(f"--input-image: {err}") from None
    pixels = image.pixels
    scale = 65535.0 if pixels.dtype.itemsize == 2 else 255.0
    return torch.from_numpy(pixels.astype("float32") / scale).permute(2, 0, 1).contiguous()


def _mirrored(length: int, start: int, count: int) -> Tensor:
    """Indices ``start .. start + count - 1`` into an axis of ``length``, reflected at its ends
    (edge samples repeated), for a window reaching beyond the axis."""
    at = torch.arange(start, start + count) % (2 * length)
    return torch.where(at < length, at, 2 * length - 1 - at)


def window(source: Tensor, side: int) -> Tensor:
    """The ``side x side`` window centred on ``source`` ``(3, H, W)``, mirrored beyond it."""
    _, h, w = source.shape
    rows = _mirrored(h, (h - side) // 2, side)
    cols = _mirrored(w, (w - side) // 2, side)
    return source[:, rows][:, :, cols]


def _turned(image: Tensor, i: int) -> Tensor:
    """``image`` ``(3, s, s)`` under the ``i mod 8``-th flip / quarter turn (0: unchanged)."""
    i %= 8
    turned = torch.rot90(image, i % 4, dims=(1, 2))
    return turned.flip(2) if i >= 4 else turned


def real_images(source: Tensor, side: int, batch: int = 1) -> Tensor:
    """``(batch, 3, side, side)`` RGB in ``[0, 1]``: the centred window of ``source``, item
    ``i`` flipped / turned by the ``i mod 8``-th transform."""
    crop = window(source, side)
    return torch.stack([_turned(crop, i) for i in range(batch)])


def real_features(
    source: Tensor, side: int, channels: int, batch: int = 1, seed: int = 0
) -> Tensor:
    """``(batch, channels, side, side)`` features of :func:`real_images` (with a one-pixel
    margin) under a fixed seeded 3x3 convolution, standardised per item and channel."""
    images = real_images(source, side + 2, batch)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, 3, 3, generator=generator) / 27**0.5
    features = nn.functional.conv2d(images, weight)
    mean = features.mean(dim=(2, 3), keepdim=True)
    std = features.std(dim=(2, 3), keepdim=True, correction=0).clamp_min(1e-12)
    return (features - mean) / std


def make_inputs(
    kind: str,
    shape: tuple[int, int, int, int],
    source: Tensor | None,
    seed: int,
    device: torch.device,
) -> Tensor:
    """The input of a ``kind`` ("block" or "model") target of ``shape`` ``(N, C, s, s)``:
    real (from ``source``) or, with no source, random from the global generator."""
    n, c, side, _ = shape
    if source is None:
        return (
            torch.randn(shape, device=device)
            if kind == "block"
            else torch.rand(shape, device=device)
        )
    real = (
        real_features(source, side, c, n, seed) if kind == "block" else real_images(source, side, n)
    )
    return real.to(device)


class _Captured(Exception):
    """Raised by the capturing hook: the features are taken, the rest of the network is skipped."""


def _block_type(name: str) -> type:
    """The class whose calls ``--input network`` counts for block ``name``."""
    from nlsr.attention import create_attention

    if name == "resblock":
        from nlsr.models.common import ResBlock

        return ResBlock
    with torch.device("meta"):
        return type(create_attention(name, 64))


def _network(name: str, scale: int) -> nn.Module:
    """The paper network of block ``name`` (:data:`NETWORKS`), untrained, at ``scale``."""
    from nlsr.models import create

    if name not in NETWORKS:
        raise BenchError(
            f"--input network: no network is known for block {name!r}; known: {', '.join(NETWORKS)}"
        )
    arch, options = NETWORKS[name]
    return create(arch, scale, **options)


def network_channels(name: str, scale: int = 2) -> int:
    """The channel count of block ``name``'s inputs inside its network (built on meta)."""
    kind = _block_type(name)
    with torch.device("meta"):
        network = _network(name, scale)
    for module in network.modules():
        if isinstance(module, kind):
            conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
            return conv.in_channels
    raise BenchError(f"--input network: {NETWORKS[name][0]} holds no {kind.__name__}")


@contextmanager
def _calls(
    network: nn.Module, kind: type, seen: list[tuple[nn.Module, Tensor]], last: int | None = None
) -> Iterator[None]:
    """Hooks that append every call of a ``kind`` module inside ``network`` to ``seen`` (the
    module and its input), in forward order, and raise :class:`_Captured` once call ``last``
    is taken; calls through ``forward_shared`` (LCoAN's pattern-sharing blocks, which skip
    hooks) count too."""

    def record(module: nn.Module, x: Tensor) -> None:
        seen.append((module, x))
        if last is not None and len(seen) > last:
            raise _Captured

    def shared(module: nn.Module, method: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            record(module, args[0])
            return method(*args, **kwargs)

        return counted

    modules = [m for m in network.modules() if isinstance(m, kind)]
    handles = [m.register_forward_pre_hook(lambda m, args: record(m, args[0])) for m in modules]
    patched = [m for m in modules if hasattr(m, "forward_shared")]
    for m in patched:
        m.forward_shared = shared(m, m.forward_shared)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m in patched:
            del m.forward_shared


def capture(network: nn.Module, kind: type, images: Tensor, index: int = 0) -> Tensor:
    """The input of the ``index``-th call (0: the first, in forward order) of a ``kind`` module
    inside ``network`` run on ``images`` without gradients; the network stops there. Calls
    through ``forward_shared`` (LCoAN's pattern-sharing blocks, which skip hooks) count too."""
    seen: list[tuple[nn.Module, Tensor]] = []
    try:
        with _calls(network, kind, seen, last=index), torch.no_grad():
            network(images)
    except _Captured:
        return seen[index][1].detach().clone()
    raise BenchError(
        f"--input-block {index}: {type(network).__name__} calls {kind.__name__} "
        f"{len(seen)} times on this input (0 .. {len(seen) - 1})"
    )


def capture_all(network: nn.Module, kind: type, images: Tensor) -> list[tuple[nn.Module, Tensor]]:
    """Every call of a ``kind`` module inside ``network`` run on ``images`` without gradients,
    in forward order: the module and (a copy of) its input, counted as :func:`capture` does."""
    seen: list[tuple[nn.Module, Tensor]] = []
    with _calls(network, kind, seen), torch.no_grad():
        network(images)
    return [(module, x.detach().clone()) for module, x in seen]


def network_features(
    name: str,
    source: Tensor,
    side: int,
    batch: int = 1,
    seed: int = 0,
    scale: int = 2,
    index: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """``(batch, C, side, side)``: the input of the ``index``-th call of block ``name`` inside
    its paper network (seeded with ``seed``) on :func:`real_images`, cropped to ``side`` where
    the network pads; the global random state is left as it was."""
    device = device or torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        network = _network(name, scale).to(device).eval()
        images = real_images(source, side, batch).to(device)
        features = capture(network, _block_type(name), images, index)
    return features[..., :side, :side].contiguous()


class NetworkFeatures:
    """The features of :func:`network_features` for one run's settings, the last few kept."""

    def __init__(
        self, source: Tensor, seed: int, scale: int, index: int, device: torch.device
    ) -> None:
        self.source = source
        self.seed, self.scale, self.index = seed, scale, index
        self.device = device
        self._kept: OrderedDict[tuple[str, int, int], Tensor] = OrderedDict()

    def __call__(self, name: str, side: int, batch: int) -> Tensor:
        """Block ``name``'s features at ``side``, a fresh copy (the caller may mark it for
        gradients)."""
        key = (name, side, batch)
        if key not in self._kept:
            self._kept[key] = network_features(
                name, self.source, side, batch, self.seed, self.scale, self.index, self.device
            )
            while len(self._kept) > _KEEP:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return self._kept[key].clone()


# --------------------------------------------------------------------------------------------
# Sparsemax supports
# --------------------------------------------------------------------------------------------


def count_supports(block: nn.Module, x: Tensor) -> Tensor:
    """Support sizes (keys with a nonzero weight) of the sparsemax rows of HSPA ``block`` on
    ``x``, for the queries described at :data:`SUPPORT_QUERIES`, scored in float64."""
    from nlsr.attention.hspa import sparsemax

    with torch.no_grad():
        theta = block.conv_match1(x).flatten(2).transpose(1, 2).double()  # [N, L, d]
        phi = block.conv_match2(x).flatten(2).double()  # [N, d, L]
    length = theta.shape[1]
    step = -(-length // SUPPORT_QUERIES)
    queries = theta[:, ::step]
    sizes = [
        (sparsemax(queries[:, i : i + _COUNT_ROWS] @ phi) > 0).sum(-1)
        for i in range(0, queries.shape[1], _COUNT_ROWS)
    ]
    return torch.cat(sizes, dim=1).flatten().cpu()


def _hspa_blocks(module: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(module to hook, its HSPA parameters) for every HSPA block of ``module``, computed by
    nlsr or in the released form."""
    from nlsr.attention.hspa import HSPA
    from nlsr.attention.reference import ReleasedHSPA

    for m in module.modules():
        if isinstance(m, HSPA):
            yield m, m
        elif isinstance(m, ReleasedHSPA):
            yield m, m.block


@contextmanager
def _counting(module: nn.Module, counts: list[Tensor]) -> Iterator[None]:
    """Hooks that append the support sizes of every HSPA call inside ``module`` to ``counts``."""
    handles = [
        hooked.register_forward_pre_hook(
            lambda _m, args, b=block: counts.append(count_supports(b, args[0]))
        )
        for hooked, block in _hspa_blocks(module)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def support_sizes(module: nn.Module, inputs: Tensor) -> dict[str, Any] | None:
    """The sparsemax support sizes met by the HSPA blocks of ``module`` in one forward pass on
    ``inputs`` (None without HSPA): ``median``, ``max`` and ``mean`` over the counted queries of
    every call, ``queries`` counted, ``calls`` and each call's ``call_medians``."""
    if next(_hspa_blocks(module), None) is None:
        return None
    counts: list[Tensor] = []
    with _counting(module, counts), torch.inference_mode():
        module(inputs)
    if not counts:
        return None
    every = torch.cat(counts).tolist()
    return {
        "median": statistics.median(every),
        "max": max(every),
        "mean": statistics.fmean(every),
        "queries": len(every),
        "calls": len(counts),
        "call_medians": [statistics.median(c.tolist()) for c in counts],
    }
