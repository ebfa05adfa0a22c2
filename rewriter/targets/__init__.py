"""Deployment targets: each lowers our op (after fusion) to the form that runs best where
the model will run. A target is a function ``lower(model: onnx_ir.Model, report) -> None``
that rewrites the model in place and records what it did (``report.lowered``) and what it
left as our op and why (``report.notes``).

Which target fits which runtime:

* ``ort`` (:data:`DEFAULT_TARGET`; :mod:`.ort_cpu`): onnxruntime CPU. Our op with its
  function body, channels-last layers moved onto the exporters' channels-first tensors;
  layers torch exported as InstanceNormalization keep that export's arithmetic (no precision
  shift) unless ``precise``.
* ``function``: our op with its function body, no layout change (onnxruntime, and onnx's
  ReferenceEvaluator when the model has one variant).
* ``portable`` (:mod:`.portable`): every runtime that ran the original (onnxruntime,
  OpenVINO, tract, ReferenceEvaluator): standard ops only, at the model's own opset.
* ``openvino`` (:mod:`.openvino`): OpenVINO, its native GroupNormalization kernel; our body
  is attached, so onnxruntime runs it too.
* ``ort-gpu`` (:mod:`.ort_gpu`): onnxruntime's CUDA/ROCm/DirectML providers.
* ``onnx`` (:mod:`.onnx_standard`): runtimes with a precise GroupNormalization-21 kernel;
  raises the opset to 21 (OpenVINO then fails on Conv).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from .._graphs import graph_likes
from ..report import FuseReport
from . import onnx_standard, openvino, ort_cpu, ort_gpu, portable

__all__ = ["DEFAULT_TARGET", "TARGETS", "NOT_ON_CPU", "lower", "absorbs_activation_by_default"]


def _function(model: ir.Model, report: FuseReport) -> None:
    """Our op stays; the pipeline attaches its function bodies."""


#: target name -> lowering; targets that cannot hold our op's activation get it unfused first.
def _onnx(model: ir.Model, report: FuseReport) -> None:
    """Channels-last layers first move onto the NCHW tensors the exporters' Transposes came
    from (as for ``ort``), where GroupNormalization-21 can express them; then lower."""
    ort_cpu.lower(model, report)
    onnx_standard.lower(model, report)


TARGETS: dict[str, Callable[[ir.Model, FuseReport], None]] = {
    "function": _function,
    "onnx": _onnx,
    "ort": ort_cpu.lower,
    "ort-gpu": ort_gpu.lower,
    "portable": portable.lower,
    "openvino": openvino.lower,
}

#: What ``fuse`` and the CLI use when no target is named: ``ort`` is ``function`` plus the
#: layout lifting (identical on channels-first models, fewer Transposes on channels-last ones),
#: still one node of our op per layer with its function body; never slower than ``function``
#: and than the original export in ``benchmarks/bench_default.py`` (numbers in its table).
DEFAULT_TARGET = "ort"

#: Targets whose output onnxruntime's CPU provider cannot run, and why.
NOT_ON_CPU = {"ort-gpu": "com.microsoft.GroupNorm has CUDA, ROCm and DirectML kernels only"}

#: Targets whose deployment form benefits from a SiLU absorbed into the op.
_ABSORB_BY_DEFAULT = {
    name for name, module in (("onnx", onnx_standard), ("ort", ort_cpu), ("ort-gpu", ort_gpu), ("portable", portable), ("openvino", openvino)) if module.ABSORBS_ACTIVATION
}


def absorbs_activation_by_default(target: str) -> bool:
    return target in _ABSORB_BY_DEFAULT


def _unique_node_names(model: ir.Model, before: set[ir.Node]) -> None:
    """onnxruntime refuses a graph with two nodes of one name: a node a target made that
    shares its name with another node of its graph gets a numbered suffix (nodes that were
    there before keep theirs)."""
    for container in graph_likes(model):
        taken = {node.name for node in container if node.name and node in before}
        for node in container:
            if not node.name or node in before:
                continue
            name, k = node.name, 0
            while name in taken:
                k += 1
                name = f"{node.name}_{k}"
            node.name = name
            taken.add(name)


#: target -> a step after its lowering that gives up our precision shift where the export
#: computed a layer more cheaply without it (skipped with ``precise``).
_EXPORT_ARITHMETIC: dict[str, Callable[[ir.Model, FuseReport], None]] = {"ort": ort_cpu.keep_export_arithmetic}


def lower(model: ir.Model, target: str, report: FuseReport, *, precise: bool = False) -> None:
    """Lower our nodes of ``model`` for ``target`` in place; ``precise`` keeps our precision
    shift in every layer (see :func:`.ort_cpu.keep_export_arithmetic`)."""
    try:
        lowering = TARGETS[target]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}") from None
    before = {node for container in graph_likes(model) for node in container}
    lowering(model, report)
    if not precise and target in _EXPORT_ARITHMETIC:
        _EXPORT_ARITHMETIC[target](model, report)
    _unique_node_names(model, before)
