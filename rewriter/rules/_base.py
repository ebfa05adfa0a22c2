"""What every GroupNormalization fusion rule shares: the result of a successful check
(:class:`Fusion`) and the one way to build our op from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from ...ops import contract
from ...ops.functions import variant_for

__all__ = ["Fusion", "GroupNormFusionBase", "Param"]

#: A per-channel gamma/beta: a constant [C] array, a [C] value already in the graph, or absent.
Param = np.ndarray | ir.Value | None


@dataclasses.dataclass
class Fusion:
    """Everything ``rewrite`` needs, established by ``check``."""

    x: ir.Value
    rank: int
    axis: int  # non-negative; we emit it as Keras would write it, see GroupNormFusionBase
    groups: int
    channels: int
    epsilon: float
    gamma: Param
    beta: Param
    name: str  # the new node's name (from the matched nodes; unique once they are removed)
    in_function: bool = False  # functions have no initializers: constants become Constant nodes
    #: ``x`` is first reshaped to ``[-1, channels]`` (a grouping Reshape that absorbed the one
    #: before it), and the result reshaped by ``after`` = (target value, allowzero) if given.
    flatten: bool = False
    after: tuple[ir.Value, int] | None = None


class GroupNormFusionBase(pattern.RewriteRuleClassBase):
    """Base of all our rules: subclasses define ``pattern`` and ``check``; ``check`` stores a
    :class:`Fusion` in ``self._fusion`` and ``rewrite`` builds one node of our op from it."""

    #: Report the axis as a negative index for channels-last inputs (Keras' default -1).
    def _emitted_axis(self, fusion: Fusion) -> int:
        return fusion.axis - fusion.rank if fusion.axis == fusion.rank - 1 else fusion.axis

    def _param(self, op, param: Param, name: str, in_function: bool) -> ir.Value | None:
        if param is None:
            return None
        if isinstance(param, ir.Value):
            return param
        tensor = ir.tensor(np.ascontiguousarray(param), name=name)
        if in_function:
            return op.Constant(value=tensor)
        return op.initializer(tensor, name=name)

    def rewrite(self, op, **_):
        fusion: Fusion = self._fusion
        gamma = self._param(op, fusion.gamma, f"{fusion.name}_gamma", fusion.in_function)
        beta = self._param(op, fusion.beta, f"{fusion.name}_beta", fusion.in_function)
        dtype = fusion.x.dtype
        variant = variant_for(
            fusion.rank, fusion.axis, int(dtype), gamma is not None, beta is not None,
            channels=fusion.channels, groups=fusion.groups,
        )
        x = fusion.x
        if fusion.flatten:
            rows_c = ir.tensor(np.array([-1, fusion.channels], np.int64), name=f"{fusion.name}_rows_c")
            shape = op.Constant(value=rows_c) if fusion.in_function else op.initializer(rows_c, name=rows_c.name)
            x = op.Reshape(x, shape, _name=f"{fusion.name}_rows")
            x.dtype, x.shape = fusion.x.dtype, ir.Shape([None, fusion.channels])  # what the targets read
        inputs = [x, gamma, beta]
        while inputs[-1] is None:
            inputs.pop()
        # Absent optional inputs are empty names; trailing ones are dropped.
        result = getattr(op, contract.OP_TYPE)(
            *inputs,
            _domain=contract.DOMAIN,
            _version=contract.VERSION,
            _name=fusion.name,
            groups=fusion.groups,
            axis=self._emitted_axis(fusion),
            epsilon=fusion.epsilon,
        )
        result.producer().overload = variant.overload
        if fusion.after is not None:
            target, allowzero = fusion.after
            result = op.Reshape(result, target, allowzero=allowzero, _name=f"{fusion.name}_restore")
        return result
