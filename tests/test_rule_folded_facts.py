"""Constants in disguise (rewriter._shapes.adopt_folded_facts): what constant folding of a
copy proves is read by the rules; the user's graph keeps every node it had; values that a
caller may override (initializers that are graph inputs) stay unknown. Graphs are the
TorchScript exporter's shapes of torch.nn.GroupNorm, built with onnx.helper; the corpus
exports themselves are in test_fuse_corpus (and, at both recorded sizes, below)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import data_sets, entries, load
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import _shapes, fuse

from onnx_groupnorm import ops

C, G = 16, 4


def _gn_nodes(x: str, inits: list) -> list:
    """TorchScript's GroupNorm(G, C) on ``x`` (gamma/beta names ``gamma_in``/``beta_in``)."""
    inits += [
        numpy_helper.from_array(np.array([0, G, -1], np.int64), "group_shape"),
        numpy_helper.from_array(np.ones(G, np.float32), "in_scale"),
        numpy_helper.from_array(np.zeros(G, np.float32), "in_bias"),
    ]
    return [
        helper.make_node("Reshape", [x, "group_shape"], ["xg"], name="gn_reshape"),
        helper.make_node("InstanceNormalization", ["xg", "in_scale", "in_bias"], ["n"], name="gn_in", epsilon=1e-5),
        helper.make_node("Shape", [x], ["x_shape"], name="gn_shape"),
        helper.make_node("Reshape", ["n", "x_shape"], ["r"], name="gn_restore"),
        helper.make_node("Mul", ["r", "gamma_in"], ["m"], name="gn_mul"),
        helper.make_node("Add", ["m", "beta_in"], ["y"], name="gn_add"),
    ]


def _model(nodes, inits, x_shape, *, inputs=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape), *inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _params(rng):
    return rng.normal(1, 0.5, (C, 1, 1)).astype(np.float32), rng.normal(0, 0.5, (C, 1, 1)).astype(np.float32)


def shared_gamma_model(rng, *, gamma_is_input=False):
    """gamma/beta are ``Identity`` of initializers (TorchScript shares repeated constants so)."""
    gamma, beta = _params(rng)
    inits = [numpy_helper.from_array(gamma, "gamma_shared"), numpy_helper.from_array(beta, "beta_shared")]
    nodes = [
        helper.make_node("Identity", ["gamma_shared"], ["gamma_in"], name="share_gamma"),
        helper.make_node("Identity", ["beta_shared"], ["beta_in"], name="share_beta"),
        *_gn_nodes("x", inits),
    ]
    inputs = [helper.make_tensor_value_info("gamma_shared", TensorProto.FLOAT, [C, 1, 1])] if gamma_is_input else []
    return _model(nodes, inits, ["batch", C, "h", "w"], inputs=inputs), gamma, beta


