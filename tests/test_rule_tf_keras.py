"""tf_keras (Keras 2) + tf2onnx (rules.tf_keras, ``TFKerasGroupNormFusion``):
``tf.nn.weighted_moments`` with an all-ones mask and div_no_nan, ``beta - mean * inv``
(research doc §2.4); the dynamic form (everything from Shape) and the static form
(tf2onnx folded the mask: a constant sum of weights). Graphs are built here with
onnx.helper (tests/keras_graphs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from keras_graphs import (
    F32,
    I32,
    I64,
    Builder,
    assert_fused,
    assert_skipped,
    keras_group_norm,
    ours,
    random_input,
)
from onnx import helper, numpy_helper
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter.rules._keras import VARIANT_SUFFIX as SUFFIX

RULE = "TFKerasGroupNormFusion"

AXES = {4: [1, 2, 4], 3: [1, 3], 2: [2], 5: [1, 2, 3, 5]}


def fill(value):
    return numpy_helper.from_array(np.array([value], np.float32), "value")


def weighted_moments(*, weights=None, sum_of_weights=None, zero=0.0, zero_mean=0.0, zero_var=0.0, zeros_fill=0.0, swap=False):
    """tf.nn.weighted_moments: ``weights`` (a value name) for the dynamic form, whose sum is
    ``ReduceSum(w + zeros_like(xg))``; else the folded form with the constant
    ``sum_of_weights`` and no products with the mask."""

    def moments(b, xs, ctx):
        axes = b.i64(ctx.axes)

        def reduce_sum(v):
            return b.op("ReduceSum", v, axes, keepdims=1, noop_with_empty_axes=1)

        def weighted(v):
            if weights is None:
                return v
            return b.op("Mul", v, weights) if swap else b.op("Mul", weights, v)

        if weights is not None:
            zeros_like = b.op("ConstantOfShape", b.op("Shape", xs), value=fill(zeros_fill))
            sw = reduce_sum(b.op("Add", weights, zeros_like))
        else:
            sw = b.const(sum_of_weights)
        is_empty = b.op("Equal", sw, b.const(np.float32(zero)))
        mean = b.op("Where", is_empty, b.const(np.float32(zero_mean)), b.op("Div", reduce_sum(weighted(xs)), sw))
        d = b.op("Sub", xs, mean)
        var = b.op("Where", is_empty, b.const(np.float32(zero_var)), b.op("Div", reduce_sum(weighted(b.op("Mul", d, d))), sw))
        return mean, var

    return moments


def dynamic_model(groups=4, *, channels=16, spatial=(8, 8), mask_fill=1.0, mask_target=None, mask_shape=None, opset=17, extra_outputs=(), moments_kw=None, **kwargs):
    """The tf_keras export with a Conv in front (here a Transpose of an NCHW input): the mask,
    the grouping/mask/gamma targets and the final target all computed from
    ``Gather(Shape(nchw), [0, 2, 3, 1])``."""
    b = Builder()
    rank = len(spatial) + 2
    perm_in = [0, rank - 1, *range(1, rank - 1)]
    perm = [0, *range(2, rank), 1]
    nchw = b.op("Transpose", "inp", perm=perm_in)
    x = b.op("Transpose", nchw, perm=perm)
    shape = b.op("Gather", b.op("Shape", nchw), b.i64(perm))
    ones = b.op("ConstantOfShape", shape if mask_shape is None else b.i64(mask_shape), value=fill(mask_fill))
    g32 = b.const(np.int32(groups))

    def target(s32, leading):
        # Concat(leading..., [spatial]:i32, [G]:i32, Unsqueeze(Div(C, G))) -> Cast INT64
        c = b.op("Squeeze", b.op("Slice", s32, b.i64([-1]), b.i64([2**31 - 1]), b.i64([0])), b.i64([0]))
        cg = b.op("Unsqueeze", b.op("Div", c, g32), b.i64([0]))
        return b.op("Cast", b.op("Concat", *leading, *[b.i32([d]) for d in spatial], b.i32([groups]), cg, axis=0), to=I64)

    ones32 = b.op("Cast", b.op("Shape", ones), to=I32)
    w_target = mask_target or target(ones32, [b.op("Slice", ones32, b.i64([0]), b.i64([1]), b.i64([0]))])
    weights = b.op("Reshape", ones, w_target if isinstance(w_target, str) else b.i64(w_target))
    s32 = b.op("Cast", shape, to=I32)
    grouping = target(s32, [b.op("Slice", s32, b.i64([0]), b.i64([1]), b.i64([0]))])
    c = b.op("Squeeze", b.op("Slice", s32, b.i64([-1]), b.i64([2**31 - 1]), b.i64([0])), b.i64([0]))
    cg = b.op("Unsqueeze", b.op("Div", c, g32), b.i64([0]))
    param_target = b.op("Cast", b.op("Concat", *[b.i32([1])] * (rank - 1), b.i32([groups]), cg, axis=0), to=I64)
    out_target = b.op("Cast", s32, to=I64)
    x_shape = ("N", *spatial, channels)
    gn = keras_group_norm(
        b, x, x_shape, groups, weighted_moments(weights=weights, **(moments_kw or {})), grouping=grouping, out_target=out_target,
        param_reshape=param_target, tf_keras=True, **kwargs,
    )
    outputs = [(gn.y, F32, list(x_shape))] + [(n, F32, None) for n in extra_outputs]
    return b.model([("inp", F32, list(x_shape))], outputs, opset=opset), gn, b


def static_model(groups=4, *, shape=(2, 8, 8, 16), count=None, sw_shape=None, opset=17, moments_kw=None, **kwargs):
    """The folded form (static signature): constant grouping/final targets, gamma/beta
    constants in grouped layout, a constant sum of weights of shape [N, 1, .., G, 1]."""
    b = Builder()
    rank = len(shape)
    group_size = int(np.prod(shape[1:-1])) * (shape[-1] // groups)
    stats_shape = sw_shape or [shape[0], *[1] * (rank - 2), groups, 1]
    sw = np.full(stats_shape, group_size if count is None else count, np.float32)
    kwargs.setdefault("out_target", list(shape))
    gn = keras_group_norm(b, "x", shape, groups, weighted_moments(sum_of_weights=sw, **(moments_kw or {})), tf_keras=True, **kwargs)
    return b.model([("x", F32, list(shape))], [(gn.y, F32, list(shape))], opset=opset), gn


def data(rng, shape):
    return random_input(rng, shape)


# -- matching variants ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_dynamic_mask_scale_center(scale, center, rng):
    model, gn, _ = dynamic_model(scale=scale, center=center)
    fused, _ = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE + SUFFIX[(scale, center)])
    # the mask, its shape computation and the div_no_nan guards are gone
    assert not {"ConstantOfShape", "Where", "Equal"} & {n.op_type for n in fused.graph.node}


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_static_folded_scale_center(scale, center, rng):
    model, gn = static_model(scale=scale, center=center)
    assert_fused(model, gn, data(rng, (2, 8, 8, 16)), rule=RULE + SUFFIX[(scale, center)])


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("dynamic", {"groups": 1, "center": False}),  # the nocenter export: Neg(mean) * inv
        ("dynamic", {"groups": 16, "epsilon": 1e-5}),  # groups=-1
        ("dynamic", {"spatial": (6,), "groups": 2}),  # rank 3
        ("dynamic", {"spatial": (), "groups": 4}),  # rank 2
        ("dynamic", {"swap": True, "moments_kw": {"swap": True}}),
        ("dynamic", {"opset": 13}),
        ("dynamic", {"opset": 18}),
        ("static", {"shape": (2, 6, 8), "groups": 2}),
        ("static", {"swap": True, "sw_shape": [1]}),  # a scalar-like constant sum
        ("static", {"groups": 8, "rsqrt": "div"}),
    ],
    ids=["g1-nocenter", "gC", "r3", "r2", "swapped", "op13", "op18", "static-r3", "static-swapped-scalar-sum", "static-div"],
)
def test_variants(kind, kwargs, rng):
    if kind == "dynamic":
        model, gn, _ = dynamic_model(**kwargs)
        shape = ("N", *kwargs.get("spatial", (8, 8)), 16)
    else:
        model, gn = static_model(**kwargs)
        shape = kwargs.get("shape", (2, 8, 8, 16))
    assert_fused(model, gn, data(rng, shape))


def test_with_beta_is_fused_by_the_full_rule(rng):
    model, gn, _ = dynamic_model()
    _, report = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE)
    assert report.skipped == []


# -- near misses ---------------------------------------------------------------------------


def test_mask_not_all_ones():
    model, _, _ = dynamic_model(mask_fill=2.0)
    assert_skipped(model, "the weights are not all ones (ConstantOfShape with value 1)")


def test_mask_of_another_shape():
    # ones of shape [1, 8, 8, 16] (broadcast against the batch): not ones_like(x)
    model, _, _ = dynamic_model(mask_shape=[1, 8, 8, 16], mask_target=[1, 8, 8, 4, 4])
    assert_skipped(model, "the weights are ones of shape [1, 8, 8, 16], not the input's")


def test_zeros_like_not_zero():
    model, _, _ = dynamic_model(moments_kw={"zeros_fill": 1.0})
    assert_skipped(model, "zeros_like is not filled with 0")


@pytest.mark.parametrize("count", [63.0, 32.0])
def test_sum_of_weights_not_the_group_size(count):
    model, _ = static_model(count=count)  # the group size is 8 * 8 * 4 = 256
    assert_skipped(model, "the sum of weights is not a constant equal to the group size 256")


def test_sum_of_weights_of_a_non_statistics_shape():
    model, _ = static_model(sw_shape=[2, 1, 1, 1, 4])
    assert_skipped(model, "the constant sum of weights has shape [2, 1, 1, 1, 4], not a statistics shape")


@pytest.mark.parametrize(
    "moments_kw, reason",
    [
        ({"zero_mean": 1.0}, "the mean fallback is not the constant 0"),
        ({"zero_var": 1.0}, "the variance fallback is not the constant 0"),
        ({"zero": 1.0}, "div_no_nan's zero is not the constant 0"),
    ],
    ids=["mean", "variance", "equal"],
)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_nonzero_div_no_nan_fallback(moments_kw, reason, kind):
    if kind == "dynamic":
        model = dynamic_model(moments_kw=moments_kw)[0]
    else:
        model = static_model(moments_kw=moments_kw)[0]
    assert_skipped(model, reason)


def test_wrong_reduce_axes():
    model, _ = static_model(axes=[1, 2, 3])
    assert_skipped(model, "reduces axes [1, 2, 3], not [1, 2, 4] (all but batch and group)")


def test_epsilon_not_a_scalar():
    model, _, _ = dynamic_model(eps_array=np.full((1, 1, 1, 4, 1), 1e-3, np.float32))
    assert_skipped(model, "epsilon is not a non-negative scalar constant")


def test_gamma_reshaped_from_the_wrong_length():
    # gamma is per group ([G] reshaped to [1, 1, 1, G, 1]), not per channel
    model, _ = static_model()
    gamma = np.linspace(0.5, 2, 4, dtype=np.float32)
    reciprocal = next(n.output[0] for n in model.graph.node if n.op_type == "Reciprocal")
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.input[0] == reciprocal)
    model.graph.initializer.append(numpy_helper.from_array(gamma, "gamma_g"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 1, 4, 1], np.int64), "gamma_shape"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["gamma_g", "gamma_shape"], ["gamma_r"], name="gamma_reshape"))
    mul.input[1] = "gamma_r"
    assert_skipped(model, "gamma is reshaped from shape [4], not [16]")


def test_final_reshape_does_not_restore_the_input_shape():
    model, _ = static_model(out_target=[2, 8, 16, 8])
    assert_skipped(model, "does not restore the input shape")


def test_intermediate_graph_output_is_not_fused():
    model, _, b = dynamic_model()
    where = next(n.output[0] for n in b.nodes if n.op_type == "Where")
    model.graph.output.append(helper.make_tensor_value_info(where, F32, None))
    fused, report = fuse(model)
    assert ours(fused) == [] and report.fused == []
