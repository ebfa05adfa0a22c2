"""Keras + torch through the TorchScript exporter (rules.keras_torch_torchscript,
``KerasTorchScriptGroupNormFusion``), research doc §3.2: moments ``ReduceMean(Mul(x, x)) -
Mul(m, m)``, rsqrt ``Div(1, Sqrt(Cast(Add(v, eps))))``, no-op Casts everywhere, and every
reshape target (gamma's and beta's too) computed at run time from Shape/Gather/Div/
Unsqueeze/Concat; or all of that constant-folded (``torch.onnx.export`` without
``dynamic_axes``). Graphs are built here with onnx.helper (Builder from tests/keras_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from keras_graphs import (
    F16,
    F32,
    GN,
    I64,
    Builder,
    assert_fused,
    assert_skipped,
    ours,
    random_input,
)
from onnx import helper
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter.rules._keras import VARIANT_SUFFIX

RULE = "KerasTorchScriptGroupNormFusion"
NP = {F32: np.float32, F16: np.float16}


def ts_group_norm(
    b: Builder,
    x: str,
    x_shape: Sequence,
    groups: int,
    *,
    axis: int = -1,
    epsilon: float = 1e-3,
    scale: bool = True,
    center: bool = True,
    elem: int = F32,  # x's dtype
    stats_casts: Sequence[int] = (F32,),  # the Casts after the grouping Reshape
    out_casts: Sequence[int] | None = None,  # the Casts before the final Reshape (default: one to elem)
    eps_cast: bool = True,  # the (no-op) Cast between Add(eps) and Sqrt
    param_elem: int | None = None,  # gamma/beta dtype (default: the statistics dtype)
    static: bool = False,  # constant-folded: constant targets, gamma/beta in grouped layout
    reduce_attr: bool = False,  # ReduceMean axes as attribute (opset 17)
    axes: Sequence[int] | None = None,  # override the statistics axes
    eps_array: np.ndarray | None = None,  # the epsilon constant as written
    param_swap: bool = False,  # gamma/beta reshaped to [.., C/G, G] instead of [.., G, C/G]
    out_order: Sequence[int] | None = None,  # dims of the final target, by index into x's shape
    seed: int = 0,
) -> tuple[GN, str]:
    """The nodes of one Keras GroupNormalization as the TorchScript exporter writes them.
    Returns the layer's parameters and the name of the mean (for near misses)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    ax = axis % rank
    channels = x_shape[ax]
    cpg = channels // groups
    stats = stats_casts[-1] if stats_casts else elem
    param_elem = param_elem or stats
    out_casts = list(out_casts) if out_casts is not None else [elem]
    gamma = rng.normal(1, 0.5, channels).astype(NP[param_elem]) if scale else None
    beta = rng.normal(0, 0.5, channels).astype(NP[param_elem]) if center else None

    xc = b.op("Cast", x, to=elem)  # the no-op copy whose Shape feeds the targets
    unsq = lambda v: b.op("Unsqueeze", v, b.i64([0]))  # noqa: E731

    def dim(source, i):
        return b.op("Gather", b.op("Shape", source), np.asarray(i, np.int64), axis=0)

    def per_group(source):
        """Cast(Cast(Div(Gather(Shape(source), C axis), G), INT64), INT64): C/G at run time."""
        div = b.op("Div", dim(source, ax), np.asarray(groups, np.int64))
        return b.op("Cast", b.op("Cast", div, to=I64), to=I64)

    grouped = [1] * (rank + 1)
    grouped[ax], grouped[ax + 1] = (cpg, groups) if param_swap else (groups, cpg)
    if static:
        grouping = b.i64([-1, *x_shape[1:ax], groups, cpg, *x_shape[ax + 1 :]])
        param_target = None
        out_target = b.i64([x_shape[i] for i in (out_order or range(rank))])
    else:
        cg = unsq(per_group(x))
        parts = [b.i64([-1])] + [unsq(dim(x, i)) for i in range(1, ax)] + [b.i64([groups]), cg]
        parts += [unsq(dim(x, i)) for i in range(ax + 1, rank)]
        grouping = b.op("Concat", *parts, axis=0)
        cg2 = unsq(per_group(xc))
        split = [cg2, b.i64([groups])] if param_swap else [b.i64([groups]), cg2]
        param_target = b.op("Concat", *[b.i64([1])] * ax, *split, *[b.i64([1])] * (rank - 1 - ax), axis=0)
        out_target = b.op("Concat", *[unsq(dim(xc, i)) for i in (out_order or range(rank))], axis=0)

    def param(array):
        if param_target is None:
            value = b.const(array.reshape(grouped))
        else:
            value = b.op("Reshape", b.const(array), param_target, allowzero=0)
        return b.op("Cast", value, to=stats) if param_elem != stats else value

    xs = b.op("Reshape", xc, grouping, allowzero=0, name=b.fresh("group_reshape"))
    for to in stats_casts:
        xs = b.op("Cast", xs, to=to)
    stat_axes = list(axes) if axes is not None else [i for i in range(1, rank + 1) if i != ax]

    def reduce_mean(v):
        if reduce_attr:
            return b.op("ReduceMean", v, axes=stat_axes, keepdims=1)
        return b.op("ReduceMean", v, b.i64(stat_axes), keepdims=1)

    mean = reduce_mean(xs)
    var = b.op("Sub", reduce_mean(b.op("Mul", xs, xs)), b.op("Mul", mean, mean))
    eps_const = eps_array if eps_array is not None else np.asarray(epsilon, NP[stats])
    summed = b.op("Add", var, b.const(eps_const))
    if eps_cast:
        summed = b.op("Cast", summed, to=stats)
    inv = b.op("Div", np.asarray(1.0, NP[stats]), b.op("Sqrt", summed))
    if scale:
        inv = b.op("Mul", inv, param(gamma))
    shift = b.op("Mul", b.op("Neg", mean), inv)
    if center:
        shift = b.op("Add", shift, param(beta))
    yg = b.op("Add", b.op("Mul", xs, inv), shift)
    for to in out_casts:
        yg = b.op("Cast", yg, to=to)
    y = b.op("Reshape", yg, out_target, allowzero=0, name=b.fresh("out_reshape"))
    keras_axis = -1 if ax == rank - 1 else ax
    eps_value = float(np.asarray(eps_const).reshape(-1)[0])
    return GN(y, groups, keras_axis, eps_value, gamma, beta), mean


