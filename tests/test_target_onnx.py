"""Target ``onnx``: our op lowered to the standard GroupNormalization-21 where it can express the
layer; parity with the framework on every corpus model, the opset upgrade and its refusal,
stash_type for float16, the SiLU re-expansion and the channels-last Transpose form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from corpus import data, entries, load
from helpers import keras_dynamo_group_norm, run_ort, single_model

from onnx_groupnorm import ops
from onnx_groupnorm.rewriter import fuse

h = onnx.helper


def _std_gn(model):
    return [n for n in model.graph.node if n.op_type == "GroupNormalization" and n.domain in ("", "ai.onnx")]


def _ours(model):
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"]))
def test_corpus_parity(entry):
    model = load(entry)
    lowered, report = fuse(model, target="onnx")
    onnx.checker.check_model(lowered)
    std, ours = _std_gn(lowered), _ours(lowered)
    assert len(std) + len(ours) == entry["expected_group_norms"]
    assert len([e for e in report.lowered if e["form"] == "GroupNormalization-21"]) == len(std)
    channels_first = sum(layer["axis"] % layer["input_rank"] == 1 for layer in entry["layers"])
    assert len(std) >= channels_first  # every channels-first layer is lowered
    assert len([n for n in report.notes if n.startswith("onnx target: kept")]) == len(ours)
    if std:
        assert _opset(lowered) >= 21
        assert all(_attr(n, "stash_type") == 1 for n in std)
    else:
        assert _opset(lowered) == entry["opset"]
    inputs, expected = data(entry)
    tol = entry["tolerance"]
    for actual, want in zip(run_ort(lowered, *inputs), expected, strict=True):
        assert actual.dtype == want.dtype
        np.testing.assert_allclose(actual.astype(np.float64), want.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("name", ["hand_gn21_r4_c16_g4_float16_stash1", "torch_gn_ts_r4_g4_opset17_float16"])
def test_float16_keeps_float32_statistics(name):
    (entry,) = [p.values[0] for p in entries(lambda e: e["name"] == name)]
    lowered, _ = fuse(load(entry), target="onnx")
    (gn,) = _std_gn(lowered)
    assert _attr(gn, "stash_type") == 1
    inits = {i.name: i for i in lowered.graph.initializer}
    for param in gn.input[1:]:
        if param in inits:  # scale/bias have X's type T
            assert inits[param].data_type == onnx.TensorProto.FLOAT16


def _opset17_model_with_local_function() -> onnx.ModelProto:
    """A torch-style channels-first GN at opset 17 whose output goes through a model-local function."""
    (entry,) = [p.values[0] for p in entries(lambda e: e["name"] == "torch_gn_ts_r4_g4_opset17_initial")]
    model = load(entry)
    out = model.graph.output[0].name
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_inner"
    model.graph.node.append(h.make_node("Twice", [out + "_inner"], [out], domain="local.test"))
    model.functions.append(h.make_function(
        "local.test", "Twice", ["a"], ["b"], [h.make_node("Add", ["a", "a"], ["b"])], [h.make_opsetid("", 17)]
    ))
    model.opset_import.append(h.make_opsetid("local.test", 1))
    onnx.checker.check_model(model)
    return model


def test_refusal_keeps_our_op_and_the_opset():
    model = _opset17_model_with_local_function()
    lowered, report = fuse(model, target="onnx")
    assert _opset(lowered) == 17
    assert _std_gn(lowered) == [] and len(_ours(lowered)) == 1
    assert report.lowered == []
    (note,) = [n for n in report.notes if "refused" in n]
    assert "from 17 to 21" in note and "local.test::Twice" in note
    x = np.random.default_rng(0).normal(size=(2, 16, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(lowered, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-5)


def test_activation_is_reexpanded():
    shape = [2, 8, 5, 5]
    scale = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "scale")
    bias = onnx.numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "bias")
    nodes = [
        h.make_node("GroupNormalization", ["x", "scale", "bias"], ["g"], num_groups=4, epsilon=1e-5),
        h.make_node("Sigmoid", ["g"], ["s"]),
        h.make_node("Mul", ["g", "s"], ["y"]),
    ]
    model = single_model(nodes, shape, opset=21, initializer=[scale, bias])
    lowered, report = fuse(model, target="onnx", absorb_activation=True)
    assert [f.activation for f in report.fused] == [1]
    assert [n.op_type for n in lowered.graph.node] == ["GroupNormalization", "Sigmoid", "Mul"]
    assert report.lowered[0]["activation"] == 1
    x = np.random.default_rng(1).normal(2, 3, size=shape).astype(np.float32)
    np.testing.assert_allclose(run_ort(lowered, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-5)


def test_channels_last_between_transposes_runs_on_the_nchw_tensor():
    nhwc = [2, 6, 6, 8]
    gn_nodes, _ = keras_dynamo_group_norm("t", "g", tuple(nhwc), groups=4)
    nodes = [
        h.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        *gn_nodes,
        h.make_node("Transpose", ["g"], ["y"], perm=[0, 3, 1, 2]),
    ]
    model = single_model(nodes, [2, 8, 6, 6], opset=21)
    lowered, report = fuse(model, target="onnx")
    assert len(report.fused) == 1
    (gn,) = _std_gn(lowered)
    assert gn.input[0] == "x" and gn.output[0] == "y"
    # Both Transposes are gone: the layer moved onto the NCHW tensor (as for target=ort),
    # where GroupNormalization-21 expresses it.
    assert [n.op_type for n in lowered.graph.node] == ["GroupNormalization"]
    assert [e["form"] for e in report.lowered] == ["our op, channels-first (axis=1, cf body)", "GroupNormalization-21"]
    x = np.random.default_rng(2).normal(size=(2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(lowered, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-5)


def test_missing_params_become_typed_initializers():
    (entry,) = [p.values[0] for p in entries(lambda e: e["name"] == "torch_gn_ts_r4_g8_noaffine_opset17_static")]
    lowered, _ = fuse(load(entry), target="onnx")
    (gn,) = _std_gn(lowered)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in lowered.graph.initializer}
    np.testing.assert_array_equal(inits[gn.input[1]], np.ones(16, np.float32))
    np.testing.assert_array_equal(inits[gn.input[2]], np.zeros(16, np.float32))


def test_onnx_target_above_2gb_checks_from_files(monkeypatch):
    """Above 2 GB (here: the threshold lowered to 1 KiB) the opset-21 trial is never serialised:
    the version converter sees a copy without the large weights, onnx.checker and onnxruntime
    open a file with external data, and the result is the same as for a small model."""
    from onnx_groupnorm.rewriter import io as rewriter_io
    from onnx_groupnorm.rewriter.targets import onnx_standard

    entry = next(e.values[0] for e in entries() if e.values[0]["name"] == "keras_torch_export_ts_nhwc_r4_block_c32_g8")
    small, _ = fuse(load(entry), target="onnx")
    monkeypatch.setattr(rewriter_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.setattr(onnx_standard, "_LARGE_INITIALIZER", 64)
    checked = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(onnx_standard.onnx.checker, "check_model", lambda m, *a, **k: (checked.append(m), real_check(m, *a, **k)))
    large, report = fuse(load(entry), target="onnx")
    assert any(isinstance(m, str) and m.endswith("trial.onnx") for m in checked)
    assert [n.op_type for n in large.graph.node] == [n.op_type for n in small.graph.node]
    assert sum(n.op_type == "GroupNormalization" for n in large.graph.node) == entry["expected_group_norms"]
    assert any("raised the default opset" in note for note in report.notes)
