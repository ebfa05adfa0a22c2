"""Target ``ort-gpu``: com.microsoft.GroupNorm for rank-4 channels-last layers; structure,
onnx validity and the untouched rest of the graph (no GPU here: onnxruntime CPU has no kernel)."""

from __future__ import annotations

import pathlib

import onnx
import onnxruntime as ort
import pytest
from corpus import entries, load
from helpers import session_options
from onnx_groupnorm.rewriter import fuse

from onnx_groupnorm import ops


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _expressible(layer) -> bool:
    return layer["input_rank"] == 4 and layer["axis"] % 4 == 3


def _ms(model):
    return [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "GroupNorm"]


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"]))
def test_structure(entry):
    lowered, report = fuse(load(entry), target="ort-gpu")
    onnx.checker.check_model(lowered)
    ms = _ms(lowered)
    ours = [n for n in lowered.graph.node if n.domain == ops.DOMAIN]
    assert len(ms) == sum(map(_expressible, entry["layers"]))
    assert len(ms) + len(ours) == entry["expected_group_norms"]
    assert len([n for n in report.notes if n.startswith("ort-gpu target: kept")]) == len(ours)
    assert any(o.domain == "com.microsoft" for o in lowered.opset_import) == bool(ms)
    inits = {i.name: i for i in lowered.graph.initializer}
    for node in ms:
        attrs = _attrs(node)
        assert attrs["channels_last"] == 1 and attrs["activation"] in (0, 1)
        assert set(attrs) == {"channels_last", "activation", "groups", "epsilon"}
        for param in node.input[1:]:
            assert param in inits and inits[param].data_type == onnx.TensorProto.FLOAT
            assert len(inits[param].dims) == 1


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"] and any(map(_expressible, e["layers"]))))
def test_rest_of_graph_untouched(entry):
    plain, _ = fuse(load(entry), target="function", absorb_activation=False)
    lowered, _ = fuse(load(entry), target="ort-gpu", absorb_activation=False)
    def rest(model):
        return [(n.op_type, n.domain, list(n.input), list(n.output)) for n in model.graph.node if n.domain not in (ops.DOMAIN, "com.microsoft")]
    assert rest(lowered) == rest(plain)
    ours = {n.output[0] for n in plain.graph.node if n.domain == ops.DOMAIN}
    assert {n.output[0] for n in _ms(lowered)} <= ours  # same output names, in place of our op


@pytest.mark.parametrize("name, silu", [("keras_tf_export_nhwc_r4_resblock_g8", True), ("keras_tf_export_nhwc_r4_g4", False)])
def test_silu_absorbed_by_default(name, silu):
    (entry,) = [p.values[0] for p in entries(lambda e: e["name"] == name)]
    lowered, _ = fuse(load(entry), target="ort-gpu")
    activations = [_attrs(n)["activation"] for n in _ms(lowered)]
    assert (1 in activations) == silu


def test_cpu_provider_has_no_kernel():
    (entry,) = [p.values[0] for p in entries(lambda e: e["name"] == "keras_tf_export_nhwc_r4_g4")]
    lowered, _ = fuse(load(entry), target="ort-gpu")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED.*GroupNorm"):
        ort.InferenceSession(lowered.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def test_verify_uses_the_portable_form():
    """--verify cannot run com.microsoft.GroupNorm on CPU: the same fusion is verified as
    target=function and the report says so."""
    import onnx as _onnx
    from onnx_groupnorm.rewriter import fuse as _fuse

    model = _onnx.load(pathlib.Path(__file__).resolve().parent.parent / "models" / "keras_tf" / "keras_tf_export_nhwc_r4_resblock_g8.onnx")
    fused, report = _fuse(model, target="ort-gpu", verify=True)
    assert any(n.op_type == "GroupNorm" and n.domain == "com.microsoft" for n in fused.graph.node)
    assert report.verification.passed
    assert "verified as target=function" in report.verification.detail
