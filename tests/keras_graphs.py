"""Graph builders and assertions for the Keras GroupNormalization rule tests
(test_rule_tf2onnx, test_rule_keras36_fp16, test_rule_tf_keras, test_rule_keras_torch_dynamo).

Every family shares Keras' skeleton (research doc §1)::

    xg = Reshape(x, group_target)          # C split into (G, C/G) in place
    m, v = moments(xg)                     # the family-specific part (a callable here)
    inv = Reciprocal(Sqrt(v + eps)) [* gamma]
    yg = xg * inv + (-m * inv [+ beta])    # or tf_keras: xg * inv + (beta - m * inv)
    y  = Reshape(yg, out_target)

:func:`keras_group_norm` writes those nodes with a :class:`Builder`; its keyword arguments
produce the structural variants (operand orders, dynamic targets, Casts) and the near misses
(wrong layouts, non-scalar epsilon, ...). Imported by the tests as ``keras_graphs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnx_groupnorm import ops
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import fuse

F32, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
I32, I64 = TensorProto.INT32, TensorProto.INT64


class Builder:
    """Collects nodes and initializers; ``op`` returns the output name."""

    def __init__(self, prefix: str = "gn"):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{self.prefix}/{base}_{self._count}"

    def const(self, value, dtype=None, name: str | None = None) -> str:
        array = np.asarray(value, dtype)
        name = name or self.fresh("const")
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def i64(self, values) -> str:
        return self.const(np.asarray(values, np.int64))

    def i32(self, values) -> str:
        return self.const(np.asarray(values, np.int32))

    def op(self, op_type: str, *inputs, name: str | None = None, **attrs) -> str:
        names = [self.const(i) if isinstance(i, np.ndarray) else i for i in inputs]
        out = name or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, names, [out], name=out, **attrs))
        return out

    def model(self, inputs, outputs, *, opset: int = 17) -> onnx.ModelProto:
        """``inputs``/``outputs``: ``(name, elem_type, shape or None)``."""
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@dataclasses.dataclass
class Ctx:
    """What a moments callable may need."""

    x: str
    xg: str
    x_shape: tuple
    groups: int
    axis: int  # non-negative channel axis of x
    axes: list[int]  # statistics axes of the grouped tensor
    dtype: np.dtype


@dataclasses.dataclass
class GN:
    """The parameters a built layer really has (for the reference)."""

    y: str
    groups: int
    axis: int  # as Keras writes it (-1 for channels-last)
    epsilon: float  # the value in the graph (rounded to its dtype)
    gamma: np.ndarray | None  # [C]
    beta: np.ndarray | None  # [C]


def random_input(rng, shape, *, dtype=np.float32, sizes=None) -> np.ndarray:
    """N(0.5, 2) data for ``shape``; symbolic dims take ``sizes[name]`` (default 2)."""
    sizes = sizes or {}
    concrete = [d if isinstance(d, int) else sizes.get(d, 2) for d in shape]
    return rng.normal(0.5, 2.0, concrete).astype(dtype)


def grouped_layout(x_shape, axis: int, groups: int) -> list[int]:
    shape = [1] * (len(x_shape) + 1)
    shape[axis] = groups
    shape[axis + 1] = x_shape[axis] // groups
    return shape


def group_target(x_shape, axis: int, groups: int) -> list[int]:
    c = x_shape[axis]
    return [-1, *x_shape[1:axis], groups, c // groups, *x_shape[axis + 1 :]]


def keras_group_norm(
    b: Builder,
    x: str,
    x_shape: Sequence,
    groups: int,
    moments: Callable[[Builder, str, Ctx], tuple[str, str]],
    *,
    axis: int = -1,
    epsilon: float = 1e-3,
    scale: bool = True,
    center: bool = True,
    dtype=np.float32,
    seed: int = 0,
    stats_input: Callable[[Builder, str], str] | None = None,  # default: xg itself
    affine_on_xg: bool = False,  # multiply xg (not the statistics input) by inv
    group_source: str | None = None,  # the tensor the grouping Reshape reads (default x)
    grouping: str | Sequence[int] | None = None,  # target name or constant
    out_target: str | Sequence[int] | None = None,  # target name or constant (default [-1, *dims])
    allowzero: int | None = None,
    rsqrt: str = "reciprocal",  # "reciprocal" | "div"
    swap: bool = False,  # the other operand order of every Mul/Add of the affine part
    swap_eps: bool = False,  # Add(eps, var) instead of Add(var, eps)
    tf_keras: bool = False,  # shift = beta - m * inv (tf.nn.batch_normalization)
    out_cast: int | None = None,  # Cast(to=...) before the final Reshape
    gamma_array: np.ndarray | None = None,  # the gamma constant as written (default grouped layout)
    beta_array: np.ndarray | None = None,
    param_reshape: str | Sequence[int] | None = None,  # gamma/beta as Reshape([C], this target)
    param_dtype=None,
    eps_array: np.ndarray | None = None,  # epsilon constant as written (default a scalar)
    axes: Sequence[int] | None = None,  # override the statistics axes
) -> GN:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    param_dtype = np.dtype(param_dtype or dtype)
    rank = len(x_shape)
    ax = axis % rank
    channels = x_shape[ax]
    layout = grouped_layout(x_shape, ax, groups)
    gamma = rng.normal(1, 0.5, channels).astype(param_dtype) if scale else None
    beta = rng.normal(0, 0.5, channels).astype(param_dtype) if center else None

    def mul(a, c):
        return b.op("Mul", c, a) if swap else b.op("Mul", a, c)

    def add(a, c):
        return b.op("Add", c, a) if swap else b.op("Add", a, c)

    def param(array, written):
        if written is not None:
            return b.const(written)
        if param_reshape is None:
            return b.const(array.reshape(layout))
        target = param_reshape if isinstance(param_reshape, str) else b.i64(param_reshape)
        return b.op("Reshape", b.const(array), target)

    target = grouping if isinstance(grouping, str) else b.i64(grouping if grouping is not None else group_target(x_shape, ax, groups))
    reshape_attrs = {} if allowzero is None else {"allowzero": allowzero}
    xg = b.op("Reshape", group_source or x, target, name=b.fresh("group_reshape"), **reshape_attrs)
    xs = stats_input(b, xg) if stats_input else xg
    stat_axes = list(axes) if axes is not None else [i for i in range(1, rank + 1) if i != ax]
    mean, var = moments(b, xs, Ctx(x, xg, tuple(x_shape), groups, ax, stat_axes, dtype))
    eps_const = eps_array if eps_array is not None else np.asarray(epsilon, param_dtype)
    eps_value = float(np.asarray(eps_const).reshape(-1)[0])
    eps_name = b.const(eps_const)
    std = b.op("Sqrt", b.op("Add", eps_name, var) if swap_eps else b.op("Add", var, eps_name))
    inv = b.op("Reciprocal", std) if rsqrt == "reciprocal" else b.op("Div", np.asarray(1.0, np.asarray(eps_const).dtype), std)
    if scale:
        inv = mul(inv, param(gamma, gamma_array))
    scaled = mul(xg if affine_on_xg else xs, inv)
    if tf_keras and center:
        shift = b.op("Sub", param(beta, beta_array), mul(mean, inv))
    else:
        shift = mul(b.op("Neg", mean), inv)
        if center:
            shift = add(shift, param(beta, beta_array))
    yg = add(scaled, shift)
    if out_cast is not None:
        yg = b.op("Cast", yg, to=out_cast)
    if not isinstance(out_target, str):
        out_target = b.i64(out_target if out_target is not None else [-1, *x_shape[1:]])
    y = b.op("Reshape", yg, out_target, name=b.fresh("out_reshape"), **reshape_attrs)
    keras_axis = -1 if ax == rank - 1 else ax
    return GN(y, groups, keras_axis, eps_value, gamma, beta)


# -- shape computations as tf2onnx writes them ----------------------------------------------


def tf_dynamic_out_target(b: Builder, source: str, perm: Sequence[int] | None, dims: Sequence) -> str:
    """``Cast(Concat(Slice(Cast(Gather(Shape(source), perm), INT32)) per dim, INT64)``: every
    dim that is an int is written as a constant, every other one sliced from the shape."""
    shape = b.op("Shape", source)
    if perm is not None:
        shape = b.op("Gather", shape, b.i64(perm))
    s32 = b.op("Cast", shape, to=I32)
    parts = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            parts.append(b.i32([d]))
        else:
            parts.append(b.op("Slice", s32, b.i64([i]), b.i64([i + 1]), b.i64([0])))
    return b.op("Cast", b.op("Concat", *parts, axis=0), to=I64)


# -- assertions -------------------------------------------------------------------------------


def ours(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def reasons(report) -> list[str]:
    return [s.reason for s in report.skipped]


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def reference(x: np.ndarray, gn: GN) -> np.ndarray:
    """The NumPy reference in float64, cast to ``x``'s dtype."""
    f64 = lambda p: None if p is None else np.asarray(p, np.float64)  # noqa: E731
    y = ops.group_normalization(np.asarray(x, np.float64), f64(gn.gamma), f64(gn.beta), groups=gn.groups, axis=gn.axis, epsilon=gn.epsilon)
    return y.astype(x.dtype)


def assert_fused(model: onnx.ModelProto, gn: GN, x_in, x_gn=None, *, rule: str | None = None):
    """Exactly one node of our op with the right attributes, and onnxruntime's output of the
    fused model agrees with the reference. ``x_in`` feeds the model; ``x_gn`` is what reaches
    the layer (default ``x_in``). Returns ``(fused, report)``."""
    fused, report = fuse(model, target="function")
    nodes = ours(fused)
    assert len(nodes) == 1, (report.summary(), [n.op_type for n in fused.graph.node])
    attrs = attrs_of(nodes[0])
    assert attrs["groups"] == gn.groups
    assert attrs["axis"] == gn.axis
    assert attrs["epsilon"] == np.float32(gn.epsilon)
    (layer,) = report.fused
    assert layer.scale == (gn.gamma is not None) and layer.center == (gn.beta is not None)
    if rule is not None:
        assert layer.rule == rule
    # nothing of the pattern is left but what feeds our op
    assert not any(n.op_type in ("ReduceMean", "ReduceSum", "GlobalAveragePool", "Sqrt") for n in fused.graph.node)
    x_gn = x_in if x_gn is None else x_gn
    (actual,) = run_ort(fused, x_in)
    expected = reference(x_gn, gn)
    ok, worst = tolerance_for(actual.dtype).check(actual, expected)
    assert ok, f"worst error ratio {worst}"
    return fused, report


def assert_skipped(model: onnx.ModelProto, reason: str):
    """Nothing fused, and some candidate was rejected for ``reason`` (a substring)."""
    fused, report = fuse(model, target="function")
    assert ours(fused) == [], report.summary()
    assert any(reason in r for r in reasons(report)), reasons(report)
    return report
