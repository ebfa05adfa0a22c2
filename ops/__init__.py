"""Our GroupNormalization op: the contract, its onnxscript function bodies, the NumPy
reference of Keras' layer, and builders."""

from .builder import attach_functions, make_model, make_node
from .contract import (
    ACTIVATION_NONE,
    ACTIVATION_SILU,
    DEFAULT_AXIS,
    DEFAULT_EPSILON,
    DEFAULT_GROUPS,
    DOMAIN,
    MIN_OPSET,
    OP_TYPE,
    VERSION,
    GroupNormConfig,
)
from .functions import Variant, function_proto, variant_for
from .reference import group_normalization

__all__ = [
    "DOMAIN",
    "VERSION",
    "OP_TYPE",
    "MIN_OPSET",
    "DEFAULT_GROUPS",
    "DEFAULT_AXIS",
    "DEFAULT_EPSILON",
    "ACTIVATION_NONE",
    "ACTIVATION_SILU",
    "GroupNormConfig",
    "Variant",
    "variant_for",
    "function_proto",
    "make_node",
    "make_model",
    "attach_functions",
    "group_normalization",
]
