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
* :func:`same_dims` compares dims structurally, and else as integer expressions in sympy
  (already a dependency of onnx-ir, which parses ``dim_param`` expressions such as ``2*hh``
  with it): ``(1 + 2*hh)//2`` from a Reshape target equals ``(2*hh - 2)//2 + 1``, the height
  of a stride-2 Conv's output, for every integer ``hh``.

Dims are also traced *forward* through Conv, the pools, Pad, Resize, Concat and Reshape, so
that a tensor deep in the network has dims written in the model inputs' symbols rather than
the fresh names (``s85``) an exporter gives intermediate dims; :func:`adopt_folded_facts`
does that once for the main graph, in graph order, and records the result in ``Value.meta``.

These functions are pure: they read the graph, never change it. The one exception is
:func:`adopt_folded_facts`, which the pipeline runs once before matching: it constant-folds a
*copy* of the model (onnxscript's folder, then onnx shape inference) and records on the
original values only what that proves — static dims where the original's shape inference left
a dim unknown, and small folded constants in ``Value.meta`` (never serialised). The user's
graph keeps every node; the pipeline restores inferred shapes before saving.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import sympy
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding

__all__ = [
    "Sym", "Dim", "dims_of", "int_values", "reshape_dims", "same_dims", "INFER", "numpy_of", "constant_array",
    "adopt_folded_facts", "equal_dims", "FOLDED_META_KEY", "DIMS_META_KEY", "evaluate",
]

logger = logging.getLogger(__name__)

#: ``Value.meta`` key under which :func:`adopt_folded_facts` records a folded constant.
FOLDED_META_KEY = "onnx_groupnorm.folded_constant"
#: ``Value.meta`` key under which :func:`adopt_folded_facts` records the traced dims.
DIMS_META_KEY = "onnx_groupnorm.dims"
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


def _preference(d: Dim) -> int:
    """Which of two descriptions of one dim says most: an int, then an expression in other
    dims (traced from the model's inputs), then a named param, then an opaque symbol."""
    if isinstance(d, int):
        return 0
    if isinstance(d, _Expr):
        return 1
    return 2 if d.key[0] == "param" else 3


def _merge(a: list[Dim] | None, b: list[Dim] | None) -> list[Dim] | None:
    """Combine two descriptions (traced ``a``, static ``b``) of the same dims."""
    if a is None:
        return b
    if b is None or len(a) != len(b):
        return a
    return [x if _preference(x) <= _preference(y) else y for x, y in zip(a, b)]


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
    if value is not node.outputs[0] or not inputs or inputs[0] is None:
        return None
    tracer = _SHAPE_ARITHMETIC.get(op)
    if tracer is None:
        return None
    src = dims_of(inputs[0], depth + 1)
    if src is None:
        return None
    try:
        out = tracer(node, src, depth)
    except (ZeroDivisionError, IndexError, ValueError):
        return None
    if out is None or op != "Reshape":
        return out
    # A Reshape's target names dims after whatever tensor it read them from: keep what the
    # arithmetic adds (ints, expressions) and let a bare symbol defer to the static shape,
    # whose names shape inference keeps consistent with the tensors around it.
    return [d if isinstance(d, (int, _Expr)) else Sym(("value", id(value), value.name, axis)) for axis, d in enumerate(out)]


# -- dims through ops that compute them (ONNX's own output-shape formulas) -------------------
# Every formula below is the op's definition for the inputs it accepts; where ONNX's integer
# Div truncates and we write floor division, the numerator is a size that is non-negative for
# every input the op accepts (a Conv with a kernel larger than its padded input fails).


def _window(node: ir.Node, src: list[Dim], kernel: list | None) -> list[Dim] | None:
    """Spatial output dims of Conv / MaxPool / AveragePool over ``src`` (N, C, spatial...)."""
    n = len(src) - 2
    kernel = _attr_ints(node, "kernel_shape") or kernel
    if n < 1 or kernel is None or len(kernel) != n or not all(isinstance(k, int) for k in kernel):
        return None
    strides = _attr_ints(node, "strides") or [1] * n
    dilations = _attr_ints(node, "dilations") or [1] * n
    pads = _attr_ints(node, "pads") or [0] * (2 * n)
    auto_pad = node.attributes.get("auto_pad")
    auto_pad = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    ceil_mode = node.attributes.get("ceil_mode")
    if ceil_mode is not None and ceil_mode.as_int():
        return None  # ceil_mode's extra rule (the last window starts inside) is not modelled
    out = []
    for i in range(n):
        size, stride = src[2 + i], strides[i]
        extent = dilations[i] * (kernel[i] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(_arith("Div", _arith("Add", size, stride - 1), stride))  # ceil(size / stride)
        elif auto_pad in ("NOTSET", "VALID"):
            padding = pads[i] + pads[i + n] if auto_pad == "NOTSET" else 0
            out.append(_arith("Add", _arith("Div", _arith("Add", size, padding - extent), stride), 1))
        else:
            return None
    return out


def _conv(node: ir.Node, src: list[Dim], depth: int) -> list[Dim] | None:
    weight = dims_of(node.inputs[1], depth + 1) if len(node.inputs) > 1 else None
    if weight is None or len(weight) != len(src):
        return None
    spatial = _window(node, src, weight[2:])
    return None if spatial is None else [src[0], weight[0], *spatial]


def _pool(node: ir.Node, src: list[Dim], depth: int) -> list[Dim] | None:
    spatial = _window(node, src, None)
    return None if spatial is None else [src[0], src[1], *spatial]


def _pad(node: ir.Node, src: list[Dim], depth: int) -> list[Dim] | None:
    pads = int_values(node.inputs[1]) if len(node.inputs) > 1 else _attr_ints(node, "pads")
    axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(src)))
    if pads is None or axes is None or len(pads) != 2 * len(axes):
        return None
    out = list(src)
    for i, axis in enumerate(a % len(src) for a in axes):
        out[axis] = _arith("Add", _arith("Add", out[axis], pads[i]), pads[i + len(axes)])
    return out


