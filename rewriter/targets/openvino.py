"""Target ``openvino``: OpenVINO's native GroupNormalization on channels-first tensors.

OpenVINO's ONNX frontend converts ``org.openvinotoolkit::GroupNorm(data, scale[C], bias[C],
num_groups, eps)`` to its own ``GroupNormalization`` kernel at any model opset, and it prefers
that converter to a model-local function of the same name. So each node of our op with the
channel axis on 1 (after the ``ort`` target's layout lifting has moved channels-last layers
onto the exporters' channels-first tensors, Transposes removed) becomes one such node, and the
model carries a function body for it: our precise channels-first body (``ops.functions``,
``cf``), with its attributes renamed. The model therefore:

* still shows one GroupNormalization node per layer;
* runs OpenVINO's kernel, at the model's own opset (no raise to 21, which breaks OpenVINO's
  Conv conversion);
* still runs in onnxruntime and onnx's ReferenceEvaluator, through the function body.

Nodes the native op cannot hold (channel axis not on 1 after lifting, rank < 3, a non-static
channel count, an input dtype other than float32/float16) are inlined as in the ``portable``
target, so OpenVINO runs every node.

Nodes OpenVINO's CPU plugin would crash on are inlined too (with a note saying why). OpenVINO
2026.4's CPU plugin turns a GroupNormalization with small groups (larger ones become an MVN)
into a "snippets" subgraph, and ``compile_model``
dies with SIGSEGV when that subgraph's output feeds an elementwise op (Add, Mul, Sub, Max...)
whose other operand another fused elementwise subgraph computes (a Relu, an Add): the residual
``Add(GroupNorm(conv(h)), h)`` of every ResNet bottleneck with GroupNorm, ``h`` the previous
block's Relu. ``SNIPPETS_MODE=DISABLE`` avoids it; with a graph input, a constant, a Conv (its
Relu fused) or a MaxPool as the other operand it compiles, as do the ``Mul(y, Sigmoid(y))`` of
a SiLU and ``Add(GroupNorm, GroupNorm)``. Dynamic input shapes compile, until the model is
reshaped to static sizes. Which producers OpenVINO fuses is its own decision, so the rule here
is wider than the crash: a native node whose output feeds an elementwise op with a computed
operand (not another native node's output, not derived from the node's own output) is inlined,
at any size and shape (``tests/test_target_openvino.py``).

tract does not run this target's output (it executes no custom-domain function): use
``portable`` there.

Precision: OpenVINO's kernel (f32) loses digits on inputs with ``|mean| >> std`` (2.5e-3 at mean
1e3 / std 1e-2 in ``benchmarks/precision.py``, about what the exports' own float32 arithmetic
and torch's InstanceNormalization form give), where our body keeps ~1e-7 in every runtime:
``portable`` keeps that precision in OpenVINO too.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from ...ops import Variant, contract, function_proto
from .._graphs import graph_likes, is_ours, node_config
from ..report import FuseReport
from . import ort_cpu, portable

__all__ = ["lower", "ABSORBS_ACTIVATION", "DOMAIN", "OP_TYPE"]

logger = logging.getLogger(__name__)

#: OpenVINO's kernel has no activation: an absorbed SiLU would only be expanded again.
ABSORBS_ACTIVATION = False

#: The custom op OpenVINO's ONNX frontend maps to its GroupNormalization kernel.
DOMAIN = "org.openvinotoolkit"
OP_TYPE = "GroupNorm"
_VERSION = 1
#: Overloads (our bodies are specialised per variant) need IR version 10.
_IR_VERSION = 10

_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name or "") or "<unnamed>"


def _native(node: ir.Node) -> tuple[int, int] | str:
    """(channels, groups) when OpenVINO's op can hold ``node``, else why not."""
    x = node.inputs[0]
    if x is None or x.shape is None:
        return "the input's rank is unknown"
    rank = len(x.shape)
    config = node_config(node)
    if rank < 3 or config.normalized_axis(rank) != 1:
        return f"channel axis {config.axis} of a rank-{rank} input is not axis 1 of a rank >= 3 tensor"
    channels = x.shape[1]
    if not isinstance(channels, int):
        return "the channel dimension is not static"
    if x.dtype not in _DTYPES:
        return f"input dtype {x.dtype} (OpenVINO's op takes float32 and float16 here)"
    return channels, config.resolved_groups(channels)


