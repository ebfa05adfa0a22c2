"""torch.nn.GroupNorm as torch.onnx exports it: Reshape -> InstanceNormalization -> Reshape ->
Mul -> Add (rules.torch_instancenorm). Graphs are built here with onnx.helper."""

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


def torch_group_norm(
    shape,
    groups,
    *,
    seed=0,
    dtype=np.float32,
    eps=1e-5,
    affine="random",  # "random" | "ts_none" ([[[1.0]]]/[[[0.0]]]) | "ones" (ones/zeros [C,1..])
    dyn_batch=False,
    restore="shape",  # "shape" (Shape(x)) | "const" | "none" (no restoring Reshape: dynamo, static shapes)
    layout="c11",  # gamma/beta as [C,1,..] | "1c11" as [1,C,1,..]
    in_affine=None,  # (scale[G], B[G]) instead of ones/zeros
    ops_=("Mul", "Add"),
    commuted=False,
    target=None,
    extra_outputs=(),
):
    """The nodes TorchScript exports for torch.nn.GroupNorm (research doc §5), as a model."""
    rng = np.random.default_rng(seed)
    rank = len(shape)
    channels = shape[1]
    trail = [1] * (rank - 2)
    pshape = [channels, *trail] if layout == "c11" else [1, channels, *trail]
    if affine == "random":
        gamma = rng.normal(1, 0.5, channels).astype(dtype)
        beta = rng.normal(0, 0.5, channels).astype(dtype)
        g_arr, b_arr = gamma.reshape(pshape), beta.reshape(pshape)
    elif affine == "ts_none":
        gamma = beta = None
        g_arr, b_arr = np.ones([1] * (rank - 1), dtype), np.zeros([1] * (rank - 1), dtype)
    else:
        gamma = beta = None
        g_arr, b_arr = np.ones(pshape, dtype), np.zeros(pshape, dtype)
    in_scale, in_bias = in_affine if in_affine is not None else (np.ones(groups, dtype), np.zeros(groups, dtype))
    inits = [
        numpy_helper.from_array(np.array(target if target is not None else [0, groups, -1], np.int64), "group_shape"),
        numpy_helper.from_array(np.asarray(in_scale, dtype), "in_scale"),
        numpy_helper.from_array(np.asarray(in_bias, dtype), "in_bias"),
        numpy_helper.from_array(g_arr, "gamma"),
        numpy_helper.from_array(b_arr, "beta"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "group_shape"], ["xg"], name="gn_reshape", allowzero=0),
        helper.make_node("InstanceNormalization", ["xg", "in_scale", "in_bias"], ["n"], name="gn_in", epsilon=eps),
    ]
    if restore == "shape":
        nodes.append(helper.make_node("Shape", ["x"], ["x_shape"], name="gn_shape"))
    elif restore == "const":
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), "x_shape"))
    last = "n"
    if restore != "none":
        nodes.append(helper.make_node("Reshape", ["n", "x_shape"], ["r"], name="gn_restore"))
        last = "r"
    for op_type, param in zip(("Mul", "Add"), ("gamma", "beta")):
        if op_type in ops_:
            inputs = [param, last] if commuted else [last, param]
            nodes.append(helper.make_node(op_type, inputs, [f"{op_type}_out"], name=f"gn_{op_type.lower()}"))
            last = f"{op_type}_out"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    in_shape = ["batch", *shape[1:]] if dyn_batch else list(shape)
    outputs = [helper.make_tensor_value_info("y", FLOAT[dtype], in_shape)]
    outputs += [helper.make_tensor_value_info(name, FLOAT[dtype], None) for name in extra_outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT[dtype], in_shape)], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model, gamma, beta


def ours(model):
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def assert_matches_reference(fused, x, gamma, beta, groups, eps):
    (actual,) = run_ort(fused, x)[:1]
    expected = ops.group_normalization(x, gamma, beta, groups=groups, axis=1, epsilon=eps)
    ok, worst = tolerance_for(x.dtype).check(actual, expected)
    assert ok, f"worst error ratio {worst}"


