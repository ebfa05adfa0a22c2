"""Keras 3.6 + tf2onnx with float16 / mixed_float16 policies (rules.keras36_fp16,
``Keras36Float16GroupNormFusion``): float32 moments of ``Cast(xg, FLOAT)``, each clipped to
+-65504 and cast to float16; rsqrt and affine in float16 (research doc §2.3).
Graphs are built here with onnx.helper (tests/keras_graphs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from keras_graphs import (
    F16,
    F32,
    Builder,
    assert_fused,
    assert_skipped,
    keras_group_norm,
    ours,
    random_input,
    tf_dynamic_out_target,
)
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter.rules._keras import VARIANT_SUFFIX as SUFFIX

RULE = "Keras36Float16GroupNormFusion"


def clip_moments(*, bound=65504.0, low=None, form="attr", stats_to=F16, mean_to=F16):
    """TF's moments for a 16-bit input: float32 statistics, Min(bound)/Max(low), Cast."""
    low = -bound if low is None else low

    def moments(b, xs, ctx):
        def reduce_mean(v):
            if form == "gap":
                return b.op("GlobalAveragePool", v)
            if form == "attr":
                return b.op("ReduceMean", v, axes=ctx.axes, keepdims=1)
            return b.op("ReduceMean", v, b.i64(ctx.axes), keepdims=1, noop_with_empty_axes=1)

        def clip_cast(v, to):
            clipped = b.op("Max", b.op("Min", v, b.const(np.float32(bound))), b.const(np.float32(low)))
            return b.op("Cast", clipped, to=to)

        mean32 = reduce_mean(xs)
        d = b.op("Sub", xs, mean32)  # the UNclipped mean
        var32 = reduce_mean(b.op("Mul", d, d))
        return clip_cast(mean32, mean_to), clip_cast(var32, stats_to)

    return moments


def stats_cast(to=F32):
    return lambda b, xg: b.op("Cast", xg, to=to)


def k36_layer(b, x, shape, groups, *, moments=None, cast_to=F32, **kwargs):
    kwargs.setdefault("dtype", np.float16)
    return keras_group_norm(b, x, shape, groups, moments or clip_moments(), stats_input=stats_cast(cast_to), affine_on_xg=True, **kwargs)


def k36_model(shape, groups, *, opset=17, extra_outputs=(), in_elem=F16, **kwargs):
    b = Builder()
    gn = k36_layer(b, "x", shape, groups, **kwargs)
    outputs = [(gn.y, in_elem, list(shape))] + [(n, F32, None) for n in extra_outputs]
    return b.model([("x", in_elem, list(shape))], outputs, opset=opset), gn


def data(rng, shape, batch=2, dtype=np.float16):
    return random_input(rng, shape, dtype=dtype, sizes={"N": batch})


# -- matching variants ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_scale_center(scale, center, rng):
    model, gn = k36_model(("N", 8, 8, 16), 4, scale=scale, center=center)
    assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE + SUFFIX[(scale, center)])


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        (("N", 8, 8, 16), 4, {"opset": 13}),
        (("N", 8, 8, 16), 8, {"clip": {"form": "input"}, "opset": 18}),
        (("N", 12, 8), 2, {}),  # rank 3
        (("N", 16), 4, {}),  # rank 2 (ReduceMean form)
        (("N", 8, 8, 16), 4, {"swap": True}),
        (("N", 8, 8, 16), 4, {"rsqrt": "div"}),
        (("N", 8, 8, 16), 16, {"epsilon": 1e-5}),
        (("N", 16, 4, 4), 4, {"axis": 1}),  # channels-first with ReduceMean
    ],
    ids=["op13", "op18-axes-input", "r3", "r2", "swapped", "div", "gC", "nchw-reducemean"],
)
def test_variants(shape, groups, kwargs, rng):
    clip = kwargs.pop("clip", {})
    model, gn = k36_model(shape, groups, moments=clip_moments(**clip), **kwargs)
    assert_fused(model, gn, data(rng, shape))


def test_epsilon_is_the_float16_constant(rng):
    model, gn = k36_model(("N", 8, 8, 16), 4, epsilon=1e-3)
    assert gn.epsilon == float(np.float16(1e-3))  # 0.0010004..., what Keras 3.6 writes
    fused, _ = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)))
    eps = next(a.f for a in ours(fused)[0].attribute if a.name == "epsilon")
    assert eps == pytest.approx(0.0010004043579101562, rel=1e-7)


def test_mixed_float16_behind_a_cast_of_the_float32_input(rng):
    """mixed_float16: the float32 graph input is cast to float16 (and transposed, as around a
    Conv); the final target is computed from Shape of the tensor before the Transpose."""
    b = Builder()
    x16 = b.op("Cast", "inp", to=F16)
    nchw = b.op("Transpose", x16, perm=[0, 3, 1, 2])
    t = b.op("Transpose", nchw, perm=[0, 2, 3, 1])
    out_target = tf_dynamic_out_target(b, nchw, [0, 2, 3, 1], ["N", 8, 8, 16])
    gn = k36_layer(b, t, ("N", 8, 8, 16), 4, out_target=out_target)
    model = b.model([("inp", F32, ["N", 8, 8, 16])], [(gn.y, F16, ["N", 8, 8, 16])])
    inp = data(rng, ("N", 8, 8, 16), dtype=np.float32)
    fused, _ = assert_fused(model, gn, inp, inp.astype(np.float16))
    assert ours(fused)[0].input[0] == t


