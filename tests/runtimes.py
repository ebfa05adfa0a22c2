"""Run a model in each ONNX runtime the targets are meant for (imported by the target tests).

Every runner takes a ModelProto and the input arrays (graph-input order) and returns the output
arrays; a runtime that is not installed raises ``pytest.skip`` through :func:`available`.
OpenVINO runs at f32 (``INFERENCE_PRECISION_HINT``: its default on CPUs with AMX/AVX512-BF16 is
bf16, whose errors exceed every float32 tolerance). :func:`run_in_child` runs one in a child
process, so a runtime that crashes (OpenVINO's SIGSEGV) fails a test instead of ending pytest.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from helpers import run_ort

__all__ = ["RUNNERS", "available", "run_openvino", "run_tract", "run_reference", "run_in_child"]

_TRACT_TYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32"}


def _feed_names(model: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def run_openvino(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(list(inputs))
    return [np.asarray(results[out]) for out in compiled.outputs]


def run_tract(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    import tract

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save(model, path)
        inference = tract.onnx().load(path)
        for i, x in enumerate(inputs):  # concrete input facts: tract's analysis needs them
            inference.set_input_fact(i, ",".join([*map(str, x.shape), _TRACT_TYPES[x.dtype.name]]))
        runnable = inference.into_model().into_runnable()
    return [out.to_numpy() for out in runnable.run(list(inputs))]


def run_reference(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(model).run(None, dict(zip(_feed_names(model), inputs))))


RUNNERS = {"onnxruntime": run_ort, "openvino": run_openvino, "tract": run_tract, "reference": run_reference}
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tract": "tract", "reference": "onnx"}


_CHILD = """
import sys
import numpy as np, onnx
sys.path.insert(0, sys.argv[1])
from runtimes import RUNNERS
folder = sys.argv[3]
with np.load(folder + "/inputs.npz") as d:
    inputs = [d[f"in_{i}"] for i in range(len(d.files))]
outputs = RUNNERS[sys.argv[2]](onnx.load(folder + "/model.onnx"), *inputs)
np.savez(folder + "/outputs.npz", **{f"out_{i}": np.asarray(o) for i, o in enumerate(outputs)})
"""

#: Compiling and running a test model takes seconds; a hung child is a failure, not a stall.
_CHILD_TIMEOUT_S = 300


def run_in_child(runtime: str, model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    """``RUNNERS[runtime]`` in a child process; RuntimeError naming the signal or the error if it dies."""
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(model, os.path.join(folder, "model.onnx"))
        np.savez(os.path.join(folder, "inputs.npz"), **{f"in_{i}": x for i, x in enumerate(inputs)})
        tests = str(pathlib.Path(__file__).resolve().parent)
        done = subprocess.run([sys.executable, "-c", _CHILD, tests, runtime, folder], capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
        if done.returncode < 0:
            raise RuntimeError(f"{runtime} died with signal {-done.returncode}")
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"{runtime} failed: {last}")
        with np.load(os.path.join(folder, "outputs.npz")) as d:
            return [d[f"out_{i}"] for i in range(len(d.files))]


def available(runtime: str) -> bool:
    return importlib.util.find_spec(_MODULES[runtime]) is not None