def _resize(node: ir.Node, src: list[Dim], depth: int) -> list[Dim] | None:
    if node.attributes.get("axes") is not None:
        return None
    policy = node.attributes.get("keep_aspect_ratio_policy")
    mode = node.attributes.get("coordinate_transformation_mode")
    if policy is not None and policy.as_string() != "stretch" or mode is not None and mode.as_string() == "tf_crop_and_resize":
        return None  # the output size is then not ``sizes`` / ``floor(size * scale)``: not modelled
    inputs = list(node.inputs) + [None] * 4
    sizes = int_values(inputs[3]) if inputs[3] is not None else None
    if sizes:
        return sizes if len(sizes) == len(src) else None
    scales = numpy_of(inputs[2]) if inputs[2] is not None else None
    if scales is None or scales.size != len(src):
        return None
    out = []
    for size, scale in zip(src, scales.reshape(-1).tolist()):
        if scale != int(scale):  # floor(size * scale) with a fraction: not modelled
            return None
        out.append(_arith("Mul", size, int(scale)))
    return out


def _concat(node: ir.Node, src: list[Dim], depth: int) -> list[Dim] | None:
    parts = [dims_of(v, depth + 1) for v in node.inputs]
    axis_attr = node.attributes.get("axis")
    if axis_attr is None or any(p is None or len(p) != len(src) for p in parts):
        return None
    axis = axis_attr.as_int() % len(src)
    out = list(src)
    for other in parts[1:]:
        out[axis] = _arith("Add", out[axis], other[axis])
        # the other axes agree in a valid Concat: keep the most informative description
        out = [x if i == axis or _preference(x) <= _preference(y) else y for i, (x, y) in enumerate(zip(out, other))]
    return out


