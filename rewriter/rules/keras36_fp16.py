"""Keras 3.6 + tf2onnx float16/mixed_float16 graphs (statistics in float32 clipped to +-65504). (Not implemented yet.)"""

from __future__ import annotations

__all__ = ["rules"]


def rules() -> list:
    return []
