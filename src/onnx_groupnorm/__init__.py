"""onnx-groupnorm: GroupNormalization for ONNX, with Keras semantics.

``onnx_groupnorm.ops`` holds the op (contract, function bodies, NumPy reference, builders);
``onnx_groupnorm.rewriter`` fuses exported subgraphs into it and lowers it for a target.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onnx-groupnorm")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
