"""Standard ONNX GroupNormalization nodes (rules.standard_op): version 21 (per-channel
scale/bias) and 18-20 (per-group scale/bias). Graphs are built here with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import fuse

from onnx_groupnorm import ops

FLOAT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def gn_model(
    shape,
    groups,
    *,
    opset=21,
    seed=0,
    dtype=np.float32,
    eps=1e-5,
    params="const",  # "const" | "inputs" (graph inputs) | "fill" (ConstantOfShape ones/zeros)
    param_len=None,  # scale/bias length; default C at opset >= 21, G below
    stash_type=None,
):
    rng = np.random.default_rng(seed)
    channels = shape[1]
    n = param_len if param_len is not None else (channels if opset >= 21 else groups)
    scale = rng.normal(1, 0.5, n).astype(dtype)
    bias = rng.normal(0, 0.5, n).astype(dtype)
    inputs = [helper.make_tensor_value_info("x", FLOAT[dtype], ["batch", *shape[1:]])]
    inits, nodes = [], []
    if params == "const":
        inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")]
    elif params == "inputs":
        inputs += [helper.make_tensor_value_info(name, FLOAT[dtype], [n]) for name in ("scale", "bias")]
    else:
        inits = [numpy_helper.from_array(np.array([n], np.int64), "n")]
        for name, fill in (("scale", 1.0), ("bias", 0.0)):
            value = numpy_helper.from_array(np.array([fill], dtype), f"{name}_fill")
            nodes.append(helper.make_node("ConstantOfShape", ["n"], [name], value=value))
        scale = bias = None
    attrs = {"num_groups": groups, "epsilon": eps}
    if stash_type is not None:
        attrs["stash_type"] = stash_type
    nodes.append(helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], name="gn", **attrs))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", FLOAT[dtype], ["batch", *shape[1:]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return model, scale, bias


def ours(model):
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def reasons(report):
    return [s.reason for s in report.skipped]


def check_output(fused, x, gamma, beta, groups, eps, *extra):
    (actual,) = run_ort(fused, x, *extra)
    expected = ops.group_normalization(x, gamma, beta, groups=groups, axis=1, epsilon=eps)
    ok, worst = tolerance_for(x.dtype).check(actual, expected)
    assert ok, f"worst error ratio {worst}"


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        ((2, 16, 8, 8), 4, {}),
        ((2, 8, 16), 2, {"eps": 1e-3}),
        ((2, 8, 4, 4, 4), 4, {"stash_type": 1}),
        ((2, 16, 8, 8), 16, {"opset": 22}),
        ((2, 16, 8, 8), 4, {"dtype": np.float16, "stash_type": 1}),
    ],
    ids=["r4", "r3", "r5-stash1", "opset22", "f16"],
)
def test_gn21_constant_per_channel(shape, groups, kwargs, rng):
    model, scale, bias = gn_model(shape, groups, **kwargs)
    fused, report = fuse(model)
    assert report.skipped == []
    (node,) = ours(fused)
    assert list(node.input) == ["x", "scale", "bias"]  # the initializers themselves
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["groups"] == groups and attrs["axis"] == 1
    assert attrs["epsilon"] == pytest.approx(kwargs.get("eps", 1e-5), rel=1e-6)
    assert report.fused[0].channels == shape[1]
    dtype = kwargs.get("dtype", np.float32)
    x = rng.normal(0.5, 2, (3, *shape[1:])).astype(dtype)
    check_output(fused, x, scale, bias, groups, kwargs.get("eps", 1e-5))


def test_gn21_run_time_scale_bias_pass_through(rng):
    model, scale, bias = gn_model((2, 16, 4, 4), 4, params="inputs")
    fused, report = fuse(model)
    (node,) = ours(fused)
    assert list(node.input) == ["x", "scale", "bias"]
    onnx.checker.check_model(fused, full_check=True)
    x = rng.normal(0, 1, (2, 16, 4, 4)).astype(np.float32)
    check_output(fused, x, scale, bias, 4, 1e-5, scale, bias)


def test_gn21_constant_of_shape_ones_zeros_are_dropped(rng):
    model, _, _ = gn_model((2, 16, 4, 4), 4, params="fill")
    fused, report = fuse(model)
    (node,) = ours(fused)
    assert list(node.input) == ["x"]
    assert [n.op_type for n in fused.graph.node] == ["GroupNormalization"]  # ConstantOfShape removed
    assert not report.fused[0].scale and not report.fused[0].center
    x = rng.normal(0, 1, (2, 16, 4, 4)).astype(np.float32)
    check_output(fused, x, None, None, 4, 1e-5)


@pytest.mark.parametrize("opset", [18, 19, 20])
def test_gn18_per_group_constants_are_expanded(opset, rng):
    model, scale, bias = gn_model((2, 16, 8, 8), 4, opset=opset)
    fused, report = fuse(model)
    assert report.skipped == []
    (node,) = ours(fused)
    gamma = numpy_helper.to_array(next(i for i in fused.graph.initializer if i.name == node.input[1]))
    np.testing.assert_array_equal(gamma, np.repeat(scale, 4))
    x = rng.normal(0, 1, (2, 16, 8, 8)).astype(np.float32)
    check_output(fused, x, np.repeat(scale, 4), np.repeat(bias, 4), 4, 1e-5)
    # and what onnxruntime computes for the per-group original agrees
    ok, worst = tolerance_for(np.float32).check(run_ort(fused, x)[0], run_ort(model, x)[0])
    assert ok, worst


# -- near misses ------------------------------------------------------------------------


def test_gn18_run_time_per_group_scale_is_rejected():
    model, _, _ = gn_model((2, 16, 8, 8), 4, opset=18, params="inputs")
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("(per group) is not a constant: cannot expand it per channel" in r for r in reasons(report))


def test_gn21_per_group_shaped_scale_is_rejected():
    model, _, _ = gn_model((2, 16, 8, 8), 4, opset=21, param_len=4)
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("scale has shape [4], not per channel [16]" in r for r in reasons(report))


def test_gn18_per_channel_shaped_scale_is_rejected():
    model, _, _ = gn_model((2, 16, 8, 8), 4, opset=18, param_len=16)
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("has shape [16], not per group [4]" in r for r in reasons(report))


def test_channels_not_divisible_by_groups():
    model, _, _ = gn_model((2, 6, 8), 4)
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("C=6 is not divisible by num_groups=4" in r for r in reasons(report))


def test_keep_standard_leaves_the_op():
    model, _, _ = gn_model((2, 16, 8, 8), 4)
    fused, report = fuse(model, keep_standard=True)
    assert report.fused == [] and report.skipped == []
    assert fused.SerializeToString() == model.SerializeToString()
