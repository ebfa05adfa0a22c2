"""``GroupNormFusionPass``: the whole fuse as one onnx-ir pass, and the two calls that let
``rule_set()`` run on its own.

The pass rewrites an ``onnx_ir.Model`` in place, in this order:

1. shape facts for the rules (:func:`prepare_for_rules`): onnx shape inference with large
   constants kept out of it (memory), model-local function inputs typed from their call
   sites, constants marked in subgraphs;
2. the rewrite (our :func:`rules.rule_set`), once, with a recorder that keeps every
   candidate whose pattern matched but whose check failed (the report's *skipped*);
3. the optional SiLU absorption and the target's lowering (:func:`targets.lower`);
4. removal of what the rewrite made dead (onnx-ir's ``RemoveUnusedNodesPass``, with what was
   dead before we came pinned so that it stays), the input's names, types and shapes back;
5. our function bodies attached (:func:`attach_functions`), and onnx's checker on the result
   whenever it passed on the input (onnx-ir's ``CheckerPass``: the main graph's initializers
   over 1 KB are checked as typed inputs, so no copy of the weights and no file; skipped
   with a note only if what is left would not fit one protobuf).

Nothing in the pass serialises the weights: external tensors stay lazy and memory-mapped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import RULE_NAME_TAG, MatchingTracer, MatchStatus, pattern

from .. import ops
from ..ops import builder, contract, functions
from . import _shapes
from . import rules as rules_module
from . import targets as targets_module
from ._graphs import graph_likes, is_our_function, is_ours
from .errors import one_line
from .report import FusedLayer, FuseReport, Skipped
from .rules import activation as activation_rules

__all__ = ["GroupNormFusionPass", "prepare_for_rules", "attach_functions"]

logger = logging.getLogger(__name__)

#: Constant-node values above these sizes are kept out of onnx's shape inference (it copies
#: the model several times, and its data propagation turns an integer tensor into one shape
#: dimension per element, ~57x the bytes). Non-integer values carry no shape data: 1 KiB,
#: onnx-ir's own limit for initializers. An integer constant above 1 MiB is no shape either;
#: eliding it turns data propagation off (onnx refuses to propagate through a tensor it
#: cannot read).
_BIG_CONSTANT_BYTES = 1024
_BIG_INTEGER_CONSTANT_BYTES = 1 << 20
_ELIDED = "__onnx_groupnorm_elided__"


# ---------------------------------------------------------------- shape facts for the rules


@contextlib.contextmanager
def _initializer_order_kept(model: ir.Model) -> Iterator[None]:
    """onnx-ir's C-API passes take large initializers out and put them back at the end."""
    order = list(model.graph.initializers)
    try:
        yield
    finally:
        initializers = model.graph.initializers
        if list(initializers) != order and set(initializers) == set(order):
            values = [initializers.pop(name) for name in order]
            for value in values:
                initializers.add(value)


@contextlib.contextmanager
def _constants_for_inference(model: ir.Model) -> Iterator[bool]:
    """Swap large Constant-node values for data-less stand-ins of the same type and shape,
    small external initializers for their data; yields whether data propagation stays safe
    (no integer constant was elided). Everything is put back afterwards."""
    swapped: list[tuple[ir.Node, ir.Attr]] = []
    integer = False
    for graph_like in graph_likes(model):
        for node in graph_like:
            attr = node.attributes.get("value")
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or attr is None or attr.type != ir.AttributeType.TENSOR:
                continue
            tensor = attr.as_tensor()
            is_int = tensor.dtype.numpy().kind in "iub"
            if tensor.nbytes <= (_BIG_INTEGER_CONSTANT_BYTES if is_int else _BIG_CONSTANT_BYTES):
                continue
            integer |= is_int
            # An external reference serialises without reading or copying any data.
            stand_in = ir.ExternalTensor(_ELIDED, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name or "")
            swapped.append((node, attr))
            node.attributes["value"] = ir.AttrTensor("value", stand_in)
    # onnx-ir's pass keeps initializers up to 1 KB in the proto; onnx cannot read an external
    # one (a model saved with every tensor external), so those few small ones are read now.
    loaded: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= _BIG_CONSTANT_BYTES:
                loaded.append((value, tensor))
                value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    try:
        yield not integer
    finally:
        for node, attr in swapped:
            node.attributes["value"] = attr
        for value, tensor in loaded:
            value.const_value = tensor


