"""Keras + JAX through jax2onnx: jnp.var's own mean, keepdims=0 sums broadcast back with
Reshape + Expand, the Where(N > 0) guard (rules.jax2onnx). Graphs are built here with
onnx.helper, node for node as jax2onnx 0.17 writes them (research doc §4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import fuse

from onnx_groupnorm import ops

ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class _Graph:
    """A tiny node/initializer collector with unique names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, stem):
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, array, stem="c"):
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values):
        return self.const(np.array(values, np.int64), "i")

    def node(self, op, inputs, stem=None, **attrs):
        out = self.name(stem or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out + "_n", **attrs))
        return out

    def dim(self, value, index):
        """Unsqueeze(Gather(Shape(value), index)) as a 1-D int64."""
        shape = self.node("Shape", [value])
        return self.node("Unsqueeze", [self.node("Gather", [shape, self.const(np.array(index, np.int64))]), self.ints([0])])


def jax_group_norm(
    shape,
    groups,
    *,
    axis=-1,
    policy="float32",  # "float32" | "float16" (f16 gamma/beta) | "mixed" (f32 gamma/beta)
    dyn="batch",  # "none" (all static) | "batch" | "hw" (batch and spatial dims dynamic)
    scale=True,
    center=True,
    eps=1e-3,
    seed=0,
    sum_axes=None,  # override the ReduceSum axes
    count=None,  # override the constant N of the mean
    ddof=0,
    zero=0.0,
    back_shape=None,  # override the Reshape target after ReduceSum
    fallback="auto",  # "auto" | an array for the Where's else branch
    cast_out_to=None,  # override the Cast before the final Reshape (float16 policies)
    gamma_layout=None,  # override the gamma Reshape target
    extra_output=None,  # "mean" | "sum": an intermediate also feeds a Relu graph output; "shape": Shape(sum) is one;
    # "grouped_shape": Shape(grouped tensor) feeds a Greater outside the subgraph
    sum_keepdims=0,
    drop_count_factor=False,  # the run-time count (dyn="hw") misses a spatial dim
    epsilon_shape=(),
):
    rng = np.random.default_rng(seed)
    rank = len(shape)
    a = axis % rank
    channels = shape[a]
    cg = channels // groups
    f16 = policy in ("float16", "mixed")
    io_dtype = np.float16 if f16 else np.float32
    p_dtype = np.float16 if policy == "float16" else np.float32
    g = _Graph()
    stat = [i for i in range(1, rank + 1) if i != a]
    kept = [groups if i == a else 1 for i in range(1, rank + 1)]  # without the batch dim
    grouped = [*shape[:a], groups, cg, *shape[a + 1 :]]

    dims = [shape[0] if dyn == "none" else "batch"] + [
        (f"d{i}" if dyn == "hw" and i != a else shape[i]) for i in range(1, rank)
    ]
    # grouping Reshape
    if dyn == "hw":
        parts = [g.ints([-1])]
        for i in range(1, rank):
            parts += [g.ints([groups]), g.ints([cg])] if i == a else [g.dim("x", i)]
        target = g.node("Concat", parts, axis=0)
    else:
        target = g.ints([-1, *grouped[1:]])
    xg = g.node("Reshape", ["x", target], "xg", allowzero=0)
    xs = g.node("Cast", [xg], "xs", to=TensorProto.FLOAT) if f16 else xg

    mean = g.node("ReduceMean", [xs, g.ints(stat)], "mean", keepdims=1)

    def broadcast_back(reduced, target_override=None):
        if dyn == "none":
            reshape_t = g.ints(target_override or [shape[0], *kept])
            expand_t = g.ints([shape[0], *kept])
        else:
            src = g.node("Shape", [reduced])
            b1 = g.node("Gather", [src, g.ints([0])], axis=0)
            b2 = g.node("Gather", [src, g.ints([0])], axis=0)
            expand_t = g.node("Concat", [b1] + [g.ints([k]) for k in kept], axis=0)
            reshape_t = g.ints(target_override) if target_override else g.node("Concat", [b2] + [g.ints([k]) for k in kept], axis=0)
        return g.node("Expand", [g.node("Reshape", [reduced, reshape_t]), expand_t])

    def group_count():
        if dyn != "hw":
            return g.const(np.float32(count if count is not None else int(np.prod([grouped[i] for i in stat]))))
        prod = g.ints([cg])
        for i in stat[1:] if drop_count_factor else stat:
            if i != a + 1:
                prod = g.node("Mul", [g.node("Shape", [xg], start=i, end=i + 1), prod])
        scalar = g.node("Reshape", [prod, g.ints([])])
        return g.node("Cast", [g.node("Cast", [scalar], to=TensorProto.INT32)], to=TensorProto.FLOAT)

    axes = g.ints(sum_axes or stat)
    s = g.node("ReduceSum", [xs, axes], "sum", keepdims=sum_keepdims)
    d = g.node("Sub", [xs, g.node("Div", [broadcast_back(s, back_shape), group_count()])])
    ss = g.node("ReduceSumSquare", [d, g.ints(stat)], "sumsq", keepdims=0)
    den = g.node("Sub", [group_count(), g.node("Cast", [g.const(np.int32(ddof))], to=TensorProto.FLOAT)])
    ratio = g.node("Div", [broadcast_back(ss), den], "ratio")
    if isinstance(fallback, np.ndarray):
        other = g.const(fallback)
    elif dyn == "none":
        other = g.const(np.full([shape[0], *kept], np.nan, np.float32))
    else:
        src = g.node("Shape", [ratio])
        t = g.node("Concat", [g.node("Gather", [src, g.ints([0])], axis=0)] + [g.ints([k]) for k in kept], axis=0)
        other = g.node("Expand", [g.const(np.float32(np.nan)), t])
    var = g.node("Where", [g.node("Greater", [den, g.const(np.float32(zero))]), ratio, other], "var")
    std = g.node("Sqrt", [g.node("Add", [var, g.const(np.full(epsilon_shape, eps, np.float32))])])
    inv = g.node("Div", [g.const(np.float32(1.0)), std], "inv")

    gamma = rng.normal(1, 0.5, channels).astype(p_dtype) if scale else None
    beta = rng.normal(0, 0.5, channels).astype(p_dtype) if center else None
    layout = gamma_layout or [groups if i == a else cg if i == a + 1 else 1 for i in range(rank + 1)]

    def param(values):
        if gamma_layout is not None:
            values = values[: int(np.prod(layout))]
        out = g.node("Reshape", [g.const(values, "p"), g.ints(layout)], allowzero=0)
        return g.node("Cast", [out], to=TensorProto.FLOAT) if policy == "float16" else out

    if scale:
        inv = g.node("Mul", [inv, param(gamma)])
    shift = g.node("Mul", [g.node("Neg", [mean]), inv])
    if center:
        shift = g.node("Add", [shift, param(beta)])
    yg = g.node("Add", [g.node("Mul", [xs, inv]), shift], "yg")
    yg_f32 = yg
    if f16:
        yg = g.node("Cast", [yg], to=cast_out_to or TensorProto.FLOAT16)
    if dyn == "none":
        out_t = g.ints(list(shape))
    else:
        parts = [g.dim(yg, 0)] + [g.dim(yg, i if i < a else i + 1) if isinstance(dims[i], str) else g.ints([shape[i]]) for i in range(1, rank)]
        out_t = g.node("Concat", parts, axis=0)
    g.nodes.append(helper.make_node("Reshape", [yg, out_t], ["y"], name="y_n", allowzero=0))

    outputs = [helper.make_tensor_value_info("y", cast_out_to or ONNX_TYPE[np.dtype(io_dtype)], dims)]
    if extra_output == "shape":
        g.nodes.append(helper.make_node("Shape", [s], ["extra"], name="extra_n"))
        outputs.append(helper.make_tensor_value_info("extra", TensorProto.INT64, [1 + rank if sum_keepdims else 2]))
    elif extra_output == "grouped_shape":
        # another layer's guard reads the grouped tensor's shape (jax2onnx shares equal shape
        # computations between layers): Greater(dim 1, 0) -> Cast -> graph output
        g.nodes.append(helper.make_node("Shape", [xs], ["xs_shape"], name="shared_shape"))
        g.nodes.append(helper.make_node("Gather", ["xs_shape", g.ints([1])], ["xs_dim1"], name="shared_gather"))
        g.nodes.append(helper.make_node("Greater", ["xs_dim1", g.ints([0])], ["xs_positive"], name="shared_greater"))
        g.nodes.append(helper.make_node("Cast", ["xs_positive"], ["extra"], name="extra_n", to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    elif extra_output:
        source = {"mean": mean, "sum": s}[extra_output]
        g.nodes.append(helper.make_node("Relu", [source], ["extra"], name="extra_n"))
        extra_dims = [dims[0], *kept] if extra_output == "mean" else [dims[0], groups]
        outputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, extra_dims))
    # jax2onnx annotates every value with its symbolic shape; the grouped ones matter here
    grouped_dims = [*dims[:a], groups, cg, *dims[a + 1 :]]
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, grouped_dims) for name in (xs, yg_f32)]
    graph = helper.make_graph(
        g.nodes, "jax_gn", [helper.make_tensor_value_info("x", ONNX_TYPE[np.dtype(io_dtype)], dims)], outputs, g.inits,
        value_info=value_info,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model, gamma, beta


def _ours(model):
    return [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.OP_TYPE]


def _fuse_and_compare(model, shape, groups, axis, gamma, beta, eps=1e-3, dtype=np.float32, seed=0):
    fused, report = fuse(model)
    nodes = _ours(fused)
    assert len(nodes) == 1, report.skipped
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["groups"] == groups and attrs["axis"] == axis
    assert attrs["epsilon"] == pytest.approx(eps)
    x = np.random.default_rng(seed).normal(0.5, 2.0, shape).astype(dtype)
    (actual,) = run_ort(fused, x)
    expected = ops.group_normalization(x, gamma, beta, groups=groups, axis=axis, epsilon=eps)
    ok, worst = tolerance_for(dtype).check(actual, expected)
    assert ok, worst
    # nothing of the exported subgraph is left
    assert {n.op_type for n in fused.graph.node} <= {ops.OP_TYPE}, [n.op_type for n in fused.graph.node]
    return report


@pytest.mark.parametrize(
    ("shape", "groups", "axis", "dyn"),
    [
        ((2, 6, 5, 8), 4, -1, "batch"),
        ((2, 6, 5, 8), 4, -1, "none"),
        ((2, 6, 5, 8), 2, -1, "hw"),
        ((2, 8, 5, 3), 4, 1, "batch"),
        ((2, 8, 5, 3), 2, 1, "hw"),
        ((3, 12), 3, -1, "batch"),
        ((2, 4, 3, 2, 6), 3, -1, "hw"),
        ((2, 7, 8), 8, -1, "batch"),  # groups = C (Keras' groups=-1)
    ],
)
def test_fuses_every_layout(shape, groups, axis, dyn):
    model, gamma, beta = jax_group_norm(shape, groups, axis=axis, dyn=dyn)
    report = _fuse_and_compare(model, shape, groups, axis, gamma, beta)
    assert report.fused[0].rule == "KerasJaxGroupNormFusion"


def test_fuses_sums_that_keep_their_dims():
    model, gamma, beta = jax_group_norm((2, 6, 5, 8), 4, sum_keepdims=1)
    _fuse_and_compare(model, (2, 6, 5, 8), 4, -1, gamma, beta)


@pytest.mark.parametrize(("scale", "center"), [(True, False), (False, True), (False, False)])
def test_fuses_without_gamma_or_beta(scale, center):
    model, gamma, beta = jax_group_norm((2, 4, 4, 8), 2, scale=scale, center=center)
    report = _fuse_and_compare(model, (2, 4, 4, 8), 2, -1, gamma, beta)
    assert (report.fused[0].scale, report.fused[0].center) == (scale, center)


@pytest.mark.parametrize("policy", ["float16", "mixed"])
@pytest.mark.parametrize("dyn", ["batch", "hw"])
def test_fuses_float16_policies(policy, dyn):
    model, gamma, beta = jax_group_norm((2, 4, 4, 8), 4, policy=policy, dyn=dyn, eps=1e-5)
    _fuse_and_compare(model, (2, 4, 4, 8), 4, -1, gamma, beta, eps=1e-5, dtype=np.float16)


def _skipped(model):
    fused, report = fuse(model)
    assert not _ours(fused)
    return " | ".join(s.reason for s in report.skipped)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"sum_axes": [1, 2]}, "reduces axes [1, 2]"),
        ({"count": 47.0}, "the count 47 is not the number of elements per group 48"),
        ({"ddof": 1}, "ddof is not the scalar constant 0"),
        ({"zero": 1.0}, "does not compare the count with the scalar 0"),
        ({"back_shape": [2, 1, 4, 1, 1], "dyn": "none"}, "not back to the keepdims shape"),
        ({"fallback": np.full([2, 6, 1, 4, 1], np.nan, np.float32)}, "fallback"),
        ({"policy": "float16", "cast_out_to": TensorProto.FLOAT}, "Cast before the final Reshape goes to FLOAT, not the input dtype FLOAT16"),
        ({"epsilon_shape": (2,)}, "epsilon is not a non-negative scalar constant"),
        ({"groups": 2, "gamma_layout": [1, 1, 1, 2, 1], "center": False}, "gamma is reshaped from shape [2], not [8]"),
        ({"extra_output": "mean"}, "is used outside the subgraph by Relu"),
        ({"extra_output": "sum"}, "is used outside the subgraph by Relu"),
        ({"extra_output": "shape"}, "reads an intermediate and is a graph output"),
        ({"dyn": "hw", "drop_count_factor": True}, "is not the number of elements per group"),
    ],
)
def test_near_misses_are_reported(kwargs, reason):
    kwargs = {"dyn": "batch", "groups": 4, **kwargs}
    model, _, _ = jax_group_norm((2, 6, 4, 8), **kwargs)
    assert reason in _skipped(model)


