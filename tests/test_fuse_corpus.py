"""Every model of models/: positives fuse to exactly their number of GroupNormalization
layers, leave no normalization op of the matched subgraphs behind, and still reproduce the
framework's recorded output; negatives fuse nothing and come back unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from corpus import data, entries, load
from helpers import run_ort

from onnx_groupnorm import ops
from onnx_groupnorm.rewriter import fuse

#: Ops that only the exported normalizations use in these models: none may survive fusion.
NORMALIZATION_OPS = {
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool", "InstanceNormalization",
    "Sqrt", "Reciprocal", "Pow", "Where", "Expand",
}


def _all_nodes(model):
    yield from model.graph.node
    for f in model.functions:
        if f.domain != ops.DOMAIN:
            yield from f.node


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"]))
def test_positive_model_fuses_every_layer(entry):
    model = load(entry)
    fused, report = fuse(model)
    assert report.skipped == []
    assert len(report.fused) == entry["expected_group_norms"]
    ours = [n for n in _all_nodes(fused) if n.domain == ops.DOMAIN]
    assert len(ours) == entry["expected_group_norms"]
    leftover = sorted({n.op_type for n in _all_nodes(fused) if n.domain in ("", "ai.onnx") and (n.op_type in NORMALIZATION_OPS or n.op_type == "GroupNormalization")} - set(entry.get("ops_outside_group_norms", [])))
    assert leftover == []
    configs = sorted((layer["channels"], layer["groups"] if layer["groups"] != -1 else layer["channels"]) for layer in entry["layers"])
    assert sorted((f.channels, f.groups) for f in report.fused) == configs
    onnx.checker.check_model(fused, full_check=not (entry["hand_built"] and entry["opset"] < 21))
    inputs, expected = data(entry)
    actual = run_ort(fused, *inputs)
    tol = entry["tolerance"]
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("entry", entries(lambda e: e["negative"]))
def test_negative_model_is_left_alone(entry):
    model = load(entry)
    fused, report = fuse(model)
    assert report.fused == []
    assert fused.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize(
    "entry",
    entries(lambda e: e["name"] in {
        "keras_tf_export_keras_hub_vae_encoder_static", "keras_torch_export_ts_nhwc_r4_block_c32_g8",
        "keras_jax_export_resblock_gn3", "tf_keras_from_keras_nhwc_r4_g4", "torch_gn_dynamo_block_c32_g8_opset18_dynbatchhw",
    }),
)
def test_fused_model_runs_in_a_second_runtime(entry):
    """The portability claim: onnx's ReferenceEvaluator runs the fused model through our
    function bodies (inlined first: it looks schemas up by op type alone, see
    test_op_function) and reproduces the framework's outputs."""
    import onnx.inliner
    from onnx.reference import ReferenceEvaluator

    fused, _ = fuse(load(entry))
    inputs, expected = data(entry)
    evaluator = ReferenceEvaluator(onnx.inliner.inline_local_functions(fused))
    feeds = {i.name: x for i, x in zip(fused.graph.input, inputs)}
    tol = entry["tolerance"]
    for a, e in zip(evaluator.run(None, feeds), expected, strict=True):
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])
