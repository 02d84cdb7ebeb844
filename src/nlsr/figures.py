"""Figures drawn with Pillow: attention heat maps, statistics histograms, zoomed comparisons.

Every figure is a :class:`PIL.Image.Image`; :func:`save_png` writes one atomically. Colours:
a black-purple-orange-yellow ramp (:func:`heat_colours`) for attention weights.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nlsr.atomic import atomic_write
from nlsr.explain.api import BlockExplanation

#: Anchors of the heat ramp, from weight 0 to the largest weight.
RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
#: Colour of the query marks and boxes.
MARK = (0, 255, 255)
#: Brightness kept outside the keys a query saw (hashing, LCoA) or outside HSPA's support.
DIM = 0.35
PAD = 6
#: Largest side of a heat-map panel, pixels.
PANEL = 240


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] -> uint8 RGB ``[..., 3]`` along :data:`RAMP`."""
    t = np.clip(values, 0, 1) * (len(RAMP) - 1)
    low = np.floor(t).astype(int).clip(0, len(RAMP) - 2)
    frac = (t - low)[..., None]
    return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).round().astype(np.uint8)


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as PNG, atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    atomic_write(Path(path), buffer.getvalue())


def _on_lr(
    values: np.ndarray, explanation: BlockExplanation, lr_size: tuple[int, int]
) -> np.ndarray:
    """A per-position map of the block (its map, or for ``csna`` its key grid) on the LR grid:
    key cells repeated ``scale`` times, maps ``factor`` times the LR averaged down; cropped."""
    height, width = lr_size
    if explanation.kind == "csna":
        s = int(explanation.extras["scale"])
        values = np.kron(values, np.ones((s, s))) / (s * s)
    f = explanation.factor
    if f > 1:
        h, w = values.shape[0] // f * f, values.shape[1] // f * f
        values = values[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    out = np.zeros(lr_size)
    h, w = min(height, values.shape[0]), min(width, values.shape[1])
    out[:h, :w] = values[:h, :w]
    return out


def _dilate(values: np.ndarray, radius: int) -> np.ndarray:
    """Largest value within ``radius`` pixels (square window): single keys stay visible in a
    panel that shrinks the image."""
    if radius < 1:
        return values
    padded = np.pad(values, radius, mode="edge")
    out = values.copy()
    h, w = values.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            np.maximum(out, padded[dy : dy + h, dx : dx + w], out=out)
    return out


def _mask(explanation: BlockExplanation, q: int) -> np.ndarray | None:
    """Which positions stay bright: the keys seen in any round, or HSPA's support."""
    if "seen" in explanation.extras:
        return explanation.extras["seen"][q].any(axis=0)
    if "support" in explanation.extras:
        return explanation.extras["support"][q]
    return None


def _caption(e: BlockExplanation, q: int) -> str:
    """One line on the mechanism's record for query ``q``."""
    x = e.extras
    if e.kind == "hspa":
        return f"support {int(x['support'][q].sum())} keys"
    if e.kind in ("nlsa", "gla"):
        return "bucket " + ",".join(str(int(c)) for c in x["codes"][q])
    if e.kind == "lcoa":
        members = int(x["members"][q][0].sum())
        return f"cluster {int(x['codes'][q][0])} ({members} pos.)"
    if e.kind == "csna":
        j = int(np.argmax(e.weights[q]))
        s = int(x["scale"])
        gy, gx = divmod(j, e.weights.shape[-1])
        return f"best patch at {gx * s},{gy * s}"
    return f"peak {float(e.weights[q].max()):.3f}"


def _panel(lr: np.ndarray, e: BlockExplanation, q: int, zoom: float) -> Image.Image:
    """The LR image under the heat map of query ``q`` (colour = sqrt(w / max w)), dimmed
    outside the seen keys / support, resized by ``zoom`` (maps dilated by ``1 / zoom`` pixels
    when that is not an enlargement), the query marked."""
    size = lr.shape[:2]
    radius = 0 if zoom > 1 else max(1, round(1 / zoom))
    weights = _dilate(_on_lr(e.weights[q].astype(np.float64), e, size), radius)
    heat = heat_colours(np.sqrt(weights / max(weights.max(), 1e-30)))
    base = lr.astype(np.float64)
    blend = 0.35 * base + 0.65 * heat
    mask = _mask(e, q)
    if mask is not None:
        bright = _dilate(_on_lr(mask.astype(np.float64), e, size), radius) > 0
        blend = np.where(bright[..., None], blend, DIM * base)
    shape = (max(1, round(size[1] * zoom)), max(1, round(size[0] * zoom)))
    resample = Image.NEAREST if zoom >= 1 else Image.BOX
    image = Image.fromarray(blend.round().astype(np.uint8)).resize(shape, resample)
    draw = ImageDraw.Draw(image)
    x, y = e.queries[q]
    cx, cy, r = (x + 0.5) * zoom, (y + 0.5) * zoom, max(5.0, 0.75 * zoom)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=MARK, width=2)
    draw.line((cx - 2 * r, cy, cx - r, cy), fill=MARK, width=2)
    draw.line((cx + r, cy, cx + 2 * r, cy), fill=MARK, width=2)
    return image


