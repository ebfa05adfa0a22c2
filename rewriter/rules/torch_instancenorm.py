"""torch.nn.GroupNorm through torch.onnx (TorchScript exporter, any opset; dynamo, opset 18-20)::

    xg = Reshape(x, [0, G, -1])                          # batch copied or static; rest inferred
    n  = InstanceNormalization(xg, ones[G], zeros[G]) {epsilon}
    r  = Reshape(n, Shape(x) | constant dims of x)       # back to x's shape
    y  = Add(Mul(r, gamma[C,1,..,1]), beta[C,1,..,1])     # affine=False: Mul(1), Add(0)

InstanceNormalization normalises each (batch, group) row of ``xg`` over its last axis, that
is over the group's C/G channels and every spatial position: a GroupNormalization with the
channel on axis 1. ``check`` proves it: the first Reshape splits x's dims into exactly
``[N, G, (C/G)*S]`` with C divisible by G, the second restores x's dims (symbolically, see
:mod:`.._shapes`), gamma/beta broadcast per channel along axis 1.

A non-trivial per-group affine of the InstanceNormalization (scale/B other than ones/zeros)
is folded into the per-channel gamma/beta when everything is constant
(``gamma' = gamma * a[c // (C/G)]``, ``beta' = gamma * b[c // (C/G)] + beta``); otherwise the
candidate is rejected. Constant gamma = 1 / beta = 0 (affine=False: ``[[[1.0]]]``/``[[[0.0]]]``
or ones/zeros ``[C,1,..]``) are identities and are not emitted.

Variants (constructor flags ``scale``/``center``) cover graphs where an optimiser already
dropped the identity Mul or Add; a variant without the Mul (Add) defers to the fuller rule
when the next node is a Mul (Add) by a per-channel constant, because the rewriter visits the
shorter pattern's anchor first.

Without the restoring Reshape (flag ``restore=False``): with ``groups == channels`` on a
rank-3 ``N x C x T`` input (audio feature encoders' ``nn.GroupNorm(512, 512)``) the grouping
Reshape ``[0, C, -1]`` is a shape identity, so is the restoring one, and the dynamo exporter's
optimiser drops the latter when shapes are static::

    n = InstanceNormalization(Reshape(x, [0, C, -1]), ones[C], zeros[C])
    y = Add(Mul(n, gamma[C,1]), beta[C,1])

``check`` proves the grouping Reshape's output has exactly x's dims (anything else, e.g.
fewer groups than channels or a rank-4 input, would leave the grouped layout in place and is
rejected). The InstanceNormalization's scale/bias may be initializers other nodes also read:
they are only read, and they stay for those nodes. A variant without the restoring Reshape
defers to the fuller rules when the InstanceNormalization's only use is a Reshape.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match, _shapes
from ._base import Fusion, GroupNormFusionBase

__all__ = ["TorchInstanceNormGroupNormFusion", "rules"]

logger = logging.getLogger(__name__)

_DEFAULT_IN_EPSILON = 1e-5  # InstanceNormalization's default


def _per_channel(value: ir.Value, rank: int, channels: int, what: str) -> tuple[np.ndarray | None, str | None]:
    """A Mul/Add operand broadcast along axis 1 of a rank-``rank`` tensor, as a [C] array.

    Accepted shapes, after padding with leading 1s to ``rank``: ``[1, C, 1, ..]`` (one value
    per channel) or all 1s (one value for every channel, e.g. TorchScript's ``[[[1.0]]]``).
    """
    array = _shapes.constant_array(value)
    if array is None:
        return None, f"{what} is not a constant"
    if array.ndim > rank:
        return None, f"{what} has rank {array.ndim}, more than the input's {rank}: it would broadcast the output"
    shape = [1] * (rank - array.ndim) + list(array.shape)
    if shape == [1] * rank:
        return np.full(channels, array.reshape(()), dtype=array.dtype), None
    if shape != [1, channels] + [1] * (rank - 2):
        layout = [channels] + [1] * (rank - 2)
        return None, f"{what} has shape {list(array.shape)}, not per channel along axis 1 ({layout})"
    return array.reshape(-1), None


class TorchInstanceNormGroupNormFusion(GroupNormFusionBase):
    """torch.nn.GroupNorm exported as Reshape -> InstanceNormalization [-> Reshape] [-> Mul] [-> Add]."""

    def __init__(self, *, scale: bool = True, center: bool = True, restore: bool = True, name: str | None = None):
        self.scale = scale
        self.center = center
        self.restore = restore
        suffix = {(True, True): "", (True, False): "NoBeta", (False, True): "NoGamma", (False, False): "NoAffine"}
        unrestored = "" if restore else "Unrestored"
        super().__init__(name or f"{type(self).__name__}{unrestored}{suffix[(scale, center)]}")

    def pattern(self, op, x, group_shape, in_scale, in_bias, out_shape, gamma, beta):
        xg = op.Reshape(x, group_shape, _outputs=["xg"])
        y = op.InstanceNormalization(xg, in_scale, in_bias, _outputs=["normalized"])
        if self.restore:
            y = op.Reshape(y, out_shape, _outputs=["restored"])
        if self.scale:
            y = op.Mul(y, gamma)  # rules() adds the commuted operand orders
        if self.center:
            y = op.Add(y, beta)
        return y

    # -- check -----------------------------------------------------------------------
    def _grouping(self, x: ir.Value, xg: ir.Value) -> tuple[tuple | None, str | None]:
        """``(x_dims, groups, channels, grouped_dims)`` when the first Reshape is ``[N, G, (C/G)*S]``."""
        x_dims = _shapes.dims_of(x)
        if x_dims is None:
            return None, f"the rank of the GroupNorm input {x.name!r} is unknown"
        if len(x_dims) < 2:
            return None, f"the input {x.name!r} has rank {len(x_dims)} < 2"
        channels = x_dims[1]
        if not isinstance(channels, int):
            return None, f"the channel dimension (axis 1) of {x.name!r} is not static: {channels!r}"
        reshape = xg.producer()
        target = _shapes.int_values(reshape.inputs[1])
        if target is None:
            return None, f"the grouping Reshape target {reshape.inputs[1].name!r} cannot be evaluated"
        allowzero = reshape.attributes.get("allowzero")
        out = _shapes.reshape_dims(x_dims, target, bool(allowzero.as_int()) if allowzero else False)
        if out is None or len(out) != 3:
            return None, f"the grouping Reshape (target {target}) does not give a rank-3 [N, G, -1] tensor"
        groups = out[1]
        if not isinstance(groups, int) or groups < 1:
            return None, f"the grouping Reshape (target {target}) has no static group count on axis 1"
        if channels % groups:
            return None, f"C={channels} is not divisible by groups={groups}"
        spatial = x_dims[2:]
        row = (channels // groups) * int(np.prod(spatial)) if all(isinstance(d, int) for d in spatial) else _shapes.Sym(("row",))
        if not _shapes.same_dims(out, [x_dims[0], groups, row]):
            return None, f"the grouping Reshape (target {target}) does not map {x_dims} to [N, {groups}, -1]"
        return (x_dims, groups, channels, out), None

    def _restored(self, x_dims, groups, grouped, xg, restored, out_shape) -> tuple[ir.Value | None, str | None]:
        """Where the normalised tensor is back in x's shape: after the restoring Reshape, or
        (``restore=False``) right after the InstanceNormalization when the grouping Reshape
        changed no dim (then so would the missing restoring one)."""
        if not self.restore:
            if not _shapes.same_dims(grouped, x_dims):
                return None, (
                    f"no Reshape restores the input's shape, and the grouping Reshape's output {grouped} is not the "
                    f"input's shape {x_dims} (an identity only when groups == channels on a rank-3 input)"
                )
            return xg, None
        target = _shapes.int_values(out_shape)
        if target is None:
            return None, "the restoring Reshape target cannot be evaluated"
        allowzero = restored.producer().attributes.get("allowzero")
        grouped_sym = [x_dims[0], groups, _shapes.Sym(("row", id(xg)))]
        back = _shapes.reshape_dims(grouped_sym, target, bool(allowzero.as_int()) if allowzero else False)
        if back is None or not _shapes.same_dims(back, x_dims):
            return None, f"the restoring Reshape (target {target}) does not give the input shape {x_dims}"
        return restored, None

    def _defer_to_fuller_rule(self, context, value: ir.Value, rank: int, channels: int) -> str | None:
        """A reason to leave this match to the rule that also takes the next Mul/Add (or,
        without the restoring Reshape, the Reshape after the InstanceNormalization)."""
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        node = uses[0].node
        if not self.restore and not (self.scale or self.center) and node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            return f"followed by Reshape {node.name!r}: left to the rules that include a restoring Reshape"
        # Mul comes before Add: after a Mul only an Add can still be taken; after an Add nothing.
        wanted = [] if self.center else ["Add"] if self.scale else ["Mul", "Add"]
        if node.op_type not in wanted or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return None
        other = node.inputs[1 - uses[0].idx]
        _, why = _per_channel(other, rank, channels, "operand")
        if why is None:
            return f"followed by a per-channel {node.op_type} {node.name!r}: left to the rule that includes it"
        return None

    def check(self, context, x, xg, normalized, in_scale, in_bias, restored=None, out_shape=None, gamma=None, beta=None, **_):
        result = pattern.MatchResult()
        dtype = x.dtype
        if dtype not in _match.FLOAT_TYPES:
            return result.fail(f"input dtype {dtype} is not a float type", x)
        found, why = self._grouping(x, xg)
        if why:
            return result.fail(why, xg)
        x_dims, groups, channels, grouped = found
        rank = len(x_dims)

        # InstanceNormalization: per-group affine (ones/zeros, or constants folded below).
        in_node = normalized.producer()
        eps_attr = in_node.attributes.get("epsilon")
        epsilon = eps_attr.as_float() if eps_attr is not None else _DEFAULT_IN_EPSILON
        if not epsilon >= 0:
            return result.fail(f"InstanceNormalization epsilon {epsilon} is negative", normalized)
        group_affine = []
        for what, value in (("InstanceNormalization scale", in_scale), ("InstanceNormalization B", in_bias)):
            array = _shapes.constant_array(value)
            if array is None:
                return result.fail(f"{what} is not a constant: its per-group affine cannot be folded", value)
            if array.shape != (groups,):
                return result.fail(f"{what} has shape {list(array.shape)}, not [{groups}]", value)
            group_affine.append(array)

        # The second Reshape (or, without it, the grouping one) restores x's shape.
        _, why = self._restored(x_dims, groups, grouped, xg, restored, out_shape)
        if why:
            return result.fail(why, out_shape if self.restore else xg)

        # gamma / beta: per channel along axis 1.
        params = {}
        for name, value, on in (("gamma", gamma, self.scale), ("beta", beta, self.center)):
            if not on:
                params[name] = None
                continue
            params[name], why = _per_channel(value, rank, channels, name)
            if why:
                return result.fail(why, value)
        last = context.output_values[0]
        if last.dtype is not None and last.dtype != dtype:
            return result.fail(f"output dtype {last.dtype} differs from input dtype {dtype}", last)
        if not (self.scale and self.center):
            why = self._defer_to_fuller_rule(context, last, rank, channels)
            if why:
                return result.fail(why, last)

        gamma_c, beta_c = self._fold(params["gamma"], params["beta"], *group_affine, channels // groups, dtype)
        self._fusion = Fusion(
            x=x,
            rank=rank,
            axis=1,
            groups=groups,
            channels=channels,
            epsilon=epsilon,
            gamma=gamma_c,
            beta=beta_c,
            name=xg.producer().name or in_node.name or last.name or "group_norm",
            in_function=isinstance(context.graph_or_function, ir.Function),
        )
        return result

    @staticmethod
    def _fold(gamma, beta, in_scale, in_bias, per_group: int, dtype: ir.DataType):
        """Per-channel gamma/beta of ``gamma * (in_scale[g] * n + in_bias[g]) + beta``;
        None for an identity (all ones / all zeros)."""
        np_dtype = dtype.numpy()
        a = np.repeat(in_scale.astype(np.float64), per_group)
        b = np.repeat(in_bias.astype(np.float64), per_group)
        g = gamma.astype(np.float64) if gamma is not None else np.ones_like(a)
        c = beta.astype(np.float64) if beta is not None else np.zeros_like(a)
        if np.all(a == 1) and np.all(b == 0):
            # The usual case: keep the exporter's values bit for bit.
            gamma_c = gamma if gamma is not None else None
            beta_c = beta if beta is not None else None
        else:
            gamma_c, beta_c = g * a, g * b + c
        if gamma_c is not None and np.all(gamma_c == 1):
            gamma_c = None
        if beta_c is not None and np.all(beta_c == 0):
            beta_c = None
        return (
            None if gamma_c is None else np.asarray(gamma_c).astype(np_dtype),
            None if beta_c is None else np.asarray(beta_c).astype(np_dtype),
        )


def rules() -> list[pattern.RewriteRule]:
    """The fullest variant first (restoring Reshape, Mul, Add); each with every operand order of its Mul/Add."""
    variants = ((True, True), (True, False), (False, True), (False, False))
    return [
        rule
        for r in (True, False)
        for s, c in variants
        for rule in TorchInstanceNormGroupNormFusion.rule(scale=s, center=c, restore=r).commute()
    ]
