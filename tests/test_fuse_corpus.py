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
    leftover = sorted({n.op_type for n in _all_nodes(fused) if n.domain in ("", "ai.onnx") and (n.op_type in NORMALIZATION_OPS or n.op_type == "GroupNormalization")})
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