def ts_model(shape, groups, *, opset=20, **kwargs):
    """A model with one TorchScript-style GroupNormalization on input ``x`` of ``shape``."""
    b = Builder()
    gn, mean = ts_group_norm(b, "x", shape, groups, **kwargs)
    elem = kwargs.get("elem", F32)
    return b.model([("x", elem, list(shape))], [(gn.y, elem, list(shape))], opset=opset), gn, mean


def data(rng, shape, dtype=np.float32, sizes=None):
    """Symbolic dims take ``sizes`` (default batch 3, other dims 5)."""
    return random_input(rng, shape, dtype=dtype, sizes={"N": 3, **{d: 5 for d in shape if isinstance(d, str) and d != "N"}, **(sizes or {})})


NHWC = ("N", 8, 8, 16)

# -- matching variants ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_scale_center(scale, center, rng):
    model, gn, _ = ts_model(NHWC, 4, scale=scale, center=center)
    fused, report = assert_fused(model, gn, data(rng, NHWC), rule=RULE + VARIANT_SUFFIX[(scale, center)])
    assert report.skipped == []
    # gamma/beta are the raw [C] parameters, not their run-time Reshapes
    for name in filter(None, ours(fused)[0].input[1:]):
        assert name in {init.name for init in fused.graph.initializer}


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        (("N", 16, 8, 8), 4, {"axis": 1}),  # channels-first
        (("N", 16, "H", "W"), 8, {"axis": 1}),  # channels-first, dynamic H/W
        (("N", "H", "W", 16), 4, {}),  # channels-last, dynamic H/W
        (("N", 8, 8), 2, {}),  # rank 3
        (("N", 16), 4, {}),  # rank 2 (Dense)
        (("N", 4, 4, 4, 8), 4, {}),  # rank 5
        (("N", 8, 8, 16), 1, {"epsilon": 1e-5}),  # groups=1
        (("N", 8, 8, 8), 8, {}),  # groups=-1 (= C)
        (("N", 8, 8, 64), 32, {"epsilon": 1e-6}),
        (("N", 8, 8, 16), 4, {"reduce_attr": True, "opset": 17}),  # axes attribute
        (("N", 8, 8, 16), 4, {"eps_cast": False, "stats_casts": (), "out_casts": ()}),  # Casts optional
        ((3, 8, 8, 16), 4, {"static": True, "reduce_attr": True, "opset": 17}),  # constant-folded
        ((3, 8, 8, 16), 4, {"static": True, "opset": 20}),
        ((3, 16, 8, 8), 8, {"static": True, "axis": 1, "opset": 18}),
    ],
    ids=["nchw", "nchw-dynhw", "nhwc-dynhw", "r3", "r2", "r5", "g1", "gC", "g32", "axes-attr", "no-casts", "static-op17", "static-op20", "static-nchw"],
)
def test_variants(shape, groups, kwargs, rng):
    opset = kwargs.get("opset", 20)
    model, gn, _ = ts_model(shape, groups, **kwargs)
    fused, _ = assert_fused(model, gn, data(rng, shape, sizes={"N": 3, "H": 6, "W": 5}), rule=RULE)
    assert fused.opset_import[0].version == opset


