"""Keras + TensorFlow through tf2onnx (rules.tf2onnx, ``KerasTFGroupNormFusion``): the moments
``ReduceMean(x)``, ``ReduceMean((x - m)^2)`` (or GlobalAveragePool), research doc §2.1-2.2.
Graphs are built here with onnx.helper (tests/keras_graphs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_ort
from keras_graphs import (
    F16,
    F32,
    F64,
    I32,
    I64,
    Builder,
    assert_fused,
    assert_skipped,
    attrs_of,
    keras_group_norm,
    ours,
    random_input,
    reference,
    tf_dynamic_out_target,
)
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter.rules._keras import VARIANT_SUFFIX

RULE = "KerasTFGroupNormFusion"


def tf_moments(form: str = "attr"):
    """tf.nn.moments as tf2onnx writes it: ReduceMean with axes as attribute (opset < 18),
    as input (opset 18), or GlobalAveragePool."""

    def moments(b, xs, ctx):
        def reduce_mean(v):
            if form == "gap":
                return b.op("GlobalAveragePool", v)
            if form == "attr":
                return b.op("ReduceMean", v, axes=ctx.axes, keepdims=1)
            return b.op("ReduceMean", v, b.i64(ctx.axes), keepdims=1, noop_with_empty_axes=1)

        mean = reduce_mean(xs)
        d = b.op("Sub", xs, mean)
        return mean, reduce_mean(b.op("Mul", d, d))

    return moments


def tf_model(shape, groups, *, form="attr", opset=17, extra_outputs=(), out_elem=F32, **kwargs):
    """A model with one tf2onnx-style GroupNormalization on input ``x`` of ``shape``
    (batch ``"N"`` is symbolic)."""
    b = Builder()
    gn = keras_group_norm(b, "x", shape, groups, tf_moments(form), **kwargs)
    outputs = [(gn.y, out_elem, list(shape))]
    outputs += [(name, F32, None) for name in extra_outputs]
    return b.model([("x", F32, list(shape))], outputs, opset=opset), gn


def data(rng, shape, batch=2, dtype=np.float32):
    return random_input(rng, shape, dtype=dtype, sizes={"N": batch})


# -- matching variants ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_scale_center(scale, center, rng):
    model, gn = tf_model(("N", 8, 8, 16), 4, scale=scale, center=center)
    assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE + VARIANT_SUFFIX[(scale, center)])


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        (("N", 8, 8, 16), 4, {"form": "attr", "opset": 13}),
        (("N", 8, 8, 16), 4, {"form": "attr", "opset": 17}),
        (("N", 8, 8, 16), 4, {"form": "input", "opset": 18}),
        (("N", 16, 4, 4), 4, {"form": "gap", "axis": 1}),  # channels-first -> GlobalAveragePool
        (("N", 8, 6), 2, {"form": "gap", "axis": 1}),
        (("N", 16), 4, {"form": "gap"}),  # rank-2 channels-last: axes [2] -> GlobalAveragePool
        (("N", 12, 8), 4, {"form": "attr"}),  # rank 3
        (("N", 4, 4, 4, 8), 2, {"form": "input", "opset": 18}),  # rank 5
        (("N", 8, 8, 16), 1, {}),  # groups=1
        (("N", 8, 8, 16), 16, {"epsilon": 1e-5}),  # groups=-1 (= C)
        (("N", 8, 8, 16), 4, {"swap": True}),  # every Add/Mul operand order swapped
        (("N", 8, 8, 16), 4, {"swap": True, "form": "input", "opset": 18, "center": False}),
        (("N", 8, 8, 16), 4, {"rsqrt": "div"}),  # Div(1, Sqrt) instead of Reciprocal
        (("N", 8, 8, 16), 4, {"out_target": [2, 8, 8, 16], "batch": 2}),  # static signature
    ],
    ids=["attr-op13", "attr-op17", "input-op18", "gap-nchw", "gap-ncw", "gap-r2", "r3", "r5", "g1", "gC", "swapped", "swapped-nobeta", "div", "static"],
)
def test_variants(shape, groups, kwargs, rng):
    batch = kwargs.pop("batch", None)
    if batch is not None:
        shape = (batch, *shape[1:])
    model, gn = tf_model(shape, groups, **kwargs)
    fused, _ = assert_fused(model, gn, data(rng, shape))
    assert fused.opset_import[0].version == kwargs.get("opset", 17)


def test_epsilon_first_in_its_add(rng):
    model, gn = tf_model(("N", 8, 8, 16), 4, swap_eps=True)
    assert_fused(model, gn, data(rng, ("N", 8, 8, 16)))


def test_float64(rng):
    b = Builder()
    gn = keras_group_norm(b, "x", ("N", 8, 8, 16), 4, tf_moments(), dtype=np.float64)
    model = b.model([("x", F64, ["N", 8, 8, 16])], [(gn.y, F64, ["N", 8, 8, 16])])
    assert_fused(model, gn, rng.normal(0, 1, (2, 8, 8, 16)))


def test_keras315_float16_statistics_in_float32(rng):
    """Keras 3.15 float16: Cast(FLOAT) after the grouping Reshape, float32 constants,
    Cast(FLOAT16) before the final Reshape."""
    b = Builder()
    gn = keras_group_norm(
        b, "x", ("N", 8, 8, 16), 4, tf_moments(), dtype=np.float16, param_dtype=np.float32,
        stats_input=lambda b, xg: b.op("Cast", xg, to=F32), out_cast=F16,
    )
    model = b.model([("x", F16, ["N", 8, 8, 16])], [(gn.y, F16, ["N", 8, 8, 16])])
    assert_fused(model, gn, rng.normal(0, 1, (2, 8, 8, 16)).astype(np.float16))


def test_negative_reduce_axes(rng):
    model, gn = tf_model(("N", 8, 8, 16), 4, axes=[-4, -3, -1])
    assert_fused(model, gn, data(rng, ("N", 8, 8, 16)))


def test_no_op_cast_after_grouping_is_accepted(rng):
    def cast(b, xg):
        return b.op("Cast", xg, to=F32)

    model, gn = tf_model(("N", 8, 8, 16), 4, stats_input=cast, out_cast=F32)
    assert_fused(model, gn, data(rng, ("N", 8, 8, 16)))


def test_beta_folded_away_is_the_no_beta_rule(rng):
    # Grappler drops "+ beta" when beta is all zeros: the center=False form.
    model, gn = tf_model(("N", 8, 8, 16), 4, center=False)
    fused, report = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE + "NoBeta")
    assert len(ours(fused)[0].input) == 2


def test_with_beta_is_fused_by_the_full_rule(rng):
    """Rule order: the NoBeta variant would see ``shift + beta`` as a bare shift; the full
    rule comes first and claims it."""
    model, gn = tf_model(("N", 8, 8, 16), 4, swap=True)
    _, report = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE)
    assert report.skipped == []


def conv_then_transpose(b, channels_in, channels):
    """``Transpose(Conv1x1(inp), NCHW->NHWC)``; returns (output, weight, bias)."""
    rng = np.random.default_rng(7)
    weight = rng.normal(0, 0.5, (channels, channels_in, 1, 1)).astype(np.float32)
    bias = rng.normal(0, 0.5, channels).astype(np.float32)
    conv = b.op("Conv", "inp", b.const(weight), b.const(bias), kernel_shape=[1, 1], name="conv")
    return conv, b.op("Transpose", conv, perm=[0, 2, 3, 1]), weight, bias


def test_dynamic_targets_read_the_conv_output_before_its_transpose(rng):
    """Both reshape targets are computed from Shape(conv output, NCHW) -> Gather(perm) ->
    Cast INT32 -> Slice -> Concat -> Cast INT64, not from the tensor being reshaped."""
    b = Builder()
    conv, t, weight, bias = conv_then_transpose(b, 8, 16)
    s32 = b.op("Cast", b.op("Gather", b.op("Shape", conv), b.i64([0, 2, 3, 1])), to=I32)
    sl = lambda i: b.op("Slice", s32, b.i64([i]), b.i64([i + 1]), b.i64([0]))  # noqa: E731
    grouping = b.op("Cast", b.op("Concat", b.i32([-1]), sl(1), sl(2), b.i32([4]), b.i32([4]), axis=0), to=I64)
    out_target = tf_dynamic_out_target(b, conv, [0, 2, 3, 1], ["N", "H", "W", 16])
    gn = keras_group_norm(b, t, ("N", "H", "W", 16), 4, tf_moments("attr"), grouping=grouping, out_target=out_target)
    model = b.model([("inp", F32, ["N", 8, "H", "W"])], [(gn.y, F32, ["N", "H", "W", 16])])
    inp = rng.normal(0, 1, (2, 8, 5, 3)).astype(np.float32)
    x = (np.einsum("nchw,oc->nhwo", inp, weight[:, :, 0, 0]) + bias).astype(np.float32)
    fused, _ = assert_fused(model, gn, inp, x)
    assert ours(fused)[0].input[0] == t


def test_channels_first_unsqueeze_copy_dims_form(rng):
    """Channels-first with dynamic H/W: ``Reshape(Unsqueeze(x, [0]), [-1, G, C/G, 0, 0])``
    (the 0s copy H and W from the unsqueezed tensor), GlobalAveragePool moments."""
    b = Builder()
    unsq = b.op("Unsqueeze", "x", b.i64([0]))
    out_target = tf_dynamic_out_target(b, "x", None, ["N", 16, "H", "W"])
    gn = keras_group_norm(
        b, "x", ("N", 16, "H", "W"), 4, tf_moments("gap"), axis=1, group_source=unsq, grouping=[-1, 4, 4, 0, 0], out_target=out_target
    )
    model = b.model([("x", F32, ["N", 16, "H", "W"])], [(gn.y, F32, ["N", 16, "H", "W"])])
    fused, _ = assert_fused(model, gn, rng.normal(0, 1, (3, 16, 5, 7)).astype(np.float32))
    assert ours(fused)[0].input[0] == "x"
    assert not any(n.op_type == "Unsqueeze" for n in fused.graph.node)


def test_c_over_g_before_g_is_a_valid_grouping_with_c_over_g_groups(rng):
    """``[..., C/G, G]`` reduced like Keras' ``[..., G, C/G]`` (over all but batch and the
    second-to-last axis) is a GroupNormalization with C/G groups, and fuses as such."""
    model, gn = tf_model(("N", 8, 8, 16), 8, grouping=[-1, 8, 8, 8, 2])
    assert_fused(model, gn, data(rng, ("N", 8, 8, 16)))


def test_two_layers_in_a_row(rng):
    b = Builder()
    first = keras_group_norm(b, "x", ("N", 8, 8, 16), 4, tf_moments(), seed=1)
    relu = b.op("Relu", first.y)
    second = keras_group_norm(b, relu, ("N", 8, 8, 16), 8, tf_moments(), seed=2, swap=True)
    model = b.model([("x", F32, ["N", 8, 8, 16])], [(second.y, F32, ["N", 8, 8, 16])])
    fused, report = fuse(model, target="function")
    assert len(ours(fused)) == 2 and {f.groups for f in report.fused} == {4, 8}


# -- near misses ---------------------------------------------------------------------------


def test_wrong_reduce_axes():
    model, _ = tf_model(("N", 8, 8, 16), 4, axes=[2, 4])
    assert_skipped(model, "reduces axes [2, 4], not [1, 2, 4] (all but batch and group)")


def test_c_over_g_g_layout_reduced_over_c_over_g_is_rejected():
    # A [..., C/G, G] grouping whose statistics keep the LAST axis (G) is not Keras' layout.
    model, _ = tf_model(("N", 8, 8, 16), 2, grouping=[-1, 8, 8, 8, 2], axes=[1, 2, 3])
    assert_skipped(model, "reduces axes [1, 2, 3], not [1, 2, 4]")


def test_grouping_that_does_not_split_the_channel_axis_in_place():
    # [N, 4, 6, 16] -> [-1, 6, 4, 4, 4]: rank + 1, but H and W are exchanged.
    model, _ = tf_model(("N", 4, 6, 16), 4, grouping=[-1, 6, 4, 4, 4], out_target=[-1, 4, 6, 16])
    assert_skipped(model, "does not split a static channel axis of")


def test_epsilon_not_a_scalar():
    eps = np.array([1e-3, 2e-3, 3e-3, 4e-3], np.float32).reshape(1, 1, 1, 4, 1)
    model, _ = tf_model(("N", 8, 8, 16), 4, eps_array=eps)
    assert_skipped(model, "epsilon is not a non-negative scalar constant")


def test_negative_epsilon():
    model, _ = tf_model(("N", 8, 8, 16), 4, eps_array=np.array(-1e-3, np.float32))
    assert_skipped(model, "epsilon is not a non-negative scalar constant")


def test_gamma_per_group_is_not_per_channel():
    gamma = np.linspace(0.5, 2, 4, dtype=np.float32).reshape(1, 1, 1, 4, 1)
    model, _ = tf_model(("N", 8, 8, 16), 4, gamma_array=gamma)
    assert_skipped(model, "gamma has shape [1, 1, 1, 4, 1], not the grouped layout [1, 1, 1, 4, 4]")


def test_beta_in_the_wrong_layout():
    beta = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 1, 1, 1, 4)
    model, _ = tf_model(("N", 8, 8, 16), 4, beta_array=beta)
    assert_skipped(model, "beta has shape [1, 1, 1, 1, 4], not the grouped layout [1, 1, 1, 4, 4]")


def test_final_reshape_does_not_restore_the_input_shape():
    model, _ = tf_model(("N", 8, 8, 16), 4, out_target=[-1, 8, 16, 8])
    assert_skipped(model, "the final Reshape (target [-1, 8, 16, 8]) does not restore the input shape")


def test_final_target_not_computable():
    b = Builder()
    gn = keras_group_norm(b, "x", ("N", 8, 8, 16), 4, tf_moments(), out_target="target")
    model = b.model([("x", F32, ["N", 8, 8, 16]), ("target", I64, [4])], [(gn.y, F32, None)])
    assert_skipped(model, "the final Reshape target cannot be evaluated")


def test_lossy_cast_of_the_grouped_tensor():
    def cast(b, xg):
        return b.op("Cast", xg, to=F16)

    model, _ = tf_model(("N", 8, 8, 16), 4, stats_input=cast, param_dtype=np.float16, out_cast=F32)
    assert_skipped(model, "Cast after the grouping Reshape goes from")


def test_cast_of_the_result_to_another_type():
    model, _ = tf_model(("N", 8, 8, 16), 4, out_cast=F16, out_elem=F16)
    assert_skipped(model, "Cast before the final Reshape goes to")


def test_intermediate_graph_output_is_not_fused():
    b = Builder()
    gn = keras_group_norm(b, "x", ("N", 8, 8, 16), 4, tf_moments())
    mean = next(n.output[0] for n in b.nodes if n.op_type == "ReduceMean")
    model = b.model([("x", F32, ["N", 8, 8, 16])], [(gn.y, F32, ["N", 8, 8, 16]), (mean, F32, None)])
    fused, report = fuse(model, target="function")
    assert ours(fused) == [] and report.fused == []


# -- a grouping Reshape that absorbed the reshape before it (RWKV-7 ln_x) ---------------------


def merged_model(*, grouping=(16, 4, 64), out_target=(1, 16, 256), **kwargs):
    """Keras' rank-2 GroupNormalization(groups=4) on the (B*T, C) = (16, 256) view of a
    (1, 16, 4, 64) tensor; tf2onnx merges the reshape to (16, 256) into the grouping one and
    the closing one into the reshape back to (1, 16, 256)."""
    b = Builder()
    gn = keras_group_norm(b, "x", (16, 256), 4, tf_moments("gap"), group_source="x4", grouping=list(grouping),
                          out_target=list(out_target), epsilon=64e-5, **kwargs)
    return b.model([("x4", F32, [1, 16, 4, 64])], [(gn.y, F32, None)]), gn


@pytest.mark.parametrize(
    "grouping, out_target",
    [((16, 4, 64), (1, 16, 256)), ((-1, 4, 64), (1, 16, 256)), ((-1, 4, 64), (-1, 256))],
    ids=["static", "inferred-rows", "closing-to-rows-c"],
)
def test_grouping_reshape_that_absorbed_the_one_before_it(grouping, out_target, rng):
    model, gn = merged_model(grouping=grouping, out_target=out_target)
    fused, report = fuse(model)
    assert report.skipped == [] and len(ours(fused)) == 1
    assert [n.op_type for n in fused.graph.node] == ["Reshape", "GroupNormalization", "Reshape"]
    attrs = attrs_of(ours(fused)[0])
    assert attrs["groups"] == 4 and attrs["axis"] == -1 and report.fused[0].channels == 256
    x4 = rng.normal(0.5, 2.0, (1, 16, 4, 64)).astype(np.float32)
    (actual,) = run_ort(fused, x4)
    expected = reference(x4.reshape(16, 256), gn).reshape(actual.shape)
    assert actual.size == expected.size
    ok, worst = tolerance_for(np.float32).check(actual, expected)
    assert ok, worst


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"gamma_array": np.ones((1, 64, 4), np.float32)}, "gamma has shape [1, 64, 4], not the grouped layout [1, 4, 64]"),
        ({"out_target": (1, 0, 256)}, "may copy a dim of the grouped tensor"),
        ({"axes": [1, 2]}, "reduces axes [1, 2], not [2]"),
    ],
    ids=["gamma-layout", "closing-copies-a-dim", "moments-over-groups"],
)
def test_merged_grouping_near_misses(kwargs, reason):
    if "axes" in kwargs:  # GlobalAveragePool always reduces [2]: state the axes with ReduceMean
        b = Builder()
        gn = keras_group_norm(b, "x", (16, 256), 4, tf_moments("attr"), group_source="x4", grouping=[16, 4, 64],
                              out_target=[1, 16, 256], **kwargs)
        model = b.model([("x4", F32, [1, 16, 4, 64])], [(gn.y, F32, None)])
    else:
        model, _ = merged_model(**kwargs)
    assert_skipped(model, reason)
