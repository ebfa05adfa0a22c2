"""standard ONNX GroupNormalization-18/20 (per-group scale) and -21 (per-channel). (Not implemented yet.)"""

from __future__ import annotations

__all__ = ["rules"]


def rules() -> list:
    return []
