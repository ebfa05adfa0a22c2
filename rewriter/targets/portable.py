"""Target ``portable``: only standard ONNX ops, at the model's own opset.

Runtimes that do not execute model-local functions in a custom domain (OpenVINO, tract) cannot
run our op, with or without its function body. This target first moves channels-last layers
onto the exporters' channels-first tensors as the ``ort`` target does (fewer Transposes
help every runtime), then inlines our op's precise body (:mod:`ops.functions`) in place of each
node: the result holds standard ops of the default domain at the opset the model already
imports, so it runs wherever the original export ran.

Why not the standard ``GroupNormalization`` where the opset has it: GroupNormalization-21's
function body (what most runtimes run) computes the variance as E[x^2] - E[x]^2, which loses
every digit when ``|mean| >> std`` (``benchmarks/precision.py``), and GroupNormalization-18
(per-group scale/bias) is deprecated. Our inlined body keeps the corrected two-pass precision.

``inline_ours`` (inline every node of our op left in a model) is shared with the ``openvino``
target, which inlines the nodes its native form cannot hold.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ...ops import Variant, contract, function_proto
from ...ops.builder import VARIANT_KEY
from .._graphs import graph_likes, is_our_function, is_ours
from ..report import FuseReport
from . import ort_cpu

__all__ = ["lower", "inline_ours", "ABSORBS_ACTIVATION"]

logger = logging.getLogger(__name__)

#: An absorbed SiLU inlines to the same Sigmoid/Mul nodes as an unabsorbed one: no gain.
ABSORBS_ACTIVATION = False


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", contract.MIN_OPSET))


def inline_ours(model: ir.Model, report: FuseReport, target: str) -> int:
    """Replace every node of our op by its function body, in place; returns how many.

    The bodies are built for the model's default opset (``ops.function_proto``) and inlined
    with onnx-ir's InlinePass restricted to our functions; the model's own functions are
    kept as they are (the pass would drop the unused ones).
    """
    ours = [node for container in graph_likes(model) for node in container if is_ours(node)]
    if not ours:
        return 0
    opset = _default_opset(model)
    # A node with no overload (a model fused before) uses the default body's recorded variant.
    default = next(
        (f.metadata_props.get(VARIANT_KEY) for f in model.functions.values() if is_our_function(f) and not f.overload),
        None,
    )
    for node in ours:
        if not node.overload and default:
            node.overload = default
    own = {key: function for key, function in model.functions.items() if not is_our_function(function)}
    for key in [key for key, function in model.functions.items() if is_our_function(function)]:
        del model.functions[key]
    for overload in sorted({node.overload for node in ours}):
        proto = function_proto(Variant.from_overload(overload), opset)
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    common_passes.InlinePass(criteria=is_our_function)(model)
    for key, function in own.items():
        model.functions.setdefault(key, function)
    if contract.DOMAIN in model.opset_imports and not any(
        is_ours(node) for container in graph_likes(model) for node in container
    ):
        del model.opset_imports[contract.DOMAIN]
    for node in ours:
        report.lowered.append({"node": node.name or "", "form": f"{target}: our body inlined ({node.overload}), standard ops at opset {opset}"})
    logger.info("%s target: inlined %d node(s) of our op", target, len(ours))
    return len(ours)


def lower(model: ir.Model, report: FuseReport) -> None:
    """Lift channels-last layers to channels-first (``ort``), then inline our op, in place."""
    ort_cpu.lower(model, report)
    inline_ours(model, report, "portable")
