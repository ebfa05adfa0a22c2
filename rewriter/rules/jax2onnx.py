"""Keras + JAX through jax2onnx. (Not implemented yet.)"""

from __future__ import annotations

__all__ = ["rules"]


def rules() -> list:
    return []