def reasons(report):
    return [s.reason for s in report.skipped]


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        ((2, 16, 8, 8), 4, {}),
        ((2, 16, 8, 8), 4, {"dyn_batch": True}),
        ((3, 8, 10), 2, {"restore": "const"}),
        ((2, 8, 4, 4, 4), 2, {"layout": "1c11"}),
        ((2, 12), 3, {}),
        ((2, 16, 8, 8), 16, {"commuted": True}),
        ((2, 16, 8, 8), 1, {"target": [2, 1, 1024]}),  # fully static target
        ((2, 16, 8, 8), 4, {"dtype": np.float16, "eps": 1e-3}),
    ],
    ids=["r4", "r4-dynbatch", "r3-const-restore", "r5-1C11", "r2", "r4-commuted", "static-target", "r4-f16"],
)
def test_torch_group_norm_fuses(shape, groups, kwargs, rng):
    model, gamma, beta = torch_group_norm(shape, groups, **kwargs)
    fused, report = fuse(model)
    assert report.skipped == []
    (node,) = ours(fused)
    assert len(fused.graph.node) == 2  # our op + the Identity
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    eps = kwargs.get("eps", 1e-5)
    assert attrs["groups"] == groups and attrs["axis"] % len(shape) == 1  # rank 2: written -1
    assert attrs["epsilon"] == pytest.approx(eps, rel=1e-6)
    assert report.fused[0].channels == shape[1] and report.fused[0].scale and report.fused[0].center
    dtype = kwargs.get("dtype", np.float32)
    x = rng.normal(0.5, 2, shape).astype(dtype)
    assert_matches_reference(fused, x, gamma, beta, groups, eps)


@pytest.mark.parametrize("affine", ["ts_none", "ones"])
def test_affine_false_emits_no_gamma_beta(affine, rng):
    model, _, _ = torch_group_norm((2, 16, 8, 8), 8, affine=affine)
    fused, report = fuse(model)
    (node,) = ours(fused)
    assert list(node.input) == ["x"]
    assert not report.fused[0].scale and not report.fused[0].center
    assert [n.op_type for n in fused.graph.node] == ["GroupNormalization", "Identity"]
    assert {i.name for i in fused.graph.initializer} == set()
    x = rng.normal(0, 1, (2, 16, 8, 8)).astype(np.float32)
    assert_matches_reference(fused, x, None, None, 8, 1e-5)


def test_instance_norm_affine_is_folded(rng):
    in_scale, in_bias = np.array([0.5, 2.0], np.float32), np.array([1.0, -1.0], np.float32)
    model, gamma, beta = torch_group_norm((2, 8, 6), 2, in_affine=(in_scale, in_bias))
    fused, report = fuse(model)
    assert report.skipped == []
    assert len(ours(fused)) == 1
    x = rng.normal(0, 1, (2, 8, 6)).astype(np.float32)
    gamma_c = gamma * np.repeat(in_scale, 4)
    beta_c = gamma * np.repeat(in_bias, 4) + beta
    assert_matches_reference(fused, x, gamma_c, beta_c, 2, 1e-5)
    ok, worst = tolerance_for(np.float32).check(run_ort(fused, x)[0], run_ort(model, x)[0])
    assert ok, worst


@pytest.mark.parametrize(
    "ops_, with_gamma, with_beta",
    [((), False, False), (("Mul",), True, False), (("Add",), False, True)],
    ids=["bare", "mul-only", "add-only"],
)
def test_variants_without_mul_or_add(ops_, with_gamma, with_beta, rng):
    model, gamma, beta = torch_group_norm((2, 8, 4, 4), 4, ops_=ops_)
    fused, report = fuse(model)
    assert report.skipped == []
    (node,) = ours(fused)
    assert [n.op_type for n in fused.graph.node] == ["GroupNormalization", "Identity"]
    assert report.fused[0].scale is with_gamma and report.fused[0].center is with_beta
    x = rng.normal(0, 1, (2, 8, 4, 4)).astype(np.float32)
    assert_matches_reference(fused, x, gamma if with_gamma else None, beta if with_beta else None, 4, 1e-5)


def test_full_chain_is_taken_by_the_full_rule():
    """The bare rule's anchor (the restoring Reshape) comes first in the graph: it must defer."""
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4)
    _, report = fuse(model)
    assert [f.rule for f in report.fused] == ["TorchInstanceNormGroupNormFusion"]


# -- without the restoring Reshape (GroupNorm(C, C) on N x C x T, dynamo with static shapes) --


def _share_in_affine(model):
    """Another node (standing in for a LayerNorm) also reads the InstanceNormalization's scale/bias."""
    model.graph.node.append(helper.make_node("Add", ["in_scale", "in_bias"], ["shared"], name="other_layer"))
    model.graph.output.append(helper.make_tensor_value_info("shared", TensorProto.FLOAT, None))
    return model


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"dyn_batch": True}, {"target": [1, 16, 10]}, {"ops_": ()}, {"commuted": True}],
    ids=["static", "dynbatch", "static-target", "no-affine", "commuted"],
)
def test_unrestored_groups_equal_channels_fuses(kwargs, rng):
    shape = (1, 16, 10)
    model, gamma, beta = torch_group_norm(shape, 16, restore="none", **kwargs)
    fused, report = fuse(_share_in_affine(model))
    assert report.skipped == []
    (node,) = ours(fused)
    assert [f.rule.startswith("TorchInstanceNormGroupNormFusionUnrestored") for f in report.fused] == [True]
    assert {"in_scale", "in_bias"} <= {i.name for i in fused.graph.initializer}  # still read by other_layer
    x = rng.normal(0.5, 2, shape).astype(np.float32)
    with_affine = kwargs.get("ops_") != ()
    assert_matches_reference(fused, x, gamma if with_affine else None, beta if with_affine else None, 16, 1e-5)


