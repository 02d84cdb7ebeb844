"""ONNX export of any nlsr model with dynamic batch, height and width (docs/deploy.md).

The graph takes ``[N, 3, H, W]`` float32 in ``[0, 1]`` and returns ``[N, 3, sH, sW]`` in
``[0, 1]`` (not clamped; the network's ``rgb_range`` is applied inside the graph). It is traced
by ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath): shapes stay symbolic
through the Python arithmetic on ``H * W`` (bucket counts, chunk sizes, padding), which the
TorchScript tracer would freeze at the example's size. While exporting, the attention blocks
take their traceable path (:func:`nlsr.attention.backends.exporting`). Random hash projections
cannot be drawn inside the graph reproducibly, so they are drawn once from ``seed`` and stored
as constants (:meth:`nlsr.attention.hashing.HashingAttention.export_projections`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from nlsr.atomic import atomic_write
from nlsr.attention.hashing import HashingAttention
from nlsr.attention.lcoa import LCoA
from nlsr.models.descriptor import ModelDescriptor
from nlsr.models.onnx_model import OnnxModel
from nlsr.models.resolve import resolve_model

__all__ = ["ExportResult", "export_onnx", "fixed_projections", "use_leading_columns"]

#: ONNX metadata keys written at export and read back by :mod:`nlsr.models.onnx_model`.
META_PREFIX = "nlsr_"
#: Size of the example input the graph is traced with (any size works afterwards).
EXAMPLE_SIZE = (2, 3, 24, 20)


class _ZeroOneGraph(nn.Module):
    """``net`` with the [0, 1] convention: inputs scaled to ``rgb_range`` and outputs back."""

    def __init__(self, net: nn.Module, rgb_range: float):
        super().__init__()
        self.net = net
        self.rgb_range = rgb_range

    def forward(self, x: Tensor) -> Tensor:
        if self.rgb_range == 1:
            return self.net(x)
        return self.net(x * self.rgb_range) / self.rgb_range


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: Path
    #: Metadata stored in the file (``nlsr_scale``, ``nlsr_rgb_range``, ...).
    metadata: dict[str, str]
    #: Largest |onnxruntime - PyTorch| on the example input (``check=True``), else None.
    max_abs_diff: float | None = None


def fixed_projections(module: nn.Module, seed: int) -> dict[nn.Module, Tensor]:
    """The projections an export stores for each hashing block of ``module``: drawn in module
    order from one CPU generator seeded with ``seed``, for the most buckets."""
    generator = torch.Generator().manual_seed(seed)
    return {
        block: block.export_projections(generator)
        for block in module.modules()
        if isinstance(block, HashingAttention)
    }


def use_leading_columns(fixed: dict[nn.Module, Tensor], length: int) -> None:
    """Set each hashing block's ``projections`` to the leading columns of ``fixed[block]`` that
    an input of ``length`` positions uses: the PyTorch forward of what the graph computes."""
    for block, proj in fixed.items():
        buckets = block.n_buckets(length)
        block.projections = proj[..., : buckets // 2 if block.signed else buckets]


def export_onnx(
    model: ModelDescriptor | nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    scale: int | None = None,
    opset: int | None = None,
    seed: int = 0,
    check: bool = False,
    projections: Sequence[Tensor] | None = None,
) -> ExportResult:
    """Export ``model`` (anything :func:`nlsr.models.resolve_model` takes) to ONNX at ``path``
    (written atomically), with dynamic batch, height and width; ``check`` runs the file in
    onnxruntime against PyTorch on the example input. Hash projections come from ``seed``, or
    are ``projections`` (one per hashing block in module order, e.g. a recorded draw; an input
    needing more buckets than such a draw has columns is hashed into fewer)."""
    found = resolve_model(model, scale)
    if isinstance(found.module, OnnxModel):
        raise ValueError(f"{found.source.path}: is already an exported ONNX model")
    net = copy.deepcopy(found.module).eval()
    lcoa = [block for block in net.modules() if isinstance(block, LCoA)]
    if lcoa and not any(bool(block.kmeans.initted) for block in lcoa):  # (later LCoAN blocks
        # reuse the first block's pattern and never set theirs)
        raise ValueError(
            f"{found.name}: its k-means centroids are not initialised (an untrained LCoA "
            "block sets them from its first input): export trained weights, or run the "
            "model once first"
        )
    fixed = fixed_projections(net, seed)
    if projections is not None:
        if len(projections) != len(fixed):
            raise ValueError(
                f"{found.name}: {len(projections)} projections given for {len(fixed)} hashing "
                "blocks"
            )
        fixed = dict(zip(fixed, projections, strict=True))
    for block, proj in fixed.items():
        block.projections = proj
    graph = _ZeroOneGraph(net, found.rgb_range).eval()
    example = torch.rand(EXAMPLE_SIZE, generator=torch.Generator().manual_seed(seed))
    # AUTO: the exporter keeps the sizes symbolic and records the least sizes the network's
    # shape arithmetic needs (e.g. CSNLN's 3x3) instead of failing; checked below
    dims = {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            dynamic_shapes=(dims,),
            input_names=["lr"],
            output_names=["sr"],
            opset_version=opset,
            verbose=False,
        )
    least = _least_sizes(program, found.name)
    metadata = {
        "scale": str(found.scale),
        "min_size": f"{least[0]}x{least[1]}",
        "rgb_range": repr(found.rgb_range),
        "arch": found.arch or "",
        "options": json.dumps(dict(found.options), sort_keys=True, default=str),
        "name": found.name,
        "seed": str(seed),
        "input": "lr: float32 [N, 3, H, W] in [0, 1]",
        "output": f"sr: float32 [N, 3, {found.scale}H, {found.scale}W] in [0, 1], not clamped",
    }
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    data = proto.SerializeToString()
    diff = None
    if check:
        use_leading_columns(fixed, example.shape[-2] * example.shape[-1])
        with torch.no_grad():
            expected = graph(example)
        diff = float((_run_bytes(data, example) - expected).abs().max())
    out = atomic_write(path, data)
    return ExportResult(out, metadata, diff)


def _least_sizes(program: Any, model: str) -> tuple[int, int]:
    """The least height and width the exported graph accepts; RuntimeError if the exporter made
    the batch, height or width static (a size-specific graph would fail on other sizes)."""
    dims = program.model_proto.graph.input[0].type.tensor_type.shape.dim
    axes = {0: "batch", 2: "height", 3: "width"}
    fixed = [axis for i, axis in axes.items() if dims[i].dim_value]
    if fixed:
        raise RuntimeError(f"{model}: the exporter made the input's {', '.join(fixed)} static")
    shape = next(
        n
        for n in program.exported_program.graph.nodes
        if n.op == "placeholder"
        and n.name == program.exported_program.graph_signature.user_inputs[0]
    )
    ranges = program.exported_program.range_constraints
    sizes = []
    for size in shape.meta["val"].shape[2:]:
        bound = ranges.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        sizes.append(max(1, int(bound.lower)) if bound is not None else 1)
    return sizes[0], sizes[1]


def _run_bytes(data: bytes, x: Tensor) -> Tensor:
    """Run a serialised ONNX model on ``x`` with onnxruntime (one thread)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(io.BytesIO(data).getvalue(), options)
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def describe(result: ExportResult) -> dict[str, Any]:
    """A JSON-ready summary of ``result`` (``nlsr export`` prints it)."""
    return {"path": str(result.path), **result.metadata, "max_abs_diff": result.max_abs_diff}