def _reshape(node: ir.Node, src: list[Dim], depth: int) -> list[Dim] | None:
    target = int_values(node.inputs[1]) if len(node.inputs) > 1 else None
    allowzero = node.attributes.get("allowzero")
    out = reshape_dims(src, target, bool(allowzero.as_int()) if allowzero else False) if target is not None else None
    if out is None:
        return None
    return out  # the inferred axis (INFER) is a bare symbol: the static shape replaces it


_SHAPE_ARITHMETIC = {
    "Conv": _conv,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "LpPool": _pool,
    "Pad": _pad,
    "Resize": _resize,
    "Concat": _concat,
    "Reshape": _reshape,
}


def dims_of(value: ir.Value | None, depth: int = 0) -> list[Dim] | None:
    """The dimensions of ``value``, symbolic where unknown; None if its rank is unknown."""
    if value is None:
        return None
    known = value.meta.get(DIMS_META_KEY)
    if known is not None:
        return list(known)
    return _merge(_traced_dims(value, depth), _static_dims(value))


def _const_ints(value: ir.Value | None) -> list[int] | None:
    array = numpy_of(value)
    if array is None:
        return None
    if array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def _arith(op: str, a: Dim, b: Dim) -> Dim:
    """``a op b`` on dims (Div is floor division: shape values are non-negative), reduced to
    an int or to one of its operands' dims when it equals one (``(h - 1) + 1`` is ``h``)."""
    if isinstance(a, int) and isinstance(b, int):
        if op == "Div":
            if b == 0:
                raise ZeroDivisionError
            return a // b
        return {"Mul": a * b, "Add": a + b, "Sub": a - b}[op]
    if b == 0 and op in ("Add", "Sub") or b == 1 and op in ("Mul", "Div"):
        return a
    if a == 0 and op == "Add" or a == 1 and op == "Mul":
        return b
    if op == "Div" and b == 0:
        raise ZeroDivisionError
    expr = _Expr(op, (a, b))
    exact = _sympy(expr)
    if exact is not None:
        if exact.is_Integer:
            return int(exact)
        for atom in _atoms(expr):
            if _sympy(atom) == exact:
                return atom
    return expr


def _atoms(d: Dim):
    if isinstance(d, _Expr):
        for arg in d.args:
            yield from _atoms(arg)
    elif isinstance(d, Sym):
        yield d


@functools.lru_cache(maxsize=4096)
def _sympy(d: Dim) -> sympy.Expr | None:
    """``d`` as a sympy integer expression; a function of the dim's structure alone (hence
    cached): a named param is parsed (``2*hh``), any other symbol is a non-negative integer
    unknown of its own."""
    if isinstance(d, bool):
        return None
    if isinstance(d, int):
        return sympy.Integer(d)
    if isinstance(d, Sym):
        if d is INFER or d.key == INFER.key:
            return None
        if d.key[0] == "param":
            try:
                # onnx-ir's own (safe, eval-free) parser of dim_param expressions
                parsed = ir.SymbolicDim(d.key[1])._expr
            except Exception:  # an unparsable name is an opaque unknown
                parsed = None
            if parsed is not None:
                return parsed
        return sympy.Symbol(f"_d{abs(hash(d.key))}", integer=True, nonnegative=True)
    args = [_sympy(a) for a in d.args]
    if any(a is None for a in args):
        return None
    a, b = args
    if d.op == "Div":
        return None if b == 0 else sympy.floor(a / b)
    return {"Mul": a * b, "Add": a + b, "Sub": a - b}[d.op]


def evaluate(d: Dim, sizes: dict[str, int]) -> int | None:
    """``d`` as an integer, its named params (dim_params) taken from ``sizes``; None if unknown."""
    if isinstance(d, int) and not isinstance(d, bool):
        return d
    expr = _sympy(d)
    if expr is None:
        return None
    expr = expr.subs({s: sizes[s.name] for s in expr.free_symbols if s.name in sizes})
    return int(expr) if expr.is_Integer else None