def padded_pool_model(rng):
    """A max-pool padded with pads built from constants (``F.pad`` under TorchScript): onnx's
    shape inference leaves every dim of the Pad output unknown, the channel included."""
    gamma, beta = _params(rng)
    inits = [numpy_helper.from_array(gamma, "gamma_in"), numpy_helper.from_array(beta, "beta_in")]
    consts = {
        "k_len": np.array([4], np.int64),
        "k_lead": np.array([0, 1, 0, 1], np.int64),
        "k_pairs": np.array([-1, 2], np.int64),
        "k_start": np.array([-1], np.int64),
        "k_end": np.array([-(2**63)], np.int64),  # INT64_MIN: slice to the start
        "k_axis": np.array([0], np.int64),
        "k_step": np.array([-1], np.int64),
        "k_flat": np.array([-1], np.int64),
        "k_value": np.array(-np.inf, np.float32),
    }
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in consts.items()]
    nodes += [
        helper.make_node("ConstantOfShape", ["k_len"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.int64))),
        helper.make_node("Concat", ["k_lead", "zeros"], ["pads8"], axis=0),
        helper.make_node("Reshape", ["pads8", "k_pairs"], ["pairs"]),
        helper.make_node("Slice", ["pairs", "k_start", "k_end", "k_axis", "k_step"], ["reversed"]),
        helper.make_node("Transpose", ["reversed"], ["by_side"], perm=[1, 0]),
        helper.make_node("Reshape", ["by_side", "k_flat"], ["pads_i"]),
        helper.make_node("Cast", ["pads_i"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads", "k_value"], ["padded"], name="pool_pad"),
        helper.make_node("MaxPool", ["padded"], ["pooled"], name="pool", kernel_shape=[3, 3], strides=[2, 2]),
        *_gn_nodes("pooled", inits),
    ]
    return _model(nodes, inits, [1, C, "h", "w"]), gamma, beta


def _reference(x, gamma, beta):
    return ops.group_normalization(x, gamma.reshape(-1), beta.reshape(-1), groups=G, axis=1, epsilon=1e-5)


def _ours(model):
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def test_identity_of_an_initializer_is_a_constant(rng):
    model, gamma, beta = shared_gamma_model(rng)
    fused, report = fuse(model)
    assert report.skipped == [] and len(report.fused) == 1
    x = rng.normal(0.5, 2, (2, C, 5, 7)).astype(np.float32)
    ok, worst = tolerance_for(np.float32).check(run_ort(fused, x)[0], _reference(x, gamma, beta))
    assert ok, worst


def test_identity_of_an_overridable_initializer_is_not_a_constant(rng):
    model, _, _ = shared_gamma_model(rng, gamma_is_input=True)
    fused, report = fuse(model)
    assert _ours(fused) == [] or all(len(n.input) == 1 for n in _ours(fused))  # gamma never baked in
    assert any("gamma is not a constant" in s.reason for s in report.skipped)


def test_pads_built_from_constants_give_the_channel_dimension(rng):
    model, gamma, beta = padded_pool_model(rng)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    pad_dims = next(v for v in inferred.graph.value_info if v.name == "padded").type.tensor_type.shape.dim
    assert not pad_dims[1].HasField("dim_value")  # what onnx alone cannot see
    fused, report = fuse(model)
    assert report.skipped == [] and len(report.fused) == 1 and report.fused[0].channels == C
    kept = {n.name for n in fused.graph.node}
    assert {"pool_pad", "pool"} <= kept  # the user's graph is not folded, only the GroupNorm is replaced
    assert sum(n.op_type == "ConstantOfShape" for n in fused.graph.node) == 1
    for size in ((1, C, 9, 9), (1, C, 8, 12)):  # odd and even: the pads do not depend on the size
        x = rng.normal(0.5, 2, size).astype(np.float32)
        got, expected = run_ort(fused, x)[0], run_ort(model, x)[0]  # the original, in onnxruntime
        assert got.shape == expected.shape
        ok, worst = tolerance_for(np.float32).check(got, expected)
        assert ok, worst


def test_facts_are_not_written_to_the_model(rng):
    model, _, _ = padded_pool_model(rng)
    ir_model = ir.from_proto(model)
    _shapes.adopt_folded_facts(ir_model)
    values = {v.name: v for n in ir_model.graph for v in n.outputs}
    assert values["padded"].shape is not None and values["padded"].shape[1] == C
    assert _shapes.numpy_of(values["pads"]).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert [n.op_type for n in ir_model.graph] == [n.op_type for n in model.graph.node]
    saved = ir.to_proto(ir_model)
    assert {i.name for i in saved.graph.initializer} == {i.name for i in model.graph.initializer}


@pytest.mark.parametrize("entry", entries(lambda e: e.get("data_sets", 1) > 1))
def test_fused_dynamic_model_matches_its_framework_at_every_size(entry):
    """Dynamic-shape exports carry the framework's outputs at several input sizes: the fused
    model must reproduce each (a proof that held only at the traced size would fail here)."""
    fused, report = fuse(load(entry))
    assert len(report.fused) == entry["expected_group_norms"] and report.skipped == []
    sizes = set()
    tol = entry["tolerance"]
    for inputs, expected in data_sets(entry):
        sizes.add(inputs[0].shape)
        for a, e in zip(run_ort(fused, *inputs), expected, strict=True):
            assert a.shape == e.shape
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])
    assert len(sizes) == entry["data_sets"]


@pytest.mark.parametrize("entry", entries(lambda e: "stdconv" in e["name"]))
def test_weight_standardisation_is_not_a_group_norm(entry):
    """The weight-standardised Convs normalise their weights at run time (a BatchNormalization
    or ReduceMean chain over each output channel, epsilon 1e-6): only the GroupNorms fuse,
    each with its own epsilon, and the standardisation stays as exported."""
    model = load(entry)
    fused, report = fuse(model)
    assert sorted(f.epsilon for f in report.fused) == pytest.approx(sorted(layer["epsilon"] for layer in entry["layers"]))
    before = [n.op_type for n in model.graph.node if n.op_type in ("BatchNormalization", "ReduceMean")]
    after = [n.op_type for n in fused.graph.node if n.op_type in ("BatchNormalization", "ReduceMean")]
    assert before and after == before