class _Capture(logging.Handler):
    """Takes onnx-ir's shape-inference log records (it logs a failure with a traceback and
    carries on) so that the report gets one line and the user's console none."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failure: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and self.failure is None:
            self.failure = one_line(record.exc_info[1])
            logger.debug("shape inference failed", exc_info=record.exc_info)


def _infer_shapes(model: ir.Model) -> str | None:
    """onnx-ir's ShapeInferencePass, bounded in memory; returns why it failed, if it did."""
    capture = _Capture()
    pass_logger = logging.getLogger(common_passes.ShapeInferencePass.__module__)
    propagate = pass_logger.propagate
    pass_logger.addHandler(capture)
    pass_logger.propagate = False
    try:
        with _initializer_order_kept(model), _constants_for_inference(model) as data_prop:
            common_passes.ShapeInferencePass(data_prop=data_prop)(model)
    finally:
        pass_logger.removeHandler(capture)
        pass_logger.propagate = propagate
    return capture.failure


def _annotate_function_inputs(model: ir.Model) -> None:
    """Give a model-local function's inputs the type and shape of its call sites' inputs
    when every call agrees (function bodies are untyped; the rules need ranks)."""
    calls: dict[tuple, list[ir.Node]] = {}
    for graph_like in graph_likes(model):
        for node in graph_like:
            calls.setdefault(node.op_identifier(), []).append(node)
    for key, function in model.functions.items():
        sites = calls.get(key, [])
        for i, formal in enumerate(function.inputs if sites else ()):
            actual = {(str(n.inputs[i].type), str(n.inputs[i].shape)) if i < len(n.inputs) and n.inputs[i] is not None else None for n in sites}
            first = sites[0].inputs[i] if i < len(sites[0].inputs) else None
            if len(actual) == 1 and first is not None and first.shape is not None and formal.shape is None:
                formal.type, formal.shape = first.type, first.shape


def _prepare(model: ir.Model) -> str | None:
    failure = _infer_shapes(model)
    # Dims only constant folding knows (an Identity of an initializer, constant shape
    # arithmetic), folded on a copy: the user's graph keeps every node.
    _shapes.adopt_folded_facts(model, _infer_shapes)
    _annotate_function_inputs(model)
    # The rewriter marks Constant outputs as constants in the main graph and functions
    # only; subgraphs (If/Loop bodies) need it too for constant operands to match.
    for graph_like in graph_likes(model):
        optimizer.basic_constant_propagation(graph_like)
    return failure


def prepare_for_rules(model: ir.Model) -> ir.Model:
    """Give ``model`` the shape facts :func:`rule_set` needs, in place, and return it.

    Call it before running the rules yourself (``onnxscript.rewriter.rewrite`` or
    ``RewritePass``); :class:`GroupNormFusionPass` does it for you. It records inferred
    types and shapes on the model's values (they are written as ``value_info`` when saved).
    """
    failure = _prepare(model)
    if failure:
        logger.info("shape inference failed, the rules see only the shapes in the model: %s", failure)
    return model


# ---------------------------------------------------------------- function bodies


def attach_functions(model: ir.Model | onnx.ModelProto) -> ir.Model | onnx.ModelProto:
    """Give every variant of our op used in ``model`` its function body, in place; returns
    ``model``. Call it after running the rules yourself: without the bodies no runtime can
    load the model. (A ``ModelProto`` goes to :func:`ops.attach_functions`.)

    Imports our domain, raises the IR version to 10 (overloads need it), drops our bodies
    that no node uses; see :func:`ops.attach_functions` for which variant is the default.
    """
    if isinstance(model, onnx.ModelProto):
        return ops.attach_functions(model)
    ours = [f for f in model.functions.values() if is_our_function(f)]
    old_default = next((f.metadata_props.get(builder.VARIANT_KEY) for f in ours if not f.overload), None)
    top = [n for g in model.graphs() for n in g if is_ours(n)]
    nested = [n for f in model.functions.values() if not is_our_function(f) for n in ir.traversal.RecursiveGraphIterator(f) if is_ours(n)]
    default, counts = builder.assign_overloads(top, nested, old_default)
    for function in ours:
        del model.functions[function.identifier()]
    if not counts:  # e.g. every node lowered to another op: no import of an unused domain
        model.opset_imports.pop(contract.DOMAIN, None)
        return model
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    for variant in sorted(counts):
        body = ir.serde.deserialize_function(functions.function_proto(functions.Variant.from_overload(variant), opset))
        body.overload = "" if variant == default else variant
        body.metadata_props[builder.VARIANT_KEY] = variant
        model.functions[body.identifier()] = body
    model.opset_imports.setdefault(contract.DOMAIN, contract.VERSION)
    model.ir_version = max(model.ir_version, builder.IR_VERSION)
    return model


