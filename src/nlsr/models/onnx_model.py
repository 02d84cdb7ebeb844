"""An exported ONNX model run by onnxruntime behind the module contract nlsr's inference uses.

:func:`nlsr.models.resolve_model` returns one for a ``.onnx`` path, so ``nlsr upscale --weights
model.onnx`` and ``nlsr eval --weights model.onnx`` run it unchanged: it declares ``scale``
(read from the file's ``nlsr_scale`` metadata, written by :func:`nlsr.export.export_onnx`) and
``rgb_range`` 1 (the graph takes [0, 1] and applies the network's range itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nlsr.checkpoint import CheckpointError

__all__ = ["ONNX_SUFFIX", "OnnxModel"]

#: File suffix resolved as an exported model.
ONNX_SUFFIX = ".onnx"


class OnnxModel(nn.Module):
    """``forward(x)``: ``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, sH, sW]`` by onnxruntime on the CPU
    (``threads`` intra-op threads, 0: onnxruntime's default); no parameters, no gradient."""

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise CheckpointError(
                f"{path}: running an ONNX model needs onnxruntime: pip install 'nlsr[onnx]'"
            ) from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options)
        except Exception as e:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: not a readable ONNX model ({e})") from None
        self.metadata: dict[str, str] = {
            key.removeprefix("nlsr_"): value
            for key, value in self.session.get_modelmeta().custom_metadata_map.items()
            if key.startswith("nlsr_")
        }
        try:
            self.scale = int(self.metadata["scale"])
        except (KeyError, ValueError):
            raise CheckpointError(
                f"{path}: no nlsr_scale metadata; export it with 'nlsr export'"
            ) from None
        self.rgb_range = 1.0
        least = self.metadata.get("min_size", "1x1").split("x")
        #: The least input height and width the graph accepts (CSNLN: 3x3).
        self.min_size = (int(least[0]), int(least[1]))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] < self.min_size[0] or x.shape[-1] < self.min_size[1]:
            raise ValueError(
                f"input of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than the "
                f"{self.min_size[0]}x{self.min_size[1]} this exported model accepts"
            )
        lr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: lr})[0]
        return torch.from_numpy(out).to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, arch={self.metadata.get('arch', '?')!r}"

    def options(self) -> dict[str, Any]:
        """The exported network's constructor options (JSON in the metadata)."""
        import json

        return json.loads(self.metadata.get("options") or "{}")
