"""Our function body, run by onnxruntime (CPU) and by onnx's ReferenceEvaluator, against
the NumPy reference over ranks 2-5, every layout, groups, epsilons, affine variants,
dtypes, opsets and static/symbolic shapes."""

from __future__ import annotations

import collections
import itertools
import pathlib
import tempfile

import ml_dtypes
import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from helpers import run_ort
from onnx.reference import ReferenceEvaluator

from onnx_groupnorm import ops
from onnx_groupnorm.ops.tolerances import tolerance_for

# (shape, axis, groups): ranks 2-5; channels-last, channels-first, a middle axis (also
# written negative); groups 1, several, -1 and == C.
LAYOUTS = [
    ((3, 12), -1, 3),
    ((3, 12), 1, -1),
    ((2, 5, 12), -1, 4),
    ((2, 12, 5), 1, 3),
    ((2, 6, 6, 16), -1, 4),
    ((2, 6, 6, 16), -1, 1),
    ((2, 6, 6, 16), -1, -1),
    ((2, 16, 6, 6), 1, 4),
    ((2, 16, 6, 6), 1, 16),
    ((2, 5, 12, 4), 2, 3),
    ((2, 5, 12, 4), -2, 6),
    ((2, 3, 4, 5, 8), -1, 2),
    ((2, 8, 3, 4, 5), 1, 4),
]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
EPSILONS = [1e-3, 1e-5, 1e-6]


def _case(rng, shape, axis, groups, dtype, scale, center, param_dtype=None):
    channels = shape[axis]
    param_dtype = param_dtype or dtype
    x = rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 2), size=shape).astype(dtype)
    gamma = rng.normal(1.0, 0.5, size=channels).astype(param_dtype) if scale else None
    beta = rng.normal(0.0, 0.5, size=channels).astype(param_dtype) if center else None
    return x, gamma, beta


def _symbolic(shape, axis):
    """Every dimension symbolic except the channel axis."""
    axis %= len(shape)
    return [d if i == axis else f"s{i}" for i, d in enumerate(shape)]


def _exact(x, gamma, beta, **config):
    """The NumPy reference evaluated in float64 and rounded once to x's dtype: the truth we
    hold our body to (the reference in float32, like Keras, rounds x*inv and -mean*inv
    separately and is itself off by ~eps*|x*inv| when inv is large)."""
    f64 = [None if a is None else np.asarray(a).astype(np.float64) for a in (x, gamma, beta)]
    return ops.group_normalization(*f64, **config).astype(x.dtype)


def _assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    ok, worst = tolerance_for(dtype).check(actual, expected)
    assert ok, f"worst |error| / tolerance = {worst:.3g}"


