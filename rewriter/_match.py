"""Matching help shared by every rule: reading constants, reduce axes, Casts, the grouping
Reshape and gamma/beta layouts. Pure functions over onnx-ir values; each failure returns a
reason string that the rules pass to ``MatchResult.fail``."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from . import _shapes
from ._shapes import Dim

__all__ = [
    "Grouping",
    "scalar_float",
    "reduce_axes",
    "groupings",
    "grouped_dims",
    "per_channel_param",
    "cast_target",
    "lossy_cast_reason",
    "EXACT_WIDENING",
    "FLOAT_TYPES",
]

FLOAT_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE})
_REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceProd")


def scalar_float(value: ir.Value | None) -> float | None:
    """The value of a constant with exactly one element, as a float; else None."""
    array = _shapes.numpy_of(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(()))


#: Casts between float types that change no value.
EXACT_WIDENING = frozenset(
    {
        (ir.DataType.FLOAT16, ir.DataType.FLOAT),
        (ir.DataType.BFLOAT16, ir.DataType.FLOAT),
        (ir.DataType.FLOAT16, ir.DataType.DOUBLE),
        (ir.DataType.BFLOAT16, ir.DataType.DOUBLE),
        (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    }
)


def lossy_cast_reason(value: ir.Value | None, what: str) -> str | None:
    """A reason to reject the Cast producing ``value`` unless it changes no value."""
    to = cast_target(value)
    if to is None:
        return None
    source = value.producer().inputs[0]
    if source.dtype is None:
        return f"the dtype of {what} before its Cast to {to} is unknown"
    if source.dtype != to and (source.dtype, to) not in EXACT_WIDENING:
        return f"{what} is cast from {source.dtype} to {to}, which rounds it"
    return None


def cast_target(value: ir.Value | None) -> ir.DataType | None:
    """The ``to`` type of the Cast that produced ``value``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Cast":
        return None
    return ir.DataType(node.attributes["to"].as_int())


def reduce_axes(node: ir.Node, rank: int, *, require_keepdims: bool = True) -> tuple[list[int] | None, str | None]:
    """Sorted non-negative axes that a reduction ``node`` reduces, for an input of ``rank``.

    Returns ``(axes, None)`` or ``(None, reason)``. Requires keepdims=1 (the default)
    unless ``require_keepdims`` is False. GlobalAveragePool reduces every axis from 2 on
    and keeps them.
    """
    if node.op_type == "GlobalAveragePool":
        return list(range(2, rank)), None
    if node.op_type not in _REDUCE_OPS:
        return None, f"{node.op_type} is not a reduction"
    keepdims = node.attributes.get("keepdims")
    if require_keepdims and keepdims is not None and keepdims.as_int() != 1:
        return None, f"{node.op_type} {node.name!r} has keepdims=0"
    axes_attr = node.attributes.get("axes")
    if axes_attr is not None:
        axes = list(axes_attr.as_ints())
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = _shapes.numpy_of(node.inputs[1])
        if array is None:
            return None, f"{node.op_type} {node.name!r} has run-time axes"
        axes = [int(a) for a in array.reshape(-1)]
    else:
        axes = []
    if not axes:
        noop = node.attributes.get("noop_with_empty_axes")
        if noop is not None and noop.as_int():
            return None, f"{node.op_type} {node.name!r} reduces nothing (noop_with_empty_axes)"
        axes = list(range(rank))
    if any(not -rank <= a < rank for a in axes):
        return None, f"{node.op_type} {node.name!r} has axes {axes} out of range for rank {rank}"
    return sorted({a % rank for a in axes}), None


@dataclasses.dataclass(frozen=True)
class Grouping:
    """How a Reshape groups its input: channel ``axis`` of ``x`` split into (groups, C/groups)."""

    x: ir.Value  # the normalised tensor (the Reshape input, or what an Unsqueeze(x, [0]) read)
    x_dims: tuple  # symbolic dims of x (``merged``: of the (rows, C) view of x)
    axis: int  # non-negative channel axis of x; the group axis of the grouped tensor
    groups: int
    channels: int
    #: The Reshape also absorbed the one before it: it maps ``x`` of any shape to
    #: (rows, G, C/G), the group split of the (rows, C) view ``Reshape(x, [-1, C])``.
    merged: bool = False

    @property
    def rank(self) -> int:
        return len(self.x_dims)

    @property
    def stat_axes(self) -> list[int]:
        """Axes of the grouped tensor that Keras reduces: all but batch and the group axis."""
        return [i for i in range(1, self.rank + 1) if i != self.axis]

    def param_shape(self) -> list[int]:
        """gamma/beta in grouped layout: 1 everywhere but (G, C/G) at the group axis."""
        shape = [1] * (self.rank + 1)
        shape[self.axis] = self.groups
        shape[self.axis + 1] = self.channels // self.groups
        return shape


