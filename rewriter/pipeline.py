"""``fuse()``: :class:`GroupNormFusionPass` for a ``ModelProto`` or an ``onnx_ir.Model``,
with the optional verification in onnxruntime against the original.

Everything the rules did not rewrite is kept as it was: names, initializers, metadata,
functions, opset imports, value_info, doc strings (:mod:`.fusion_pass` says how).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from . import targets as targets_module
from .fusion_pass import GroupNormFusionPass
from .report import FuseReport

__all__ = ["fuse", "TARGETS"]

TARGETS = targets_module.TARGETS

logger = logging.getLogger(__name__)


def _proto_graphs(model: onnx.ModelProto) -> Iterable[onnx.GraphProto | onnx.FunctionProto]:
    def graphs_of(graph):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from graphs_of(attr.g)
                for g in attr.graphs:
                    yield from graphs_of(g)

    yield from graphs_of(model.graph)
    for function in model.functions:
        yield from graphs_of(function)


def _value_info_names(model: onnx.ModelProto) -> set[str]:
    return {vi.name for g in _proto_graphs(model) for vi in g.value_info}


def _keep_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """onnx-ir writes value_info for every typed value (initializers too): keep the input's."""
    for graph in _proto_graphs(model):
        kept = [vi for vi in graph.value_info if vi.name in names]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _snapshot(model: ir.Model) -> ir.Model:
    """A copy of ``model`` as it is: in-memory tensors copied, external ones still read from
    their files (a copy of the graph alone when the weights are external)."""
    from . import io

    copy_ = ir.from_proto(ir.to_proto(model))
    folders = io.external_folders(model)
    if len(folders) == 1:
        ir.external_data.set_base_dir(copy_.graph, next(iter(folders)))
    return copy_


def fuse(
    model: onnx.ModelProto | ir.Model,
    *,
    verify: bool = False,
    keep_standard: bool = False,
    target: str = targets_module.DEFAULT_TARGET,
    absorb_activation: bool | None = None,
    precise: bool = False,
    source: str = "",
    seed: int = 0,
    verify_inputs=None,
    verify_original: str | os.PathLike | None = None,
    verify_workdir: str | os.PathLike | None = None,
) -> tuple[onnx.ModelProto | ir.Model, FuseReport]:
    """Fuse every exported GroupNormalization in ``model`` into our op.

    A ``ModelProto`` is not modified (a new one is returned; the input itself, copied, when
    nothing was rewritten); an ``onnx_ir.Model`` is rewritten in place and returned (the
    same object). ``verify`` runs both models in onnxruntime and records the comparison in
    the report (it does not raise: check ``report.verification.passed``); it needs the
    ``ort`` extra. ``target`` picks the deployment form (:mod:`.targets`);
    ``absorb_activation`` folds a following SiLU into the op (default: only for targets
    that gain from it). ``precise`` keeps our precision shift in every layer: the ``ort``
    target otherwise computes the layers torch exported as InstanceNormalization with that
    export's own arithmetic (:func:`.targets.ort_cpu.keep_export_arithmetic`). ``verify_inputs`` (an ``inputs.InputSpec``) fixes verification
    input shapes or arrays. ``verify_original``: the file an ``onnx_ir.Model`` was loaded
    from; the verification runs the original from it (its external data in place) instead of
    a copy taken before the rewrite. ``verify_workdir``: where the verification may write a
    model whose weights are in memory, in a temporary folder it removes (default: the
    system's). :class:`GroupNormFusionPass` does the work.
    """
    fusion = GroupNormFusionPass(target=target, keep_standard=keep_standard, absorb_activation=absorb_activation, precise=precise, source=source)
    is_proto = isinstance(model, onnx.ModelProto)
    # Verification compares with the input as it was: its file, or a copy (external tensors
    # stay references).
    if is_proto:
        original = model
    elif verify:
        original = verify_original if verify_original is not None else _snapshot(model)
    else:
        original = None
    ir_model = ir.from_proto(model) if is_proto else model
    modified = fusion(ir_model).modified
    report = fusion.report
    if not is_proto:
        fused = ir_model
    elif not modified:
        fused = copy.deepcopy(model)  # nothing rewritten: the input itself, byte for byte
    else:
        fused = ir.to_proto(ir_model)
        _keep_value_info(fused, _value_info_names(model))
    if not verify:
        return fused, report
    from . import verify as verify_module  # onnxruntime (the ``ort`` extra): only to verify
    if target in targets_module.NOT_ON_CPU and modified:
        # onnxruntime's CPU provider has no kernel for this target's op: verify the same
        # fusion in its portable form and say so.
        if isinstance(original, (str, os.PathLike)):
            from . import io

            again, again_path = io.load_model(original), original
        else:
            again, again_path = original, None
        _, function_report = fuse(again, verify=True, keep_standard=keep_standard, absorb_activation=fusion.absorb_activation, precise=precise, seed=seed,
                                  verify_inputs=verify_inputs, verify_original=again_path, verify_workdir=verify_workdir)
        report.verification = function_report.verification
        report.verification.detail = f"verified as target=function: {targets_module.NOT_ON_CPU[target]}"
    else:
        report.verification = verify_module.verify(original, fused, seed=seed, spec=verify_inputs, source=source, workdir=verify_workdir)
    return fused, report
