"""Target ort-gpu: onnxruntime's com.microsoft.GroupNorm (CUDA/ROCm/DirectML providers). (Not implemented yet.)"""

from __future__ import annotations

import onnx_ir as ir

from ..report import FuseReport

__all__ = ["lower", "ABSORBS_ACTIVATION"]

#: Whether this target's form gains from a SiLU absorbed into the op (pipeline default).
ABSORBS_ACTIVATION = False


def lower(model: ir.Model, report: FuseReport) -> None:
    raise NotImplementedError("target not implemented yet")