#: Elementwise ops with several data inputs: OpenVINO's CPU plugin fuses them into snippets.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Mod", "PRelu", "Sum", "Mean", "Where"})


def _derives_from(value: ir.Value, node: ir.Node, position: dict[ir.Node, int]) -> bool:
    """Whether ``value`` is computed from ``node``'s output: a walk up the producers that stops at
    nodes placed before ``node`` (graphs are topologically sorted; were one not, a wrong False
    only inlines one more layer)."""
    source, start = node.outputs[0], position.get(node, -1)
    seen, stack = set(), [value]
    while stack:
        current = stack.pop()
        if current is source:
            return True
        producer = current.producer()
        if producer is None or id(producer) in seen or position.get(producer, start + 1) < start:
            continue
        seen.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return False


def _computed(value: ir.Value, native: set[ir.Node]) -> bool:
    """Computed by an op OpenVINO may fuse into an elementwise snippet: not a constant, not a
    graph input, not the output of a node that stays OpenVINO's GroupNormalization (``native``;
    ``Add(GroupNorm, GroupNorm)``, the downsampling residual of a ResNet, compiles)."""
    producer = value.producer()
    return value.const_value is None and producer is not None and producer.op_type != "Constant" and producer not in native


def _users(value: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
    """The nodes reading ``value``, through Identity nodes (OpenVINO drops them), with the value they read."""
    found = []
    for user, _ in value.uses():
        if user.op_type == "Identity" and user.domain in ("", "ai.onnx"):
            found += _users(user.outputs[0])
        else:
            found.append((user, value))
    return found


def _snippet_hazard(node: ir.Node, native: set[ir.Node], position: dict[ir.Node, int]) -> str | None:
    """Why OpenVINO's CPU plugin could crash on the native op here, else None (module docstring)."""
    out = node.outputs[0]
    for user, value in _users(out):
        if user.op_type not in _ELEMENTWISE or user.domain not in ("", "ai.onnx"):
            continue
        for other in user.inputs:
            if other is None or other is value or not _computed(other, native) or _derives_from(other, node, position):
                continue
            return (
                f"its output feeds {user.op_type} {_label(user)!r} with the computed operand {other.name!r}: "
                "OpenVINO 2026.4's CPU plugin crashes compiling that (SIGSEGV in its GroupNormalization snippets)"
            )
    return None


def _plan(candidates: list[tuple[ir.Graph, ir.Node]]) -> dict[ir.Node, tuple[int, int] | str]:
    """(channels, groups) for each node that becomes OpenVINO's op, else why it is inlined.
    Inlining one node can make its neighbour's operand an elementwise one: repeat until stable."""
    position = {node: i for graph in {id(g): g for g, _ in candidates}.values() for i, node in enumerate(graph)}
    plan = {node: _native(node) for _, node in candidates}
    while True:
        native = {node for node, form in plan.items() if not isinstance(form, str)}
        hazards = {node: why for node in native if (why := _snippet_hazard(node, native, position))}
        if not hazards:
            return plan
        plan.update(hazards)


def _body(variant: Variant, opset: int) -> ir.Function:
    """Our cf body as ``org.openvinotoolkit::GroupNorm(X, scale, bias; num_groups, eps)``."""
    proto = function_proto(variant, opset)
    proto.domain, proto.name = DOMAIN, OP_TYPE
    del proto.attribute_proto[:]
    proto.attribute_proto.extend([
        onnx.helper.make_attribute("num_groups", variant.groups),
        onnx.helper.make_attribute("eps", contract.DEFAULT_EPSILON),
    ])
    for node in proto.node:
        for attr in node.attribute:
            if attr.ref_attr_name == "epsilon":
                attr.ref_attr_name = "eps"
            elif attr.ref_attr_name:  # pragma: no cover - the cf body reads epsilon only
                raise AssertionError(f"cf body reads attribute {attr.ref_attr_name!r}")
    kept = [o for o in proto.opset_import if o.domain != contract.DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    proto.doc_string = f"OpenVINO's GroupNorm; our precise body ({variant.overload}) for other runtimes."
    return ir.serde.deserialize_function(proto)


def _param(container, node: ir.Node, index: int, fill: float, channels: int, dtype: ir.DataType, before: list) -> ir.Value:
    """gamma (1) or beta (2) as a [C] value of X's dtype."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is not None and value.dtype == dtype:
        return value
    if value is not None:
        cast = ir.node("Cast", [value], {"to": dtype}, name=f"{_label(node)}_{'scale' if index == 1 else 'bias'}_cast")
        before.append(cast)
        return cast.outputs[0]
    array = np.full([channels], fill, dtype=dtype.numpy())
    return ort_cpu._new_const(container, array, f"{_label(node)}_{'ones' if fill else 'zeros'}", node)


def _replace(container, node: ir.Node, channels: int, groups: int, opset: int, model: ir.Model) -> None:
    x = node.inputs[0]
    config = node_config(node)
    activation = node.attributes["activation"].as_int() if "activation" in node.attributes else contract.ACTIVATION_NONE
    variant = Variant("cf", int(x.dtype), True, True, False, channels, groups)
    key = (DOMAIN, OP_TYPE, variant.overload)
    if key not in model.functions:
        model.functions[key] = _body(variant, opset)
    new_nodes: list[ir.Node] = []
    scale = _param(container, node, 1, 1.0, channels, x.dtype, new_nodes)
    bias = _param(container, node, 2, 0.0, channels, x.dtype, new_nodes)
    gn = ir.Node(
        DOMAIN, OP_TYPE, [x, scale, bias],
        [ir.AttrInt64("num_groups", groups), ir.AttrFloat32("eps", float(config.epsilon))],
        overload=variant.overload, name=node.name,
    )
    gn.metadata_props.update(node.metadata_props)
    new_nodes.append(gn)
    out = gn.outputs[0]
    if activation == contract.ACTIVATION_SILU:
        sig = ir.node("Sigmoid", [out], name=f"{_label(node)}_sigmoid")
        mul = ir.node("Mul", [out, sig.outputs[0]], name=f"{_label(node)}_silu")
        new_nodes += [sig, mul]
        out = mul.outputs[0]
    old = node.outputs[0]
    out.type, out.shape = old.type, old.shape
    ir.convenience.replace_nodes_and_values(container, node, [node], new_nodes, [old], [out])


def _default_body(model: ir.Model) -> None:
    """The most used body becomes the default (overload ""): onnx's ReferenceEvaluator ignores
    overloads, so a model with one variant runs there too (as ``ops.attach_functions`` does)."""
    counts: dict[str, int] = {}
    nodes = [n for c in graph_likes(model) for n in c if n.domain == DOMAIN and n.op_type == OP_TYPE]
    for node in nodes:
        counts[node.overload] = counts.get(node.overload, 0) + 1
    default = max(sorted(counts), key=counts.get)
    function = model.functions.pop((DOMAIN, OP_TYPE, default))
    function.overload = ""
    model.functions[function.identifier()] = function
    for node in nodes:
        if node.overload == default:
            node.overload = ""


def lower(model: ir.Model, report: FuseReport) -> None:
    """Lift layouts (``ort``), map channels-first nodes to OpenVINO's op, inline the rest."""
    ort_cpu.lower(model, report)
    opset = portable._default_opset(model)
    # Nodes in model-local functions are inlined below instead: onnxruntime ignores the
    # overloads of nested calls.
    candidates = [
        (container, node) for container in list(graph_likes(model)) if not isinstance(container, ir.Function)
        for node in list(container) if is_ours(node)
    ]
    plan = _plan(candidates)
    mapped = 0
    for container, node in candidates:
        native = plan[node]
        if isinstance(native, str):
            report.notes.append(f"openvino target: inlined {_label(node)} (standard ops): {native}")
            logger.info("openvino target: inlined %s: %s", _label(node), native)
            continue
        _replace(container, node, *native, opset, model)
        mapped += 1
        report.lowered.append({
            "node": _label(node), "form": f"{DOMAIN}::{OP_TYPE} (OpenVINO's GroupNormalization), our body attached",
            "channels": native[0], "num_groups": native[1],
        })
    if mapped:
        model.opset_imports.setdefault(DOMAIN, _VERSION)
        model.ir_version = max(model.ir_version, _IR_VERSION)
        _default_body(model)
    portable.inline_ours(model, report, "openvino")
    logger.info("openvino target: %d node(s) mapped to %s::%s", mapped, DOMAIN, OP_TYPE)
