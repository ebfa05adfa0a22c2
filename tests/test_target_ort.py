"""Target ``ort``: every corpus model still reproduces the framework's outputs, and on the block
models (Conv -> bias -> GroupNormalization -> SiLU -> Conv, residual Adds) the exporters' layout
Transposes around the GroupNormalizations are gone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from corpus import data, entries, load
from helpers import run_ort

from onnx_groupnorm import ops
from onnx_groupnorm.rewriter import FuseReport, fuse
from onnx_groupnorm.rewriter.report import UNSHIFTED_FORM
from onnx_groupnorm.rewriter.targets import ort_cpu

#: Block models -> (Transposes in the original, at most this many after the ort target).
#: The remaining ones are the model's own input/output layout changes (and, for the jax
#: block, the weight Transposes and the last Conv's output, which feeds no GroupNormalization).
BLOCKS = {
    "keras_tf_export_nhwc_r4_resblock_g8": 2,
    "keras_tf_cli_nhwc_r4_resblock_g4_opset18": 2,
    "keras_torch_export_ts_nhwc_r4_block_c32_g8": 2,
    "keras_torch_export_dynamo_nhwc_r4_block_c32_g8_initial": 2,
    "keras_jax_export_resblock_gn3": 6,
    # The second GroupNormalization feeds a residual Add with the NHWC graph input: moving it
    # would insert two Transposes to remove one, so only the first one moves.
    "keras_tf_fromkeras_nhwc_r4_resblock_g8_initial": 2,
}


def _transposes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Transpose")


def _ours(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def _check_outputs(fused, entry):
    inputs, expected = data(entry)
    actual = run_ort(fused, *inputs)
    tol = entry["tolerance"]
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        assert a.shape == e.shape
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"]))
def test_ort_target_matches_framework(entry):
    model = load(entry)
    fused, report = fuse(model, target="ort")
    assert len(report.fused) == entry["expected_group_norms"]
    assert len(_ours(fused)) == entry["expected_group_norms"]
    # Never more Transposes than the function target leaves.
    assert _transposes(fused) <= _transposes(fuse(model)[0])
    onnx.checker.check_model(fused, full_check=not (entry["hand_built"] and entry["opset"] < 21))
    _check_outputs(fused, entry)


@pytest.mark.parametrize("entry", entries(lambda e: e["negative"]))
def test_ort_target_leaves_negatives_alone(entry):
    model = load(entry)
    fused, report = fuse(model, target="ort")
    assert report.fused == [] and report.lowered == []
    assert fused.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("entry", entries(lambda e: e["name"] in BLOCKS))
def test_block_transposes_removed(entry):
    model = load(entry)
    before = _transposes(model)
    function_form, _ = fuse(model, target="function")
    fused, report = fuse(model, target="ort")
    after = _transposes(fused)
    assert after < before and after < _transposes(function_form)
    assert after <= BLOCKS[entry["name"]], f"{before} -> {after} Transposes"
    assert report.lowered, report.notes
    assert all(e["transposes_removed"] >= e["transposes_inserted"] for e in report.lowered)
    lowered = {e["node"] for e in report.lowered}
    for node in _ours(fused):
        axis = next(a.i for a in node.attribute if a.name == "axis")
        if node.name in lowered:
            assert axis == 1  # the channels-first (cf) body; the overload may be the default ""
    _check_outputs(fused, entry)


def test_block_with_nhwc_residual_keeps_second_layer_and_says_why():
    entry = next(e for e in entries() if e.values[0]["name"] == "keras_tf_fromkeras_nhwc_r4_resblock_g8_initial").values[0]
    _, report = fuse(load(entry), target="ort")
    assert len(report.lowered) == 1
    assert any("would remove 1 Transpose(s) and insert 2" in note for note in report.notes)


def test_channels_first_models_unchanged_by_ort_target():
    """No layout change on a channels-first model; torch's InstanceNormalization-form layers only
    lose the precision shift (``keep_export_arithmetic``), unless ``precise``."""
    entry = next(e for e in entries() if e.values[0]["name"] == "torch_gn_ts_block_c32_g8_opset17_dynbatch").values[0]
    model = load(entry)
    function_form, _ = fuse(model, target="function")
    fused, report = fuse(model, target="ort")
    assert report.lowered and all(e["form"] == UNSHIFTED_FORM for e in report.lowered)
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in function_form.graph.node]
    assert all(n.overload.endswith("_unshifted") or not n.overload for n in _ours(fused))
    precise, precise_report = fuse(model, target="ort", precise=True)
    assert precise_report.lowered == [] and precise_report.precise
    assert [n.overload for n in _ours(precise)] == [n.overload for n in _ours(function_form)]


#: A hard input for onnxruntime's InstanceNormalization: mean 1e3, std 1e-2 (its
#: ``x * (1/std) + (-mean/std)`` cancels two ~1e5 terms: torch's export errs ~1e-2 there).
HARD_MEAN, HARD_STD = 1e3, 1e-2
#: The export's error at the hard input is above this, so the checks below can tell a shifted
#: body from an unshifted one.
EXPORT_ERROR_ABOVE = 1e-4
#: Our shifted body at the hard input (``tests/test_op_function.py`` measures ~1e-7; 100x margin).
SHIFTED_TOL = 1e-5
#: Unshifted, the fused layer runs the export's InstanceNormalization on the same data; only the
#: affine (one BatchNormalization instead of Mul + Add) may round differently: a few float32 ulps
#: of outputs of magnitude ~3.
SAME_ARITHMETIC_ATOL = 1e-5


def _layer_reference(fused: onnx.ModelProto, x: np.ndarray, report) -> np.ndarray:
    """float64 NumPy reference of the one fused layer of ``fused`` on ``x``."""
    (node,) = _ours(fused)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fused.graph.initializer}
    gamma, beta = (inits[name].astype(np.float64).reshape(-1) for name in node.input[1:3])
    (layer,) = report.fused
    return ops.group_normalization(x.astype(np.float64), gamma, beta, groups=layer.groups, axis=1, epsilon=layer.epsilon)


@pytest.mark.parametrize("name", ["torch_gn_ts_r4_g4_opset17_dynbatchhw", "torch_gn_dynamo_r4_g4_opset18_static"])
def test_torch_instancenorm_layers_keep_the_exports_arithmetic(name, rng):
    """Default ``ort``: a torch InstanceNormalization-form layer computes what the export computes
    (as precise as the export, never less); ``precise=True``: our shift, precise where the export is not."""
    entry = next(e for e in entries() if e.values[0]["name"] == name).values[0]
    model = load(entry)
    (x,), _ = data(entry)
    hard = (HARD_MEAN + HARD_STD * rng.standard_normal(x.shape)).astype(np.float32)
    fused, report = fuse(model, target="ort")
    precise, _ = fuse(model, target="ort", precise=True)
    assert [e["form"] for e in report.lowered] == [UNSHIFTED_FORM]
    ref = _layer_reference(fused, hard, report)
    (export,), (unshifted,), (shifted,) = run_ort(model, hard), run_ort(fused, hard), run_ort(precise, hard)
    assert np.max(np.abs(export - ref)) > EXPORT_ERROR_ABOVE
    np.testing.assert_allclose(unshifted, export, rtol=0, atol=SAME_ARITHMETIC_ATOL)
    np.testing.assert_allclose(shifted, ref, rtol=0, atol=SHIFTED_TOL)
    _check_outputs(fused, entry)  # and both match the framework on ordinary data
    _check_outputs(precise, entry)


def test_absorbed_silu_keeps_the_exports_arithmetic_too():
    """A SiLU absorbed into a torch InstanceNormalization-form layer (the node's rule tag then
    names both rules) still gets the unshifted body, and matches the framework."""
    entry = next(e for e in entries() if e.values[0]["name"] == "torch_gn_ts_block_c32_g8_opset17_dynbatch").values[0]
    fused, report = fuse(load(entry), target="ort", absorb_activation=True)
    assert [f.activation for f in report.fused] == [1]
    assert [e["form"] for e in report.lowered] == [UNSHIFTED_FORM]
    _check_outputs(fused, entry)


def test_keras_layers_keep_the_shift_in_ort():
    """Only torch's InstanceNormalization form gives up the shift: Keras exports compute
    ``E[x^2] - E[x]^2``, where our shifted body is both faster and precise."""
    entry = next(e for e in entries() if e.values[0]["name"] == "keras_tf_export_nhwc_r4_resblock_g8").values[0]
    fused, report = fuse(load(entry), target="ort")
    assert report.fused and not any(e["form"] == UNSHIFTED_FORM for e in report.lowered)
    assert not any(n.overload.endswith("_unshifted") for n in _ours(fused))


def test_ort_does_not_absorb_activation_by_default():
    assert ort_cpu.ABSORBS_ACTIVATION is False
    entry = next(e for e in entries() if e.values[0]["name"] == "keras_tf_export_nhwc_r4_resblock_g8").values[0]
    fused, report = fuse(load(entry), target="ort")
    assert all(f.activation == 0 for f in report.fused)
    assert sum(n.op_type == "Sigmoid" for n in fused.graph.node) == 2


def test_ort_with_absorbed_activation_still_matches():
    entry = next(e for e in entries() if e.values[0]["name"] == "keras_torch_export_dynamo_nhwc_r4_block_c32_g8_initial").values[0]
    model = load(entry)
    fused, report = fuse(model, target="ort", absorb_activation=True)
    assert any(f.activation == 1 for f in report.fused)
    assert _transposes(fused) <= BLOCKS[entry["name"]]
    _check_outputs(fused, entry)


def _tiny_block(out_consumer: str) -> onnx.ModelProto:
    """Conv (NCHW) -> Transpose to NHWC -> Add bias [C] -> our op (axis -1) -> SiLU -> then
    either a Transpose back and a Conv (``conv``) or the graph output (``output``)."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    c = 8
    w = onnx.numpy_helper.from_array(rng.normal(size=(c, 4, 3, 3)).astype(np.float32), "w")
    bias = onnx.numpy_helper.from_array(rng.normal(size=(c,)).astype(np.float32), "bias")
    gamma = onnx.numpy_helper.from_array(rng.normal(1, 0.3, size=(c,)).astype(np.float32), "gamma")
    beta = onnx.numpy_helper.from_array(rng.normal(size=(c,)).astype(np.float32), "beta")
    w2 = onnx.numpy_helper.from_array(rng.normal(size=(c, c, 1, 1)).astype(np.float32), "w2")
    nodes = [
        h.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("Transpose", ["conv"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        h.make_node("Add", ["nhwc", "bias"], ["biased"], name="bias_add"),
        ops.make_node(
            ["biased", "gamma", "beta"], ["gn"], variant=ops.variant_for(4, -1, onnx.TensorProto.FLOAT, True, True, channels=8, groups=4),
            groups=4, axis=-1, epsilon=1e-3, name="gn",
        ),
        h.make_node("Sigmoid", ["gn"], ["sig"], name="sig"),
        h.make_node("Mul", ["gn", "sig"], ["silu"], name="silu"),
    ]
    if out_consumer == "conv":
        nodes += [
            h.make_node("Transpose", ["silu"], ["back"], perm=[0, 3, 1, 2], name="to_nchw"),
            h.make_node("Conv", ["back", "w2"], ["y"], name="conv2"),
        ]
        y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, c, 6, 6])
    else:
        nodes.append(h.make_node("Identity", ["silu"], ["y"], name="out"))
        y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 6, 6, c])
    graph = h.make_graph(
        nodes, "block", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 6, 6])], [y],
        initializer=[w, bias, gamma, beta, w2],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(ops.DOMAIN, 1)], ir_version=10)
    return ops.attach_functions(model)


@pytest.mark.parametrize("consumer", ["conv", "output"])
def test_handmade_block(consumer):
    model = _tiny_block(consumer)
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    (expected,) = run_ort(model, x)
    # The model holds our op already (fuse() lowers only what it fused): lower it directly.
    ir_model = ir.from_proto(model)
    common_passes.ShapeInferencePass()(ir_model)
    report = FuseReport(target="ort")
    ort_cpu.lower(ir_model, report)
    fused = ops.attach_functions(ir.to_proto(ir_model))
    onnx.checker.check_model(fused)
    (actual,) = run_ort(fused, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert report.lowered, report.notes
    # conv: both Transposes gone; output: the input one gone, one inserted before the output.
    assert _transposes(fused) == (0 if consumer == "conv" else 1)
