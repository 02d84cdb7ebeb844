"""``nlsr models``: the architectures, attention blocks and paper presets nlsr provides.

Parameter counts are computed by building each paper configuration on the ``meta`` device
(shapes only, no memory, no initialisation cost) and counting its parameters.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

#: What each pinned attention-block name is (see nlsr.attention).
ATTENTION_DESCRIPTIONS = {
    "nla": "dense non-local attention (every position attends to all)",
    "nlsa": "non-local sparse attention, spherical LSH buckets (NLSN)",
    "gla": "global learnable attention, super-bit LSH + learnable scores (DLSN)",
    "hspa": "high-similarity-pass attention, sparsemax weights (HSPAN)",
    "lcoa": "learnable k-means sparse pattern, collaborative attention (LCoAN)",
    "csna": "cross-scale non-local attention (CSNLN)",
}


@dataclass(frozen=True)
class Preset:
    """One paper configuration with its computed parameter count."""

    arch: str
    repository: str
    scale: int
    options: dict[str, Any]
    parameters: int
    paper_parameters: str


def count_parameters(arch: str, scale: int = 2, **options: Any) -> int:
    """Number of parameters of ``nlsr.models.create(arch, scale, **options)``, built on the
    meta device so that even the largest configuration costs no memory."""
    import torch

    from nlsr.models.resolve import create

    with torch.device("meta"):
        model = create(arch, scale, **options)
    return sum(p.numel() for p in model.parameters())


def presets(scale: int = 2) -> list[Preset]:
    """The paper presets of the registered architectures (``ArchSpec.preset``) at ``scale``."""
    from nlsr.models.registry import architectures

    return [
        Preset(
            arch.name,
            arch.preset.repository,
            scale,
            dict(arch.preset.options),
            count_parameters(arch.name, scale, **arch.preset.options),
            arch.preset.parameters,
        )
        for arch in architectures()
        if arch.preset is not None
    ]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr models``."""
    p = subparsers.add_parser(
        "models",
        help="list architectures, attention blocks, paper presets and shipped weights",
        description="List the architectures, attention blocks and paper presets (with their "
        "parameter counts, computed by building each model), and the pretrained weights shipped "
        "with nlsr.",
    )
    p.add_argument(
        "--scale", type=int, choices=(2, 3, 4), default=2, help="scale of the presets (default 2)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the listing; returns the exit status."""
    from nlsr.attention import available_attention
    from nlsr.models.registry import available, describe

    archs = [{"name": a, "description": describe(a)} for a in available()]
    blocks = [
        {"name": b, "description": ATTENTION_DESCRIPTIONS.get(b, "")} for b in available_attention()
    ]
    rows = presets(args.scale)
    shipped = shipped_weights()
    if args.json:
        listing = {
            "architectures": archs,
            "attention": blocks,
            "presets": [asdict(r) for r in rows],
            "pretrained": shipped,
        }
        print(json.dumps(listing, indent=2))
        return 0
    print("Architectures (nlsr.models.create / --arch):")
    width = max(len(a["name"]) for a in archs)
    for a in archs:
        print(f"  {a['name']:<{width}}  {a['description']}")
    print("\nAttention blocks (nlsr.attention.create_attention, or attention= on edsr/rcan):")
    for b in blocks:
        print(f"  {b['name']:<5}  {b['description']}")
    print(f"\nPaper presets (x{args.scale}; parameters counted by building each model):")
    paper = args.scale == 2  # the papers' headline counts are for x2
    print(
        f"  {'arch':<6} {'params':>8} {'(paper)':>8}  options"
        if paper
        else "  arch     params  options"
    )
    for r in rows:
        count = f"{r.parameters / 1e6:.2f}M"
        reported = f" {r.paper_parameters:>8}" if paper else ""
        opts = " ".join(f"{k}={v}" for k, v in r.options.items())
        print(f"  {r.arch:<6} {count:>8}{reported}  {opts}")
    print("\nPretrained weights shipped with nlsr (--model NAME; create(NAME, pretrained=True)):")
    if not shipped:
        print("  none yet (nlsr upscale / nlsr eval fall back to bicubic)")
    for w in shipped:
        psnr = f"Set5 {w['scores']['Set5']:.2f} dB" if "Set5" in w["scores"] else "not scored"
        print(
            f"  {w['name']:<14} x{w['scale']}  {w['arch']:<6} {w['parameters'] / 1e6:.2f}M  "
            f"{w['megabytes']:.1f} MB  {psnr}  {w['iterations']} iterations"
        )
    return 0


def shipped_weights() -> list[dict[str, Any]]:
    """One record per shipped (model, scale): name, scale, arch, parameters, file size, measured
    scores and training iterations, from the weights manifest (``nlsr.models.pretrained``)."""
    from nlsr.models.pretrained import read_manifest

    records = []
    for name, scales in sorted(read_manifest().items()):
        for scale, w in sorted(scales.items()):
            size = w.file.stat().st_size if w.file.is_file() else 0
            records.append(
                {
                    "name": name,
                    "scale": scale,
                    "arch": w.arch,
                    "parameters": w.parameters,
                    "megabytes": size / 1e6,
                    "scores": w.scores,
                    "iterations": w.training.get("iterations"),
                    "file": w.file.name,
                }
            )
    return records
