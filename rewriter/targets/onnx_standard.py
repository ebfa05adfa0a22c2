"""Target ``onnx``: the standard ONNX ``GroupNormalization-21`` op where it can express the layer.

Each of our nodes whose channel axis is 1 (after normalising a negative axis; rank 2 included)
becomes ``GroupNormalization(X, scale, bias, num_groups=G, epsilon=eps, stash_type=1)``
(``groups=-1`` resolved to C; ``stash_type=1`` keeps float32 statistics for float16/bfloat16
inputs, as our op does). Its ``scale``/``bias`` are ``[C]`` of X's element type (the spec's
``T``): constant gamma/beta of another dtype are cast at conversion time, a computed one gets a
``Cast``, a missing one becomes a ones/zeros ``[C]`` initializer (a ``Constant`` inside a
function). An absorbed activation (``activation=1``) is re-expanded as ``Mul(y, Sigmoid(y))``.

A channels-last node is lowered only where the exporter's layout Transposes make it free:
input ``Transpose(t, perm=[0, 2, ..., r-1, 1])`` and output read only by a
``Transpose(perm=[0, r-1, 1, ..., r-2])``; the standard op then runs on ``t`` and the output
Transpose is bypassed (the pipeline removes what became dead). Any other channels-last or
middle-axis node stays our op with a note in ``report.notes``.

Opset: GroupNormalization-21 needs default opset >= 21. A model below that is upgraded only if
``onnx.version_converter.convert_version(model, 21)`` (run on a copy) succeeds, rewrites no
node (the converter drops node metadata, which we ignore; a node it rewrites, e.g. a
``ReduceMax`` whose ``axes`` become an input, is reported as not surviving), the model has no
model-local function of its own (the converter drops function bodies), and the upgraded,
lowered copy passes ``onnx.checker`` and opens in an onnxruntime CPU session. Then the model's
opset import is raised in place. Otherwise every node stays our op and a note names the ops
that did not survive.

Precision: the standard op's function body computes the variance as E[x^2] - E[x]^2 (in
float32 with ``stash_type=1``). That cancels catastrophically when ``|mean| >> std`` (an
input with mean 1e3 and std 1e-2 loses every digit, and can give a negative variance -> NaN),
where our op's corrected two-pass body stays exact. Prefer the ``function`` target for such
inputs; onnxruntime's own GroupNormalization kernel (when it has one) may differ.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from ...ops import attach_functions, contract
from .. import io
from .._graphs import graph_likes, is_our_function, is_ours, node_config
from ..report import FuseReport

__all__ = ["lower", "ABSORBS_ACTIVATION", "STANDARD_VERSION"]

logger = logging.getLogger(__name__)

#: Whether this target's form gains from a SiLU absorbed into the op (pipeline default): the
#: standard op has no activation, so an absorbed SiLU would only be expanded again.
ABSORBS_ACTIVATION = False

#: The first (and current) version of the standard op with per-channel scale/bias.
STANDARD_VERSION = 21

_STASH_FLOAT32 = 1


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name or "") or "<unnamed>"


def _default_opset(imports) -> int | None:
    return imports.get("", imports.get("ai.onnx"))


class _Plan:
    """How one of our nodes is lowered (or why not)."""

    def __init__(self, node: ir.Node, container, x: ir.Value, channels: int, groups: int,
                 out_transpose: ir.Node | None = None):
        self.node = node
        self.container = container
        self.x = x  # the standard op's input (the NCHW tensor for the transpose form)
        self.channels = channels
        self.groups = groups
        self.out_transpose = out_transpose

    @property
    def form(self) -> str:
        return "GroupNormalization-21" + (" (layout Transposes bypassed)" if self.out_transpose else "")


def _single_transpose_user(value: ir.Value, perm: list[int]) -> ir.Node | None:
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1:
        return None
    user = uses[0].node
    if user.op_type != "Transpose" or user.domain not in ("", "ai.onnx"):
        return None
    attr = user.attributes.get("perm")
    return user if attr is not None and list(attr.as_ints()) == perm else None


def _plan(node: ir.Node, container) -> _Plan | str:
    """A :class:`_Plan`, or the reason the node stays our op."""
    x = node.inputs[0]
    if x is None or x.shape is None:
        return "the input's rank is unknown"
    rank = len(x.shape)
    config = node_config(node)
    try:
        axis = config.normalized_axis(rank)
    except ValueError as e:
        return str(e)
    channels = x.shape[axis]
    if not isinstance(channels, int):
        return f"the channel dimension (axis {axis}) is not static"
    if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
        return f"input dtype {x.dtype} is not one GroupNormalization-21 accepts"
    groups = config.resolved_groups(channels)
    if isinstance(container, ir.Function):
        version = _default_opset(container.opset_imports)
        if version is not None and version < STANDARD_VERSION:
            return f"function {container.name} imports default opset {version} < {STANDARD_VERSION}"
    if axis == 1:
        return _Plan(node, container, x, channels, groups)
    if axis == rank - 1 and rank >= 3:
        to_last = [0, *range(2, rank), 1]
        to_first = [0, rank - 1, *range(1, rank - 1)]
        producer = x.producer()
        perm = producer.attributes.get("perm") if producer is not None else None
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and producer.domain in ("", "ai.onnx")
            and perm is not None
            and list(perm.as_ints()) == to_last
        ):
            out_transpose = _single_transpose_user(node.outputs[0], to_first)
            if out_transpose is not None:
                return _Plan(node, container, producer.inputs[0], channels, groups, out_transpose)
        return (
            f"channel axis {axis} of a rank-{rank} input (channels-last) is not between a "
            f"Transpose(perm={to_last}) and a Transpose(perm={to_first}); "
            "GroupNormalization-21 normalises axis 1 only"
        )
    return f"channel axis {axis} of a rank-{rank} input: GroupNormalization-21 normalises axis 1 only"


def _param(plan: _Plan, index: int, fill: float, new_nodes: list[ir.Node], suffix: str) -> ir.Value:
    """scale (index 1) or bias (2) as a [C] value of X's dtype."""
    node, dtype = plan.node, plan.x.dtype
    value = node.inputs[index] if index < len(node.inputs) else None
    base = (node.name or node.outputs[0].name or "gn") + suffix
    if value is not None and value.dtype == dtype:
        return value
    array = None
    if value is None:
        array = np.full([plan.channels], fill, dtype=np.float32)
    elif value.const_value is not None and not value.is_graph_input():
        array = value.const_value.numpy().reshape(-1)
    if array is None:  # computed at run time, another dtype
        cast = ir.node("Cast", [value], {"to": dtype}, name=base + "_cast")
        new_nodes.append(cast)
        return cast.outputs[0]
    tensor = ir.tensor(np.asarray(array).astype(dtype.numpy()), name=base)
    if isinstance(plan.container, ir.Graph):
        names = set(plan.container.initializers)
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        tensor.name = name
        initializer = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([plan.channels]), const_value=tensor)
        plan.container.register_initializer(initializer)
        return initializer
    constant = ir.node("Constant", [], {"value": tensor}, name=base + "_const")
    new_nodes.append(constant)
    return constant.outputs[0]