@functools.lru_cache(maxsize=4096)
def equal_dims(a: Dim, b: Dim) -> bool:
    """Whether two dims are equal for every input: structurally, or as sympy expressions.

    Named params may carry the exporter's constraints (``2*hh``: even heights only); an
    equality that holds only under them holds on every input the model accepts, and a fused
    op that differs from the original only on inputs the original rejects is equivalent.
    """
    if a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    sa, sb = _sympy(a), _sympy(b)
    if sa is None or sb is None:
        return False
    try:
        return sympy.simplify(sa - sb) == 0
    except Exception:  # sympy could not decide: not proven
        return False


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
    return all(a is INFER or equal_dims(a, e) for a, e in zip(actual, expected))


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


def adopt_folded_facts(model: ir.Model, infer_shapes=None) -> None:
    """Record on ``model``'s main-graph values what constant folding of a copy proves.

    Exporters hide constants behind ops that shape inference does not evaluate (TorchScript
    shares repeated constants as ``Identity`` of one initializer and builds Pad pads through
    ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast), which leaves even channel dims
    unknown downstream. Folding a copy (tensors are shared, not copied) and running shape
    inference on it gives those dims; they are facts of the original too, because the copy
    computes the same values for every input. Only integer dims are adopted (the copy's
    symbolic names are fresh and must not be compared with the original's), and only where
    the original's dim is unknown; constants are recorded in ``Value.meta``. Then every
    value's dims are traced forward from the inputs (see :func:`_propagate_dims`).
    ``infer_shapes`` runs shape inference on the copy (default: onnx-ir's
    ShapeInferencePass; the pipeline passes its memory-bounded one).
    """
    _adopt_folded(model, infer_shapes)
    _propagate_dims(model.graph)


def _adopt_folded(model: ir.Model, infer_shapes=None) -> None:
    # The folder warns about what it leaves unfolded; on our private copy that is not news.
    folder_logger = logging.getLogger(_constant_folding.__name__)
    level = folder_logger.level
    folder_logger.setLevel(logging.ERROR)
    try:
        copy = model.clone()  # a malformed model may not even clone: then no facts from it
        _constant_folding.fold_constants(copy, onnx_shape_inference=True, should_fold=_fold_everything_small)
        (infer_shapes or common_passes.ShapeInferencePass())(copy)
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


def _propagate_dims(graph: ir.Graph) -> None:
    """Trace every value's dims forward, in graph order, and record them in ``Value.meta``:
    each node's inputs are then already known, so the trace is one step per node however
    deep the network (the on-demand trace in :func:`dims_of` stops at a depth limit).

    Where a value's static shape names a dim (``s85`` from the exporter, ``unk__3`` from
    shape inference) that the trace expresses otherwise, both describe the same run-time
    size, and the name means that size wherever it appears (that is what naming a dim says):
    later static shapes have the name replaced by the traced expression, so tensors read
    through either description compare equal. Names declared on graph inputs are the
    symbols expressions are written in and are never replaced.
    """
    declared = {d for v in graph.inputs for d in (_static_dims(v) or []) if isinstance(d, Sym)}
    aliases: dict[Sym, Dim] = {}
    for node in graph:
        for value in node.outputs:
            value.meta.pop(DIMS_META_KEY, None)
            traced, static = _traced_dims(value, 0), _static_dims(value)
            if static is not None and traced is not None and len(static) == len(traced):
                for t, named in zip(traced, static):
                    if isinstance(named, Sym) and named.key[0] == "param" and named not in declared and named != t and _preference(t) < 3:
                        aliases.setdefault(named, t)
            if static is not None:
                static = [aliases.get(d, d) if isinstance(d, Sym) else d for d in static]
            dims = _merge(traced, static)
            if dims is not None:
                value.meta[DIMS_META_KEY] = tuple(dims)


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
