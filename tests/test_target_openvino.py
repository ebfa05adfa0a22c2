"""Target ``openvino`` on the layer arrangement OpenVINO's CPU plugin crashes on.

OpenVINO 2026.4's CPU plugin dies with SIGSEGV in ``compile_model`` when the output of a
GroupNormalization it runs as a "snippet" (small groups) feeds an elementwise op whose other
operand another fused elementwise op computes: the residual ``Add(GroupNorm(conv(h)), h)`` of
a ResNet bottleneck, ``h`` a Relu (``rewriter/targets/openvino.py``). The model here is a small
TorchScript-style export of such a stage (``torch.nn.GroupNorm`` as Reshape ->
InstanceNormalization -> Reshape -> Mul -> Add): a residual layer, a SiLU layer (``Mul(y,
Sigmoid(y))``, which compiles) and a downsampling-style ``Add(GroupNorm, GroupNorm)`` (which
compiles). OpenVINO runs in a child process, so a segfault fails the test instead of pytest.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort
from keras_graphs import F32, Builder
from runtimes import available, run_in_child

from onnx_groupnorm import ops
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter.targets import openvino

#: 8 channels a group on 8x8: 512 values a group, small enough for OpenVINO to run the layer
#: as a snippet (larger groups become an MVN, which never crashed).
SHAPE = (1, 64, 8, 8)
GROUPS = 8
EPS = 1e-5
#: The layers of the stage below, by what follows them.
RESIDUAL, SILU, PAIR_A, PAIR_B = "res_gn", "silu_gn", "pair_a_gn", "pair_b_gn"


def _torch_group_norm(b: Builder, x: str, name: str, rng) -> str:
    """torch.nn.GroupNorm(GROUPS, C) as TorchScript exports it (opset 17)."""
    channels = SHAPE[1]
    grouped = b.op("Reshape", x, b.i64([0, GROUPS, -1]), name=f"{name}/Reshape")
    normed = b.op("InstanceNormalization", grouped, np.ones(GROUPS, np.float32), np.zeros(GROUPS, np.float32), epsilon=EPS)
    restored = b.op("Reshape", normed, b.op("Shape", x))
    scaled = b.op("Mul", restored, rng.normal(1, 0.5, (channels, 1, 1)).astype(np.float32))
    return b.op("Add", scaled, rng.normal(0, 0.5, (channels, 1, 1)).astype(np.float32), name=f"{name}/Add")


def _conv(b: Builder, x: str, rng) -> str:
    channels = SHAPE[1]
    return b.op("Conv", x, (rng.standard_normal((channels, channels, 3, 3)) / (3 * channels**0.5)).astype(np.float32), pads=[1, 1, 1, 1])


def resnet_stage(seed: int = 0, identity: bool = False) -> onnx.ModelProto:
    """Relu(x) -> GN(conv) + residual; GN -> SiLU; GN(conv) + GN(conv); all static. The
    residual is a bare Relu, as after a previous block's Add (a Conv's Relu is fused into the
    Conv by OpenVINO and does not crash it)."""
    rng = np.random.default_rng(seed)
    b = Builder("stage")
    h = b.op("Relu", "x")
    normed = _torch_group_norm(b, _conv(b, h, rng), RESIDUAL, rng)
    if identity:  # OpenVINO drops it: the Add still reads the GroupNorm
        normed = b.op("Identity", normed)
    residual = b.op("Relu", b.op("Add", normed, h))
    silu_in = _torch_group_norm(b, _conv(b, residual, rng), SILU, rng)
    silu = b.op("Mul", silu_in, b.op("Sigmoid", silu_in))
    pair = b.op("Add", _torch_group_norm(b, _conv(b, silu, rng), PAIR_A, rng), _torch_group_norm(b, _conv(b, silu, rng), PAIR_B, rng))
    b.op("Relu", pair, name="y")
    return b.model([("x", F32, list(SHAPE))], [("y", F32, list(SHAPE))], opset=17)


def _mapped(model: onnx.ModelProto) -> set[str]:
    return {n.name.split("/")[0] for n in model.graph.node if (n.domain, n.op_type) == (openvino.DOMAIN, openvino.OP_TYPE)}


@pytest.fixture(scope="module")
def stage():
    model = resnet_stage()
    fused, report = fuse(model, target="openvino")
    assert len(report.fused) == 4
    return model, fused, report


@pytest.mark.parametrize("identity", [False, True])
def test_residual_layer_is_inlined_and_the_others_stay_native(identity):
    fused, report = fuse(resnet_stage(identity=identity), target="openvino")
    assert _mapped(fused) == {SILU, PAIR_A, PAIR_B}
    (note,) = [n for n in report.notes if "inlined" in n]
    assert RESIDUAL in note and "SIGSEGV" in note


def test_openvino_target_output_runs_in_onnxruntime(stage, rng):
    model, fused, _ = stage
    x = rng.standard_normal(SHAPE).astype(np.float32)
    ok, worst = tolerance_for(np.float32).check(run_ort(fused, x)[0], run_ort(model, x)[0].astype(np.float64))
    assert ok, worst


def test_openvino_compiles_and_matches_the_original(stage, rng):
    """Fails before the fix: the native residual layer took ``compile_model`` down (SIGSEGV)."""
    if not available("openvino"):
        pytest.skip("openvino is not installed")
    model, fused, _ = stage
    x = rng.standard_normal(SHAPE).astype(np.float32)
    (expected,) = run_in_child("openvino", model, x)
    (actual,) = run_in_child("openvino", fused, x)
    ok, worst = tolerance_for(np.float32).check(actual, expected.astype(np.float64))
    assert ok, worst


@pytest.mark.slow
def test_openvino_still_crashes_on_the_native_residual_layer(stage, rng, monkeypatch):
    """Why the rule exists: the same stage with every layer native still kills OpenVINO. When
    this fails, OpenVINO has fixed its snippets and ``_snippet_hazard`` can go (for that version
    on). The crash needs the CPU plugin's snippets (AVX2/AVX-512 CPUs)."""
    if not available("openvino"):
        pytest.skip("openvino is not installed")
    model, _, _ = stage
    monkeypatch.setattr(openvino, "_plan", lambda candidates: {node: openvino._native(node) for _, node in candidates})
    fused, _ = fuse(model, target="openvino")
    assert _mapped(fused) == {RESIDUAL, SILU, PAIR_A, PAIR_B}
    with pytest.raises(RuntimeError, match="signal 11"):
        run_in_child("openvino", fused, rng.standard_normal(SHAPE).astype(np.float32))