def _apply(plan: _Plan) -> dict:
    node = plan.node
    attrs = node.attributes
    epsilon = attrs["epsilon"].as_float() if "epsilon" in attrs else contract.DEFAULT_EPSILON
    activation = attrs["activation"].as_int() if "activation" in attrs else contract.ACTIVATION_NONE
    new_nodes: list[ir.Node] = []
    scale = _param(plan, 1, 1.0, new_nodes, "_scale")
    bias = _param(plan, 2, 0.0, new_nodes, "_bias")
    name = node.name or "GroupNormalization"
    gn = ir.node(
        "GroupNormalization",
        [plan.x, scale, bias],
        {"num_groups": plan.groups, "epsilon": float(epsilon), "stash_type": _STASH_FLOAT32},
        name=name,
    )
    new_nodes.append(gn)
    out = gn.outputs[0]
    if activation == contract.ACTIVATION_SILU:
        sig = ir.node("Sigmoid", [out], name=name + "_sigmoid")
        mul = ir.node("Mul", [out, sig.outputs[0]], name=name + "_silu")
        new_nodes += [sig, mul]
        out = mul.outputs[0]
    old_out = plan.out_transpose.outputs[0] if plan.out_transpose is not None else node.outputs[0]
    old_nodes = [node] + ([plan.out_transpose] if plan.out_transpose is not None else [])
    # The output Transpose is after our node: insert there so every input is defined.
    ir.convenience.replace_nodes_and_values(
        plan.container, old_nodes[-1], old_nodes, new_nodes, [old_out], [out]
    )
    _detach(old_nodes)
    entry = {
        "node": _label(gn), "form": plan.form, "num_groups": plan.groups, "channels": plan.channels,
        "epsilon": float(epsilon), "stash_type": _STASH_FLOAT32, "activation": activation,
    }
    return entry


def _detach(nodes: Iterable[ir.Node]) -> None:
    """Drop removed nodes' uses of their inputs, so what fed only them reads as dead."""
    for node in nodes:
        inputs = [v for v in node.inputs if v is not None]
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
        for value in inputs:  # uses left by nodes the rewriter removed earlier
            for use in list(value.uses()):
                if use.node.graph is None:
                    use.node.replace_input_with(use.idx, None)


def _plans(model: ir.Model, report: FuseReport | None) -> tuple[list[_Plan], int]:
    plans, kept = [], 0
    for container in graph_likes(model):
        for node in list(container):
            if not is_ours(node):
                continue
            plan = _plan(node, container)
            if isinstance(plan, str):
                kept += 1
                if report is not None:
                    report.notes.append(f"onnx target: kept {_label(node)} as our op: {plan}")
            else:
                plans.append(plan)
    return plans, kept


def _lower_all(model: ir.Model) -> list[dict]:
    plans, _ = _plans(model, None)
    return [_apply(plan) for plan in plans]


def _strip(node: onnx.NodeProto) -> onnx.NodeProto:
    node = copy.deepcopy(node)
    del node.metadata_props[:]
    node.overload = ""
    return node


