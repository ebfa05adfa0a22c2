"""The skeleton that every Keras GroupNormalization export shares, as a rule base class.

Keras computes (``GroupNormalization.call``, all backends)::

    xg  = Reshape(x, [..., G, C/G, ...])          # the grouping Reshape
    m, v = moments(xg)                            # backend-specific: the one thing that varies
    inv = rsqrt(v + eps) [* gamma]
    yg  = xg * inv + (-m * inv [+ beta])
    y   = Reshape(yg, shape(x))

Subclasses (one per exporter family) implement :meth:`moments` and may override
:meth:`rsqrt` and :meth:`combine`; constructor flags ``scale``/``center`` give the variants
without gamma/beta (``RewriteRuleClassBase.rule(scale=..., center=...)``). ``check`` here
proves the parts that every family shares; :meth:`check_moments` adds what is specific.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match, _shapes
from ._base import Fusion, GroupNormFusionBase

__all__ = ["KerasGroupNormFusionBase", "commuted", "optional_cast", "VARIANT_SUFFIX"]

#: Rule-name suffix of each (scale, center) variant.
VARIANT_SUFFIX = {(True, True): "", (True, False): "NoBeta", (False, True): "NoGamma", (False, False): "NoAffine"}


def commuted(op_fn, a, b):
    """``op_fn(a, b)`` or ``op_fn(b, a)``: exporters differ in operand order."""
    return pattern.OrValue([op_fn(a, b), op_fn(b, a)])


def optional_cast(op, value, name: str):
    """``Cast(value)`` (its output bound to ``name``) or ``value`` itself."""
    return pattern.OrValue([op.Cast(value, _outputs=[name]), value])


class KerasGroupNormFusionBase(GroupNormFusionBase):
    """A Keras GroupNormalization layer as exported by one family of exporters."""

    #: Reductions whose axes must be "all but batch and group" when they read the grouped tensor.
    REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool")

    def __init__(self, *, scale: bool = True, center: bool = True, name: str | None = None):
        self.scale = scale
        self.center = center
        super().__init__(name or f"{type(self).__name__}{VARIANT_SUFFIX[(scale, center)]}")

    # -- pattern ---------------------------------------------------------------------
    def moments(self, op, xs):
        """Return ``(mean, variance)`` pattern values computed from the grouped ``xs``."""
        raise NotImplementedError

    def rsqrt(self, op, variance, epsilon):
        std = op.Sqrt(commuted(op.Add, variance, epsilon))
        return pattern.OrValue([op.Reciprocal(std), op.Div(1.0, std)])

    def combine(self, op, xs, mean, inv, beta):
        shift = commuted(op.Mul, op.Neg(mean), inv)
        if self.center:
            shift = commuted(op.Add, shift, beta)
        return commuted(op.Add, commuted(op.Mul, xs, inv), shift)

    def statistics_input(self, op, xg):
        """The grouped tensor the statistics and the affine read (Keras 3.15 casts it to
        float32 for float16 inputs; a no-op Cast elsewhere)."""
        return optional_cast(op, xg, "cast_in")

    def affine_input(self, op, xg, xs):
        """The tensor that is multiplied by ``inv``: the statistics input by default."""
        return xs

    def pattern(self, op, x, group_shape, out_shape, epsilon, gamma, beta):
        xg = op.Reshape(x, group_shape, _outputs=["xg"])
        xs = self.statistics_input(op, xg)
        mean, variance = self.moments(op, xs)
        inv = self.rsqrt(op, variance, epsilon)
        if self.scale:
            inv = commuted(op.Mul, inv, gamma)
        yg = self.combine(op, self.affine_input(op, xg, xs), mean, inv, beta)
        return op.Reshape(optional_cast(op, yg, "cast_out"), out_shape, _outputs=["y"])

    # -- check -----------------------------------------------------------------------
    def check_moments(self, context, grouping: _match.Grouping, **bindings) -> str | None:
        """Family-specific semantics of the moments; a reason to reject, or None."""
        return None

    def requires_keepdims(self, node: ir.Node) -> bool:
        """Whether reduction ``node`` must keep its dims (a family may broadcast back)."""
        return True

    def _check_reductions(self, context, candidates):
        nodes = [n for n in context.nodes if n.op_type in self.REDUCTIONS]
        reasons = []
        for grouping in candidates:
            bad = None
            for node in nodes:
                axes, why = _match.reduce_axes(node, grouping.rank + 1, require_keepdims=self.requires_keepdims(node))
                if why:
                    return None, why
                if axes != grouping.stat_axes:
                    bad = f"{node.op_type} {node.name!r} reduces axes {axes}, not {grouping.stat_axes} (all but batch and group)"
                    break
            if bad is None:
                return grouping, None
            reasons.append(bad)
        return None, reasons[0] if reasons else "no reduction found"

    def _check_casts(self, x: ir.Value, y: ir.Value, cast_in, cast_out) -> str | None:
        dtype = x.dtype
        if dtype is None:
            return f"the dtype of {x.name!r} is unknown (shape inference could not type it)"
        if dtype not in _match.FLOAT_TYPES:
            return f"input dtype {dtype} is not a float type"
        stash = False
        if cast_in is not None:
            to = _match.cast_target(cast_in)
            if to == ir.DataType.FLOAT and dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                stash = True
            elif to != dtype:
                return f"Cast after the grouping Reshape goes from {dtype} to {to}"
        if cast_out is not None:
            to = _match.cast_target(cast_out)
            if to != dtype:
                return f"Cast before the final Reshape goes to {to}, not the input dtype {dtype}"
        elif stash:
            return "statistics are cast to float32 but the result is not cast back"
        if y.dtype is not None and y.dtype != dtype:
            return f"output dtype {y.dtype} differs from input dtype {dtype}"
        return None

    def check(self, context, x, xg, out_shape, epsilon, y, gamma=None, beta=None, cast_in=None, cast_out=None, **bindings):
        result = pattern.MatchResult()
        candidates, why = _match.groupings(xg)
        if why:
            return result.fail(why, xg)
        grouping, why = self._check_reductions(context, candidates)
        if why:
            return result.fail(why)
        x_in = grouping.x
        why = self._check_casts(x_in, y, cast_in, cast_out)
        if why:
            return result.fail(why, x_in)
        why = self.check_moments(context, grouping, **bindings)
        if why:
            return result.fail(why)
        eps = _match.scalar_float(epsilon)
        if eps is None or eps < 0:
            return result.fail("epsilon is not a non-negative scalar constant", epsilon)
        params = {}
        for name, value, on in (("gamma", gamma, self.scale), ("beta", beta, self.center)):
            if not on:
                params[name] = None
                continue
            params[name], why = _match.per_channel_param(value, grouping, name)
            if why:
                return result.fail(why, value)
        reshape = y.producer()
        target = _shapes.int_values(out_shape)
        if target is None:
            return result.fail("the final Reshape target cannot be evaluated", out_shape)
        allowzero = reshape.attributes.get("allowzero")
        allowzero = bool(allowzero.as_int()) if allowzero else False
        if grouping.merged:
            # The final Reshape may have absorbed the one after it too: it is re-emitted after
            # our op on (rows, C). Same elements, same row-major order: the same result, unless
            # a 0 copies a dim (rows is the only dim the two inputs share).
            if not allowzero and any(not isinstance(t, int) or t == 0 for t in target[1:]):
                return result.fail(f"the final Reshape (target {target}) may copy a dim of the grouped tensor (a 0 after the first entry)", out_shape)
        else:
            grouped = _match.grouped_dims(list(grouping.x_dims), grouping.axis, grouping.groups)
            restored = _shapes.reshape_dims(grouped, target, allowzero)
            if restored is None or not _shapes.same_dims(restored, list(grouping.x_dims)):
                return result.fail(f"the final Reshape (target {target}) does not restore the input shape {list(grouping.x_dims)}", out_shape)
        self._fusion = Fusion(
            x=x_in,
            rank=grouping.rank,
            axis=grouping.axis,
            groups=grouping.groups,
            channels=grouping.channels,
            epsilon=eps,
            gamma=params["gamma"],
            beta=params["beta"],
            name=xg.producer().name or reshape.name or y.name or "group_norm",
            in_function=isinstance(context.graph_or_function, ir.Function),
            flatten=grouping.merged,
            after=(out_shape, int(allowzero)) if grouping.merged else None,
        )
        return result
