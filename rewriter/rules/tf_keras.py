"""tf_keras (Keras 2) + tf2onnx: weighted moments with an all-ones mask. (Not implemented yet.)"""

from __future__ import annotations

__all__ = ["rules"]


def rules() -> list:
    return []
