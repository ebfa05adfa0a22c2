"""Keras 3.6 + tf2onnx, float16 and mixed_float16 policies.

Keras 3.6's GroupNormalization does not up-cast; TF's ``moments`` does it internally for
16-bit inputs: the statistics are computed in float32 from ``Cast(xg, FLOAT)``, clipped to
the float16 range and cast back; rsqrt and the affine run in float16 (research doc §2.3)::

    m16 = Cast(Max(Min(ReduceMean(x32), 65504), -65504), FLOAT16)
    v16 = Cast(Max(Min(ReduceMean((x32 - m32)^2), 65504), -65504), FLOAT16)
    y   = xg * inv + (-m16 * inv + beta)          # inv = 1/sqrt(v16 + eps) * gamma, float16

Our op computes the same statistics in float32 and the affine in float32 before one final
rounding, so it agrees to float16 rounding. The clip changes a result only when a group's
variance exceeds 65504 (std > 256, or |mean| > 65504, impossible for float16 data): there
Keras 3.6 itself returns a wrongly scaled output and Keras 3.15 (no clip) agrees with us.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match
from ._keras import KerasGroupNormFusionBase
from .tf2onnx import tf_mean

__all__ = ["Keras36Float16GroupNormFusion", "rules"]

_FLOAT16_MAX = 65504.0


class Keras36Float16GroupNormFusion(KerasGroupNormFusionBase):
    """float32 moments on ``Cast(xg)``, clipped to +-65504 and cast to float16."""

    def statistics_input(self, op, xg):
        return op.Cast(xg, _outputs=["stats_cast"])

    def affine_input(self, op, xg, xs):
        return xg

    def _clip_cast(self, op, value, name):
        clipped = op.Max(op.Min(value, _allow_other_inputs=True, _outputs=[f"{name}_min"]), _allow_other_inputs=True, _outputs=[f"{name}_max"])
        return op.Cast(clipped, _outputs=[f"{name}_cast"])

    def moments(self, op, xs):
        mean32 = tf_mean(op, xs)
        deviation = op.Sub(xs, mean32)
        var32 = tf_mean(op, op.Mul(deviation, deviation))
        return self._clip_cast(op, mean32, "mean"), self._clip_cast(op, var32, "var")

    def _clip_ok(self, node: ir.Node, bound: float) -> bool:
        others = [v for v in node.inputs[1:] if v is not None]
        return len(others) == 1 and _match.scalar_float(others[0]) == bound

    def check_moments(self, context, grouping, stats_cast=None, **bindings) -> str | None:
        dtype = grouping.x.dtype
        if dtype != ir.DataType.FLOAT16:
            return f"the float16 statistics pattern needs a float16 input, got {dtype}"
        if _match.cast_target(stats_cast) != ir.DataType.FLOAT:
            return "the statistics are not computed on a float32 Cast of the grouped input"
        for name in ("mean", "var"):
            low, high, cast = bindings.get(f"{name}_min"), bindings.get(f"{name}_max"), bindings.get(f"{name}_cast")
            if not self._clip_ok(low.producer(), _FLOAT16_MAX) or not self._clip_ok(high.producer(), -_FLOAT16_MAX):
                return f"the {name} is not clipped to exactly [-65504, 65504]"
            if _match.cast_target(cast) != ir.DataType.FLOAT16:
                return f"the clipped {name} is cast to {_match.cast_target(cast)}, not float16"
        return None


def rules() -> list[pattern.RewriteRule]:
    return [Keras36Float16GroupNormFusion.rule(scale=s, center=c) for s in (True, False) for c in (True, False)]
