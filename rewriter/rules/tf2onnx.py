"""Keras + TensorFlow through tf2onnx (``model.export(format="onnx")``, ``from_keras``,
SavedModel + CLI): TF's ``moments`` is ``mean = reduce_mean(x)``,
``var = reduce_mean(squared_difference(x, mean))``, rsqrt is ``Reciprocal(Sqrt)``.

tf2onnx writes each ReduceMean as ``GlobalAveragePool`` when its axes are exactly
``[2, ...]`` (channels-first, and rank-2 channels-last) and omits the beta Add when TF's
optimiser folded a beta of zeros (that case is the ``center=False`` rule).
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from ._keras import KerasGroupNormFusionBase

__all__ = ["KerasTFGroupNormFusion", "rules", "tf_mean"]


def tf_mean(op, value):
    """``reduce_mean`` as tf2onnx writes it: ReduceMean, or GlobalAveragePool when the
    axes are exactly [2, ...] (the reductions check proves the axes either way)."""
    return pattern.OrValue([op.ReduceMean(value, _allow_other_inputs=True), op.GlobalAveragePool(value)])


class KerasTFGroupNormFusion(KerasGroupNormFusionBase):
    """tf2onnx's form of ``tf.nn.moments``: ReduceMean (or GlobalAveragePool) of (x - m)^2."""

    def moments(self, op, xs):
        mean = tf_mean(op, xs)
        deviation = op.Sub(xs, mean)
        return mean, tf_mean(op, op.Mul(deviation, deviation))


def rules() -> list[pattern.RewriteRule]:
    return [KerasTFGroupNormFusion.rule(scale=s, center=c) for s in (True, False) for c in (True, False)]
