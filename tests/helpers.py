"""Helpers shared by tests (imported as ``helpers``; tests/ is on pythonpath)."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["run_ort", "session_options", "keras_dynamo_group_norm", "single_model"]


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _bf16_wrapped(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's Python API cannot feed or fetch bfloat16 NumPy arrays: wrap the graph
    in float32 <-> bfloat16 Casts (the body under test is unchanged)."""
    model = copy.deepcopy(model)
    graph = model.graph
    bf16 = onnx.TensorProto.BFLOAT16
    new_nodes = []
    for vi in graph.input:
        if vi.type.tensor_type.elem_type == bf16:
            inner = vi.name + "__bf16"
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == vi.name:
                        node.input[i] = inner
            new_nodes.append(onnx.helper.make_node("Cast", [vi.name], [inner], to=bf16))
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    tail = []
    for vi in graph.output:
        if vi.type.tensor_type.elem_type == bf16:
            inner = vi.name + "__bf16"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == vi.name:
                        node.output[i] = inner
            tail.append(onnx.helper.make_node("Cast", [inner], [vi.name], to=onnx.TensorProto.FLOAT))
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    nodes = new_nodes + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def run_ort(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` on onnxruntime CPU; bfloat16 arrays in and out are handled."""
    bf16 = any(np.asarray(x).dtype == ml_dtypes.bfloat16 for x in inputs)
    if bf16:
        model = _bf16_wrapped(model)
        inputs = tuple(np.asarray(x).astype(np.float32) for x in inputs)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feeds)
    if bf16:
        outputs = [o.astype(ml_dtypes.bfloat16) for o in outputs]
    return outputs


def keras_dynamo_group_norm(
    x: str,
    y: str,
    shape: tuple[int, ...],
    groups: int,
    *,
    epsilon: float = 1e-3,
    seed: int = 0,
    prefix: str = "gn",
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The nodes torch's dynamo exporter writes for a channels-last Keras GroupNormalization
    (research doc §3.3), with every constant as a Constant node so the nodes also work
    inside If branches and functions. Returns ``(nodes, {"gamma": .., "beta": ..})``."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    rank = len(shape)
    grouped = [-1, *shape[1:-1], groups, channels // groups]
    pshape = [1] * (rank - 1) + [groups, channels // groups]
    gamma = rng.normal(1, 0.5, channels).astype(np.float32)
    beta = rng.normal(0, 0.5, channels).astype(np.float32)
    axes = [*range(1, rank - 1), rank]

    def const(name, value):
        return onnx.helper.make_node("Constant", [], [f"{prefix}_{name}"], value=onnx.numpy_helper.from_array(np.asarray(value), f"{prefix}_{name}"))

    p = lambda n: f"{prefix}_{n}"  # noqa: E731
    mk = onnx.helper.make_node
    nodes = [
        const("target", np.array(grouped, np.int64)),
        const("axes", np.array(axes, np.int64)),
        const("two", np.array(2.0, np.float32)),
        const("eps", np.array(epsilon, np.float32)),
        const("gamma", gamma.reshape(pshape)),
        const("beta", beta.reshape(pshape)),
        const("shape", np.array(shape, np.int64)),
        mk("Reshape", [x, p("target")], [p("xg")], allowzero=1, name=p("group_reshape")),
        mk("ReduceMean", [p("xg"), p("axes")], [p("mean")], keepdims=1, name=p("mean")),
        mk("Pow", [p("xg"), p("two")], [p("sq")], name=p("square")),
        mk("ReduceMean", [p("sq"), p("axes")], [p("mean_sq")], keepdims=1, name=p("mean_sq")),
        mk("Pow", [p("mean"), p("two")], [p("mean2")], name=p("mean2")),
        mk("Sub", [p("mean_sq"), p("mean2")], [p("var")], name=p("var")),
        mk("Add", [p("var"), p("eps")], [p("var_eps")], name=p("var_eps")),
        mk("Sqrt", [p("var_eps")], [p("std")], name=p("std")),
        mk("Reciprocal", [p("std")], [p("rstd")], name=p("rstd")),
        mk("Mul", [p("rstd"), p("gamma")], [p("inv")], name=p("inv")),
        mk("Neg", [p("mean")], [p("neg")], name=p("neg")),
        mk("Mul", [p("neg"), p("inv")], [p("shift0")], name=p("shift0")),
        mk("Add", [p("shift0"), p("beta")], [p("shift")], name=p("shift")),
        mk("Mul", [p("xg"), p("inv")], [p("scaled")], name=p("scaled")),
        mk("Add", [p("scaled"), p("shift")], [p("yg")], name=p("yg")),
        mk("Reshape", [p("yg"), p("shape")], [y], allowzero=1, name=p("out_reshape")),
    ]
    return nodes, {"gamma": gamma, "beta": beta}


def single_model(nodes, shape, *, opset: int = 20, x: str = "x", y: str = "y", **kwargs) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, shape)],
        **kwargs,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)
