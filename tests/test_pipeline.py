"""fuse(): what it keeps, what it reports, idempotence, subgraphs and functions."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import keras_dynamo_group_norm, run_ort, single_model

from onnx_groupnorm import ops
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import fuse, rule_set

SHAPE = (2, 6, 6, 16)


def _ours(nodes):
    return [n for n in nodes if n.domain == ops.DOMAIN and n.op_type == ops.OP_TYPE]


def _reference(x, params, groups=4):
    return ops.group_normalization(x.astype(np.float64), params["gamma"].astype(np.float64), params["beta"].astype(np.float64), groups=groups).astype(np.float32)


def _decorated_model():
    """A model with everything fuse must keep: metadata, doc strings, value_info, an unused
    initializer, an untouched node, a model-local function, extra opset imports."""
    nodes, params = keras_dynamo_group_norm("x", "gn_out", SHAPE, 4)
    extra = onnx.helper.make_node("Relu", ["gn_out"], ["relu_out"], name="keep_me_relu", doc_string="relu doc")
    call = onnx.helper.make_node("Twice", ["relu_out"], ["y"], domain="my.domain", name="keep_me_call")
    twice = onnx.helper.make_function("my.domain", "Twice", ["a"], ["b"], [onnx.helper.make_node("Add", ["a", "a"], ["b"])], [onnx.helper.make_opsetid("", 20)])
    unused = onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "unused_init")
    model = single_model(nodes + [extra, call], SHAPE, initializer=[unused], doc_string="graph doc")
    model.opset_import.append(onnx.helper.make_opsetid("my.domain", 1))
    model.functions.append(twice)
    model.doc_string = "model doc"
    model.producer_name = "a-producer"
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("relu_out", onnx.TensorProto.FLOAT, SHAPE))
    onnx.helper.set_model_props(model, {"author": "someone", "license": "x"})
    return model, params


def test_fuses_and_keeps_everything_else(rng):
    model, params = _decorated_model()
    before = copy.deepcopy(model)
    fused, report = fuse(model, verify=True)
    assert model == before, "the input ModelProto must not be modified"
    assert len(report.fused) == 1 and report.skipped == []
    assert report.verification.passed
    onnx.checker.check_model(fused, full_check=True)
    (node,) = _ours(fused.graph.node)
    assert node.name == "gn_group_reshape"
    assert {p.key: p.value for p in fused.metadata_props} == {"author": "someone", "license": "x"}
    assert (fused.doc_string, fused.producer_name, fused.graph.doc_string) == ("model doc", "a-producer", "graph doc")
    assert "unused_init" in {i.name for i in fused.graph.initializer}
    kept = {n.name: n for n in fused.graph.node}
    assert kept["keep_me_relu"].doc_string == "relu doc" and kept["keep_me_relu"].input == ["gn_out"]
    assert kept["keep_me_call"].domain == "my.domain"
    assert [vi.name for vi in fused.graph.value_info] == ["relu_out"]
    assert {(f.domain, f.name) for f in fused.functions} == {("my.domain", "Twice"), (ops.DOMAIN, ops.OP_TYPE)}
    imports = {o.domain: o.version for o in fused.opset_import}
    assert imports == {"": 20, "my.domain": 1, ops.DOMAIN: ops.VERSION}
    assert [i.name for i in fused.graph.input] == ["x"] and [o.name for o in fused.graph.output] == ["y"]
    # No shape-computation or statistics node of the matched subgraph is left.
    assert {n.op_type for n in fused.graph.node} == {"GroupNormalization", "Relu", "Twice"}
    x = rng.normal(0.5, 2, SHAPE).astype(np.float32)
    (y,) = run_ort(fused, x)
    expected = 2 * np.maximum(_reference(x, params), 0)
    assert tolerance_for(np.float32).check(y, expected)[0]


def test_second_run_changes_nothing():
    model, _ = _decorated_model()
    once, report1 = fuse(model)
    twice, report2 = fuse(once)
    assert len(report1.fused) == 1 and report2.fused == [] and report2.skipped == []
    assert twice == once


def test_accepts_an_onnx_ir_model_and_rewrites_it_in_place():
    model, _ = _decorated_model()
    ir_model = ir.from_proto(model)
    result, report = fuse(ir_model)
    assert result is ir_model and len(report.fused) == 1
    proto = ir.to_proto(ir_model)
    assert len(_ours(proto.graph.node)) == 1
    # The caller's model holds the function bodies too: it loads in onnxruntime.
    assert {(f.domain, f.name) for f in proto.functions} == {("my.domain", "Twice"), (ops.DOMAIN, ops.OP_TYPE)}
    run_ort(proto, np.zeros(SHAPE, np.float32))


def test_intermediate_used_elsewhere_is_not_fused():
    """The variance is also a graph output: removing the subgraph would lose it."""
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    model = single_model(nodes, SHAPE)
    model.graph.output.append(onnx.helper.make_tensor_value_info("gn_var", onnx.TensorProto.FLOAT, [2, 1, 1, 4, 1]))
    fused, report = fuse(model)
    assert report.fused == []
    assert _ours(fused.graph.node) == []


def test_wrong_reduce_axes_are_reported_not_fused():
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    for n in nodes:
        if n.output[0] == "gn_axes":
            n.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "gn_axes"))
    fused, report = fuse(single_model(nodes, SHAPE))
    assert report.fused == []
    (skip,) = report.skipped
    assert "reduces axes [1, 2], not [1, 2, 4]" in skip.reason
    assert skip.rule.startswith("KerasTorchDynamoGroupNormFusion")


def _if_model():
    then_nodes, params = keras_dynamo_group_norm("x", "then_y", SHAPE, 4, prefix="t")
    else_nodes = [onnx.helper.make_node("Identity", ["x"], ["else_y"])]
    out = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, SHAPE)  # noqa: E731
    then_graph = onnx.helper.make_graph(then_nodes, "then", [], [out("then_y")])
    else_graph = onnx.helper.make_graph(else_nodes, "else", [], [out("else_y")])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, SHAPE), onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [out("y")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)], ir_version=10), params


def test_fuses_inside_if_branches(rng):
    model, params = _if_model()
    fused, report = fuse(model, verify=True)
    assert len(report.fused) == 1 and report.verification.passed
    (then_branch,) = [a.g for a in fused.graph.node[0].attribute if a.name == "then_branch"]
    assert len(_ours(then_branch.node)) == 1 and len(then_branch.node) == 1
    onnx.checker.check_model(fused, full_check=True)
    x = rng.normal(size=SHAPE).astype(np.float32)
    (y,) = run_ort(fused, x, np.array(True))
    assert tolerance_for(np.float32).check(y, _reference(x, params))[0]


def _function_model(typed: bool):
    """A model-local function holding the pattern; ``typed``: called with a known shape."""
    body, params = keras_dynamo_group_norm("a", "b", SHAPE, 4)
    block = onnx.helper.make_function("my.domain", "Block", ["a"], ["b"], body, [onnx.helper.make_opsetid("", 20)])
    model = single_model([onnx.helper.make_node("Block", ["x"], ["y"], domain="my.domain")], SHAPE if typed else ["n", "h", "w", "c"])
    model.opset_import.append(onnx.helper.make_opsetid("my.domain", 1))
    model.functions.append(block)
    return model, params


def test_fuses_inside_model_local_functions(rng):
    model, params = _function_model(typed=True)
    fused, report = fuse(model, verify=True)
    assert len(report.fused) == 1 and report.verification.passed
    (block_fused,) = [f for f in fused.functions if f.name == "Block"]
    assert len(_ours(block_fused.node)) == 1
    assert ops.DOMAIN in {o.domain for o in block_fused.opset_import}
    onnx.checker.check_model(fused, full_check=True)
    x = rng.normal(size=SHAPE).astype(np.float32)
    (y,) = run_ort(fused, x)
    assert tolerance_for(np.float32).check(y, _reference(x, params))[0]


def test_untyped_function_input_is_reported():
    """Without a static channel dim the split cannot be proven: skip, say why."""
    model, _ = _function_model(typed=False)
    fused, report = fuse(model)
    assert report.fused == []
    (skip,) = report.skipped
    assert "does not split a static channel axis" in skip.reason


def test_rule_set_composes_with_an_onnx_ir_pass_manager():
    from onnxscript.rewriter import RewritePass

    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    model = ir.from_proto(single_model(nodes, SHAPE))
    result = ir.passes.PassManager([RewritePass(rule_set())])(model)
    assert result.modified
    assert len(_ours(ir.to_proto(result.model).graph.node)) == 1


@pytest.mark.parametrize("as_ir", [False, True], ids=["ModelProto", "ir.Model"])
def test_opset_below_13_is_raised_only_when_something_fuses(rng, as_ir):
    """tf2onnx-style pattern at opset 11 (ReduceMean with an axes attribute): the opset goes to
    13, the minimum of our function body; a model with nothing to fuse keeps its opset. An
    onnx_ir.Model is raised in place (the same object comes back)."""
    from keras_graphs import Builder, keras_group_norm

    def moments(b, xs, ctx):
        mean = b.op("ReduceMean", xs, axes=ctx.axes, keepdims=1)
        d = b.op("Sub", xs, mean)
        return mean, b.op("ReduceMean", b.op("Mul", d, d), axes=ctx.axes, keepdims=1)

    b = Builder()
    gn = keras_group_norm(b, "x", SHAPE, 4, moments)
    model = b.model([("x", onnx.TensorProto.FLOAT, list(SHAPE))], [(gn.y, onnx.TensorProto.FLOAT, list(SHAPE))], opset=11)
    if as_ir:
        ir_model = ir.from_proto(model)
        result, report = fuse(ir_model, verify=True)
        assert result is ir_model
        fused = ir.to_proto(ir_model)
    else:
        fused, report = fuse(model, verify=True)
    assert len(report.fused) == 1 and report.verification.passed
    assert "raised from 11 to 13" in report.notes[0]
    assert {o.domain: o.version for o in fused.opset_import}[""] == 13
    onnx.checker.check_model(fused, full_check=True)
    x = rng.normal(size=SHAPE).astype(np.float32)
    (y,) = run_ort(fused, x)
    expected = ops.group_normalization(x.astype(np.float64), gn.gamma.astype(np.float64), gn.beta.astype(np.float64), groups=4).astype(np.float32)
    assert tolerance_for(np.float32).check(y, expected)[0]

    plain = single_model([onnx.helper.make_node("Relu", ["x"], ["y"])], SHAPE, opset=11)
    unchanged, report = fuse(plain)
    assert report.fused == [] and unchanged == plain and "nothing to fuse" in report.notes[0]


def test_unknown_target_is_refused():
    model, _ = _decorated_model()
    with pytest.raises(ValueError, match="unknown target 'gpu'"):
        fuse(model, target="gpu")
