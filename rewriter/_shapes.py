"""Symbolic reasoning about shapes and shape computations, for the rules' checks.

Exporters compute reshape targets at run time from ``Shape`` of some tensor, often not the
tensor being reshaped (tf2onnx reads the Conv output *before* its layout Transpose; the
TorchScript exporter reads a no-op ``Cast`` copy). To prove a target equals what we need
we evaluate it symbolically:

* :func:`dims_of` gives a tensor's dimensions, each an ``int`` or a :class:`Sym` — a symbol
  for "dimension ``axis`` of value ``root``", where ``root`` is found by walking back through
  ops that provably keep (or permute) the shape: Cast, Identity, unary elementwise ops,
  elementwise binary ops whose other operand broadcasts without growing the shape,
  Transpose and Unsqueeze. A dimension known statically (shape inference) or named by a
  ``dim_param`` is used as such, so two tensors fed from the same graph input agree.
* :func:`int_values` evaluates a 1-D int64/int32 shape computation (constants, Shape,
  Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, Reshape, Div/Mul/Add/Sub) into a list of
  such dims, or None when any part is unknown.
* :func:`reshape_dims` applies Reshape's rules (0 = copy unless ``allowzero``, one -1).

These functions are pure: they read the graph, never change it. The one exception is
:func:`adopt_folded_facts`, which the pipeline runs once before matching: it constant-folds a
*copy* of the model (onnxscript's folder, then onnx shape inference) and records on the
original values only what that proves — static dims where the original's shape inference left
a dim unknown, and small folded constants in ``Value.meta`` (never serialised). The user's
graph keeps every node; the pipeline restores inferred shapes before saving.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding

__all__ = [
    "Sym", "Dim", "dims_of", "int_values", "reshape_dims", "same_dims", "INFER", "numpy_of", "constant_array",
    "adopt_folded_facts", "FOLDED_META_KEY",
]

logger = logging.getLogger(__name__)

#: ``Value.meta`` key under which :func:`adopt_folded_facts` records a folded constant.
FOLDED_META_KEY = "onnx_groupnorm.folded_constant"
#: Largest folded constant (elements) recorded: shape vectors and per-channel parameters,
#: not weights; it bounds the memory the facts hold on to.
_FOLDED_MAX_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Sym:
    """An unknown dimension: ``key`` names it (a dim_param, or a value and an axis)."""

    key: tuple

    def __repr__(self) -> str:
        return f"?{self.key[-2] if len(self.key) > 2 else self.key[-1]}"


@dataclasses.dataclass(frozen=True)
class _Expr:
    """An arithmetic expression over dims that we cannot simplify (kept for equality)."""

    op: str
    args: tuple


Dim = int | Sym | _Expr
INFER = Sym(("infer",))  # the -1 of a Reshape target

_UNARY_SAME_SHAPE = frozenset(
    {"Cast", "Identity", "Neg", "Sigmoid", "Relu", "Tanh", "Abs", "Exp", "Sqrt", "Reciprocal", "Erf", "Softplus", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "CastLike"}
)
_BINARY_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
_MAX_DEPTH = 64


def _static_dims(value: ir.Value) -> list[Dim] | None:
    shape = value.shape
    if shape is None:
        return None
    dims: list[Dim] = []
    for axis, d in enumerate(shape):
        if isinstance(d, int):
            dims.append(d)
        elif d.value is not None and isinstance(d.value, str):
            dims.append(Sym(("param", d.value)))
        else:
            dims.append(Sym(("value", id(value), value.name, axis)))
    return dims


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _merge(a: list[Dim] | None, b: list[Dim] | None) -> list[Dim] | None:
    """Combine two descriptions of the same dims, preferring ints, then named params."""
    if a is None:
        return b
    if b is None or len(a) != len(b):
        return a
    out = []
    for x, y in zip(a, b):
        if isinstance(x, int):
            out.append(x)
        elif isinstance(y, int):
            out.append(y)
        elif isinstance(x, Sym) and x.key[0] == "param":
            out.append(x)
        else:
            out.append(y if isinstance(y, Sym) and y.key[0] == "param" else x)
    return out


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return None
    return list(attr.as_ints())


def _traced_dims(value: ir.Value, depth: int) -> list[Dim] | None:
    node = value.producer()
    if node is None or depth > _MAX_DEPTH or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    inputs = node.inputs
    if op in _UNARY_SAME_SHAPE and inputs and inputs[0] is not None:
        return dims_of(inputs[0], depth + 1)
    if op in _BINARY_ELEMENTWISE and len(inputs) == 2 and None not in inputs:
        # The output has the shape of the operand that the other broadcasts into.
        a, b = inputs
        ra, rb = _rank(a), _rank(b)
        for main, other, rother in ((a, b, rb), (b, a, ra)):
            main_dims = dims_of(main, depth + 1)
            other_shape = other.shape
            if main_dims is None or other_shape is None or rother is None or rother > len(main_dims):
                continue
            tail = main_dims[len(main_dims) - rother :]
            if all(isinstance(o, int) and (o == 1 or o == t) for o, t in zip(other_shape, tail)):
                return main_dims
        return None
    if op == "Transpose" and inputs and inputs[0] is not None:
        src = dims_of(inputs[0], depth + 1)
        perm = _attr_ints(node, "perm")
        if src is None:
            return None
        perm = perm if perm is not None else list(reversed(range(len(src))))
        if sorted(perm) != list(range(len(src))):
            return None
        return [src[p] for p in perm]
    if op == "Unsqueeze" and inputs and inputs[0] is not None:
        src = dims_of(inputs[0], depth + 1)
        axes = _attr_ints(node, "axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = _const_ints(inputs[1])
        if src is None or axes is None:
            return None
        rank = len(src) + len(axes)
        axes = sorted(a % rank for a in axes)
        out: list[Dim] = list(src)
        for a in axes:
            out.insert(a, 1)
        return out
    return None


def dims_of(value: ir.Value | None, depth: int = 0) -> list[Dim] | None:
    """The dimensions of ``value``, symbolic where unknown; None if its rank is unknown."""
    if value is None:
        return None
    return _merge(_traced_dims(value, depth), _static_dims(value))


def _const_ints(value: ir.Value | None) -> list[int] | None:
    array = numpy_of(value)
    if array is None:
        return None
    if array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def _arith(op: str, a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        if op == "Div":
            if b == 0:
                raise ZeroDivisionError
            return a // b
        return {"Mul": a * b, "Add": a + b, "Sub": a - b}[op]
    if op == "Mul" and (a == 1 or b == 1):
        return b if a == 1 else a
    if op == "Div" and b == 1:
        return a
    return _Expr(op, (a, b))


def int_values(value: ir.Value | None, depth: int = 0) -> list[Dim] | None:
    """Evaluate a (scalar or 1-D) integer shape computation symbolically."""
    if value is None or depth > _MAX_DEPTH:
        return None
    const = _const_ints(value)
    if const is not None:
        return list(const)
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op, inputs = node.op_type, node.inputs
    try:
        if op == "Shape":
            dims = dims_of(inputs[0])
            if dims is None:
                return None
            start = node.attributes.get("start")
            end = node.attributes.get("end")
            s = start.as_int() if start is not None else 0
            e = end.as_int() if end is not None else len(dims)
            return dims[slice(s, e)]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            # On a scalar or a 1-D shape vector these only change the rank, not the values.
            return int_values(inputs[0], depth + 1)
        if op == "Gather":
            data = int_values(inputs[0], depth + 1)
            idx = _const_ints(inputs[1])
            axis = node.attributes.get("axis")
            if data is None or idx is None or (axis is not None and axis.as_int() != 0):
                return None
            return [data[i] for i in idx]
        if op == "Slice":
            data = int_values(inputs[0], depth + 1)
            starts, ends = _const_ints(inputs[1]), _const_ints(inputs[2])
            axes = _const_ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else [0]
            steps = _const_ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
            if data is None or starts is None or ends is None or axes != [0] or steps is None:
                return None
            n = len(data)
            s, e, st = starts[0], ends[0], steps[0]
            s, e = max(min(s, n), -n), max(min(e, n), -n - 1) if st < 0 else min(e, n)
            return data[slice(s, e, st)]
        if op == "Concat":
            out: list[Dim] = []
            for v in inputs:
                part = int_values(v, depth + 1)
                if part is None:
                    return None
                out.extend(part)
            return out
        if op in ("Div", "Mul", "Add", "Sub"):
            a, b = int_values(inputs[0], depth + 1), int_values(inputs[1], depth + 1)
            if a is None or b is None:
                return None
            if len(a) == 1 and len(b) > 1:
                a = a * len(b)
            if len(b) == 1 and len(a) > 1:
                b = b * len(a)
            if len(a) != len(b):
                return None
            return [_arith(op, x, y) for x, y in zip(a, b)]
    except (ZeroDivisionError, IndexError, KeyError):
        return None
    return None


def reshape_dims(input_dims: Sequence[Dim], target: Sequence[Dim], allowzero: bool) -> list[Dim] | None:
    """Output dims of ``Reshape(input, target)``; a -1 becomes :data:`INFER`. None if invalid."""
    out: list[Dim] = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero:
            if i >= len(input_dims):
                return None
            out.append(input_dims[i])
        elif t == -1:
            out.append(INFER)
        else:
            out.append(t)
    if out.count(INFER) > 1:
        return None
    return out


def same_dims(actual: Sequence[Dim], expected: Sequence[Dim]) -> bool:
    """Whether a reshape result equals ``expected``, given that element counts agree.

    One :data:`INFER` entry is allowed: when every other entry equals its expected dim and
    the element counts agree, the inferred one equals its expected dim too.
    """
    if len(actual) != len(expected):
        return False
    return all(a == e or a is INFER for a, e in zip(actual, expected))


def numpy_of(value: ir.Value | None) -> np.ndarray | None:
    """A constant's value as a NumPy array, or None: an initializer or Constant, or a value
    that :func:`adopt_folded_facts` proved constant (an Identity of an initializer, shape
    arithmetic on static shapes, ...).

    An initializer that is also a graph input is not constant: a caller may override it.
    """
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    return value.meta.get(FOLDED_META_KEY)


def _fold_everything_small(node: ir.Node) -> bool | None:
    # onnxscript keeps ConstantOfShape unfolded (to keep models small); on our private copy
    # we want its value: torch's Pad/MaxPool padding is built from one.
    return True if node.op_type == "ConstantOfShape" else None


def adopt_folded_facts(model: ir.Model) -> None:
    """Record on ``model``'s main-graph values what constant folding of a copy proves.

    Exporters hide constants behind ops that shape inference does not evaluate (TorchScript
    shares repeated constants as ``Identity`` of one initializer and builds Pad pads through
    ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast), which leaves even channel dims
    unknown downstream. Folding a copy (tensors are shared, not copied) and running shape
    inference on it gives those dims; they are facts of the original too, because the copy
    computes the same values for every input. Only integer dims are adopted (the copy's
    symbolic names are fresh and must not be compared with the original's), and only where
    the original's dim is unknown; constants are recorded in ``Value.meta``.
    """
    copy = model.clone()
    # The folder warns about what it leaves unfolded; on our private copy that is not news.
    folder_logger = logging.getLogger(_constant_folding.__name__)
    level = folder_logger.level
    folder_logger.setLevel(logging.ERROR)
    try:
        _constant_folding.fold_constants(copy, onnx_shape_inference=True, should_fold=_fold_everything_small)
        common_passes.ShapeInferencePass()(copy)
    except Exception as e:  # a model the folder cannot handle is matched on its own facts
        logger.info("constant folding of a copy failed; matching without its facts: %s", e)
        return
    finally:
        folder_logger.setLevel(level)
    folded: dict[str, ir.Value] = {v.name: v for v in copy.graph.initializers.values() if v.name}
    for node in copy.graph:
        for out in node.outputs:
            if out.name:
                folded.setdefault(out.name, out)
    for node in model.graph:
        for value in node.outputs:
            twin = folded.get(value.name) if value.name else None
            if twin is None:
                continue
            _adopt_dims(value, twin)
            tensor = twin.const_value
            if value.const_value is None and tensor is not None and tensor.size <= _FOLDED_MAX_ELEMENTS:
                value.meta[FOLDED_META_KEY] = tensor.numpy()


def _adopt_dims(value: ir.Value, twin: ir.Value) -> None:
    if twin.shape is None:
        return
    if value.shape is None:
        value.shape = ir.Shape([d if isinstance(d, int) else None for d in twin.shape])
        return
    if len(value.shape) != len(twin.shape):
        return
    dims = [d if isinstance(d, int) or not isinstance(t, int) else t for d, t in zip(value.shape, twin.shape)]
    if dims != list(value.shape):
        value.shape = ir.Shape(dims)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """A value known before run time: a constant (see :func:`numpy_of`) or a
    ``ConstantOfShape`` of a constant shape; else None."""
    array = numpy_of(value)
    if array is not None or value is None:
        return array
    node = value.producer()
    if node is None or node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = numpy_of(node.inputs[0])
    if shape is None:
        return None
    fill = node.attributes.get("value")
    fill = fill.as_tensor().numpy().reshape(-1) if fill is not None else np.zeros(1, np.float32)
    return np.full([int(d) for d in shape.reshape(-1)], fill[0], dtype=fill.dtype)