# ---------------------------------------------------------------- keeping what we did not rewrite


def _all_values(graph_like) -> Iterable[ir.Value]:
    yield from graph_like.inputs
    for node in graph_like:
        yield from node.outputs
    if isinstance(graph_like, ir.Graph):
        yield from graph_like.initializers.values()


class _Snapshot:
    """What the model looked like before we touched it, to keep what we did not rewrite."""

    def __init__(self, model: ir.Model) -> None:
        self.node_names: dict[ir.Node, str | None] = {}
        self.input_counts: dict[ir.Node, int] = {}
        self.value_names: dict[ir.Value, str | None] = {}
        self.value_types: dict[ir.Value, tuple] = {}
        self.unused: dict[ir.Graph | ir.Function, list[ir.Value]] = {}
        for graph_like in graph_likes(model):
            outputs = set(graph_like.outputs)
            for node in graph_like:
                self.node_names[node] = node.name
                self.input_counts[node] = len(node.inputs)
            for value in _all_values(graph_like):
                self.value_names[value] = value.name
                self.value_types[value] = (value.type, value.shape)
                if not value.uses() and value not in outputs and not value.is_graph_input():
                    self.unused.setdefault(graph_like, []).append(value)

    def remove_new_dead_code(self, model: ir.Model) -> None:
        """onnx-ir's RemoveUnusedNodesPass, with what nobody used before we came pinned as a
        graph output for the while: exporters leave dead nodes and unused initializers, and
        we keep everything we did not rewrite."""
        pinned = []
        for graph_like, values in self.unused.items():
            alive = [v for v in values if v.producer() is not None and v.producer().graph is not None or v.is_initializer()]
            graph_like.outputs.extend(alive)
            pinned.append((graph_like, len(alive)))
        try:
            common_passes.RemoveUnusedNodesPass()(model)
            # The pass clears the initializers of the main graph only.
            for graph in model.graph.subgraphs():
                for name, value in list(graph.initializers.items()):
                    if not value.uses() and not value.is_graph_output() and value in self.value_names:
                        del graph.initializers[name]
        finally:
            for graph_like, count in pinned:
                del graph_like.outputs[len(graph_like.outputs) - count :]

    def restore(self, model: ir.Model) -> None:
        """The input's node and value names (onnxscript renames on clashes), trailing empty
        inputs, types and shapes; inferred shapes on new values dropped (we add no value_info)."""
        for graph_like in graph_likes(model):
            taken = {v.name for v in _all_values(graph_like)}
            for node in graph_like:
                if node in self.node_names:
                    node.name = self.node_names[node]
                    # RemoveUnusedNodesPass drops trailing empty inputs (``Clip(x, lo, "")``).
                    if len(node.inputs) < self.input_counts[node]:
                        node.resize_inputs(self.input_counts[node])
            for value in _all_values(graph_like):
                if value in self.value_names:
                    old = self.value_names[value]
                    if old != value.name and old and old not in taken:
                        value.name = old
                    value.type, value.shape = self.value_types[value]
                elif not value.is_graph_output() and not value.is_graph_input():
                    value.shape = None


# ---------------------------------------------------------------- the pass


