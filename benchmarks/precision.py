"""Accuracy on inputs with a large mean: our op, ONNX GroupNormalization-21, torch's
InstanceNormalization form (both in onnxruntime), OpenVINO's GroupNormalization kernel (what
the ``openvino`` target maps to, run at f32) and the Keras algorithm in float32, against
float64 on the same float32 input.

    python benchmarks/precision.py

For x = mean + std * N(0, 1) in float32 (1x64x16x16 channels-first and 1x16x16x64
channels-last, 8 groups), prints max |y - y64| / (1 + |y64|) per method (channels-last
inputs are moved to channels-first for the channels-first-only forms). OpenVINO's column is
"n/a" when openvino is not installed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnx_groupnorm import ops


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _gn21(shape) -> onnx.ModelProto:
    h = onnx.helper
    c = shape[1]
    graph = h.make_graph(
        [h.make_node("GroupNormalization", ["X", "g", "b"], ["Y"], num_groups=8, epsilon=1e-3)], "gn21",
        [h.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
        [h.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(np.ones(c, np.float32), "g"), onnx.numpy_helper.from_array(np.zeros(c, np.float32), "b")],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _instance_norm_form(shape) -> onnx.ModelProto:
    """torch.onnx's GroupNorm export: Reshape [N, G, -1] -> InstanceNormalization -> Reshape back."""
    h = onnx.helper
    nodes = [
        h.make_node("Reshape", ["X", "grouped"], ["x3"]),
        h.make_node("InstanceNormalization", ["x3", "ones", "zeros"], ["n3"], epsilon=1e-3),
        h.make_node("Reshape", ["n3", "shape"], ["Y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([0, 8, -1], np.int64), "grouped"),
        onnx.numpy_helper.from_array(np.array(shape, np.int64), "shape"),
        onnx.numpy_helper.from_array(np.ones(8, np.float32), "ones"),
        onnx.numpy_helper.from_array(np.zeros(8, np.float32), "zeros"),
    ]
    graph = h.make_graph(nodes, "instance_norm_form", [h.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
                         [h.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _openvino(shape, x: np.ndarray) -> np.ndarray | None:
    """OpenVINO's GroupNormalization kernel (``org.openvinotoolkit::GroupNorm``) at f32."""
    try:
        import openvino as ov
    except ImportError:
        return None
    h = onnx.helper
    c = shape[1]
    node = h.make_node("GroupNorm", ["X", "g", "b"], ["Y"], domain="org.openvinotoolkit", num_groups=8, eps=1e-3)
    graph = h.make_graph(
        [node], "ov_gn", [h.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
        [h.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(np.ones(c, np.float32), "g"), onnx.numpy_helper.from_array(np.zeros(c, np.float32), "b")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("org.openvinotoolkit", 1)], ir_version=8)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled([x])[compiled.outputs[0]])


def _channels_first(run, x: np.ndarray, axis: int, shape_cf) -> np.ndarray | None:
    if axis == 1:
        return run(shape_cf, x)
    y = run(shape_cf, np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    return None if y is None else np.moveaxis(y, 1, -1)


def _error(y, y64) -> str:
    if y is None:
        return "n/a"
    err = np.abs(y.astype(np.float64) - y64) / (1 + np.abs(y64))
    return "NaN" if np.isnan(err).any() else f"{err.max():.1e}"


def main() -> None:
    rng = np.random.default_rng(0)
    print(
        "| mean | std | layout | ours (onnxruntime) | GroupNormalization-21 (onnxruntime) | torch InstanceNormalization form "
        "(onnxruntime) | OpenVINO GroupNormalization (f32) | Keras algorithm, float32 (NumPy) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mean, std in ((0.0, 1.0), (1e2, 1e-1), (1e3, 1e-2), (1e4, 1e-2)):
        for layout, shape, axis in (("channels-first", (1, 64, 16, 16), 1), ("channels-last", (1, 16, 16, 64), -1)):
            x = (mean + std * rng.standard_normal(shape)).astype(np.float32)
            y64 = ops.group_normalization(x.astype(np.float64), np.ones(64), np.zeros(64), groups=8, axis=axis)
            ours = _run(ops.make_model(shape, groups=8, axis=axis), x)
            keras32 = ops.group_normalization(x, np.ones(64, np.float32), np.zeros(64, np.float32), groups=8, axis=axis)
            shape_cf = (1, 64, 16, 16)
            gn21 = _error(_channels_first(lambda sh, v: _run(_gn21(sh), v), x, axis, shape_cf), y64)
            instance = _error(_channels_first(lambda sh, v: _run(_instance_norm_form(sh), v), x, axis, shape_cf), y64)
            openvino = _error(_channels_first(_openvino, x, axis, shape_cf), y64)
            print(f"| {mean:g} | {std:g} | {layout} | {_error(ours, y64)} | {gn21} | {instance} | {openvino} | {_error(keras32, y64)} |")


if __name__ == "__main__":
    main()
