"""tf_keras (Keras 2) + tf2onnx: ``tf.nn.weighted_moments`` with an all-ones mask and
``tf.nn.batch_normalization`` (research doc §2.4)::

    w    = Reshape(ConstantOfShape(shape(x), 1.0), grouped shape)          # ones_like(x)
    sw   = ReduceSum(Add(w, ConstantOfShape(Shape(xg), 0.0)))              # sum of weights
    m    = Where(Equal(sw, 0), 0, Div(ReduceSum(Mul(w, xg)), sw))          # div_no_nan
    v    = Where(Equal(sw, 0), 0, Div(ReduceSum(Mul(w, (xg - m)^2)), sw))
    y    = xg * inv + (beta - m * inv)           # or + (-m * inv) without beta

With a static batch, tf2onnx folds the mask away: ``sw`` is a constant and the products
with ``w`` disappear. Equivalence: ``w`` is all ones with exactly ``xg``'s shape, so the
weighted sums are plain sums and ``sw`` is the element count of a group (> 0), so both
``Where`` pick the quotient.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match, _shapes
from ._keras import KerasGroupNormFusionBase, commuted

__all__ = ["TFKerasGroupNormFusion", "rules"]


def _weighted(op, w, value):
    return pattern.OrValue([commuted(op.Mul, w, value), value])


def _fill_value(node: ir.Node) -> float | None:
    """The value a ConstantOfShape fills with (0.0 when the attribute is absent)."""
    attr = node.attributes.get("value")
    if attr is None:
        return 0.0
    array = attr.as_tensor().numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


class TFKerasGroupNormFusion(KerasGroupNormFusionBase):
    """Weighted moments (all-ones mask, div_no_nan) and ``beta - mean * inv``."""

    def moments(self, op, xs):
        weights = pattern.Var("weights")
        # sum(w + zeros_like(xg)) reads xg through Shape, so it must be inside the pattern
        # (a use of xg outside it would stop the match); tf2onnx folds it to a constant
        # when the batch is static.
        zeros_like = op.ConstantOfShape(op.Shape(xs), _outputs=["zeros_like"])
        sum_w = pattern.OrValue([op.ReduceSum(commuted(op.Add, weights, zeros_like), _allow_other_inputs=True), pattern.Var("sum_of_weights")])
        is_empty = op.Equal(sum_w, pattern.Var("zero"))
        mean_sum = op.ReduceSum(_weighted(op, weights, xs), _allow_other_inputs=True)
        mean = op.Where(is_empty, pattern.Var("zero_mean"), op.Div(mean_sum, sum_w))
        deviation = op.Sub(xs, mean)
        squared_sum = op.ReduceSum(_weighted(op, weights, op.Mul(deviation, deviation)), _allow_other_inputs=True)
        variance = op.Where(is_empty, pattern.Var("zero_var"), op.Div(squared_sum, sum_w))
        return mean, variance

    def combine(self, op, xs, mean, inv, beta):
        if self.center:
            shift = op.Sub(beta, commuted(op.Mul, mean, inv))
        else:
            shift = commuted(op.Mul, op.Neg(mean), inv)
        return commuted(op.Add, commuted(op.Mul, xs, inv), shift)

    # -- check -----------------------------------------------------------------------
    def _group_count(self, grouping: _match.Grouping) -> int | None:
        grouped = _match.grouped_dims(list(grouping.x_dims), grouping.axis, grouping.groups)
        count = 1
        for axis in grouping.stat_axes:
            if not isinstance(grouped[axis], int):
                return None
            count *= grouped[axis]
        return count

    def _check_ones_mask(self, weights: ir.Value, grouping: _match.Grouping) -> str | None:
        node = weights.producer()
        if node is None or node.op_type != "Reshape":
            return "the weights are not a Reshape of ones_like(x)"
        fill = node.inputs[0].producer()
        if fill is None or fill.op_type != "ConstantOfShape" or _fill_value(fill) != 1.0:
            return "the weights are not all ones (ConstantOfShape with value 1)"
        fill_dims = _shapes.int_values(fill.inputs[0])
        target = _shapes.int_values(node.inputs[1])
        if fill_dims is None or target is None:
            return "the weights' shape cannot be evaluated"
        grouped = _match.grouped_dims(list(grouping.x_dims), grouping.axis, grouping.groups)
        if fill_dims != list(grouping.x_dims):
            return f"the weights are ones of shape {fill_dims}, not the input's {list(grouping.x_dims)}"
        reshaped = _shapes.reshape_dims(fill_dims, target, False)
        if reshaped is None or not _shapes.same_dims(reshaped, grouped):
            return f"the weights are reshaped to {target}, not the grouped shape {grouped}"
        return None

    def _check_constant_sum(self, sum_w: ir.Value, grouping: _match.Grouping) -> str | None:
        constant = _shapes.numpy_of(sum_w)
        count = self._group_count(grouping)
        if constant is None or count is None or not np.all(constant == count):
            return f"the sum of weights is not a constant equal to the group size {count}"
        stats_shape = [1] * (grouping.rank + 1)
        stats_shape[0] = grouping.x_dims[0]
        stats_shape[grouping.axis] = grouping.groups
        padded = [1] * (len(stats_shape) - constant.ndim) + list(constant.shape)
        if len(padded) != len(stats_shape) or any(p != 1 and p != s for p, s in zip(padded, stats_shape)):
            return f"the constant sum of weights has shape {list(constant.shape)}, not a statistics shape"
        return None

    def check_moments(self, context, grouping, sum_of_weights=None, weights=None, zeros_like=None, zero=None, zero_mean=None, zero_var=None, **_) -> str | None:
        for name, value in (("div_no_nan's zero", zero), ("the mean fallback", zero_mean), ("the variance fallback", zero_var)):
            if _match.scalar_float(value) != 0.0:
                return f"{name} is not the constant 0"
        if weights is not None:
            why = self._check_ones_mask(weights, grouping)
            if why:
                return why
        if zeros_like is not None:
            # ReduceSum(w + zeros_like(xg)): its axes are checked with the other reductions.
            if _fill_value(zeros_like.producer()) != 0.0:
                return "zeros_like is not filled with 0"
            return None
        return self._check_constant_sum(sum_of_weights, grouping)


def rules() -> list[pattern.RewriteRule]:
    return [TFKerasGroupNormFusion.rule(scale=s, center=c) for s in (True, False) for c in (True, False)]
