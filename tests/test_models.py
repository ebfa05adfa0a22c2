"""models/: the manifest is consistent with the files, and every model runs in onnxruntime
and reproduces its framework's recorded output within the tolerance recorded for it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from corpus import MODELS, data_sets, default_opset, entries, load, manifest
from helpers import run_ort

REQUIRED = {
    "name": str, "file": str, "data": str, "route": str, "pattern_family": str, "exporter": dict,
    "frameworks": dict, "opset": int, "dtype_policy": str, "inputs": list, "outputs": list,
    "expected_group_norms": int, "layers": list, "negative": bool, "hand_built": bool,
    "weights": str, "tolerance": dict, "generator": str,
}
LAYER_KEYS = {"groups", "axis", "epsilon", "center", "scale", "channels", "input_rank"}


def test_manifest_lists_exactly_the_files_present():
    listed = set()
    for entry in manifest()["models"]:
        listed.update({entry["file"], entry["data"]})
    present = {str(p.relative_to(MODELS)) for p in MODELS.rglob("*") if p.suffix in (".onnx", ".npz")}
    assert sorted(listed - present) == [], "listed but missing"
    assert sorted(present - listed) == [], "present but not listed"


def test_manifest_entries_are_well_formed():
    models = manifest()["models"]
    names = [m["name"] for m in models]
    assert len(names) == len(set(names)), "duplicate names"
    for m in models:
        for key, kind in REQUIRED.items():
            assert isinstance(m.get(key), kind), f"{m['name']}: {key} should be {kind.__name__}"
        assert m["generator"].startswith("gen_") and (MODELS / "generators" / m["generator"]).exists()
        assert m["negative"] == (m["expected_group_norms"] == 0), m["name"]
        assert len(m["layers"]) == m["expected_group_norms"], m["name"]
        for layer in m["layers"]:
            assert LAYER_KEYS <= set(layer), f"{m['name']}: layer lacks {LAYER_KEYS - set(layer)}"
            assert layer["groups"] == -1 or (layer["groups"] >= 1 and layer["channels"] % layer["groups"] == 0)
        assert {"rtol", "atol"} <= set(m["tolerance"]) and 0 < m["tolerance"]["rtol"] < 0.1 and 0 < m["tolerance"]["atol"] < 0.1
        for spec in m["inputs"]:
            assert all(d is None or isinstance(d, (int, str)) for d in spec["shape"]), m["name"]
        # several data sets only for a model with a dynamic input dim (other sizes to run at)
        assert m.get("data_sets", 1) == 1 or (
            isinstance(m["data_sets"], int) and m["data_sets"] > 1
            and any(not isinstance(d, int) for spec in m["inputs"] for d in spec["shape"])
        ), m["name"]
    for failure in manifest()["failures"]:
        assert failure.get("route") and failure.get("error"), failure


def test_corpus_covers_every_route_and_configuration():
    models = [m for m in manifest()["models"] if not m["negative"]]
    routes = {m["route"] for m in manifest()["models"]} | {f["route"] for f in manifest()["failures"]}
    for route in ("keras_export_tf", "tf2onnx_from_keras", "tf2onnx_cli_savedmodel", "tf_keras_from_keras",
                  "keras36_tf2onnx", "keras_export_torch_torchscript", "keras_export_torch_dynamo",
                  "torch_onnx_export_keras_ts", "torch_onnx_export_keras_dynamo", "keras_export_jax",
                  "torch_groupnorm_ts", "torch_groupnorm_dynamo", "hand_built"):
        assert route in routes, route
    layers = [layer for m in models for layer in m["layers"]]
    assert {layer["input_rank"] for layer in layers} >= {2, 3, 4, 5}
    assert {layer["groups"] for layer in layers} >= {1, 32, -1}
    assert {layer["epsilon"] for layer in layers} >= {1e-3, 1e-5, 1e-6} or len({round(np.log10(layer["epsilon"])) for layer in layers}) >= 3
    assert {(layer["center"], layer["scale"]) for layer in layers} == {(True, True), (True, False), (False, True), (False, False)}
    assert {m["dtype_policy"] for m in models} >= {"float32", "float16", "mixed_float16"}
    assert {m["opset"] for m in models} >= {13, 17, 18, 21, 23}
    assert any(m["expected_group_norms"] >= 2 for m in models), "no block with several layers"
    assert sum(m["negative"] for m in manifest()["models"]) >= 4


@pytest.mark.parametrize("entry", entries())
def test_model_runs_and_matches_its_framework(entry):
    model = load(entry)
    if entry["hand_built"] and 18 <= default_opset(model) <= 20 and any(n.op_type == "GroupNormalization" for n in model.graph.node):
        # onnx >= 1.18 rejects GroupNormalization-18 as deprecated; onnxruntime still runs it.
        with pytest.raises(onnx.checker.ValidationError, match="deprecated"):
            onnx.checker.check_model(model, full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
    assert default_opset(model) == entry["opset"]
    assert [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}] == [i["name"] for i in entry["inputs"]]
    tol = entry["tolerance"]
    for inputs, expected in data_sets(entry):
        actual = run_ort(model, *inputs)
        for a, e in zip(actual, expected, strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])