def test_with_beta_is_fused_by_the_full_rule(rng):
    model, gn = k36_model(("N", 8, 8, 16), 4)
    _, report = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)), rule=RULE)
    assert report.skipped == []


def test_not_claimed_by_the_float32_tf2onnx_rule(rng):
    model, gn = k36_model(("N", 8, 8, 16), 4, center=False)
    _, report = assert_fused(model, gn, data(rng, ("N", 8, 8, 16)))
    assert report.fused[0].rule.startswith(RULE)


def test_channels_first_global_average_pool(rng):
    model, gn = k36_model(("N", 16, 4, 4), 4, axis=1, moments=clip_moments(form="gap"))
    assert_fused(model, gn, data(rng, ("N", 16, 4, 4)))


# -- near misses ---------------------------------------------------------------------------


@pytest.mark.parametrize("bound, low, which", [(60000.0, None, "mean"), (65504.0, -60000.0, "mean"), (65504.0, 65504.0, "mean")])
def test_clip_bound_not_65504(bound, low, which):
    model, _ = k36_model(("N", 8, 8, 16), 4, moments=clip_moments(bound=bound, low=low))
    assert_skipped(model, f"the {which} is not clipped to exactly [-65504, 65504]")


def test_variance_clip_bound_not_65504():
    # only the variance's upper bound differs
    b = Builder()
    gn = k36_layer(b, "x", ("N", 8, 8, 16), 4)
    mins = [n for n in b.nodes if n.op_type == "Min"]
    bound_name = b.const(np.float32(1000.0))
    mins[1].input[1] = bound_name
    model = b.model([("x", F16, ["N", 8, 8, 16])], [(gn.y, F16, ["N", 8, 8, 16])])
    assert_skipped(model, "the var is not clipped to exactly [-65504, 65504]")


def test_float32_input_is_not_this_pattern():
    # Same structure on a float32 input (Cast to FLOAT is a no-op, "clip" casts to FLOAT).
    model, _ = k36_model(("N", 8, 8, 16), 4, dtype=np.float32, moments=clip_moments(stats_to=F32, mean_to=F32), in_elem=F32)
    assert_skipped(model, "the float16 statistics pattern needs a float16 input")


def test_statistics_not_on_a_float32_cast():
    model, _ = k36_model(("N", 8, 8, 16), 4, cast_to=F16)  # Cast(xg, FLOAT16): a no-op, stats in f16
    assert_skipped(model, "the statistics are not computed on a float32 Cast of the grouped input")


def test_wrong_reduce_axes():
    model, _ = k36_model(("N", 8, 8, 16), 4, axes=[1, 2])
    assert_skipped(model, "reduces axes [1, 2], not [1, 2, 4] (all but batch and group)")


def test_epsilon_not_a_scalar():
    model, _ = k36_model(("N", 8, 8, 16), 4, eps_array=np.full((1, 1, 1, 4, 1), 1e-3, np.float16))
    assert_skipped(model, "epsilon is not a non-negative scalar constant")


def test_gamma_in_the_wrong_layout():
    # [1, 1, 1, 1, 4]: per position within a group, not per channel.
    model, _ = k36_model(("N", 8, 8, 16), 4, gamma_array=np.linspace(0.5, 2, 4).astype(np.float16).reshape(1, 1, 1, 1, 4))
    assert_skipped(model, "gamma has shape [1, 1, 1, 1, 4], not the grouped layout [1, 1, 1, 4, 4]")


def test_grouping_that_does_not_split_the_channel_axis_in_place():
    model, _ = k36_model(("N", 4, 6, 16), 4, grouping=[-1, 6, 4, 4, 4], out_target=[-1, 4, 6, 16])
    assert_skipped(model, "does not split a static channel axis of")


def test_final_reshape_does_not_restore_the_input_shape():
    model, _ = k36_model(("N", 8, 8, 16), 4, out_target=[-1, 8, 4, 32])
    assert_skipped(model, "does not restore the input shape")


def test_intermediate_graph_output_is_not_fused():
    b = Builder()
    gn = k36_layer(b, "x", ("N", 8, 8, 16), 4)
    stats = next(n.output[0] for n in b.nodes if n.op_type == "Cast" and n.attribute[0].i == F32)
    model = b.model([("x", F16, ["N", 8, 8, 16])], [(gn.y, F16, ["N", 8, 8, 16]), (stats, F32, None)])
    fused, report = fuse(model, target="function")
    assert ours(fused) == [] and report.fused == []