class _SkipRecorder(MatchingTracer):
    """Records every check failure (MatchingTracer keeps only the best match per rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[tuple[str, ir.Node, str]] = []

    def log(self, rule, container, node, match_result, status) -> None:
        if status == MatchStatus.CONDITION_FAILED:
            self.failures.append((rule.name or "", node, match_result.reason or "check failed"))


#: How far past a fired rule's match a fuller variant can anchor: torch's GroupNorm core ends
#: at a Reshape, its gamma Mul and beta Add follow (rules/torch_instancenorm.py).
_LOOKAHEAD = 2


def _recorded(rule_set: pattern.RewriteRuleSet, recorder: _SkipRecorder) -> pattern.RewriteRuleSet:
    """onnxscript treats a tracer given to ``apply_to_model`` as a dry run; a rule's own
    ``try_rewrite`` takes one and still rewrites, so the recorder goes there: one run.

    Rules are tried node by node in graph order, so a variant that fires on the core of a
    layer pre-empts a fuller variant anchored on the nodes after it; before the rewrite is
    applied, those nodes are matched (not rewritten) so that the reason the fuller variant
    refused them is recorded as a dry run would have.
    """

    def explain_downstream(model, graph_or_function, fired, outputs):
        frontier = list(outputs)
        for _ in range(_LOOKAHEAD):
            after = list(dict.fromkeys(use.node for value in frontier for use in value.uses()))
            for node in after:
                for other in rule_set.rules:
                    if other is not fired:
                        other.match(model, graph_or_function, node, check_nodes_are_removable=other.remove_nodes, tracer=recorder)
            frontier = [value for node in after for value in node.outputs]

    for rule in rule_set.rules:

        def try_rewrite(model, graph_or_function, node, *, verbose=None, tracer=None, _rule=rule):
            delta = type(_rule).try_rewrite(_rule, model, graph_or_function, node, verbose=verbose, tracer=recorder)
            if delta is not None:
                explain_downstream(model, graph_or_function, _rule, delta.match.outputs)
            return delta

        rule.try_rewrite = try_rewrite
    return rule_set


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


def _default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


#: onnx-ir's checker pass serialises the model without the main graph's large initializers;
#: what is left (tensors in node attributes, subgraph initializers) must fit in one protobuf.
_CHECKER_LIMIT = onnx.checker.MAXIMUM_PROTOBUF


def _left_in_skeleton(model: ir.Model) -> int:
    """Bytes of tensors that onnx-ir's C-API passes still serialise."""
    total = 0
    for graph_like in graph_likes(model):
        for node in graph_like:
            total += sum(attr.as_tensor().nbytes for attr in node.attributes.values() if attr.type == ir.AttributeType.TENSOR)
        if isinstance(graph_like, ir.Graph) and graph_like is not model.graph:
            total += sum(v.const_value.nbytes for v in graph_like.initializers.values() if v.const_value is not None)
    return total


def _checker_error(model: ir.Model) -> str | None:
    try:
        with _initializer_order_kept(model):
            common_passes.CheckerPass()(model)
    except onnx.checker.ValidationError as e:
        return one_line(e)
    return None


