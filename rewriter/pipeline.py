"""The fuse pipeline: normalise, match, rewrite, clean up, attach the function, (lower),
verify. Everything the rules did not rewrite is kept as it was: names, initializers,
metadata, functions, opset imports, value_info, doc strings.

Steps, in order:

1. shape inference on the in-memory model (the rules need ranks and static channels);
   what it adds is stripped again before the model is returned;
2. a dry run with a tracer that records every candidate whose pattern matched but whose
   check failed (the *skipped* list, with reasons);
3. the rewrite (onnxscript ``RewriteRuleSet``, our rules in :func:`rules.rule_set` order),
   in the main graph, in subgraphs (If/Loop/Scan bodies) and in model-local functions;
4. removal of the shape-computation nodes and initializers that the rewrite made dead
   (nodes that were dead before we came are left alone);
5. restoring node and value names that onnxscript's name fixing changed;
6. attaching one function body per overload of our op, importing our domain;
7. lowering to the chosen target (see :mod:`onnx_groupnorm.rewriter.targets`);
8. optionally, verification in onnxruntime against the original model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import RULE_NAME_TAG, MatchingTracer, MatchStatus, pattern

from ..ops import attach_functions, contract
from . import _shapes, io
from . import rules as rules_module
from ._graphs import graph_likes, is_ours
from . import targets as targets_module
from . import verify as verify_module
from .rules import activation as activation_rules
from .report import FusedLayer, FuseReport, Skipped

__all__ = ["fuse", "TARGETS"]

TARGETS = targets_module.TARGETS

logger = logging.getLogger(__name__)


class _SkipRecorder(MatchingTracer):
    """Records every check failure (MatchingTracer keeps only the best match per rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[tuple[str, ir.Node, str]] = []

    def log(self, rule, container, node, match_result, status) -> None:
        if status == MatchStatus.CONDITION_FAILED:
            self.failures.append((rule.name or "", node, match_result.reason or "check failed"))


def _all_values(graph_like) -> Iterable[ir.Value]:
    yield from graph_like.inputs
    for node in graph_like:
        yield from node.outputs
    if isinstance(graph_like, ir.Graph):
        yield from graph_like.initializers.values()


def _live_uses(value: ir.Value) -> list:
    # A node removed from its graph may still be listed as a user; it does not count.
    return [u for u in value.uses() if u.node.graph is not None]


def _is_dead(node: ir.Node) -> bool:
    return all(not _live_uses(out) and not out.is_graph_output() for out in node.outputs)


class _Snapshot:
    """What the model looked like before we touched it, to keep what we did not rewrite."""

    def __init__(self, model: ir.Model) -> None:
        self.node_names: dict[ir.Node, str | None] = {}
        self.value_names: dict[ir.Value, str | None] = {}
        self.value_types: dict[ir.Value, tuple] = {}
        self.dead: set[ir.Node] = set()
        self.used_initializers: set[ir.Value] = set()
        for graph_like in graph_likes(model):
            for node in graph_like:
                self.node_names[node] = node.name
                if _is_dead(node):
                    self.dead.add(node)
            for value in _all_values(graph_like):
                self.value_names[value] = value.name
                self.value_types[value] = (value.type, value.shape)
            if isinstance(graph_like, ir.Graph):
                self.used_initializers.update(v for v in graph_like.initializers.values() if v.uses())

    def remove_new_dead_code(self, model: ir.Model) -> None:
        for graph_like in graph_likes(model):
            changed = True
            while changed:
                changed = False
                for node in reversed(list(graph_like)):
                    if node in self.node_names and node not in self.dead and _is_dead(node):
                        for out in node.outputs:  # let go of users already removed
                            for use in list(out.uses()):
                                use.node.replace_input_with(use.idx, None)
                        graph_like.remove(node, safe=True)
                        changed = True
            if isinstance(graph_like, ir.Graph):
                for name, value in list(graph_like.initializers.items()):
                    if value in self.used_initializers and not _live_uses(value) and not value.is_graph_input() and not value.is_graph_output():
                        del graph_like.initializers[name]

    def restore(self, model: ir.Model) -> None:
        for graph_like in graph_likes(model):
            taken = {v.name for v in _all_values(graph_like)}
            for node in graph_like:
                if node in self.node_names:
                    node.name = self.node_names[node]
            for value in _all_values(graph_like):
                if value in self.value_names:
                    old = self.value_names[value]
                    if old != value.name and old and old not in taken:
                        value.name = old
                    value.type, value.shape = self.value_types[value]
                elif not value.is_graph_output() and not value.is_graph_input():
                    # Shape inference results on new values: drop, we add no value_info.
                    value.shape = None


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


def _annotate_function_inputs(model: ir.Model) -> None:
    """Give a model-local function's inputs the type and shape of its call sites' inputs
    when every call agrees (function bodies are untyped; the rules need ranks)."""
    calls: dict[tuple, list[ir.Node]] = {}
    for graph_like in graph_likes(model):
        for node in graph_like:
            calls.setdefault((node.domain, node.op_type, node.overload), []).append(node)
    for key, function in model.functions.items():
        sites = calls.get(key, [])
        if not sites:
            continue
        for i, formal in enumerate(function.inputs):
            actual = {(str(n.inputs[i].type), str(n.inputs[i].shape)) if i < len(n.inputs) and n.inputs[i] is not None else None for n in sites}
            first = sites[0].inputs[i] if i < len(sites[0].inputs) else None
            if len(actual) == 1 and first is not None and first.shape is not None and formal.shape is None:
                formal.type, formal.shape = first.type, first.shape


def _default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _fused_layer(node: ir.Node) -> FusedLayer:
    attrs = {k: v.value for k, v in node.attributes.items()}
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    channels = None
    for param in inputs[1:]:
        if param is not None and param.shape is not None and len(param.shape) == 1:
            channels = param.shape[0]
    x = inputs[0]
    if channels is None and x is not None and x.shape is not None:
        channels = x.shape[attrs["axis"]]
    return FusedLayer(
        rule=node.metadata_props.get(RULE_NAME_TAG, ""),
        node=node.name or (node.outputs[0].name or ""),
        groups=int(attrs["groups"]),
        axis=int(attrs["axis"]),
        epsilon=float(attrs["epsilon"]),
        center=inputs[2] is not None,
        scale=inputs[1] is not None,
        channels=int(channels) if isinstance(channels, int) else -1,
        overload=node.overload,
        activation=int(attrs.get("activation", 0)),
    )


def _check(proto: onnx.ModelProto, original: onnx.ModelProto, report: FuseReport) -> None:
    """The result must pass onnx's checker whenever the input did; an input that fails it
    (for reasons of its own) only gets a note."""
    if proto.ByteSize() > io.EXTERNAL_DATA_THRESHOLD:
        report.notes.append("model over 2 GB: onnx.checker skipped (it needs a file path)")
        return
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        try:
            onnx.checker.check_model(original)
        except onnx.checker.ValidationError as original_error:
            report.notes.append(f"the input model already fails onnx.checker: {str(original_error).splitlines()[0][:200]}")
            return
        raise RuntimeError(f"the fused model fails onnx.checker although the input passes: {e}") from e


def _fuse_raised(original, opset, is_proto, ir_model, report, *, verify, **options):
    """Our function body needs opset 13: raise the opset (onnx.version_converter) only when
    that lets something fuse; otherwise hand the model back untouched."""
    try:
        raised = onnx.version_converter.convert_version(original, contract.MIN_OPSET)
    except Exception as e:  # the converter cannot upgrade every model
        report.notes.append(
            f"default-domain opset {opset} is below {contract.MIN_OPSET}, the lowest our function body "
            f"supports, and onnx.version_converter could not raise it ({str(e).splitlines()[0][:200]}): nothing fused"
        )
        return (original if is_proto else ir_model), report
    fused, raised_report = fuse(raised, verify=False, source=report.source, **options)
    if not raised_report.fused:
        report.notes.append(f"default-domain opset {opset} is below {contract.MIN_OPSET}: nothing to fuse, the model is unchanged")
        return (original if is_proto else ir_model), report
    raised_report.notes.insert(0, f"default-domain opset raised from {opset} to {contract.MIN_OPSET} (onnx.version_converter) to hold our op")
    if verify:
        raised_report.verification = verify_module.verify(original, fused, seed=options["seed"])
    return (fused if is_proto else ir.from_proto(fused)), raised_report


def fuse(
    model: onnx.ModelProto | ir.Model,
    *,
    verify: bool = False,
    keep_standard: bool = False,
    target: str = "function",
    absorb_activation: bool | None = None,
    source: str = "",
    seed: int = 0,
) -> tuple[onnx.ModelProto | ir.Model, FuseReport]:
    """Fuse every exported GroupNormalization in ``model`` into our op.

    A ModelProto is not modified (a new one is returned); an ``onnx_ir.Model`` is rewritten
    in place and returned. ``verify`` runs both models in onnxruntime and records the
    comparison in the report (it does not raise: check ``report.verification.passed``).
    ``target`` picks the deployment form (:mod:`.targets`); ``absorb_activation`` folds a
    following SiLU into the op (default: only for targets that gain from it).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    is_proto = isinstance(model, onnx.ModelProto)
    original = model if is_proto else ir.to_proto(model)
    ir_model = ir.from_proto(model) if is_proto else model
    report = FuseReport(source=source, target=target)

    opset = _default_opset(ir_model)
    if opset is None:
        report.notes.append("the model imports no default-domain opset: nothing fused")
        return (original if is_proto else ir_model), report
    if opset < contract.MIN_OPSET:
        return _fuse_raised(original, opset, is_proto, ir_model, report, verify=verify, keep_standard=keep_standard,
                            target=target, absorb_activation=absorb_activation, seed=seed)

    snapshot = _Snapshot(ir_model)
    try:
        common_passes.ShapeInferencePass()(ir_model)
    except Exception as e:  # a model onnx cannot infer still fuses where shapes are known
        logger.warning("shape inference failed, continuing with the shapes in the model: %s", e)
        report.notes.append(f"shape inference failed: {str(e).splitlines()[0][:200]}")
    _shapes.adopt_folded_facts(ir_model)

    _annotate_function_inputs(ir_model)
    # The rewriter marks Constant outputs as constants in the main graph and functions
    # only; subgraphs (If/Loop bodies) need it too for constant operands to match.
    for graph_like in graph_likes(ir_model):
        optimizer.basic_constant_propagation(graph_like)
    rule_set = rules_module.rule_set(keep_standard=keep_standard)
    recorder = _SkipRecorder()
    rule_set.apply_to_model(ir_model, tracer=recorder)
    before = {n for g in graph_likes(ir_model) for n in g if is_ours(n)}
    count = rule_set.apply_to_model(ir_model)
    logger.info("%d GroupNormalization subgraph(s) fused", count)
    if absorb_activation is None:
        absorb_activation = targets_module.absorbs_activation_by_default(target)
    absorbed = 0
    if absorb_activation:
        absorbed = pattern.RewriteRuleSet(activation_rules.rules()).apply_to_model(ir_model)
    # Read the fused layers before lowering (a target may replace our nodes) while the
    # inferred shapes are still on the values.
    fused_layers = [_fused_layer(n) for g in graph_likes(ir_model) for n in g if is_ours(n) and n not in before]
    snapshot.remove_new_dead_code(ir_model)  # shape reads the rules left for later layers (jax2onnx) are dead now
    targets_module.lower(ir_model, target, report)
    snapshot.remove_new_dead_code(ir_model)
    alive = {n for g in graph_likes(ir_model) for n in g}
    report.fused = sorted(fused_layers, key=lambda f: f.node)
    snapshot.restore(ir_model)
    seen = set()
    for rule, node, reason in recorder.failures:
        if node in alive and node not in seen:
            seen.add(node)
            report.skipped.append(Skipped(rule=rule, node=node.name or "", reason=reason))

    if not (report.fused or report.lowered or absorbed) and is_proto:
        # Nothing rewritten: hand back the input itself, byte for byte.
        proto = copy.deepcopy(original)
        if verify:
            report.verification = verify_module.verify(original, proto, seed=seed)
        return proto, report
    proto = ir.to_proto(ir_model)
    _keep_value_info(proto, _value_info_names(original))
    attach_functions(proto)
    _check(proto, original, report)
    if verify and target in targets_module.NOT_ON_CPU:
        # onnxruntime's CPU provider has no kernel for this target's op: verify the same
        # fusion in its portable form and say so.
        _, function_report = fuse(original, verify=True, keep_standard=keep_standard, absorb_activation=absorb_activation, seed=seed)
        report.verification = function_report.verification
        report.verification.detail = f"verified as target=function: {targets_module.NOT_ON_CPU[target]}"
    elif verify:
        report.verification = verify_module.verify(original, proto, seed=seed)
    return (proto if is_proto else ir.from_proto(proto)), report
