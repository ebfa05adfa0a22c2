"""Speed of our op's function body in onnxruntime (CPU) against the alternatives.

For channels-last and channels-first inputs at 1x64x64x512, 1x128x128x256 and 2x32x32x320
(groups 32, epsilon 1e-6), in ONE process, sessions alternated, median of repeated runs:

* ``ours``     our GroupNormalization (onnxruntime inlines the function body);
* ``gn21``     standard ONNX GroupNormalization-21 (wrapped in two Transposes for channels-last);
* ``keras``    the Keras+TensorFlow ``model.export(format="onnx")`` (tf2onnx) graph of the same
               layer, from ``benchmarks/models/`` (made by ``benchmarks/make_keras_models.py``);
* ``torch``    ``torch.nn.functional.group_norm`` (channels_last memory format for the
               channels-last rows), when torch is importable.

Prints a Markdown table with milliseconds, the ratios alternative/ours (above 1 = ours is
faster), our max error against a float64 NumPy reference, and the memory-traffic bound
(two reads and one write of the input at the measured copy bandwidth).

    python benchmarks/bench_op.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import onnx
from _timing import THREADS, copy_bandwidth, machine, session, time_alternated

from onnx_groupnorm import ops

HERE = pathlib.Path(__file__).resolve().parent
SHAPES = [(1, 64, 64, 512), (1, 128, 128, 256), (2, 32, 32, 320)]
GROUPS, EPSILON = 32, 1e-6


def _gn21(shape_cl, channels_last: bool, gamma, beta) -> onnx.ModelProto:
    h = onnx.helper
    n, hh, ww, c = shape_cl
    shape = shape_cl if channels_last else (n, c, hh, ww)
    nodes = []
    x = "X"
    if channels_last:
        nodes.append(h.make_node("Transpose", ["X"], ["Xt"], perm=[0, 3, 1, 2]))
        x = "Xt"
    nodes.append(h.make_node("GroupNormalization", [x, "gamma", "beta"], ["Yt" if channels_last else "Y"], num_groups=GROUPS, epsilon=EPSILON))
    if channels_last:
        nodes.append(h.make_node("Transpose", ["Yt"], ["Y"], perm=[0, 2, 3, 1]))
    graph = h.make_graph(
        nodes, "gn21",
        [h.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
        [h.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(gamma, "gamma"), onnx.numpy_helper.from_array(beta, "beta")],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _keras(shape_cl, channels_last: bool):
    """The real tf2onnx export and its gamma/beta, or None when not generated."""
    n, hh, ww, c = shape_cl
    layout = "nhwc" if channels_last else "nchw"
    path = HERE / "models" / f"keras_tf_gn_{layout}_{hh}x{ww}x{c}.onnx"
    if not path.exists():
        return None
    params = np.load(path.with_suffix(".npz"))
    return onnx.load(path), params["gamma"], params["beta"]


def _torch_runner(x: np.ndarray, channels_last: bool, gamma, beta):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    if channels_last:
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.from_numpy(x)
    g, b = torch.from_numpy(gamma), torch.from_numpy(beta)

    def run():
        with torch.inference_mode():
            torch.nn.functional.group_norm(t, GROUPS, g, b, EPSILON)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}\n")
    print("| layout | shape | ours ms | gn21 ms | keras ms | torch ms | bound ms | gn21/ours | keras/ours | torch/ours | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape_cl in SHAPES:
        n, hh, ww, c = shape_cl
        bandwidth = copy_bandwidth(4 * n * hh * ww * c)
        for channels_last in (True, False):
            shape = shape_cl if channels_last else (n, c, hh, ww)
            axis = -1 if channels_last else 1
            keras = _keras(shape_cl, channels_last)
            if keras is not None:
                keras_model, gamma, beta = keras
            else:
                gamma = rng.normal(1, 0.3, c).astype(np.float32)
                beta = rng.normal(0, 0.3, c).astype(np.float32)
            x = rng.normal(0.5, 2.0, shape).astype(np.float32)
            ours = session(ops.make_model(shape, groups=GROUPS, axis=axis, epsilon=EPSILON, gamma=gamma, beta=beta))
            runners = {"ours": lambda s=ours: s.run(None, {"X": x})}
            gn21 = session(_gn21(shape_cl, channels_last, gamma, beta))
            runners["gn21"] = lambda s=gn21: s.run(None, {"X": x})
            if keras is not None:
                ks = session(keras_model)
                kname = ks.get_inputs()[0].name
                runners["keras"] = lambda s=ks: s.run(None, {kname: x})
            torch_run = _torch_runner(x, channels_last, gamma, beta)
            if torch_run is not None:
                runners["torch"] = torch_run
            ms = time_alternated(runners, args.repeats)
            y = ours.run(None, {"X": x})[0]
            y64 = ops.group_normalization(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), groups=GROUPS, axis=axis, epsilon=EPSILON)
            err = float(np.abs(y - y64).max())
            bound = 3 * x.nbytes / bandwidth * 1e3

            def fmt(k):
                return f"{ms[k]:.2f}" if k in ms else "n/a"

            def ratio(k):
                return f"{ms[k] / ms['ours']:.2f}x" if k in ms else "n/a"

            label = "channels-last" if channels_last else "channels-first"
            print(f"| {label} | {'x'.join(map(str, shape))} | {fmt('ours')} | {fmt('gn21')} | {fmt('keras')} | {fmt('torch')} | {bound:.2f} | {ratio('gn21')} | {ratio('keras')} | {ratio('torch')} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