def grouped_dims(x_dims, axis: int, groups: int) -> list[Dim]:
    channels = x_dims[axis]
    return [*x_dims[:axis], groups, channels // groups, *x_dims[axis + 1 :]]


def _unsqueezed_source(value: ir.Value) -> ir.Value | None:
    """``x`` when ``value = Unsqueeze(x, [0])`` (tf2onnx's copy-dims trick), else None."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze":
        return None
    axes = node.attributes.get("axes")
    axes = list(axes.as_ints()) if axes is not None else _shapes.int_values(node.inputs[1]) if len(node.inputs) > 1 else None
    return node.inputs[0] if axes == [0] else None


def groupings(reshaped: ir.Value) -> tuple[list[Grouping], str | None]:
    """Every way the Reshape producing ``reshaped`` can be Keras' grouping Reshape.

    The Reshape must map ``x`` (its input, or ``x`` under an ``Unsqueeze(x, [0])``) of rank r
    to rank r+1 with one channel axis split in place into (G, C/G). Several axes can fit
    when dims repeat; the reduce axes decide between them. Returns ``(candidates, reason)``.
    """
    node = reshaped.producer()
    if node is None or node.op_type != "Reshape":
        return [], "the grouped tensor is not produced by a Reshape"
    source, target = node.inputs[0], node.inputs[1]
    allowzero = node.attributes.get("allowzero")
    allowzero = bool(allowzero.as_int()) if allowzero is not None else False
    source_dims = _shapes.dims_of(source)
    x = _unsqueezed_source(source) or source
    x_dims = _shapes.dims_of(x)
    if source_dims is None or x_dims is None:
        return [], f"the rank of the grouping Reshape input {source.name!r} is unknown"
    target_dims = _shapes.int_values(target)
    if target_dims is None:
        return [], f"the grouping Reshape target {target.name!r} cannot be evaluated"
    out = _shapes.reshape_dims(source_dims, target_dims, allowzero)
    if out is not None and len(out) != len(x_dims) + 1 and source is x:
        merged = _merged_grouping(x, out)
        if merged is not None:
            return [merged], None
    if out is None or len(out) != len(x_dims) + 1:
        return [], f"Reshape {node.name!r} does not add exactly one axis (target {target_dims})"
    found = []
    for axis in range(1, len(x_dims)):
        channels = x_dims[axis]
        if not isinstance(channels, int):
            continue
        groups = out[axis]
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            continue
        if _shapes.same_dims(out, grouped_dims(x_dims, axis, groups)):
            found.append(Grouping(x, tuple(x_dims), axis, groups, channels))
    if not found:
        return [], f"Reshape {node.name!r} (target {target_dims}) does not split a static channel axis of {x_dims} into (G, C/G) in place"
    return found, None


def _merged_grouping(x: ir.Value, out: list) -> Grouping | None:
    """A rank-3 ``(rows, G, C/G)`` output with static G and C/G from an input of another
    rank: Keras' rank-2 grouping Reshape with the reshape before it merged in (RWKV-7's
    ``ln_x`` on ``(B*T, C)``, from ``(B, T, H, N)``). Reshapes keep the row-major order, so
    this is the group split of ``Reshape(x, [-1, C])`` whatever x's shape."""
    if len(out) != 3 or not all(isinstance(d, int) and d >= 1 for d in out[1:]):
        return None
    groups, per_group = out[1], out[2]
    rows = out[0] if out[0] is not _shapes.INFER else _shapes.Sym(("rows", id(x)))
    return Grouping(x, (rows, groups * per_group), 1, groups, groups * per_group, merged=True)


def per_channel_param(value: ir.Value, grouping: Grouping, what: str) -> tuple[np.ndarray | ir.Value | None, str | None]:
    """gamma or beta as a per-channel [C] array (constant) or [C] value (computed).

    Accepted: a constant whose shape, padded with leading 1s, is the grouped layout
    ``[1,..,G,C/G,..,1]`` (flattened row-major it is the per-channel vector); or
    ``Reshape(p, target)`` with ``p`` of shape [C] and ``target`` evaluating to that layout;
    either behind a Cast to a float type.
    """
    if cast_target(value) is not None:
        why = lossy_cast_reason(value, what)
        if why:
            return None, why
        value = value.producer().inputs[0]
    expected = grouping.param_shape()
    node = value.producer()
    # A Reshape first, even when folding knows its value: its [C] input is kept as it is.
    if node is not None and node.op_type == "Reshape":
        source = node.inputs[0]
        target = _shapes.int_values(node.inputs[1])
        src_dims = _shapes.dims_of(source)
        if src_dims != [grouping.channels]:
            return None, f"{what} is reshaped from shape {src_dims}, not [{grouping.channels}]"
        if target is None:
            return None, f"{what}'s Reshape target cannot be evaluated"
        if [1] * (len(expected) - len(target)) + list(target) != expected:
            return None, f"{what} is reshaped to {target}, not the grouped layout {expected}"
        why = lossy_cast_reason(source, what)
        if why:
            return None, why
        return source, None
    array = _shapes.numpy_of(value)
    if array is not None:
        shape = [1] * (len(expected) - array.ndim) + list(array.shape)
        if shape != expected:
            return None, f"{what} has shape {list(array.shape)}, not the grouped layout {expected}"
        return array.reshape(-1), None
    return None, f"{what} is neither a constant nor a Reshape of a [C] vector"