def _changed_by_converter(before: onnx.GraphProto, after: onnx.GraphProto) -> list[str]:
    """Op types of nodes the version converter rewrote (metadata aside)."""
    if len(before.node) != len(after.node):
        old = {(n.domain, n.op_type) for n in before.node}
        new = {(n.domain, n.op_type) for n in after.node}
        return sorted({t for _, t in old ^ new} or {"<node count changed>"})
    return sorted({a.op_type for a, b in zip(before.node, after.node) if _strip(a) != _strip(b)})


def _upgrade_blockers(model: ir.Model) -> list[str]:
    """Why the model cannot move to opset 21 (empty: it can)."""
    own_functions = [f"{f.domain}::{f.name}" for f in model.functions.values() if not is_our_function(f)]
    if own_functions:
        return [f"model-local function(s) {', '.join(own_functions)} (onnx's version converter drops function bodies)"]
    proto = ir.to_proto(model)
    del proto.functions[:]
    try:
        converted = onnx.version_converter.convert_version(_weightless(proto, model), STANDARD_VERSION)
    except Exception as e:  # noqa: BLE001 - any converter failure is a refusal
        return [f"onnx.version_converter failed: {str(e).splitlines()[0][:200]}"]
    changed = _changed_by_converter(proto.graph, converted.graph)
    if changed:
        return [f"{', '.join(changed)} (rewritten by the opset-{STANDARD_VERSION} converter)"]
    # The final form: lowered copy at opset 21, checked and opened in onnxruntime.
    trial = ir.from_proto(proto)
    _lower_all(trial)
    _set_default_opset(trial, STANDARD_VERSION)
    trial_proto = attach_functions(ir.to_proto(trial))
    with tempfile.TemporaryDirectory(prefix="onnx-groupnorm-trial-") as folder:
        # Never serialise a proto above 2 GB (protobuf's limit): a large model is checked and
        # opened from a file whose weights are external data, as onnx.checker requires.
        source: onnx.ModelProto | str = trial_proto
        if _initializer_bytes(trial) > io.EXTERNAL_DATA_THRESHOLD:
            source = os.path.join(folder, "trial.onnx")
            onnx.save_model(trial_proto, source, save_as_external_data=True, location="trial.onnx.data")
        try:
            onnx.checker.check_model(source)
        except Exception as e:  # noqa: BLE001
            return [f"onnx.checker at opset {STANDARD_VERSION}: {str(e).splitlines()[0][:200]}"]
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            model_arg = source if isinstance(source, str) else source.SerializeToString()
            ort.InferenceSession(model_arg, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            return [f"onnxruntime at opset {STANDARD_VERSION}: {str(e).splitlines()[0][:200]}"]
    return []


#: Initializers above this size are left out of the copy the version converter sees.
_LARGE_INITIALIZER = 1 << 20


def _weightless(proto: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """``proto`` itself, or for a model above 2 GB (the converter serialises its input) a copy
    whose large initializers are graph inputs of the same type and shape: the converter rewrites
    nodes, never weights, and :func:`_changed_by_converter` compares nodes only."""
    if _initializer_bytes(model) <= io.EXTERNAL_DATA_THRESHOLD:
        return proto
    light = onnx.ModelProto()
    graph = proto.graph
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.output.extend(graph.output)
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        size = len(tensor.raw_data) if tensor.HasField("raw_data") else 0
        if size > _LARGE_INITIALIZER or tensor.data_location == onnx.TensorProto.EXTERNAL:
            if tensor.name not in inputs:
                light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            light.graph.initializer.append(tensor)
    return light


def _initializer_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers (a proto's ByteSize() raises above 2 GB)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _set_default_opset(model: ir.Model, version: int) -> None:
    for imports in (model.opset_imports, model.graph.opset_imports):
        for domain in ("", "ai.onnx"):
            if domain in imports:
                imports[domain] = version
        if "" not in imports and "ai.onnx" not in imports:
            imports[""] = version


def lower(model: ir.Model, report: FuseReport) -> None:
    """Lower our nodes to GroupNormalization-21 in place (raising the opset when it is safe)."""
    plans, _ = _plans(model, report)
    if not plans:
        return
    opset = _default_opset(model.opset_imports)
    if opset is None or opset < STANDARD_VERSION:
        blockers = _upgrade_blockers(model)
        if blockers:
            names = ", ".join(sorted({_label(p.node) for p in plans}))
            report.notes.append(
                f"onnx target: refused to raise the default opset from {opset} to {STANDARD_VERSION} "
                f"(ops that do not survive the upgrade: {'; '.join(blockers)}); kept our op for {names}"
            )
            logger.info("opset upgrade refused: %s", blockers)
            return
        _set_default_opset(model, STANDARD_VERSION)
        report.notes.append(f"onnx target: raised the default opset from {opset} to {STANDARD_VERSION}")
    for plan in plans:
        report.lowered.append(_apply(plan))
    logger.info("lowered %d GroupNormalization node(s) to GroupNormalization-21", len(plans))

