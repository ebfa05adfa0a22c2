"""Keras + torch through torch.onnx's dynamo exporter (rules.keras_torch_dynamo,
``KerasTorchDynamoGroupNormFusion``): ``var = ReduceMean(Pow(x, 2)) - Pow(mean, 2)``,
Reshapes with ``allowzero=1`` (research doc §3.3). Graphs are built here with onnx.helper
(tests/keras_graphs.py, helpers.keras_dynamo_group_norm)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import keras_dynamo_group_norm, single_model
from keras_graphs import (
    F16,
    F32,
    GN,
    Builder,
    assert_fused,
    assert_skipped,
    keras_group_norm,
    ours,
    random_input,
)
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter.rules._keras import VARIANT_SUFFIX as SUFFIX

RULE = "KerasTorchDynamoGroupNormFusion"


def dynamo_moments(exponent=2.0, mean_exponent=2.0):
    def moments(b, xs, ctx):
        axes = b.i64(ctx.axes)
        mean = b.op("ReduceMean", xs, axes, keepdims=1, noop_with_empty_axes=0)
        mean_sq = b.op("ReduceMean", b.op("Pow", xs, b.const(np.float32(exponent))), axes, keepdims=1, noop_with_empty_axes=0)
        return mean, b.op("Sub", mean_sq, b.op("Pow", mean, b.const(np.float32(mean_exponent))))

    return moments


def dynamo_model(shape=(2, 8, 8, 16), groups=4, *, opset=20, moments=None, in_elem=F32, extra_outputs=(), **kwargs):
    """Static signature: constant targets, batch baked into the final one, allowzero=1."""
    b = Builder()
    kwargs.setdefault("allowzero", 1)
    kwargs.setdefault("out_target", list(shape))
    gn = keras_group_norm(b, "x", shape, groups, moments or dynamo_moments(), **kwargs)
    outputs = [(gn.y, in_elem, list(shape))] + [(n, F32, None) for n in extra_outputs]
    return b.model([("x", in_elem, list(shape))], outputs, opset=opset), gn


def data(rng, shape, dtype=np.float32):
    return random_input(rng, shape, dtype=dtype)


# -- matching variants ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_scale_center(scale, center, rng):
    model, gn = dynamo_model(scale=scale, center=center)
    assert_fused(model, gn, data(rng, (2, 8, 8, 16)), rule=RULE + SUFFIX[(scale, center)])


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        ((2, 16), 4, {}),  # rank 2 (Dense)
        ((2, 16), 16, {}),  # rank 2, groups=-1
        ((2, 6, 8), 4, {}),  # rank 3
        ((2, 4, 4, 4, 8), 2, {}),  # rank 5 (Conv3D)
        ((2, 16, 4, 4), 2, {"axis": 1, "epsilon": 1e-5}),  # channels-first
        ((2, 8, 4, 4, 4), 4, {"axis": 1}),  # channels-first rank 5
        ((2, 8, 8, 16), 4, {"opset": 18}),
        ((2, 8, 8, 16), 4, {"opset": 21}),
        ((2, 8, 8, 16), 4, {"allowzero": None}),  # allowzero absent works the same here
        ((2, 8, 8, 16), 4, {"swap": True}),
        ((2, 8, 8, 64), 32, {"epsilon": 1e-6}),
        ((2, 8, 8, 16), 1, {}),
    ],
    ids=["r2", "r2-gC", "r3", "r5", "nchw", "ncdhw", "op18", "op21", "allowzero0", "swapped", "g32", "g1"],
)
def test_variants(shape, groups, kwargs, rng):
    model, gn = dynamo_model(shape, groups, **kwargs)
    assert_fused(model, gn, data(rng, shape))


def test_helper_graph_with_constant_nodes(rng):
    nodes, params = keras_dynamo_group_norm("x", "y", (2, 8, 8, 16), 4, epsilon=1e-3, seed=3)
    model = single_model(nodes, [2, 8, 8, 16])
    gn = GN("y", 4, -1, float(np.float32(1e-3)), params["gamma"], params["beta"])
    assert_fused(model, gn, data(rng, (2, 8, 8, 16)), rule=RULE)


def test_dynamic_shapes_from_shape_slices(rng):
    """``dynamic_shapes``: both targets are Concat of ``Shape(x){start, end}`` slices (the
    grouping one with -1 for the batch) and constants."""
    b = Builder()
    dim = lambda i: b.op("Shape", "x", start=i, end=i + 1)  # noqa: E731
    grouping = b.op("Concat", b.i64([-1]), dim(1), dim(2), b.i64([4]), b.i64([4]), axis=0)
    out_target = b.op("Concat", dim(0), dim(1), dim(2), b.i64([16]), axis=0)
    gn = keras_group_norm(b, "x", ("N", "H", "W", 16), 4, dynamo_moments(), allowzero=1, grouping=grouping, out_target=out_target)
    model = b.model([("x", F32, ["N", "H", "W", 16])], [(gn.y, F32, ["N", "H", "W", 16])], opset=18)
    fused, _ = assert_fused(model, gn, rng.normal(0, 1, (3, 5, 6, 16)).astype(np.float32))
    assert not any(n.op_type == "Concat" for n in fused.graph.node)


def test_float16_statistics_in_float32(rng):
    """float16 / mixed: Cast(FLOAT) after the grouping Reshape, Cast(FLOAT16) before the
    final one, float32 constants."""
    model, gn = dynamo_model(
        dtype=np.float16, param_dtype=np.float32, in_elem=F16,
        stats_input=lambda b, xg: b.op("Cast", xg, to=F32), out_cast=F16,
    )
    assert_fused(model, gn, data(rng, (2, 8, 8, 16), np.float16))


def test_with_beta_is_fused_by_the_full_rule(rng):
    model, gn = dynamo_model(swap=True)
    _, report = assert_fused(model, gn, data(rng, (2, 8, 8, 16)), rule=RULE)
    assert report.skipped == []


# -- near misses ---------------------------------------------------------------------------


@pytest.mark.parametrize("exponents", [(3.0, 2.0), (2.0, 3.0)])
def test_not_a_square(exponents):
    model, _ = dynamo_model(moments=dynamo_moments(*exponents))
    fused, report = fuse(model)
    assert ours(fused) == [] and report.fused == []


def test_wrong_reduce_axes():
    model, _ = dynamo_model(axes=[1, 2, 3])
    assert_skipped(model, "reduces axes [1, 2, 3], not [1, 2, 4] (all but batch and group)")


def test_layer_norm_like_axes():
    model, _ = dynamo_model(axes=[1, 2, 3, 4])
    assert_skipped(model, "reduces axes [1, 2, 3, 4], not [1, 2, 4]")


def test_epsilon_not_a_scalar():
    model, _ = dynamo_model(eps_array=np.full((1, 1, 1, 4, 1), 1e-3, np.float32))
    assert_skipped(model, "epsilon is not a non-negative scalar constant")


def test_gamma_in_the_wrong_layout():
    # per group ([1, 1, 1, G, 1]), not per channel
    model, _ = dynamo_model(gamma_array=np.linspace(0.5, 2, 4, dtype=np.float32).reshape(1, 1, 1, 4, 1))
    assert_skipped(model, "gamma has shape [1, 1, 1, 4, 1], not the grouped layout [1, 1, 1, 4, 4]")


def test_grouping_that_does_not_split_the_channel_axis_in_place():
    model, _ = dynamo_model((2, 4, 6, 16), 4, grouping=[-1, 6, 4, 4, 4])
    assert_skipped(model, "does not split a static channel axis of")


def test_final_reshape_does_not_restore_the_input_shape():
    model, _ = dynamo_model(out_target=[2, 8, 16, 8])
    assert_skipped(model, "the final Reshape (target [2, 8, 16, 8]) does not restore the input shape")


def test_final_reshape_with_allowzero_zero_is_a_literal_zero():
    # allowzero=1: a 0 in the target is a zero-size dim, not "copy" (the grouped dim 0 is 2)
    model, _ = dynamo_model(out_target=[0, 8, 8, 16])
    assert_skipped(model, "the final Reshape (target [0, 8, 8, 16]) does not restore the input shape")


def test_non_no_op_cast_before_the_final_reshape():
    model, _ = dynamo_model(out_cast=F16, in_elem=F32)
    model.graph.output[0].type.tensor_type.elem_type = F16
    assert_skipped(model, "Cast before the final Reshape goes to")


def test_intermediate_graph_output_is_not_fused():
    b = Builder()
    gn = keras_group_norm(b, "x", (2, 8, 8, 16), 4, dynamo_moments(), allowzero=1, out_target=[2, 8, 8, 16])
    sub = next(n.output[0] for n in b.nodes if n.op_type == "Sub")
    model = b.model([("x", F32, [2, 8, 8, 16])], [(gn.y, F32, [2, 8, 8, 16]), (sub, F32, None)], opset=20)
    fused, report = fuse(model)
    assert ours(fused) == [] and report.fused == []
