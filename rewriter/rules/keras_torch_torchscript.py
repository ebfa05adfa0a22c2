"""Keras + torch through torch.onnx's TorchScript exporter (``model.export(format="onnx")``
with the default signature, or ``torch.onnx.export(keras_model, dynamo=False)``).

Keras' torch ``moments`` is ``var = mean(x*x) - mean(x)^2`` with the squares written as
``Mul(x, x)`` and ``Mul(m, m)``; rsqrt is ``Div(1.0, Sqrt(Cast(Add(var, eps))))``. The tracer
records every ``tensor.shape[i]``, so all reshape targets (also gamma's and beta's, which
are the raw ``[C]`` parameters reshaped to ``[1, .., G, C/G, ..]``) are computed at run time
from ``Shape``/``Gather``/``Div``/``Unsqueeze``/``Concat``; the shared symbolic evaluation
(:mod:`.._shapes`) proves them. Without ``dynamic_axes`` ``torch.onnx.export`` constant-folds
all of that (constant targets, gamma/beta constants in grouped layout, ``ReduceMean`` with
an ``axes`` attribute at opset 17), which the same rule matches.

The exporter scatters Casts through the subgraph: ``Cast(FLOAT)`` after the grouping
Reshape (a second one under the float16 policy), one between ``Add(eps)`` and ``Sqrt``, one
or two before the final Reshape, and ``Cast(FLOAT)`` after gamma's/beta's Reshape when the
parameters are float16. ``check`` proves that each is a no-op, the float16 -> float32
stash (and its cast back), or an exact widening of gamma/beta.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match
from ._keras import KerasGroupNormFusionBase, optional_cast

__all__ = ["KerasTorchScriptGroupNormFusion", "rules"]

_STASHABLE = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

#: Float conversions that change no value: (from, to).
def _statistics_dtype(dtype: ir.DataType, cast_in: ir.Value | None) -> ir.DataType:
    """The dtype the statistics are computed in: float32 after the float16 stash Cast."""
    to = _match.cast_target(cast_in)
    if to == ir.DataType.FLOAT and dtype in _STASHABLE:
        return ir.DataType.FLOAT
    return dtype


class KerasTorchScriptGroupNormFusion(KerasGroupNormFusionBase):
    """E[x*x] - E[x]^2 with ``Mul``, ``Div(1, Sqrt(Cast(Add(var, eps))))``, as torch's
    TorchScript exporter writes Keras' torch GroupNormalization."""

    def statistics_input(self, op, xg):
        # Cast(FLOAT) after the grouping Reshape; under the float16 policy a second, no-op one.
        once = op.Cast(xg, _outputs=["cast_in"])
        twice = op.Cast(op.Cast(xg, _outputs=["cast_in"]), _outputs=["cast_in_again"])
        return pattern.OrValue([twice, once, xg])

    def moments(self, op, xs):
        mean = op.ReduceMean(xs, _allow_other_inputs=True)
        mean_sq = op.ReduceMean(op.Mul(xs, xs), _allow_other_inputs=True)
        return mean, op.Sub(mean_sq, op.Mul(mean, mean))

    def rsqrt(self, op, variance, epsilon):
        std = op.Sqrt(optional_cast(op, op.Add(variance, epsilon), "cast_eps"))
        return pattern.OrValue([op.Div(1.0, std), op.Reciprocal(std)])

    def combine(self, op, xs, mean, inv, beta):
        # The float16 policy casts the result back twice; the base matches the outer Cast.
        return optional_cast(op, super().combine(op, xs, mean, inv, beta), "cast_out_inner")

    @staticmethod
    def _hidden_casts_reason(dtype, cast_in, cast_in_again, cast_eps, cast_out_inner) -> str | None:
        """The Casts the base class does not see: each must be a no-op in the statistics
        dtype, or (before the final Reshape) the cast back to the input ``dtype``."""
        stats = _statistics_dtype(dtype, cast_in)
        if cast_in_again is not None and _match.cast_target(cast_in_again) != stats:
            return f"the second Cast after the grouping Reshape goes to {_match.cast_target(cast_in_again)}, not {stats}"
        if cast_eps is not None and _match.cast_target(cast_eps) != stats:
            return f"the Cast between Add(epsilon) and Sqrt goes to {_match.cast_target(cast_eps)}, not {stats}"
        if cast_out_inner is not None and _match.cast_target(cast_out_inner) not in (stats, dtype):
            return f"the Cast of the result goes to {_match.cast_target(cast_out_inner)}, neither {stats} nor the input dtype {dtype}"
        return None

    def check(self, context, x, gamma=None, beta=None, cast_in=None, cast_in_again=None, cast_eps=None, cast_out_inner=None, **bindings):
        # The base check first: it proves the input dtype and the first Cast (no-op or stash).
        result = super().check(context, x=x, gamma=gamma, beta=beta, cast_in=cast_in, **bindings)
        if not result:
            return result
        why = self._hidden_casts_reason(self._fusion.x.dtype, cast_in, cast_in_again, cast_eps, cast_out_inner)
        if why:
            return result.fail(why, self._fusion.x)
        return result


def rules() -> list[pattern.RewriteRule]:
    return [KerasTorchScriptGroupNormFusion.rule(scale=s, center=c) for s in (True, False) for c in (True, False)]
