"""What --verify does to stay small, and that it judges the same: the original's channels-last
layer input fetched after its Transpose (rewriter.verify._channels_last_input), onnxruntime's
large blocks mapped on their own while it runs (rewriter.verify._large_blocks_mapped)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir
import onnxruntime
import pytest
from keras_graphs import F32, Builder
from test_verify import _corpus_model, _fused, _mutated, _set_epsilon

from onnx_groupnorm.rewriter import verify as verify_module

#: tf2onnx's channels-last layer after a Conv: Conv (NCHW) -> Transpose -> the layer, which
#: also reads Shape of the Conv's output; the ort target fuses it onto the Conv's output.
KERAS_TF_MODEL = "keras_tf_fromkeras_nhwc_r4_resblock_g8_initial"
#: The same float32 values, channels last instead of first: NumPy sums their float64 reference
#: in another order (~1e-16 relative); any other difference would be far larger.
LAYOUT_REL = 1e-9


def _original_layers(model: onnx.ModelProto, fused: onnx.ModelProto, stack: contextlib.ExitStack) -> list:
    before = verify_module._Model(model, "original", "", stack)
    layers = verify_module._layers(onnx_ir.from_proto(fused))
    for layer in layers:
        verify_module._match_original(layer, before)
    return layers


def test_original_layer_input_is_fetched_after_its_channels_last_transpose(monkeypatch):
    """The original's layer input is taken after the Transpose tf2onnx puts before the layer
    (channels last), not as the Conv output the fused layer reads: the same numbers, so the
    same verdict and the same errors on both sides as fetching the Conv output."""
    model = _corpus_model(KERAS_TF_MODEL)
    fused, _ = _fused(model, target="ort")
    with contextlib.ExitStack() as stack:
        layers = _original_layers(model, fused, stack)
    moved = [layer for layer in layers if layer.original_x != layer.x]
    assert moved, [(layer.x, layer.original_x) for layer in layers]
    producers = {out: node for node in model.graph.node for out in node.output}
    for layer in moved:
        node = producers[layer.original_x]
        assert node.op_type == "Transpose" and node.input[0] == layer.x and layer.x_channels_last
        assert layer.shapes  # the Conv output's shape, read by the layer's final Reshape
    after = verify_module.verify(model, fused)
    monkeypatch.setattr(verify_module, "_channels_last_input", lambda *args: None)
    before = verify_module.verify(model, fused)
    assert after.verdict == before.verdict == "passed"
    assert after.outputs == before.outputs
    for a, b in zip(after.layers, before.layers, strict=True):
        assert (a.node, a.fused_error, a.fused_ratio) == (b.node, b.fused_error, b.fused_ratio)
        assert a.original_error == pytest.approx(b.original_error, rel=LAYOUT_REL)
        assert a.original_ratio == pytest.approx(b.original_ratio, rel=LAYOUT_REL)


@pytest.mark.parametrize("mutate", [None, _set_epsilon], ids=["right", "epsilon"])
def test_float64_subgraph_from_the_transposed_input(mutate):
    """The float64 evaluation of the original's subgraph starts after the Transpose (fed the
    Conv output's shape it reads): it confirms the right configuration, refutes a wrong one."""
    model = _corpus_model(KERAS_TF_MODEL)
    fused, _ = _fused(model, target="ort")
    if mutate is not None:
        fused = _mutated(fused, mutate)
    with contextlib.ExitStack() as stack:
        layer = next(layer for layer in _original_layers(model, fused, stack) if layer.original_x != layer.x)
    names = [layer.original_x, *layer.shapes]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.normal(size=[d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(names, session.run(names, feeds)))
    confirmed, why = verify_module._confirmed(onnx_ir.from_proto(model), layer, values[layer.original_x], {n: values[n] for n in layer.shapes})
    assert confirmed is (mutate is None), why


def _layer_graph(second_reader: str, perm: list[int]) -> onnx_ir.Model:
    """x [1, 4, 2, 2] -> Transpose(perm) -> t; y = t - mean(m) where m is t (the layer reads x
    through the Transpose alone), x itself (``"x"``) or Shape(x) cast to float (``"shape"``)."""
    b = Builder("g")
    t = b.op("Transpose", "x", perm=perm, name="t")
    m = {"t": t, "x": "x", "shape": None}[second_reader]
    if m is None:
        m = b.op("Cast", b.op("Shape", "x"), to=onnx.TensorProto.FLOAT)
    b.op("Sub", t, b.op("ReduceMean", m, keepdims=0), name="y")
    model = b.model([("x", F32, [1, 4, 2, 2])], [("y", F32, None)])
    return onnx_ir.from_proto(model)


@pytest.mark.parametrize(("reader", "perm", "expected"), [
    ("t", [0, 2, 3, 1], "t"),
    ("shape", [0, 2, 3, 1], "t"),  # Shape of x: fetched and fed on its own
    ("x", [0, 2, 3, 1], None),  # x read directly too: the layer's input is x
    ("t", [0, 3, 1, 2], None),  # not channels last
])
def test_channels_last_input_only_where_the_layer_reads_x_through_it(reader, perm, expected):
    assert verify_module._channels_last_input(_layer_graph(reader, perm), "x", "y") == expected


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


#: Run in a child process of its own: glibc's block counters are process-wide, and in pytest's
#: process other threads (onnxruntime's pools) allocate and free mapped blocks at any time.
_GLIBC_CHECK = """
import ctypes, sys
from onnx_groupnorm.rewriter import verify as verify_module

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

try:
    mallinfo2 = ctypes.CDLL(None).mallinfo2
except AttributeError:
    sys.exit(77)  # no glibc >= 2.33
mallinfo2.restype = MallInfo2
size = 2 * verify_module.MMAP_THRESHOLD_BYTES
assert size < verify_module.HEAP_THRESHOLD_BYTES
with verify_module._large_blocks_mapped():
    mapped = mallinfo2().hblks
    block = ctypes.create_string_buffer(size)  # malloc'ed by ctypes, freed when collected
    assert mallinfo2().hblks == mapped + 1, "not mapped on its own inside"
    del block
heap = mallinfo2().hblks
block = ctypes.create_string_buffer(size)
assert mallinfo2().hblks == heap, "mapped on its own outside"
del block
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_thresholds_reach_glibc():
    """The thresholds are glibc's: a block of twice MMAP_THRESHOLD_BYTES is mapped on its own
    inside _large_blocks_mapped (one more mapped block while it lives), and comes from the heap
    outside it."""
    child = subprocess.run([sys.executable, "-c", _GLIBC_CHECK], capture_output=True, text=True)
    if child.returncode == 77:
        pytest.skip("no glibc >= 2.33 (mallinfo2)")
    assert child.returncode == 0, child.stderr