class GroupNormFusionPass(ir.passes.InPlacePass):
    """Fuse every exported GroupNormalization of an ``onnx_ir.Model`` into our op, in place,
    and lower it for ``target`` (:data:`targets.TARGETS`).

    ``keep_standard`` leaves standard GroupNormalization ops alone; ``absorb_activation``
    folds a following SiLU into the op (default: only for targets that gain from it);
    ``precise`` keeps our precision shift where a target would otherwise keep the export's
    arithmetic (:func:`targets.lower`); ``check`` runs onnx's checker on the result when the input passes it (a failure raises
    ``RuntimeError``). After a call, :attr:`report` says what was fused, skipped and lowered;
    the ``PassResult`` is modified exactly when something was. Runs in an onnx-ir
    ``PassManager`` next to onnxscript's optimizer and your own passes.
    """

    def __init__(
        self,
        *,
        target: str = targets_module.DEFAULT_TARGET,
        keep_standard: bool = False,
        absorb_activation: bool | None = None,
        precise: bool = False,
        check: bool = True,
        source: str = "",
    ) -> None:
        super().__init__()
        if target not in targets_module.TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {', '.join(targets_module.TARGETS)}")
        self.target = target
        self.keep_standard = keep_standard
        self.absorb_activation = targets_module.absorbs_activation_by_default(target) if absorb_activation is None else absorb_activation
        self.precise = precise
        self.check = check
        self.source = source
        self.report = FuseReport(source=source, target=target, precise=precise)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = report = FuseReport(source=self.source, target=self.target, precise=self.precise)
        opset = _default_opset(model)
        if opset is None:
            report.notes.append("the model imports no default-domain opset: nothing fused")
            return ir.passes.PassResult(model, modified=False)
        if opset < contract.MIN_OPSET:
            return self._call_raised(model, opset)
        check = self.check
        if check and _left_in_skeleton(model) > _CHECKER_LIMIT:
            check = False
            report.notes.append("onnx.checker skipped: over 2 GB of tensors in node attributes or subgraphs (it needs them in one protobuf)")
        input_error = _checker_error(model) if check else None

        snapshot = _Snapshot(model)
        failure = _prepare(model)
        if failure:
            logger.info("shape inference failed, continuing with the shapes in the model: %s", failure)
            report.notes.append(f"shape inference failed: {failure}")
        before = {n for g in graph_likes(model) for n in g if is_ours(n)}
        recorder = _SkipRecorder()
        count = _recorded(rules_module.rule_set(keep_standard=self.keep_standard), recorder).apply_to_model(model)
        logger.info("%d GroupNormalization subgraph(s) fused", count)
        absorbed = pattern.RewriteRuleSet(activation_rules.rules()).apply_to_model(model) if self.absorb_activation else 0
        # Read the fused layers before lowering (a target may replace our nodes) while the
        # inferred shapes are still on the values.
        fused_layers = [_fused_layer(n) for g in graph_likes(model) for n in g if is_ours(n) and n not in before]
        snapshot.remove_new_dead_code(model)  # shape reads the rules left for later layers (jax2onnx) are dead now
        targets_module.lower(model, self.target, report, precise=self.precise)
        snapshot.remove_new_dead_code(model)
        report.fused = fused_layers  # graph order: main graph, its subgraphs, then functions
        snapshot.restore(model)
        alive = {n for g in graph_likes(model) for n in g}
        seen = set()
        for rule, node, reason in recorder.failures:
            if node in alive and node not in seen:
                seen.add(node)
                report.skipped.append(Skipped(rule=rule, node=node.name or "", reason=reason))

        modified = bool(report.fused or report.lowered or absorbed)
        if modified:
            attach_functions(model)
            if check:
                self._check(model, input_error)
        return ir.passes.PassResult(model, modified=modified)

    def _check(self, model: ir.Model, input_error: str | None) -> None:
        """The result must pass onnx's checker whenever the input did; an input that fails
        it (for reasons of its own) only gets a note."""
        if input_error is not None:
            self.report.notes.append(f"the input model already fails onnx.checker: {input_error}")
            return
        error = _checker_error(model)
        if error is not None:
            raise RuntimeError(f"the fused model fails onnx.checker although the input passes: {error}")

    def _call_raised(self, model: ir.Model, opset: int) -> ir.passes.PassResult:
        """Our function body needs opset 13: raise the opset (onnx.version_converter) only
        when that lets something fuse; otherwise leave the model untouched."""
        report = self.report
        try:
            # External tensors stay references in the proto: only in-memory weights are copied.
            raised = ir.from_proto(onnx.version_converter.convert_version(ir.to_proto(model), contract.MIN_OPSET))
        except Exception as e:  # the converter cannot upgrade every model
            report.notes.append(
                f"default-domain opset {opset} is below {contract.MIN_OPSET}, the lowest our function body "
                f"supports, and onnx.version_converter could not raise it ({one_line(e)}): nothing fused"
            )
            return ir.passes.PassResult(model, modified=False)
        inner = GroupNormFusionPass(
            target=self.target, keep_standard=self.keep_standard, absorb_activation=self.absorb_activation, precise=self.precise,
            check=self.check, source=self.source,
        )
        if not inner(raised).modified:
            report.notes.append(f"default-domain opset {opset} is below {contract.MIN_OPSET}: nothing to fuse, the model is unchanged")
            return ir.passes.PassResult(model, modified=False)
        self.report = inner.report
        self.report.notes.insert(0, f"default-domain opset raised from {opset} to {contract.MIN_OPSET} (onnx.version_converter) to hold our op")
        # In place: the caller's model object takes the raised and fused contents.
        model.graph = raised.graph
        model.functions.clear()
        model.functions.update(raised.functions)
        model.ir_version = raised.ir_version
        return ir.passes.PassResult(model, modified=True)
