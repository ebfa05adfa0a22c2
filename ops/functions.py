"""The onnxscript function bodies of our GroupNormalization op.

One op (``contract.DOMAIN``/``GroupNormalization``), several bodies. An ONNX function body
is fixed: it cannot branch on whether an optional input was given or on the input dtype
without an ``If`` node, and onnxruntime inlines it with the *model's* opset. So we
specialise the body when we attach it, and tell the bodies apart with the ONNX function
``overload`` field (IR version 10); the node keeps op type, domain, attributes and inputs:

* **affine variant** (``center``/``scale``): gamma and beta are optional inputs (``X``,
  ``gamma``, ``beta``, with an empty name for an absent one). The body for a variant only
  reads the inputs it has, so ``scale=False`` costs no multiply by ones and ``center=False``
  no add of zeros.
* **layout** ``cf`` (channel axis 1: channels-first, and every rank-2 input) or ``nd``
  (channel axis elsewhere: channels-last or a middle axis). Each uses the fastest
  onnxruntime CPU kernels for its memory layout (see ``benchmarks/bench_op.py``):

  - ``cf``: ``Reshape(x, [N, G, -1])`` makes every group contiguous; we subtract a shift
    (every group's first element, one ``Slice``), normalise the deviations with
    ``InstanceNormalization`` (scale 1, bias 0) and apply gamma/beta per channel with one
    ``BatchNormalization`` (mean 0, var 1, epsilon 0), a single pass over the tensor. Six
    kernels per layer, one more than torch's own export (``benchmarks/realsize/profile_gn_layers.py``).
    Its ``_unshifted`` overload (``Variant.shift=False``) skips the shift: onnxruntime's
    InstanceNormalization on the data itself, the arithmetic of torch's own export, which the
    ``ort`` target keeps for layers torch exported that way (``targets.ort_cpu.keep_export_arithmetic``).
  - ``nd``: view ``x`` as ``[N, A, G, C/G, B]`` (A = dims before the channel axis, B = dims
    after it), reduce over ``[3, 4]`` then ``[1]`` (each reduction is one of onnxruntime's
    fast reduce patterns, unlike one reduce over the three axes), and apply the statistics
    and gamma/beta folded into one per-channel scale and shift.
* **activation** (``activation=1``): a following SiLU/swish ``y * sigmoid(y)`` absorbed
  into the op (computed in the statistics' precision before the final cast).
* **dtype**: float16 and bfloat16 inputs are computed in float32 and cast back (Keras 3 and
  ONNX ``stash_type=1`` do the same); float32 in float32; float64 in float64 (``nd`` body,
  since onnxruntime's InstanceNormalization has no float64 kernel).

Precision: the bodies are a *corrected two-pass*: a shift ``m`` near the mean is subtracted,
then the mean and the variance of the deviations ``d = x - m`` are taken. ``d`` is small, so
``E[d^2] - E[d]^2`` does not cancel even when ``|mean| >> std`` (mean 1e3, std 1e-2), where
ONNX GroupNormalization-21's own body (E[x^2] - E[x]^2 in the input type) returns NaN. For
``cf`` it matters where the subtraction happens: onnxruntime's InstanceNormalization applies
``x * scale + shift`` with ``scale = 1/std``, ``shift = -mean/std``, two large terms that cancel
(torch's export errs ~1e-2 there), so the shift must be taken from the data before it; folding
it into InstanceNormalization's bias or into the BatchNormalization would not help. Any element
of a group is within ``sqrt(n - 1)`` standard deviations of the group's mean, so with the
group's first element as the shift the output errs by at most ~``eps * sqrt(n)`` standard
deviations, whatever the data (``tests/test_op_function.py``).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import numpy as np
import onnx
from onnxscript import script
from onnxscript import opset13 as op13
from onnxscript import opset18 as op18
from onnxscript.values import Opset

from . import contract

__all__ = ["Variant", "variant_for", "function_proto", "LAYOUTS"]

LAYOUTS = ("cf", "cl", "nd")

_CUSTOM_OPSET = Opset(contract.DOMAIN, contract.VERSION)

#: nd: at most about this many rows per group estimate the shift.
_SHIFT_SAMPLES = 256
#: cf: the mean of the first this-many elements of every group is the shift. 1 (the first
#: element itself) spares a ReduceMean kernel per layer and keeps the error bound above.
_SHIFT_HEAD = 1

_STASHED = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_SUPPORTED_DTYPES = (*_STASHED, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


_OVERLOAD = re.compile(r"^(cf|cl|nd)_([a-z0-9]+)_(gb|g|b|plain)(_silu)?(?:_c(\d+)g(\d+)(?:r(\d+))?)?(_unshifted)?$")


class Variant(NamedTuple):
    """Which body a node needs; :attr:`overload` names it.

    ``cf`` and ``cl`` bodies are specialised on the channel count and number of groups
    (and ``cl`` on the rank) so that every shape they use is a constant: onnxruntime folds
    no shape computation that reads a tensor with a symbolic (batch) dimension, and each
    left over costs a kernel launch. The ``nd`` body (channel axis in the middle) computes
    its shapes at run time.
    """

    layout: str
    dtype: int
    scale: bool
    center: bool
    silu: bool = False
    channels: int = 0
    groups: int = 0
    rank: int = 0
    #: ``cf`` only: False drops the precision shift (onnxruntime's InstanceNormalization on the
    #: data itself, the arithmetic of torch's own export; see ``targets.ort_cpu``).
    shift: bool = True

    @property
    def overload(self) -> str:
        dtype = onnx.TensorProto.DataType.Name(self.dtype).lower()
        affine = ("g" if self.scale else "") + ("b" if self.center else "")
        name = f"{self.layout}_{dtype}_{affine or 'plain'}" + ("_silu" if self.silu else "")
        if self.layout in ("cf", "cl"):
            name += f"_c{self.channels}g{self.groups}"
        if self.layout == "cl":
            name += f"r{self.rank}"
        if not self.shift:
            name += "_unshifted"
        return name

    @classmethod
    def from_overload(cls, overload: str) -> Variant:
        """Inverse of :attr:`overload`; ValueError for a name we did not make."""
        match = _OVERLOAD.match(overload)
        try:
            if match is None:
                raise ValueError(overload)
            layout, dtype, affine, silu, channels, groups, rank, unshifted = match.groups()
            variant = cls(
                layout,
                onnx.TensorProto.DataType.Value(dtype.upper()),
                "g" in affine,
                "b" in affine,
                silu is not None,
                int(channels or 0),
                int(groups or 0),
                int(rank or 0),
                unshifted is None,
            )
            _validate(variant)
        except ValueError as e:
            raise ValueError(f"{overload!r} is not an overload of our GroupNormalization") from e
        return variant


def _validate(variant: Variant) -> None:
    if variant.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {variant.layout!r}")
    if variant.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"GroupNormalization supports float16, bfloat16, float32 and float64 inputs, "
            f"got {onnx.TensorProto.DataType.Name(variant.dtype)}"
        )
    if variant.layout in ("cf", "cl") and (variant.groups < 1 or variant.channels % variant.groups):
        raise ValueError(f"C={variant.channels} is not divisible by groups={variant.groups}")
    if variant.layout == "cl" and variant.rank < 2:
        raise ValueError(f"rank {variant.rank} < 2")
    if not variant.shift and variant.layout != "cf":
        raise ValueError(f"only the cf body can drop its shift, not {variant.layout!r}")


def variant_for(
    rank: int,
    axis: int,
    dtype: int,
    scale: bool,
    center: bool,
    activation: int = 0,
    *,
    channels: int,
    groups: int,
) -> Variant:
    """The body for an input of ``rank`` with ``channels`` on ``axis`` (may be negative);
    ``groups`` may be -1 (one per channel)."""
    if activation not in contract.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(contract.ACTIVATIONS)} (0 none, 1 SiLU), got {activation}")
    groups = channels if groups == -1 else groups
    axis %= rank
    silu = activation == contract.ACTIVATION_SILU
    if dtype == onnx.TensorProto.DOUBLE:  # onnxruntime's InstanceNormalization has no float64 kernel
        layout = "cl" if axis == rank - 1 and rank >= 3 else "nd"
    else:
        layout = "cf" if axis == 1 else "cl" if axis == rank - 1 else "nd"
    if layout == "nd":
        variant = Variant(layout, int(dtype), bool(scale), bool(center), silu)
    else:
        variant = Variant(layout, int(dtype), bool(scale), bool(center), silu, int(channels), int(groups), rank if layout == "cl" else 0)
    _validate(variant)
    return variant


def _np_type(dtype: int):
    return np.float64 if dtype == onnx.TensorProto.DOUBLE else np.float32


class _Switches(NamedTuple):
    """Python constants the scripts read: onnxscript turns ``if NAME:`` on an outer-scope
    constant into a static choice, so each variant has a straight-line body."""

    STASH: bool  # float16/bfloat16: compute in float32 and cast back
    COMPUTE: int  # the statistics' dtype
    OUT: int
    SCALE: bool
    CENTER: bool
    AFFINE: bool
    NO_AFFINE: bool
    SILU: bool
    R18: bool  # ReduceSumSquare/ReduceMean take axes as an input from opset 18
    R13: bool
    op: Opset


def _switches(variant: Variant, opset: int) -> _Switches:
    compute = onnx.TensorProto.FLOAT if variant.dtype != onnx.TensorProto.DOUBLE else onnx.TensorProto.DOUBLE
    r18 = opset >= 18
    return _Switches(
        variant.dtype in _STASHED, compute, variant.dtype, variant.scale, variant.center,
        variant.scale or variant.center, not (variant.scale or variant.center), variant.silu,
        r18, not r18, op18 if r18 else op13,
    )


# The three bodies repeat their first and last lines (the float32 stash Cast, SiLU, the Cast
# back): an onnxscript helper function would become a nested function in every model, and
# onnxruntime ignores overloads in nested calls (see ops.builder).


def _cf_body(variant: Variant, opset: int):
    """Channels-first: Slice shift, Sub, InstanceNormalization per group, one BatchNormalization affine."""
    STASH, COMPUTE, OUT, SCALE, CENTER, AFFINE, NO_AFFINE, SILU, R18, R13, op = _switches(variant, opset)
    SHIFT, UNSHIFTED = variant.shift, not variant.shift
    # Shapes known when the body is built: constants onnxruntime needs no kernel for.
    C, G = variant.channels, variant.groups
    GROUPED = [0, G, -1]  # [N, G, C/G * spatial]
    HEAD = _SHIFT_HEAD
    ONE, MEAN18, MEAN13 = HEAD == 1, HEAD > 1 and R18, HEAD > 1 and R13
    ONES_G = onnx.numpy_helper.from_array(np.ones(G, np.float32), "ones_g")
    ZEROS_G = onnx.numpy_helper.from_array(np.zeros(G, np.float32), "zeros_g")
    ONES_C = onnx.numpy_helper.from_array(np.ones(C, _np_type(COMPUTE)), "ones_c")
    ZEROS_C = onnx.numpy_helper.from_array(np.zeros(C, _np_type(COMPUTE)), "zeros_c")


    @script(_CUSTOM_OPSET, default_opset=op)
    def GroupNormalization(X, gamma, beta, groups: int, axis: int, epsilon: float):
        if STASH:
            x = op.Cast(X, to=COMPUTE)
        else:
            x = op.Identity(X)
        x3 = op.Reshape(x, op.Constant(value_ints=GROUPED))
        if SHIFT:
            # The shift, [N, G, 1], from the grouped view itself (contiguous: a strided Slice costs
            # a full pass in onnxruntime). Subtracted, it leaves the statistics small deviations.
            head = op.Slice(x3, op.Constant(value_ints=[0]), op.Constant(value_ints=[HEAD]), op.Constant(value_ints=[2]))
            if ONE:
                m = op.Identity(head)
            if MEAN18:
                m = op.ReduceMean(head, op.Constant(value_ints=[2]), keepdims=1)
            if MEAN13:
                m = op.ReduceMean(head, axes=[2], keepdims=1)
            d = op.Sub(x3, m)
        if UNSHIFTED:
            d = op.Identity(x3)
        n = op.Reshape(op.InstanceNormalization(d, op.Constant(value=ONES_G), op.Constant(value=ZEROS_G), epsilon=epsilon), op.Shape(X))
        if AFFINE:
            ones_c = op.Constant(value=ONES_C)
            zeros_c = op.Constant(value=ZEROS_C)
            if SCALE:
                gam = op.Cast(gamma, to=COMPUTE)
            else:
                gam = op.Identity(ones_c)
            if CENTER:
                bet = op.Cast(beta, to=COMPUTE)
            else:
                bet = op.Identity(zeros_c)
            # Per-channel affine in one pass: (n - 0) / sqrt(1 + 0) * gam + bet.
            y = op.BatchNormalization(n, gam, bet, zeros_c, ones_c, epsilon=0.0)
        if NO_AFFINE:
            y = op.Identity(n)
        if SILU:
            y = op.Mul(y, op.Sigmoid(y))
        if STASH:
            Y = op.Cast(y, to=OUT)
        else:
            Y = op.Identity(y)
        return Y

    return GroupNormalization


def _cl_body(variant: Variant, opset: int):
    """Channels-last: group statistics with MatMuls against channel->group matrices."""
    STASH, COMPUTE, OUT, SCALE, CENTER, AFFINE, NO_AFFINE, SILU, R18, R13, op = _switches(variant, opset)
    C, G = variant.channels, variant.groups
    CG = C // G
    PER_CHANNEL = [0] + [1] * max(variant.rank - 2, 0) + [C]  # [N, 1.., C], X's layout
    INV_CG = onnx.numpy_helper.from_array(np.array(1.0 / CG, _np_type(COMPUTE)), "inv_cg")


    @script(_CUSTOM_OPSET, default_opset=op)
    def GroupNormalization(X, gamma, beta, groups: int, axis: int, epsilon: float):
        if STASH:
            x = op.Cast(X, to=COMPUTE)
        else:
            x = op.Identity(X)
        # Channel -> group matrices, folded to constants by the runtime: expand[g, c] = 1
        # where channel c is in group g; average = expand^T / (C/G).
        eye = op.EyeLike(op.Cast(op.ConstantOfShape(op.Constant(value_ints=[G, G])), to=COMPUTE))
        expand = op.Reshape(op.Expand(op.Unsqueeze(eye, op.Constant(value_ints=[2])), op.Constant(value_ints=[G, G, CG])), op.Constant(value_ints=[G, C]))
        average = op.Mul(op.Transpose(expand, perm=[1, 0]), op.Constant(value=INV_CG))
        # [1, H] filled with 1/(spatial size): ``weights @ t`` sums the first spatial axis
        # with one GEMM pass (onnxruntime's reductions over it are slow).
        shape = op.Shape(X)
        first = op.Slice(shape, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
        spatial = op.ReduceProd(op.Slice(shape, op.Constant(value_ints=[1]), op.Constant(value_ints=[-1])), keepdims=1)
        weights = op.Expand(op.Reciprocal(op.Cast(spatial, to=COMPUTE)), op.Concat(op.Constant(value_ints=[1]), first, axis=0))
        rows = op.Constant(value_ints=[0, 0, -1])
        columns = op.Constant(value_ints=[0, -1, C])
        per_channel = op.Constant(value_ints=PER_CHANNEL)
        one = op.Constant(value_ints=[1])
        # group_mean(t) = ReduceSum(MatMul(Reshape(MatMul(weights, t as [N, H, rest*C]),
        # [N, rest, C]), average), over rest): [N, 1, G]. Written out three times below
        # because onnxscript functions cannot nest closures.
        m = op.ReduceSum(op.MatMul(op.Reshape(op.MatMul(weights, op.Reshape(x, rows)), columns), average), one, keepdims=1)
        # Subtract a first mean, then take the statistics of the small deviations: a
        # corrected two-pass, accurate even when |mean| >> std.
        d = op.Sub(x, op.Reshape(op.MatMul(m, expand), per_channel))
        mean_d = op.ReduceSum(op.MatMul(op.Reshape(op.MatMul(weights, op.Reshape(d, rows)), columns), average), one, keepdims=1)
        mean_sq = op.ReduceSum(op.MatMul(op.Reshape(op.MatMul(weights, op.Reshape(op.Mul(d, d), rows)), columns), average), one, keepdims=1)
        var = op.Sub(mean_sq, op.Mul(mean_d, mean_d))
        eps = op.Cast(op.Constant(value_float=epsilon), to=COMPUTE)
        inv = op.MatMul(op.Reciprocal(op.Sqrt(op.Add(var, eps))), expand)  # [N, 1, C]
        if SCALE:
            a = op.Mul(inv, op.Cast(gamma, to=COMPUTE))
        else:
            a = op.Identity(inv)
        shift = op.Mul(op.MatMul(mean_d, expand), a)
        if CENTER:
            b = op.Sub(op.Cast(beta, to=COMPUTE), shift)
        else:
            b = op.Neg(shift)
        # Per-(sample, channel) scale and shift in X's own layout [N, 1.., C]: a row
        # broadcast, and no copying Reshape at the end.
        y = op.Add(op.Mul(d, op.Reshape(a, per_channel)), op.Reshape(b, per_channel))
        if SILU:
            y = op.Mul(y, op.Sigmoid(y))
        if STASH:
            Y = op.Cast(y, to=OUT)
        else:
            Y = op.Identity(y)
        return Y

    return GroupNormalization


def _nd_body(variant: Variant, opset: int):
    """Channel axis in the middle: shapes computed at run time, reduce [3, 4] then [1]."""
    STASH, COMPUTE, OUT, SCALE, CENTER, AFFINE, NO_AFFINE, SILU, R18, R13, op = _switches(variant, opset)
    SAMPLES = _SHIFT_SAMPLES


    @script(_CUSTOM_OPSET, default_opset=op)
    def GroupNormalization(X, gamma, beta, groups: int, axis: int, epsilon: float):
        if STASH:
            x = op.Cast(X, to=COMPUTE)
        else:
            x = op.Identity(X)
        shape = op.Shape(X)
        rank = op.Shape(shape)
        ax = op.Unsqueeze(op.Constant(value_int=axis), op.Constant(value_ints=[0]))
        ax = op.Where(op.Less(ax, op.Constant(value_ints=[0])), op.Add(ax, rank), ax)
        channels = op.Gather(shape, ax)
        g1 = op.Unsqueeze(op.Constant(value_int=groups), op.Constant(value_ints=[0]))
        num_groups = op.Where(op.Less(g1, op.Constant(value_ints=[1])), channels, g1)
        per_group = op.Div(channels, num_groups)
        one = op.Constant(value_ints=[1])
        before = op.ReduceProd(op.Concat(one, op.Slice(shape, one, ax), axis=0), keepdims=1)
        after = op.ReduceProd(op.Concat(one, op.Slice(shape, op.Add(ax, one), rank), axis=0), keepdims=1)
        batch = op.Slice(shape, op.Constant(value_ints=[0]), one)
        view = op.Concat(batch, before, num_groups, per_group, after, axis=0)
        x5 = op.Reshape(x, view)
        count = op.Cast(op.Mul(op.Mul(before, per_group), after), to=COMPUTE)
        inner = op.Constant(value_ints=[3, 4])
        # Per-(sample, channel) values are broadcast in X's own layout, [N, 1.., C, 1..]:
        # a row broadcast is fast in onnxruntime, [N, 1, G, 1, 1] against [N, A, G, C/G, B]
        # is not, and computing in X's shape spares a copying Reshape at the end.
        ones = op.ConstantOfShape(rank, value=onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1]))
        param_shape = op.Concat(batch, op.Slice(ones, one, ax), channels, op.Slice(ones, op.Add(ax, one), rank), axis=0)
        per_channel = op.Concat(batch, one, num_groups, per_group, one, axis=0)
        # A shift near each group's mean from an evenly strided sample of the A axis
        # (cheap), as in the cf body; then the statistics of the deviations.
        rows = op.Max(op.Div(before, op.Constant(value_ints=[SAMPLES])), one)
        sample = op.Slice(x5, op.Constant(value_ints=[0]), before, one, rows)
        sample_count = op.Cast(op.ReduceProd(op.Gather(op.Shape(sample), op.Constant(value_ints=[1, 3, 4])), keepdims=1), to=COMPUTE)
        m5 = op.Div(op.ReduceSum(op.ReduceSum(sample, inner, keepdims=1), one, keepdims=1), sample_count)
        # Reduce [3, 4] then [1]: two fast reduce kernels instead of one slow strided one.
        d = op.Sub(x, op.Reshape(op.Expand(m5, per_channel), param_shape))
        d5 = op.Reshape(d, view)
        s1 = op.ReduceSum(op.ReduceSum(d5, inner, keepdims=1), one, keepdims=1)
        if R18:
            sq = op.ReduceSumSquare(d5, inner, keepdims=1)
        if R13:
            sq = op.ReduceSumSquare(d5, axes=[3, 4], keepdims=1)
        s2 = op.ReduceSum(sq, one, keepdims=1)
        md = op.Div(s1, count)
        var = op.Sub(op.Div(s2, count), op.Mul(md, md))
        eps = op.Cast(op.Constant(value_float=epsilon), to=COMPUTE)
        inv = op.Reciprocal(op.Sqrt(op.Add(var, eps)))
        affine_shape = op.Concat(op.Constant(value_ints=[1, 1]), num_groups, per_group, one, axis=0)
        if SCALE:
            a5 = op.Mul(inv, op.Reshape(op.Cast(gamma, to=COMPUTE), affine_shape))
        else:
            a5 = op.Identity(inv)
        if CENTER:
            b5 = op.Sub(op.Reshape(op.Cast(beta, to=COMPUTE), affine_shape), op.Mul(md, a5))
        else:
            b5 = op.Neg(op.Mul(md, a5))
        a = op.Reshape(op.Expand(a5, per_channel), param_shape)
        b = op.Reshape(op.Expand(b5, per_channel), param_shape)
        y = op.Add(op.Mul(d, a), b)
        if SILU:
            y = op.Mul(y, op.Sigmoid(y))
        if STASH:
            Y = op.Cast(y, to=OUT)
        else:
            Y = op.Identity(y)
        return Y

    return GroupNormalization


_BODIES = {"cf": _cf_body, "cl": _cl_body, "nd": _nd_body}


def _build(variant: Variant, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of ``variant``: its script, the contract's attributes and imports."""
    GroupNormalization = _BODIES[variant.layout](variant, opset)
    proto = GroupNormalization.to_function_proto()
    proto.overload = variant.overload
    # Attributes with the contract's defaults, so a node may omit any of them.
    del proto.attribute[:]
    proto.attribute_proto.extend(
        [
            onnx.helper.make_attribute("groups", contract.DEFAULT_GROUPS),
            onnx.helper.make_attribute("axis", contract.DEFAULT_AXIS),
            onnx.helper.make_attribute("epsilon", contract.DEFAULT_EPSILON),
            onnx.helper.make_attribute("activation", contract.ACTIVATION_NONE),
        ]
    )
    proto.doc_string = (
        f"Keras GroupNormalization ({variant.overload}); see onnx_groupnorm.ops.functions."
    )
    del proto.opset_import[:]
    proto.opset_import.extend(
        [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(contract.DOMAIN, contract.VERSION)]
    )
    return proto


@functools.lru_cache(maxsize=None)
def _cached(variant: Variant, opset: int) -> bytes:
    return _build(variant, opset).SerializeToString()


def function_proto(variant: Variant, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of ``variant`` for a model whose default-domain opset is ``opset``."""
    if opset < contract.MIN_OPSET:
        raise ValueError(
            f"our GroupNormalization body needs default-domain opset >= {contract.MIN_OPSET}, "
            f"the model has {opset}"
        )
    proto = onnx.FunctionProto()
    proto.ParseFromString(_cached(variant, opset))
    return proto
