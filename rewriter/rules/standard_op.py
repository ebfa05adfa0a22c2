"""Standard ONNX ``GroupNormalization`` nodes (default domain), replaced by our op with the
channel on axis 1 (the standard op is always channels-first).

The standard op changed meaning between versions; which one a node is comes from the opset
its graph imports (the model's default opset; a function's own import):

* ``GroupNormalization-21`` (torch dynamo at opset 21): scale/bias are **per channel**
  ``[C]``: passed through as they are (constants, graph inputs, computed values).
  ``stash_type`` only chooses the precision of the statistics; our op always computes them
  in at least float32 (float32 for float16/bfloat16, float64 for float64), which is never
  less precise, so every ``stash_type`` is accepted. The spec's function body computes the
  variance as E[x^2]-E[x]^2; mathematically the same normalisation.
* ``GroupNormalization-18`` (18-20): scale/bias are **per group** ``[G]``, applied on the
  grouped tensor, so channel ``c`` gets ``scale[c // (C/G)]``: constants are expanded with
  ``np.repeat(., C/G)``; a per-group value only known at run time is rejected.

Constant scale = 1 / bias = 0 (torch's affine=False gives ``ConstantOfShape`` ones/zeros)
are identities and are not emitted. The pipeline's ``keep_standard`` flag leaves these
nodes alone (``rules.all_rules`` skips this module).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match, _shapes
from ._base import Fusion, GroupNormFusionBase

__all__ = ["StandardGroupNormFusion", "rules"]

logger = logging.getLogger(__name__)

_DEFAULT_EPSILON = 1e-5  # GroupNormalization-18/21's default
_FIRST_VERSION = 18  # GroupNormalization-18: per-group scale/bias
_PER_CHANNEL_VERSION = 21  # GroupNormalization-21: per-channel scale/bias


def _opset_version(context, node: ir.Node) -> int | None:
    """The default-domain version of ``node``: its own, else its graph's or function's
    import, else the model's (subgraphs usually import nothing themselves)."""
    if node.version is not None:
        return node.version
    for imports in (context.graph_or_function.opset_imports, context.model.opset_imports):
        for domain in ("", "ai.onnx"):
            if domain in imports:
                return imports[domain]
    return None


class StandardGroupNormFusion(GroupNormFusionBase):
    """A default-domain ``GroupNormalization`` node (version 18-20 per group, 21+ per channel)."""

    def pattern(self, op, x, scale, bias):
        return op.GroupNormalization(x, scale, bias, _outputs=["y"])

    def _affine_input(self, value: ir.Value, what: str, groups: int, channels: int, version: int):
        """A per-channel [C] array or value for our op (None = identity); or a reason."""
        array = _shapes.constant_array(value)
        identity = 1 if what == "scale" else 0
        if array is not None and array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            return None, f"{what} has dtype {array.dtype}, not a float type"
        if version < _PER_CHANNEL_VERSION:
            if array is None:
                return None, f"{what} of GroupNormalization-{_FIRST_VERSION} (per group) is not a constant: cannot expand it per channel"
            if array.shape != (groups,):
                return None, f"{what} of GroupNormalization-{_FIRST_VERSION} has shape {list(array.shape)}, not per group [{groups}]"
            return (None if np.all(array == identity) else np.repeat(array, channels // groups)), None
        shape = list(array.shape) if array is not None else None if value.shape is None else list(value.shape)
        if shape != [channels]:
            return None, f"{what} has shape {shape}, not per channel [{channels}]"
        if array is None and value.dtype not in _match.FLOAT_TYPES:
            return None, f"{what} has dtype {value.dtype}, not a float type"
        # Per channel already: the value itself (an initializer keeps its name).
        return (None if array is not None and np.all(array == identity) else value), None

    def check(self, context, x, scale, bias, y, **_):
        result = pattern.MatchResult()
        node = y.producer()
        version = _opset_version(context, node)
        if version is None or version < _FIRST_VERSION:
            return result.fail(f"GroupNormalization in default-domain opset {version}: no such standard op before {_FIRST_VERSION}", y)
        dtype = x.dtype
        if dtype not in _match.FLOAT_TYPES:
            return result.fail(f"input dtype {dtype} is not a float type", x)
        dims = _shapes.dims_of(x)
        if dims is None:
            return result.fail(f"the rank of the input {x.name!r} is unknown", x)
        if len(dims) < 2:
            return result.fail(f"the input {x.name!r} has rank {len(dims)} < 2", x)
        channels = dims[1]
        if not isinstance(channels, int):
            return result.fail(f"the channel dimension (axis 1) of {x.name!r} is not static: {channels!r}", x)
        groups_attr = node.attributes.get("num_groups")
        if groups_attr is None or groups_attr.is_ref():
            return result.fail("num_groups is missing or a reference to a function attribute", y)
        groups = groups_attr.as_int()
        if groups < 1 or channels % groups:
            return result.fail(f"C={channels} is not divisible by num_groups={groups}", y)
        eps_attr = node.attributes.get("epsilon")
        if eps_attr is not None and eps_attr.is_ref():
            return result.fail("epsilon is a reference to a function attribute", y)
        epsilon = eps_attr.as_float() if eps_attr is not None else _DEFAULT_EPSILON
        if not epsilon >= 0:
            return result.fail(f"epsilon {epsilon} is negative", y)
        stash = node.attributes.get("stash_type")
        if stash is not None and stash.is_ref():
            return result.fail("stash_type is a reference to a function attribute", y)
        params = {}
        for what, value in (("scale", scale), ("bias", bias)):
            params[what], why = self._affine_input(value, what, groups, channels, version)
            if why:
                return result.fail(why, value)
        if y.dtype is not None and y.dtype != dtype:
            return result.fail(f"output dtype {y.dtype} differs from input dtype {dtype}", y)
        self._fusion = Fusion(
            x=x,
            rank=len(dims),
            axis=1,
            groups=groups,
            channels=channels,
            epsilon=epsilon,
            gamma=params["scale"],
            beta=params["bias"],
            name=node.name or y.name or "group_norm",
            in_function=isinstance(context.graph_or_function, ir.Function),
        )
        return result


def rules() -> list[pattern.RewriteRule]:
    return [StandardGroupNormFusion.rule()]