def _zoom_for(size: tuple[int, int], target: int = PANEL) -> float:
    """Scale of a panel: whole multiples up to ``target`` px for small images, else down."""
    largest = max(size)
    return float(max(1, target // largest)) if largest <= target else target / largest


def explain_figure(lr: np.ndarray, explanations: list[BlockExplanation]) -> Image.Image:
    """A grid: one row per query, one column per block, each a :func:`_panel` with the block
    and the mechanism's record written above."""
    zoom = _zoom_for(lr.shape[:2])
    ph, pw = max(1, round(lr.shape[0] * zoom)), max(1, round(lr.shape[1] * zoom))
    line = 16
    queries = len(explanations[0].queries)
    cell_h = ph + 2 * line + PAD
    fig = Image.new("RGB", (len(explanations) * (pw + PAD) + PAD, queries * cell_h + PAD), "white")
    draw = ImageDraw.Draw(fig)
    font = _font()
    for col, e in enumerate(explanations):
        x0 = PAD + col * (pw + PAD)
        for q in range(queries):
            y0 = PAD + q * cell_h
            title = f"block {e.index} {e.kind}  query {e.queries[q][0]},{e.queries[q][1]}"
            draw.text((x0, y0), title, fill="black", font=font)
            draw.text((x0, y0 + line), _caption(e, q), fill="black", font=font)
            fig.paste(_panel(lr, e, q, zoom), (x0, y0 + 2 * line))
    return fig


def _histogram(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    hist: dict[str, Any],
    title: str,
    log_bins: bool,
) -> None:
    """Bars of ``hist`` (``edges``, ``counts``) inside ``box`` with its title and end labels."""
    x0, y0, x1, y1 = box
    font = _font(11)
    draw.text((x0, y0), title, fill="black", font=font)
    top, bottom = y0 + 16, y1 - 14
    counts = np.asarray(hist["counts"], dtype=np.float64)
    edges = hist["edges"]
    draw.rectangle((x0, top, x1, bottom), outline=(160, 160, 160))
    if counts.size and counts.max() > 0:
        width = (x1 - x0) / counts.size
        for i, c in enumerate(counts):
            height = (bottom - top) * c / counts.max()
            draw.rectangle(
                (x0 + i * width + 1, bottom - height, x0 + (i + 1) * width - 1, bottom),
                fill=(70, 90, 170),
            )
    left = f"{edges[0]:.3g}"
    right = f"{edges[-1]:.3g}" if not log_bins else f"{int(edges[-1])}"
    draw.text((x0, bottom + 1), left, fill="black", font=font)
    draw.text((x1 - 8 * len(right), bottom + 1), right, fill="black", font=font)


def stats_figure(blocks: list[dict[str, Any]], source: str) -> Image.Image:
    """Per block (one row): histograms of support size (power-of-two bins) and entropy per
    query, with the median and, for hashing blocks, the promoted fraction."""
    w, row = 560, 130
    fig = Image.new("RGB", (w, 28 + row * len(blocks)), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((PAD, PAD), f"attention statistics: {source}", fill="black", font=_font(13))
    for i, b in enumerate(blocks):
        y = 28 + i * row
        s, e = b["support_size"], b["entropy_nats"]
        head = f"block {b['block']} {b['kind']}: {b['queries']} queries"
        if "promoted_fraction" in b:
            head += f", promoted {100 * b['promoted_fraction']:.1f}%"
        draw.text((PAD, y), head, fill="black", font=_font(12))
        median_s = s["percentiles"]["50"]
        median_e = e["percentiles"]["50"]
        _histogram(
            draw,
            (PAD, y + 18, w // 2 - PAD, y + row - 6),
            s["histogram"],
            f"support (w > {b['support_threshold']:g}), median {median_s:g}",
            True,
        )
        _histogram(
            draw,
            (w // 2 + PAD, y + 18, w - PAD, y + row - 6),
            e["histogram"],
            f"entropy (nats), median {median_e:.2f}",
            False,
        )
    return fig


def compare_figure(
    hr: np.ndarray,
    box: tuple[int, int, int, int],
    crops: list[tuple[str, np.ndarray, float, float]],
    title: str,
) -> Image.Image:
    """The HR image (scaled to 256 px high) with ``box`` ``(x, y, w, h)`` drawn, then the
    zoomed crop of HR and of each model with ``PSNR/SSIM`` under it."""
    x, y, bw, bh = box
    height = 256
    ratio = height / hr.shape[0]
    overview = Image.fromarray(hr).resize(
        (max(1, round(hr.shape[1] * ratio)), height), Image.LANCZOS
    )
    d = ImageDraw.Draw(overview)
    d.rectangle(
        (x * ratio, y * ratio, (x + bw) * ratio, (y + bh) * ratio), outline=(255, 0, 0), width=2
    )
    zoom = max(1, 140 // max(bw, bh))
    cw, ch = bw * zoom, bh * zoom
    panels = [("HR", hr[y : y + bh, x : x + bw], None, None), *crops]
    per_row = max(1, (overview.width + 2 * PAD) // (cw + PAD) or 1)
    per_row = max(per_row, 3)
    rows = -(-len(panels) // per_row)
    label = 30
    width = max(overview.width, per_row * (cw + PAD)) + 2 * PAD
    fig = Image.new("RGB", (width, 24 + height + PAD + rows * (ch + label + PAD)), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((PAD, 4), title, fill="black", font=_font(13))
    fig.paste(overview, (PAD, 24))
    for i, (name, crop, p, s) in enumerate(panels):
        r, c = divmod(i, per_row)
        px = PAD + c * (cw + PAD)
        py = 24 + height + PAD + r * (ch + label + PAD)
        fig.paste(Image.fromarray(crop).resize((cw, ch), Image.NEAREST), (px, py))
        draw.text((px, py + ch + 1), name, fill="black", font=_font(11))
        if p is not None and s is not None:
            draw.text((px, py + ch + 14), f"{p:.2f} dB / {s:.4f}", fill="black", font=_font(11))
    return fig