def test_float16_policy(rng):
    """float16: f16 grouping Reshape, Cast(FLOAT) twice, f16 [C] gamma/beta reshaped then
    Cast(FLOAT), the result cast back to float16 twice; the op computes in float32 too."""
    model, gn, _ = ts_model(NHWC, 4, elem=F16, stats_casts=(F32, F32), out_casts=(F16, F16), param_elem=F16)
    fused, report = assert_fused(model, gn, data(rng, NHWC, np.float16), rule=RULE)
    assert report.fused[0].overload.startswith("cl_float16")
    inits = {init.name: init.data_type for init in fused.graph.initializer}
    assert [inits[name] for name in ours(fused)[0].input[1:]] == [F16, F16]


def test_mixed_float16_policy(rng):
    """mixed_float16: float16 activations, float32 gamma/beta (no Cast on them)."""
    model, gn, _ = ts_model(NHWC, 4, elem=F16, stats_casts=(F32, F32), out_casts=(F16, F16), param_elem=F32)
    assert_fused(model, gn, data(rng, NHWC, np.float16), rule=RULE)


def test_float16_without_stash(rng):
    """float16 statistics (no Cast to float32 at all, only no-op ones) also fuse."""
    model, gn, _ = ts_model(NHWC, 4, elem=F16, stats_casts=(F16,), out_casts=(F16,))
    assert_fused(model, gn, data(rng, NHWC, np.float16), rule=RULE)


def test_two_layers_in_a_chain(rng):
    b = Builder()
    gn1, _ = ts_group_norm(b, "x", NHWC, 4, seed=1)
    b.prefix = "gn2"
    gn2, _ = ts_group_norm(b, gn1.y, NHWC, 8, seed=2)
    model = b.model([("x", F32, list(NHWC))], [(gn2.y, F32, list(NHWC))], opset=20)
    fused, report = fuse(model, verify=True)
    assert [layer.groups for layer in sorted(report.fused, key=lambda f: f.groups)] == [4, 8]
    assert len(ours(fused)) == 2 and report.verification.passed


# -- near misses ----------------------------------------------------------------------------


def test_wrong_reduce_axes_are_rejected():
    model, _, _ = ts_model(NHWC, 4, axes=[1, 2])
    assert_skipped(model, "reduces axes [1, 2], not [1, 2, 4]")


def test_non_scalar_epsilon_is_rejected():
    eps = np.full([1, 1, 1, 4, 1], 1e-3, np.float32)
    model, _, _ = ts_model(NHWC, 4, eps_array=eps)
    assert_skipped(model, "epsilon is not a non-negative scalar constant")


def test_gamma_in_the_wrong_layout_is_rejected():
    """gamma/beta reshaped at run time to [1, 1, 1, C/G, G]: the target is evaluated
    symbolically and does not give the grouped layout [1, 1, 1, G, C/G]."""
    model, _, _ = ts_model(("N", 8, 8, 32), 4, param_swap=True)
    assert_skipped(model, "gamma is reshaped to [1, 1, 1, 8, 4], not the grouped layout [1, 1, 1, 4, 8]")


def test_gamma_rounded_by_its_cast_is_rejected():
    """float32 gamma/beta cast down to float16 statistics: the Cast rounds them."""
    model, _, _ = ts_model(NHWC, 4, elem=F16, stats_casts=(F16,), out_casts=(F16,), param_elem=F32)
    assert_skipped(model, "gamma is cast from FLOAT to FLOAT16, which rounds it")


def test_first_cast_that_is_not_a_no_op_is_rejected():
    """float32 input, statistics in float16: Keras would not round the input."""
    model, _, _ = ts_model(NHWC, 4, stats_casts=(F16,), out_casts=(F32,))
    assert_skipped(model, "Cast after the grouping Reshape goes from FLOAT to FLOAT16")


def test_second_cast_back_to_float16_is_rejected():
    """Cast(FLOAT) then Cast(FLOAT16): the statistics are float16 after all, the op would
    compute them in float32."""
    model, _, _ = ts_model(NHWC, 4, elem=F16, stats_casts=(F32, F16), out_casts=(F16,))
    assert_skipped(model, "the second Cast after the grouping Reshape goes to FLOAT16, not FLOAT")


def test_final_reshape_with_swapped_dims_is_rejected():
    """The final target reads H and W in the wrong order; with symbolic H, W it is not
    provably the input shape."""
    model, _, _ = ts_model(("N", "H", "W", 16), 4, out_order=[0, 2, 1, 3])
    assert_skipped(model, "does not restore the input shape")


def test_intermediate_used_elsewhere_is_not_fused():
    model, _, mean = ts_model(NHWC, 4)
    model.graph.output.append(helper.make_tensor_value_info(mean, F32, None))
    fused, report = fuse(model)
    assert ours(fused) == [] and report.fused == []
