"""What --verify does to stay small, and that it judges the same: onnxruntime's large blocks
mapped on their own while it runs (rewriter.verify._large_blocks_mapped)."""

from __future__ import annotations

import ctypes
import sys

import onnxruntime
import pytest
from test_verify import _corpus_model, _fused

from onnx_groupnorm.rewriter import verify as verify_module

#: tf2onnx's channels-last layer after a Conv: Conv (NCHW) -> Transpose -> the layer, which
#: also reads Shape of the Conv's output; the ort target fuses it onto the Conv's output.
KERAS_TF_MODEL = "keras_tf_fromkeras_nhwc_r4_resblock_g8_initial"


# -- glibc's thresholds ---------------------------------------------------------------------------


def test_onnxruntime_runs_with_large_blocks_mapped(monkeypatch):
    """Every session is created and run with glibc's mmap threshold at MMAP_THRESHOLD_BYTES;
    the float64 layer checks between runs, and whatever follows verification, at
    HEAP_THRESHOLD_BYTES (their temporaries reused from the heap)."""
    thresholds: list[int] = []
    seen: dict[str, set[int]] = {"create": set(), "run": set(), "layer check": set()}
    real_mmap_threshold = verify_module._mmap_threshold

    def record(size: int) -> None:
        thresholds.append(size)
        real_mmap_threshold(size)

    def spy(kind: str, function):
        def wrapped(*args, **kwargs):
            seen[kind].add(thresholds[-1] if thresholds else None)
            return function(*args, **kwargs)
        return wrapped

    session_class = onnxruntime.InferenceSession
    monkeypatch.setattr(verify_module, "_mmap_threshold", record)
    monkeypatch.setattr(session_class, "__init__", spy("create", session_class.__init__))
    monkeypatch.setattr(session_class, "run", spy("run", session_class.run))
    monkeypatch.setattr(verify_module._Tally, "measure", spy("layer check", verify_module._Tally.measure))
    model = _corpus_model(KERAS_TF_MODEL)
    fused, _ = _fused(model, target="ort")
    assert verify_module.verify(model, fused).verdict == "passed"
    assert seen == {"create": {verify_module.MMAP_THRESHOLD_BYTES}, "run": {verify_module.MMAP_THRESHOLD_BYTES},
                    "layer check": {verify_module.HEAP_THRESHOLD_BYTES}}
    assert thresholds[-1] == verify_module.HEAP_THRESHOLD_BYTES


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        function = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("no glibc >= 2.33 (mallinfo2)")
    function.restype = _MallInfo2
    return function


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_thresholds_reach_glibc():
    """The thresholds are glibc's: a block of twice MMAP_THRESHOLD_BYTES is mapped on its own
    inside _large_blocks_mapped (one more mapped block while it lives), and comes from the heap
    outside it."""
    mallinfo2 = _mallinfo2()
    size = 2 * verify_module.MMAP_THRESHOLD_BYTES
    assert size < verify_module.HEAP_THRESHOLD_BYTES
    with verify_module._large_blocks_mapped():
        mapped = mallinfo2().hblks
        block = ctypes.create_string_buffer(size)  # malloc'ed by ctypes, freed when collected
        assert mallinfo2().hblks == mapped + 1
        del block
    heap = mallinfo2().hblks
    block = ctypes.create_string_buffer(size)
    assert mallinfo2().hblks == heap
    del block