@pytest.mark.parametrize("shape,axis,groups", LAYOUTS)
@pytest.mark.parametrize("scale,center", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_onnxruntime_matches_reference(rng, shape, axis, groups, scale, center, dtype):
    x, gamma, beta = _case(rng, shape, axis, groups, dtype, scale, center)
    epsilon = float(rng.choice(EPSILONS))
    expected = _exact(x, gamma, beta, groups=groups, axis=axis, epsilon=epsilon)
    for input_shape in (shape, _symbolic(shape, axis)):
        model = ops.make_model(
            input_shape, groups=groups, axis=axis, epsilon=epsilon, center=center,
            scale=scale, dtype=dtype, gamma=gamma, beta=beta,
        )
        (actual,) = run_ort(model, x)
        _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("opset", [13, 15, 17, 18, 21, 23])
@pytest.mark.parametrize("shape,axis,groups", [((2, 6, 6, 16), -1, 4), ((2, 16, 6, 6), 1, 4), ((2, 5, 12, 4), 2, 3)])
def test_every_supported_opset(rng, opset, shape, axis, groups):
    """The body is inlined with the model's opset: it must be valid from 13 on."""
    x, gamma, beta = _case(rng, shape, axis, groups, np.float32, True, True)
    model = ops.make_model(shape, groups=groups, axis=axis, gamma=gamma, beta=beta, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    (actual,) = run_ort(model, x)
    _assert_close(actual, _exact(x, gamma, beta, groups=groups, axis=axis), np.float32)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_float32_parameters_with_low_precision_input(rng, dtype):
    """Keras' mixed_float16 policy keeps gamma/beta in float32 while x is float16."""
    shape, axis, groups = (2, 6, 6, 16), -1, 4
    x, gamma, beta = _case(rng, shape, axis, groups, dtype, True, True, param_dtype=np.float32)
    model = ops.make_model(shape, groups=groups, axis=axis, dtype=dtype, gamma=gamma, beta=beta)
    (actual,) = run_ort(model, x)
    _assert_close(actual, _exact(x, gamma, beta, groups=groups, axis=axis), dtype)


@pytest.mark.parametrize("shape,axis,groups", LAYOUTS[::2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_reference_evaluator_runs_the_same_model(rng, shape, axis, groups, dtype):
    """A second runtime: onnx's ReferenceEvaluator on the model with its function inlined.

    (onnx 1.23's evaluator looks up an op's schema by op type alone, so a custom-domain node
    called GroupNormalization is checked against the standard op's attributes; inlining the
    function, like onnx's own ``*_expanded`` backend tests, runs exactly our body.)
    """
    x, gamma, beta = _case(rng, shape, axis, groups, dtype, True, True)
    model = ops.make_model(_symbolic(shape, axis), groups=groups, axis=axis, dtype=dtype, gamma=gamma, beta=beta)
    inlined = onnx.inliner.inline_local_functions(model)
    (actual,) = ReferenceEvaluator(inlined).run(None, {"X": x})
    _assert_close(actual, _exact(x, gamma, beta, groups=groups, axis=axis), dtype)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "middle"])
def test_large_mean_stays_accurate(rng, layout):
    """Mean 1e3, std 1e-2 in float32: max |y - y64| / (1 + |y64|) <= 1e-4 against float64.

    A plain float32 two-pass (the NumPy reference itself, in float32) reaches only ~1e-2,
    and ONNX GroupNormalization-21 (E[x^2] - E[x]^2) returns NaN or garbage here, see
    test_standard_op_fails_on_large_mean.
    """
    shape, axis = {"channels_first": ((2, 64, 16, 16), 1), "channels_last": ((2, 16, 16, 64), -1), "middle": ((2, 5, 64, 7), 2)}[layout]
    x = (1e3 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    gamma = rng.normal(1.0, 0.5, 64).astype(np.float32)
    beta = rng.normal(0.0, 0.5, 64).astype(np.float32)
    model = ops.make_model(shape, groups=8, axis=axis, gamma=gamma, beta=beta)
    (y,) = run_ort(model, x)
    y64 = ops.group_normalization(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), groups=8, axis=axis)
    assert np.max(np.abs(y - y64) / (1 + np.abs(y64))) <= 1e-4


def test_large_mean_with_the_worst_shift(rng):
    """The cf body's shift is every group's first element; the deviations it leaves are within
    sqrt(n - 1) standard deviations (no element lies further from its group's mean), so the
    output errs by at most ~eps * sqrt(n) standard deviations whatever that element is. Here each
    group's first element is an outlier (5 below a mean of 1e3; the rest has std 1e-2 around
    channel means 0.1 apart): the same bound as test_large_mean_stays_accurate holds."""
    shape, groups = (2, 64, 16, 16), 8
    offsets = 0.1 * np.arange(64).reshape(1, 64, 1, 1)
    x = (1e3 + offsets + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    x.reshape(2, groups, -1)[:, :, 0] = 1e3 - 5.0  # the first element of every group
    gamma = rng.normal(1.0, 0.5, 64).astype(np.float32)
    beta = rng.normal(0.0, 0.5, 64).astype(np.float32)
    model = ops.make_model(shape, groups=groups, axis=1, gamma=gamma, beta=beta)
    (y,) = run_ort(model, x)
    y64 = ops.group_normalization(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), groups=groups, axis=1)
    assert np.max(np.abs(y - y64) / (1 + np.abs(y64))) <= 1e-4


def test_channels_first_body_runs_six_kernels():
    """What onnxruntime runs per channels-first layer once it has inlined the body and folded its
    constants: Reshape, Slice (the shift), Sub, InstanceNormalization, Reshape, BatchNormalization.
    torch's export runs five (Reshape, InstanceNormalization, Reshape, Mul, Add); every extra
    kernel costs a launch that shows at ResNet's 7x7 layers
    (benchmarks/realsize/profile_gn_layers.py)."""
    model = ops.make_model((1, 64, 7, 7), groups=32, axis=1, gamma=np.ones(64, np.float32), beta=np.zeros(64, np.float32))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(pathlib.Path(d) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    kernels = collections.Counter(n.op_type for n in optimized.graph.node)
    assert kernels == {"Reshape": 2, "Slice": 1, "Sub": 1, "InstanceNormalization": 1, "BatchNormalization": 1}


def test_standard_op_fails_on_large_mean(rng):
    """Why the two-pass matters: the same input through ONNX GroupNormalization-21."""
    shape = (2, 64, 16, 16)
    x = (1e3 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    node = onnx.helper.make_node("GroupNormalization", ["X", "g", "b"], ["Y"], num_groups=8, epsilon=1e-3)
    graph = onnx.helper.make_graph(
        [node], "gn21",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(np.ones(64, np.float32), "g"), onnx.numpy_helper.from_array(np.zeros(64, np.float32), "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    y64 = ops.group_normalization(x.astype(np.float64), np.ones(64), np.zeros(64), groups=8, axis=1)
    (y_ort,) = run_ort(model, x)
    (y_body,) = ReferenceEvaluator(onnx.inliner.inline_local_functions(model), verbose=0).run(None, {"X": x})
    for y in (y_ort, y_body):
        err = np.abs(y - y64) / (1 + np.abs(y64))
        assert np.isnan(err).any() or err.max() > 1e-2


def test_function_is_attached_once_per_overload():
    model = ops.make_model((2, 16, 6, 6), groups=4, axis=1)
    ours = [f for f in model.functions if f.domain == ops.DOMAIN]
    assert [(f.name, f.overload) for f in ours] == [(ops.OP_TYPE, model.graph.node[0].overload)]
    assert {o.domain: o.version for o in model.opset_import}[ops.DOMAIN] == ops.VERSION
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("scale,center", AFFINE)
def test_disabled_affine_costs_nothing(scale, center):
    """center=False / scale=False: the body reads no gamma/beta and multiplies by no ones."""
    for shape, axis in (((2, 16, 6, 6), 1), ((2, 6, 6, 16), -1)):
        model = ops.make_model(shape, groups=4, axis=axis, center=center, scale=scale)
        node = model.graph.node[0]
        assert [n for n in node.input if n] == ["X"] + ["gamma"] * scale + ["beta"] * center
        (body,) = [f for f in model.functions if f.domain == ops.DOMAIN]
        used = {i for n in body.node for i in n.input}
        assert ("gamma" in used) == scale and ("beta" in used) == center
        if not (scale or center):
            assert not any(n.op_type == "BatchNormalization" for n in body.node)


@pytest.mark.parametrize("shape,axis,groups", [((2, 6, 6, 16), -1, 4), ((2, 16, 6, 6), 1, 4), ((2, 5, 12, 4), 2, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_silu_activation(rng, shape, axis, groups, dtype):
    x, gamma, beta = _case(rng, shape, axis, groups, dtype, True, True)
    model = ops.make_model(shape, groups=groups, axis=axis, dtype=dtype, gamma=gamma, beta=beta, activation=ops.ACTIVATION_SILU)
    onnx.checker.check_model(model, full_check=True)
    assert {a.name: a.i for a in model.graph.node[0].attribute if a.name == "activation"} == {"activation": 1}
    (actual,) = run_ort(model, x)
    expected = _exact(x, gamma, beta, groups=groups, axis=axis, activation=ops.ACTIVATION_SILU)
    _assert_close(actual, expected, dtype)
    plain = _exact(x, gamma, beta, groups=groups, axis=axis).astype(np.float64)
    np.testing.assert_allclose(expected.astype(np.float64), plain / (1 + np.exp(-plain)), rtol=1e-2, atol=1e-2)


def test_variant_overload_round_trip():
    for layout, dtype, scale, center in itertools.product(
        ops.functions.LAYOUTS,
        [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE],
        [True, False], [True, False],
    ):
        v = ops.Variant(layout, dtype, scale, center, scale and not center, *((16, 4, 4 if layout == "cl" else 0) if layout != "nd" else ()))
        assert ops.Variant.from_overload(v.overload) == v
    with pytest.raises(ValueError, match="not an overload"):
        ops.Variant.from_overload("something_else")
