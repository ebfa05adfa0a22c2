"""GroupNormFusionPass as an onnx-ir pass, the rule set on its own (prepare_for_rules before,
attach_functions after) on every model of models/, and the pass's bounds: one rewrite run,
lazy external data, large constants kept out of shape inference."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from corpus import MODELS, data, entries, load
from helpers import keras_dynamo_group_norm, run_ort, single_model
from onnxscript import rewriter as onnxscript_rewriter
from onnxscript.rewriter import RewritePass, pattern

from onnx_groupnorm import ops
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import GroupNormFusionPass, attach_functions, fuse, prepare_for_rules, rule_set
from onnx_groupnorm.rewriter import fusion_pass

SHAPE = (2, 6, 6, 16)


def _ours(model: ir.Model) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == ops.DOMAIN] + [
        n for f in model.functions.values() if f.domain != ops.DOMAIN for n in ir.traversal.RecursiveGraphIterator(f) if n.domain == ops.DOMAIN
    ]


def _check_outputs(entry, model: onnx.ModelProto) -> None:
    inputs, expected = data(entry)
    tol = entry["tolerance"]
    for a, e in zip(run_ort(model, *inputs), expected, strict=True):
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])


def _keras_model():
    nodes, params = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    return single_model(nodes, SHAPE), params


def test_pass_rewrites_in_place_and_reports(rng):
    proto, params = _keras_model()
    model = ir.from_proto(proto)
    fusion = GroupNormFusionPass()
    result = fusion(model)
    assert result.model is model and result.modified
    assert len(fusion.report.fused) == 1 and fusion.report.skipped == []
    x = rng.normal(0.5, 2, SHAPE).astype(np.float32)
    (y,) = run_ort(ir.to_proto(model), x)
    expected = ops.group_normalization(x.astype(np.float64), params["gamma"].astype(np.float64), params["beta"].astype(np.float64), groups=4)
    assert tolerance_for(np.float32).check(y, expected.astype(np.float32))[0]


def test_pass_with_nothing_to_fuse_is_not_modified():
    proto = single_model([onnx.helper.make_node("Relu", ["x"], ["y"])], SHAPE)
    model = ir.from_proto(proto)
    fusion = GroupNormFusionPass()
    assert not fusion(model).modified
    assert fusion.report.fused == []
    assert ir.to_proto(model).graph == ir.to_proto(ir.from_proto(proto)).graph


def test_fuse_returns_the_same_onnx_ir_model_with_its_bodies():
    proto, _ = _keras_model()
    model = ir.from_proto(proto)
    result, report = fuse(model)
    assert result is model and len(report.fused) == 1
    # The bodies are on the caller's model: onnxruntime loads it.
    assert any(f.domain == ops.DOMAIN for f in model.functions.values())
    run_ort(ir.to_proto(model), np.zeros(SHAPE, np.float32))


@pytest.mark.parametrize(
    "entry",
    entries(lambda e: e["name"] in {"keras_tf_export_nhwc_r4_resblock_g8", "keras_jax_export_resblock_gn3", "keras36_tf2onnx_nhwc_r4_g4_float16"}),
)
def test_pass_runs_in_a_pass_manager_before_onnxscripts_optimizer(entry):
    """The README's order: our pass, then onnxscript's optimizer without inlining; our op
    survives the optimizer and the model still reproduces the framework's outputs. (The
    optimizer first folds these JAX and Keras 3.6 float16 exports past what the rules match.)"""
    import onnxscript.optimizer

    model = ir.from_proto(load(entry))
    fusion = GroupNormFusionPass(target="ort")
    assert ir.passes.PassManager([fusion, common_passes.RemoveUnusedOpsetsPass()])(model).modified
    assert len(fusion.report.fused) == entry["expected_group_norms"]
    onnxscript.optimizer.optimize(model, inline=False)
    assert len(_ours(model)) == entry["expected_group_norms"]
    _check_outputs(entry, ir.to_proto(model))


def test_rules_run_once_with_the_skip_recorder(monkeypatch):
    """One rewrite run: no tracer dry run of the rule set, and skips still recorded."""
    calls = []
    real = pattern.RewriteRuleSet.apply_to_model

    def spy(self, model, **kwargs):
        calls.append(kwargs.get("tracer"))
        return real(self, model, **kwargs)

    monkeypatch.setattr(pattern.RewriteRuleSet, "apply_to_model", spy)
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    for n in nodes:
        if n.output[0] == "gn_axes":
            n.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "gn_axes"))
    _, report = fuse(single_model(nodes, SHAPE))
    assert calls == [None]
    assert report.fused == [] and len(report.skipped) == 1


def test_dead_nodes_and_unused_initializers_of_the_input_are_kept():
    """Exporters leave dead nodes: what was dead before is kept, what the rewrite made dead goes."""
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    dead = onnx.helper.make_node("Shape", ["x"], ["dead_shape"], name="dead_before")
    unused = onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "unused_before")
    # A node we do not rewrite keeps its trailing empty input too.
    lo = onnx.numpy_helper.from_array(np.array(0, np.float32), "lo")
    nodes[-1].output[0] = "gn_out"
    clip = onnx.helper.make_node("Clip", ["gn_out", "lo", ""], ["y"], name="clip_kept")
    fused, report = fuse(single_model(nodes + [clip, dead], SHAPE, initializer=[unused, lo]))
    assert len(report.fused) == 1
    assert "dead_before" in {n.name for n in fused.graph.node}
    assert "unused_before" in {i.name for i in fused.graph.initializer}
    assert {n.op_type for n in fused.graph.node} == {"GroupNormalization", "Clip", "Shape"}
    assert [list(n.input) for n in fused.graph.node if n.name == "clip_kept"] == [["gn_out", "lo", ""]]


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"]))
def test_rule_set_alone_fuses_what_fuse_does(entry):
    """The README's standalone route: prepare_for_rules, the rules through onnxscript (its
    ``rewrite`` and a ``RewritePass`` in a PassManager), then attach_functions: both fuse
    every layer fuse() fuses, and the result loads in onnxruntime and reproduces the
    framework's outputs. (``rewrite`` is ``RewritePass`` plus onnx-ir's unused-node,
    -function and -opset removal: one run in onnxruntime covers what both produce.)"""
    proto = load(entry)
    by_pass = prepare_for_rules(ir.from_proto(proto))
    by_pass = ir.passes.PassManager([RewritePass(rule_set())])(by_pass).model
    assert len(_ours(attach_functions(by_pass))) == entry["expected_group_norms"]
    model = prepare_for_rules(ir.from_proto(proto))
    model = onnxscript_rewriter.rewrite(model, pattern_rewrite_rules=rule_set())
    attach_functions(model)
    assert len(_ours(model)) == entry["expected_group_norms"]
    _check_outputs(entry, ir.to_proto(model))


def test_rule_set_without_prepare_misses_layers():
    """Why the README asks for prepare_for_rules: the rules need the inferred shapes."""
    entry = entries(lambda e: e["name"] == "keras_tf_export_nhwc_r4_resblock_g8")[0].values[0]
    model = onnxscript_rewriter.rewrite(ir.from_proto(load(entry)), pattern_rewrite_rules=rule_set())
    assert len(_ours(model)) < entry["expected_group_norms"]


def test_external_data_stays_lazy(tmp_path):
    """An ir.load-ed model keeps its untouched weights as memory-mapped external tensors."""
    entry = entries(lambda e: e["name"] == "keras_tf_export_nhwc_r4_resblock_g8")[0].values[0]
    source = tmp_path / "in.onnx"
    ir.save(ir.from_proto(load(entry)), source, external_data="in.onnx.data", size_threshold_bytes=0)
    model = ir.load(source)
    external_before = {name for name, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    assert external_before
    fused, report = fuse(model)
    assert fused is model and len(report.fused) == entry["expected_group_norms"]
    kept = {name for name, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    # Every initializer the rules did not consume is still an external (memory-mapped) tensor.
    assert kept == {name for name in external_before if name in model.graph.initializers} and kept
    out = tmp_path / "out.onnx"
    ir.save(model, out, external_data="out.onnx.data")
    _check_outputs(entry, onnx.load(out))


def test_large_constants_are_kept_out_of_shape_inference(monkeypatch):
    """A 16 MiB int64 Constant would cost ~57x its size in onnx's data propagation: it is
    replaced by a data-less stand-in for the while (data propagation then off), put back
    intact, and the shapes downstream are still inferred."""
    big = np.arange(2 * 1024 * 1024, dtype=np.int64)
    const = onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(big))
    add = onnx.helper.make_node("Add", ["c", "c"], ["y"])
    graph = onnx.helper.make_graph([const, add], "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]))
    seen = {}
    real = common_passes.ShapeInferencePass.call

    def spy(self, m):
        node = m.graph.node(0)
        seen["value"] = node.attributes["value"].as_tensor()
        seen["data_prop"] = self.data_prop
        return real(self, m)

    monkeypatch.setattr(common_passes.ShapeInferencePass, "call", spy)
    assert fusion_pass._infer_shapes(model) is None
    monkeypatch.undo()
    assert isinstance(seen["value"], ir.ExternalTensor) and seen["data_prop"] is False
    restored = model.graph.node(0).attributes["value"].as_tensor()
    np.testing.assert_array_equal(restored.numpy(), big)
    assert model.graph.outputs[0].shape == ir.Shape([big.size])


def test_shape_inference_failure_is_one_note_without_a_traceback(caplog):
    """onnx-ir logs a failed shape inference with its traceback; we report one line."""
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    model = single_model(nodes, SHAPE)
    # A declared output type that contradicts the graph makes onnx's strict inference fail.
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("gn_var", onnx.TensorProto.INT32, None))
    with caplog.at_level(logging.DEBUG):
        _, report = fuse(model)
    assert any(n.startswith("shape inference failed:") for n in report.notes)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]


def test_fusing_needs_no_onnxruntime(tmp_path):
    """onnxruntime is the ``ort`` extra: importing the package and fusing must not need it."""
    entry = entries(lambda e: e["name"] == "keras_tf_export_nhwc_r4_resblock_g8")[0].values[0]
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # any import of it raises ImportError
        "import onnx\n"
        "from onnx_groupnorm.rewriter import fuse\n"
        f"fused, report = fuse(onnx.load({str(MODELS / entry['file'])!r}), target='ort')\n"
        "assert len(report.fused) == %d, report.summary()\n" % entry["expected_group_norms"]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_package_ships_its_type_annotations():
    import importlib.resources

    assert importlib.resources.files("onnx_groupnorm").joinpath("py.typed").is_file()


def test_input_failing_the_checker_gets_a_note():
    """The result is held to onnx's checker only when the input passes it."""
    nodes, _ = keras_dynamo_group_norm("x", "gn_out", SHAPE, 4)
    odd = onnx.helper.make_node("Relu", ["gn_out"], ["y"], name="odd", not_a_relu_attribute=1)
    fused, report = fuse(single_model(nodes + [odd], SHAPE))
    assert len(report.fused) == 1
    assert any(n.startswith("the input model already fails onnx.checker") and "not_a_relu_attribute" in n for n in report.notes)


