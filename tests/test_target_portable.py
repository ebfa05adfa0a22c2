"""Targets ``portable`` and ``openvino``: what they emit, and that it runs where it should.

Default run: every corpus model fused with ``portable`` holds standard ops only, at the input's
own opset, and reproduces the framework's outputs in onnxruntime; the ``openvino`` target maps
the channels-first layers to OpenVINO's op with our body attached and still runs in
onnxruntime. Opt-in (``-m slow``): both targets on the whole corpus in OpenVINO (f32), tract
and onnx's ReferenceEvaluator, wherever the original export runs there.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import data, default_opset, entries, load
from helpers import run_ort
from runtimes import RUNNERS, available

from onnx_groupnorm import ops
from onnx_groupnorm.ops.tolerances import tolerance_for
from onnx_groupnorm.rewriter import FuseReport, fuse
from onnx_groupnorm.rewriter.targets import openvino, portable

BLOCK_MARKERS = ("block",)


def _runnable(entry) -> bool:
    return not entry["negative"] and all(i["dtype"] != "bfloat16" for i in entry["inputs"])


def _assert_matches(actual, entry) -> None:
    _, expected = data(entry)
    tol = entry["tolerance"]
    for a, e in zip(actual, expected, strict=True):
        assert np.asarray(a).shape == e.shape
        np.testing.assert_allclose(np.asarray(a, np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])


def _domains(model: onnx.ModelProto) -> set[str]:
    found = {n.domain for n in model.graph.node}
    for function in model.functions:
        found |= {n.domain for n in function.node}
    return found


@pytest.mark.parametrize("entry", entries(lambda e: not e["negative"]))
def test_portable_is_standard_ops_at_the_model_opset(entry):
    model = load(entry)
    fused, report = fuse(model, target="portable")
    assert len(report.fused) == entry["expected_group_norms"]
    assert _domains(fused) <= {"", "ai.onnx", "ai.onnx.ml"}
    assert not any(f.domain == ops.DOMAIN for f in fused.functions)
    assert ops.DOMAIN not in {o.domain for o in fused.opset_import}
    assert default_opset(fused) == default_opset(model)
    if _runnable(entry):
        inputs, _ = data(entry)
        _assert_matches(run_ort(fused, *inputs), entry)


@pytest.mark.parametrize("entry", entries(lambda e: _runnable(e) and any(m in e["name"] for m in BLOCK_MARKERS)))
def test_openvino_target_maps_channels_first_layers(entry):
    model = load(entry)
    fused, report = fuse(model, target="openvino")
    mapped = [n for n in fused.graph.node if (n.domain, n.op_type) == (openvino.DOMAIN, openvino.OP_TYPE)]
    assert mapped, report.notes
    assert len(mapped) + sum("inlined" in note for note in report.notes) == entry["expected_group_norms"]
    assert not any(n.domain == ops.DOMAIN for n in fused.graph.node)
    assert default_opset(fused) == default_opset(model)
    bodies = {f.overload for f in fused.functions if (f.domain, f.name) == (openvino.DOMAIN, openvino.OP_TYPE)}
    assert {n.overload for n in mapped} <= bodies
    onnx.checker.check_model(fused)
    inputs, _ = data(entry)
    _assert_matches(run_ort(fused, *inputs), entry)  # onnxruntime runs the attached body


def _runs(runtime, model, inputs):
    try:
        return RUNNERS[runtime](model, *inputs)
    except Exception:  # noqa: BLE001 - the original does not run there: nothing to compare
        return None


def _meets(actual, entry) -> bool:
    try:
        _assert_matches(actual, entry)
    except AssertionError:
        return False
    return True


#: onnx 1.23's ReferenceEvaluator computes BatchNormalization before opset 14 wrongly (an
#: identity BatchNormalization, epsilon 0, is 4e-2 off at opset 13, exact at 15), and our cf
#: body ends with one: onnxruntime, OpenVINO and tract agree with the framework there.
_REFERENCE_MIN_OPSET = 14


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "tract", "reference"])
@pytest.mark.parametrize("target", ["portable", "openvino"])
def test_target_runs_wherever_the_original_runs(target, runtime):
    """Whole corpus (one test per runtime to keep the sessions' start-up in one place). The
    fused model must meet the framework's tolerance there, or, where the runtime's own
    arithmetic misses it for the original too (tract computes float16 in float16), match the
    original's output in that runtime within the same tolerance."""
    if not available(runtime):
        pytest.skip(f"{runtime} is not installed")
    if (target, runtime) == ("openvino", "tract"):
        pytest.skip("tract runs no custom-domain function: the openvino target is not for tract")
    failures, compared = [], 0
    for param in entries(_runnable):
        entry = param.values[0]
        if runtime == "reference" and entry["opset"] < _REFERENCE_MIN_OPSET:
            continue
        inputs, _ = data(entry)
        model = load(entry)
        original = _runs(runtime, model, inputs)
        if original is None:
            continue
        fused, _ = fuse(model, target=target)
        if runtime == "reference" and target == "openvino":
            variants = collections.Counter(
                n.overload for n in fused.graph.node if n.domain == openvino.DOMAIN
            )
            if len(variants) > 1:
                continue  # the ReferenceEvaluator ignores function overloads (one body per op)
        compared += 1
        try:
            actual = RUNNERS[runtime](fused, *inputs)
            if _meets(original, entry):
                _assert_matches(actual, entry)
            else:
                tol = entry["tolerance"]
                for a, o in zip(actual, original, strict=True):
                    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(o, np.float64), rtol=tol["rtol"], atol=tol["atol"])
        except Exception as e:  # noqa: BLE001 - collect them all
            failures.append(f"{entry['name']}: {' '.join(str(e).split())[:300]}")
    assert compared > 0
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("runtime", list(RUNNERS))
@pytest.mark.parametrize("shape, axis", [((1, 64, 16, 16), 1), ((1, 16, 16, 64), -1)])
def test_portable_body_keeps_precision_in_every_runtime(runtime, shape, axis, rng):
    """Inputs with |mean| >> std (1e3 / 1e-2), where one-pass variances lose every digit: our
    inlined body stays within the float32 tolerance of the float64 NumPy reference."""
    if not available(runtime):
        pytest.skip(f"{runtime} is not installed")
    model = ops.make_model(shape, groups=8, axis=axis, opset=17)
    inlined = ir.from_proto(model)
    portable.inline_ours(inlined, FuseReport(), "portable")
    inlined = ir.to_proto(inlined)
    assert _domains(inlined) == {""}
    x = (1e3 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    expected = ops.group_normalization(x.astype(np.float64), np.ones(64), np.zeros(64), groups=8, axis=axis)
    ok, worst = tolerance_for(np.float32).check(RUNNERS[runtime](inlined, x)[0], expected)
    assert ok, worst
