"""Timing help shared by the benchmark scripts: sessions that do not fight for the cores,
alternated runs, medians, and the machine description printed above every table."""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["session", "time_alternated", "machine", "copy_bandwidth", "random_inputs", "THREADS"]

THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # With several sessions in one process, idle sessions' spinning threads steal the
    # cores from the one being timed unless spinning is off.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_alternated(runners: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each zero-argument callable, calls interleaved round-robin."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}


def random_inputs(model: onnx.ModelProto, size: int = 1) -> list[np.ndarray]:
    """Seeded standard-normal inputs for the graph inputs: static dims as declared, a symbolic
    batch (axis 0) of 1 and other symbolic dims of ``size``."""
    rng = np.random.default_rng(0)
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (1 if k == 0 else size) for k, d in enumerate(t.shape.dim)]
        out.append(rng.normal(size=shape).astype(_DTYPES.get(t.elem_type, np.float32)))
    return out


def copy_bandwidth(nbytes: int, repeats: int = 20) -> float:
    """Bytes per second of a large NumPy copy (one read + one write per byte copied)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__} (CPU, {THREADS} intra-op threads, "
        f"spinning off), onnx {onnx.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
    )
