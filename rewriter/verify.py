"""Run the original and the rewritten model in onnxruntime (CPU) on the same seeded inputs.

Symbolic dimensions get concrete sizes; the same ``dim_param`` gets the same size in every
input. A model may constrain its sizes (a UNet needs even H/W, a Reshape a multiple of
something), so we try a few size sets and use the first one the original model accepts.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort

from ..ops.tolerances import Tolerance
from .report import Verification

__all__ = ["verify", "VERIFY_TOLERANCES"]

logger = logging.getLogger(__name__)

#: Graph against graph, not op against op: a GroupNormalization feeds Convs and more
#: GroupNormalizations, which pass on (and may amplify) the last-bit differences between
#: the exporter's algorithm (often E[x^2] - E[x]^2 in the input type) and ours. float32:
#: 1e-4 (~800 ulp), float16/bfloat16: 10 ulp of the format (1e-2, 8e-2), float64: 1e-9.
VERIFY_TOLERANCES = {
    "float32": Tolerance(rtol=1e-4, atol=1e-4),
    "float16": Tolerance(rtol=1e-2, atol=1e-2),
    "bfloat16": Tolerance(rtol=8e-2, atol=8e-2),
    "float64": Tolerance(rtol=1e-9, atol=1e-9),
}
_DEFAULT = Tolerance(rtol=1e-4, atol=1e-4)
_SIZE_SETS = ((2, 8), (2, 16), (1, 32), (3, 12), (1, 64))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inputs(session: ort.InferenceSession, batch: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i, arg in enumerate(session.get_inputs()):
        shape = []
        for axis, d in enumerate(arg.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                shape.append(batch if axis == 0 else size)
        np_type = {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(double)": np.float64,
            "tensor(int64)": np.int64,
            "tensor(int32)": np.int32,
            "tensor(bool)": np.bool_,
        }.get(arg.type)
        if np_type is None:
            raise ValueError(f"cannot make a random input of type {arg.type} for {arg.name!r}")
        if np.issubdtype(np_type, np.floating):
            feeds[arg.name] = rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 2), size=shape).astype(np_type)
        else:
            feeds[arg.name] = rng.integers(0, 2, size=shape).astype(np_type)
    return feeds


def verify(original: onnx.ModelProto, rewritten: onnx.ModelProto, *, seed: int = 0) -> Verification:
    """Compare every output of ``rewritten`` with ``original`` on seeded random inputs."""
    before, after = _session(original), _session(rewritten)
    last_error = None
    for batch, size in _SIZE_SETS:
        feeds = _inputs(before, batch, size, seed)
        try:
            expected = before.run(None, feeds)
        except Exception as e:  # the model does not accept these sizes; try the next set
            last_error = e
            continue
        actual = after.run(None, feeds)
        worst, max_abs, passed = 0.0, 0.0, True
        tolerance = _DEFAULT
        for a, b in zip(actual, expected):
            tolerance = VERIFY_TOLERANCES.get(np.asarray(b).dtype.name, _DEFAULT)
            ok, ratio = tolerance.check(a, b)
            passed &= ok
            worst = max(worst, ratio) if np.isfinite(ratio) else float("inf")
            diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
            max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
        return Verification(
            passed=bool(passed),
            max_abs_error=max_abs,
            worst_ratio=worst,
            rtol=tolerance.rtol,
            atol=tolerance.atol,
            inputs={k: list(v.shape) for k, v in feeds.items()},
        )
    raise ValueError(f"the original model did not run on any of the input sizes tried: {last_error}")