@pytest.mark.parametrize("dyn", ["batch", "hw"])
def test_shape_read_shared_with_the_graph_stays_for_it(dyn, rng):
    """The grouped tensor's Shape also feeds a Greater outside the subgraph: the fused op
    replaces the subgraph, and the grouping Reshape and that shape chain stay for the Greater."""
    shape, groups = (2, 6, 4, 8), 4
    model, gamma, beta = jax_group_norm(shape, groups, dyn=dyn, extra_output="grouped_shape")
    fused, report = fuse(model)
    assert len(_ours(fused)) == 1 and report.skipped == []
    kept = {n.name for n in fused.graph.node}
    assert {"shared_shape", "shared_gather", "shared_greater", "extra_n"} <= kept
    assert [n.op_type for n in fused.graph.node if n.op_type in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "Where")] == []
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    y, extra = run_ort(fused, x)
    ok, worst = tolerance_for(np.float32).check(y, ops.group_normalization(x, gamma, beta, groups=groups, axis=-1, epsilon=1e-3))
    assert ok, worst
    np.testing.assert_array_equal(extra, run_ort(model, x)[1])  # the other reader sees what it saw


def test_count_must_follow_dynamic_spatial_dims():
    """A constant N is only right when the group size is static."""
    model, _, _ = jax_group_norm((2, 6, 4, 8), 4, dyn="hw")
    # replace the run-time count of the mean by the constant a static trace would give
    for node in model.graph.node:
        if node.op_type == "Div" and node.input[1].startswith("cast_"):
            node.input[1] = "static_count"
            model.graph.initializer.append(numpy_helper.from_array(np.float32(48.0), "static_count"))
            break
    assert "is a constant but the group size is not static" in _skipped(model)


def test_a_second_run_changes_nothing():
    model, _, _ = jax_group_norm((2, 6, 4, 8), 4, dyn="hw")
    once, _ = fuse(model)
    twice, report = fuse(once)
    assert not report.fused and not report.skipped
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]