def test_restoring_reshape_is_left_to_the_full_rule():
    model, _, _ = torch_group_norm((1, 16, 10), 16)
    _, report = fuse(model)
    assert [f.rule for f in report.fused] == ["TorchInstanceNormGroupNormFusion"]


@pytest.mark.parametrize(
    "shape, groups, target",
    [((1, 16, 10), 8, None), ((1, 16, 4, 4), 16, None), ((1, 16, 10), 16, [0, 16, 2, -1])],
    ids=["fewer-groups", "rank4", "rank4-target-on-rank3"],
)
def test_unrestored_grouping_that_is_not_an_identity_is_rejected(shape, groups, target):
    model, _, _ = torch_group_norm(shape, groups, restore="none", target=target)
    del model.graph.output[0].type.tensor_type.shape.dim[:]  # the output keeps the grouped shape
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("is not the input's shape" in r or "rank-3 [N, G, -1]" in r for r in reasons(report)), reasons(report)


# -- near misses ------------------------------------------------------------------------


def test_channels_not_divisible_by_groups():
    # [2, 6, 4] -> [0, 4, -1] is a valid reshape (48 / 8 = 6) but groups straddle channels.
    model, _, _ = torch_group_norm((2, 6, 4), 4)
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("C=6 is not divisible by groups=4" in r for r in reasons(report))


def test_grouping_reshape_of_wrong_rank():
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4, target=[0, 4, 2, -1])
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("does not give a rank-3 [N, G, -1]" in r for r in reasons(report))


def test_grouping_reshape_that_moves_the_batch():
    # [2, 8, 4, 4] -> [-1, 4, 64]: for batch 2 this is [2, 4, 64] only if -1 is inferred
    # as 2; a static last dim that is not (C/G)*H*W mixes batch items.
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4, target=[1, 4, 128])
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("does not map" in r for r in reasons(report))


def test_restoring_reshape_to_another_shape():
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4, restore="const")
    # Restore to [2, 8, 16] instead of [2, 8, 4, 4] (gamma [C,1,1] still broadcasts).
    for init in model.graph.initializer:
        if init.name == "x_shape":
            init.CopyFrom(numpy_helper.from_array(np.array([2, 8, 16], np.int64), "x_shape"))
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("does not give the input shape" in r for r in reasons(report))


def test_run_time_instance_norm_scale_is_rejected():
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "in_scale"))
    model.graph.input.append(helper.make_tensor_value_info("in_scale", TensorProto.FLOAT, [4]))
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("InstanceNormalization scale is not a constant" in r for r in reasons(report))


def test_gamma_along_the_last_axis_is_not_per_channel(rng):
    """gamma [1,1,W] scales along W: the full rule rejects it; the bare GroupNorm core still
    fuses (the Mul/Add stay after it), which is exact."""
    model, _, _ = torch_group_norm((2, 8, 4, 8), 4)
    for init in model.graph.initializer:
        if init.name == "gamma":
            init.CopyFrom(numpy_helper.from_array(rng.normal(1, 0.5, (1, 1, 8)).astype(np.float32), "gamma"))
    fused, report = fuse(model)
    assert any("gamma has shape [1, 1, 8], not per channel along axis 1" in r for r in reasons(report))
    (node,) = ours(fused)
    assert [n.op_type for n in fused.graph.node] == ["GroupNormalization", "Mul", "Add", "Identity"]
    assert len(node.input) == 1
    x = rng.normal(0, 1, (2, 8, 4, 8)).astype(np.float32)
    ok, worst = tolerance_for(np.float32).check(run_ort(fused, x)[0], run_ort(model, x)[0])
    assert ok, worst


def test_intermediate_used_outside_is_not_fused():
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4, extra_outputs=("n",))
    fused, report = fuse(model)
    assert report.fused == []
    assert fused.SerializeToString() == model.SerializeToString()


def test_run_time_grouping_target_is_rejected():
    model, _, _ = torch_group_norm((2, 8, 4, 4), 4)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "group_shape"))
    model.graph.input.append(helper.make_tensor_value_info("group_shape", TensorProto.INT64, [3]))
    fused, report = fuse(model)
    assert ours(fused) == []
    assert any("grouping Reshape target 'group_shape' cannot be evaluated" in r for r in reasons(report))


def test_model_is_valid_after_fusion():
    model, _, _ = torch_group_norm((2, 16, 8, 8), 4, dyn_batch=True)
    fused, _ = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