def test_result_failing_the_checker_raises(monkeypatch):
    """A fused model the checker refuses (here: our op left without its body and its domain
    import) is our fault when the input passes: RuntimeError, not a silent bad model."""

    def broken_attach(model):
        model.opset_imports.pop(ops.DOMAIN)
        return model

    monkeypatch.setattr(fusion_pass, "attach_functions", broken_attach)
    model, _ = _keras_model()
    with pytest.raises(RuntimeError, match="fails onnx.checker although the input passes"):
        fuse(model)


def test_initializer_order_survives_onnx_irs_c_api_passes():
    """onnx-ir's shape-inference and checker passes put large initializers back at the end;
    we keep the input's order (nothing we did not rewrite changes)."""
    big = onnx.numpy_helper.from_array(np.ones(1024, np.float32), "big_first")
    small = onnx.numpy_helper.from_array(np.ones(2, np.float32), "small_second")
    nodes = [onnx.helper.make_node("ReduceSum", ["big_first"], ["s1"]), onnx.helper.make_node("Add", ["x", "s1"], ["a"]), onnx.helper.make_node("Add", ["a", "small_second"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], initializer=[big, small])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]))
    fusion_pass._infer_shapes(model)
    fusion_pass._checker_error(model)
    assert list(model.graph.initializers) == ["big_first", "small_second"]


def test_checker_skipped_with_a_note_when_the_skeleton_is_too_big(monkeypatch):
    """Large initializers never reach the checker; if what is left (constants in nodes,
    subgraph initializers) would not fit one protobuf, the check is skipped and said so."""
    monkeypatch.setattr(fusion_pass, "_CHECKER_LIMIT", 0)
    checked = []
    monkeypatch.setattr(fusion_pass, "_checker_error", lambda model: checked.append(model))
    model, _ = _keras_model()
    fused, report = fuse(model)
    assert len(report.fused) == 1 and checked == []
    assert any(n.startswith("onnx.checker skipped") for n in report.notes)
