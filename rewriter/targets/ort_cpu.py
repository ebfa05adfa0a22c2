"""Target ``ort``: the fastest form for onnxruntime on CPU, with the exporters' layout Transposes removed.

Our op's channels-first body (``cf``: InstanceNormalization + BatchNormalization) is the
fastest CPU form we know, and tf2onnx, jax2onnx and the Keras torch exporters wrap every Conv in
``Transpose(perm=[0, 2, 3, 1])`` / ``Transpose(perm=[0, 3, 1, 2])``. So each channels-last node of
our op (channel axis ``r - 1`` of a rank-``r`` input, ``r`` in 3..5) is moved onto the
channels-first tensor together with the layout-neutral ops around it:

1. a *region* is grown from the node over layout-neutral neighbours: our channels-last nodes
   of the same rank, unary elementwise ops (Sigmoid, Cast, Relu, ...) and binary elementwise
   ops (Add, Sub, Mul, Div, ...) whose other operand is a constant (``[C]``, ``[1, .., 1, C]``,
   a scalar: any constant of rank <= r) or a rank-``r`` tensor, so swish/SiLU
   ``Mul(v, Sigmoid(v))``, bias ``Add`` and residual ``Add`` all join it;
2. every tensor entering the region is either the output of ``Transpose(t, perm=to_last)``
   (``t`` is used instead, the Transpose dies when the region was its only reader), a constant
   (re-laid out: left-padded to rank ``r`` and transposed), or anything else (one
   ``Transpose(perm=to_first)`` is inserted);
3. every reader outside the region is either ``Transpose(perm=to_first)`` (bypassed: its
   readers take the region's channels-first tensor) or anything else, a graph output included
   (one ``Transpose(perm=to_last)`` is inserted for it);
4. the region is rewritten only when that removes at least as many Transposes as it inserts;
   our nodes in it get ``axis=1`` and the ``cf`` body. A region that would add Transposes is
   left alone with a note in ``report.notes``.

Every rewritten region is recorded in ``report.lowered`` with the Transposes removed/inserted.
Nodes that are not in a rewritten region (channels-first already, middle axis, rank 2, ...)
stay as they are: our op is already the best CPU form for them, with one exception that
:func:`keep_export_arithmetic` makes after the regions (skipped with ``precise``): a layer torch
exported as ``InstanceNormalization`` keeps that export's arithmetic, our body without its
precision shift, since onnxruntime cannot hide the shift's extra pass over the tensor.

``ABSORBS_ACTIVATION`` is False: our body computes an absorbed SiLU as separate
``Sigmoid``/``Mul`` nodes after the normalisation, so absorbing saves no pass over the data
(measured in ``benchmarks/bench_targets.py``: no gain), while the un-absorbed Sigmoid/Mul join
the region anyway.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxscript.rewriter import RULE_NAME_TAG

from ...ops import Variant, contract, variant_for
from .. import rules
from .._graphs import graph_likes, is_ours
from ..report import UNSHIFTED_FORM, FuseReport

__all__ = ["lower", "keep_export_arithmetic", "ABSORBS_ACTIVATION", "plan_regions", "CHANNELS_FIRST_SUFFIX", "EXPORT_ARITHMETIC_FAMILIES"]

#: Name suffix of the channels-first copy of a channels-last value (verification finds the
#: original value under the name without it).
CHANNELS_FIRST_SUFFIX = "_nchw"

logger = logging.getLogger(__name__)

#: Exporter families (``rules.FAMILIES``) whose export computes a layer with onnxruntime's own
#: InstanceNormalization kernel: :func:`keep_export_arithmetic` keeps that arithmetic for them.
EXPORT_ARITHMETIC_FAMILIES = frozenset({"torch-instancenorm"})

#: Whether this target's form gains from a SiLU absorbed into the op (pipeline default).
ABSORBS_ACTIVATION = False

_UNARY = {
    "Sigmoid", "Relu", "Tanh", "Cast", "Identity", "Neg", "Exp", "Erf", "Abs", "Sqrt", "Reciprocal",
    "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Elu", "Selu", "Gelu", "Mish", "Softsign",
    "Log", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
_RANKS = (3, 4, 5)



def _channels_and_groups(node: ir.Node) -> tuple[int, int]:
    """C and the resolved group count of one of our channels-last nodes."""
    groups = node.attributes["groups"].as_int() if "groups" in node.attributes else contract.DEFAULT_GROUPS
    if node.overload:
        variant = Variant.from_overload(node.overload)
        if variant.channels:
            return variant.channels, variant.groups
    for param in node.inputs[1:]:
        if param is not None and param.shape is not None and len(param.shape) == 1 and isinstance(param.shape[0], int):
            channels = param.shape[0]
            break
    else:
        channels = node.inputs[0].shape[-1]
    return channels, channels if groups == -1 else groups

def _to_last(rank: int) -> list[int]:
    return [0, *range(2, rank), 1]


def _to_first(rank: int) -> list[int]:
    return [0, rank - 1, *range(1, rank - 1)]


def _std(node: ir.Node, op_type: str | set) -> bool:
    types = {op_type} if isinstance(op_type, str) else op_type
    return node.domain in ("", "ai.onnx") and node.op_type in types


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None or not _std(node, "Transpose"):
        return None
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name or "") or "<unnamed>"


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array (initializer, Constant, or Reshape/Unsqueeze/Cast of those)."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None:
        return None
    if _std(node, "Constant"):
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return np.asarray(attr.value.numpy())
        return None
    if _std(node, "Reshape") and len(node.inputs) >= 2:
        data, shape = _const(node.inputs[0]), _const(node.inputs[1])
        if data is None or shape is None:
            return None
        shape = [int(s) for s in shape.reshape(-1)]
        allowzero = node.attributes["allowzero"].as_int() if "allowzero" in node.attributes else 0
        if not allowzero:
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        try:
            return data.reshape(shape)
        except ValueError:
            return None
    if _std(node, "Cast"):
        data = _const(node.inputs[0])
        if data is None:
            return None
        try:
            return data.astype(ir.DataType(node.attributes["to"].as_int()).numpy())
        except Exception:  # noqa: BLE001 - an exotic dtype: not treated as a constant
            return None
    return None


#: Readers that count while planning: every live node of the container being lowered (and
#: every node nested in one of its subgraphs) -> the container node that owns it. Dead nodes
#: (the shape computations a fusion left for the pipeline to remove) and the stale nodes
#: onnxscript's rewriter leaves in ``uses()`` do not count.
_READERS: dict[ir.Node, ir.Node] = {}


def _nested(node: ir.Node):
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        )
        for graph in graphs:
            for inner in graph:
                yield inner
                yield from _nested(inner)


def _index(container) -> None:
    """Fill :data:`_READERS` with the live nodes of ``container``."""
    nodes = list(container)
    owner = {}
    for node in nodes:
        owner[node] = node
        for inner in _nested(node):
            owner[inner] = node
    live: set[ir.Node] = set()
    stack = [v.producer() for v in container.outputs]
    while stack:
        node = stack.pop()
        if node is None or node not in owner or owner[node] in live:
            continue
        top = owner[node]
        live.add(top)
        for inner in [top, *_nested(top)]:
            stack.extend(v.producer() for v in inner.inputs if v is not None)
    _READERS.clear()
    _READERS.update({n: top for n, top in owner.items() if top in live})


def _all_nodes(container) -> set[ir.Node]:
    found = set()
    for node in container:
        found.add(node)
        found.update(_nested(node))
    return found


def _detach_stale(container) -> None:
    """Drop the uses recorded for nodes that are in no graph (left by onnxscript's rewriter), so
    that the pipeline's dead-code removal sees the old region as dead."""
    present = _all_nodes(container)
    values = list(container.inputs)
    if isinstance(container, ir.Graph):
        values += list(container.initializers.values())
    for node in present:
        values += list(node.outputs)
    for value in values:
        for use in list(value.uses()):
            if use.node not in present and use.node.graph is None:
                use.node.replace_input_with(use.idx, None)


def _uses(value: ir.Value) -> list:
    """The value's uses by live nodes (see :data:`_READERS`)."""
    return [use for use in value.uses() if use.node in _READERS]


def _rank(value: ir.Value | None, depth: int = 0) -> int | None:
    """The value's rank: from its shape, or propagated through the ops a region holds (our op's
    outputs carry no inferred shape: onnx cannot infer through a custom op)."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    node = value.producer()
    if node is None or depth > 64:
        return None
    if _std(node, "Transpose"):
        perm = _perm(node)
        return len(perm) if perm is not None else _rank(node.inputs[0], depth + 1)
    if is_ours(node) or _std(node, _UNARY):
        return _rank(node.inputs[0], depth + 1)
    if _std(node, _BINARY):
        ranks = [_rank(v, depth + 1) if _const(v) is None else _const(v).ndim for v in node.inputs]
        return None if any(r is None for r in ranks) else max(ranks)
    return None


def _channels_last_rank(node: ir.Node) -> int | None:
    """Rank ``r`` when ``node`` is our op normalising axis ``r - 1`` (r in 3..5), else None."""
    rank = _rank(node.inputs[0]) if node.inputs else None
    if rank not in _RANKS:
        return None
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else contract.DEFAULT_AXIS
    return rank if axis % rank == rank - 1 and -rank <= axis < rank else None


class _Region:
    """Nodes to move to channels-first, and what entering/leaving them costs."""

    def __init__(self, rank: int):
        self.rank = rank
        self.nodes: list[ir.Node] = []
        self.members: set[ir.Node] = set()
        # (node, input index) -> kind: "transpose" (source = transpose input), "const", "insert"
        self.entries: dict[tuple[ir.Node, int], str] = {}
        # region value -> list of outside uses ("bypass", transpose node) or ("insert", None)
        self.exits: dict[ir.Value, list[tuple[str, ir.Node | None]]] = {}

    def removed_transposes(self) -> list[ir.Node]:
        removed = []
        sources = {}
        for (node, i), kind in self.entries.items():
            if kind == "transpose":
                producer = node.inputs[i].producer()
                sources[producer] = producer
        for producer in sources:
            out = producer.outputs[0]
            if not out.is_graph_output() and all(use.node in self.members for use in _uses(out)):
                removed.append(producer)
        for uses in self.exits.values():
            removed.extend(node for kind, node in uses if kind == "bypass")
        return removed

    def inserted_transposes(self) -> int:
        inserted = {self_node.inputs[i] for (self_node, i), kind in self.entries.items() if kind == "insert"}
        outs = sum(1 for uses in self.exits.values() if any(kind == "insert" for kind, _ in uses))
        return len(inserted) + outs


def _joinable(node: ir.Node, rank: int) -> bool:
    """Whether ``node`` is layout-neutral for rank-``rank`` tensors."""
    if is_ours(node):
        return _channels_last_rank(node) == rank
    if _std(node, _UNARY):
        return len(node.outputs) == 1 and node.inputs and node.inputs[0] is not None
    if _std(node, _BINARY):
        if len(node.inputs) != 2 or any(v is None for v in node.inputs):
            return False
        for v in node.inputs:
            array = _const(v)
            if array is not None:
                if array.ndim > rank:
                    return False
            elif _rank(v) != rank:
                return False
        return True
    return False


def _data_inputs(node: ir.Node) -> list[int]:
    """Indices of the inputs carrying the layout (our op: X only; gamma/beta are [C])."""
    if is_ours(node):
        return [0]
    if _std(node, _UNARY):
        return [0]
    return [i for i, v in enumerate(node.inputs) if v is not None]


def _grow(seed: ir.Node, rank: int, taken: set[ir.Node], alive: set[ir.Node]) -> _Region:
    region = _Region(rank)
    to_last, to_first = _to_last(rank), _to_first(rank)
    stack = [seed]
    while stack:
        node = stack.pop()
        if node in region.members:
            continue
        region.members.add(node)
        region.nodes.append(node)
        for i in _data_inputs(node):
            value = node.inputs[i]
            producer = value.producer()
            if _const(value) is not None and not is_ours(node):
                region.entries[(node, i)] = "const"
            elif _perm(producer) == to_last:
                region.entries[(node, i)] = "transpose"
            elif (
                producer in alive and producer not in taken and _joinable(producer, rank) and len(producer.outputs) == 1
            ):
                region.entries.pop((node, i), None)
                stack.append(producer)
            else:
                region.entries[(node, i)] = "insert"
        for out in node.outputs:
            for use in _uses(out):
                user = use.node
                if user in region.members or user not in alive:
                    continue
                if _perm(user) == to_first:
                    continue
                if user not in taken and _joinable(user, rank) and use.idx in _data_inputs(user):
                    stack.append(user)
    # Entries recorded before their producer joined are internal after all.
    for (node, i) in list(region.entries):
        producer = node.inputs[i].producer()
        if producer in region.members:
            del region.entries[(node, i)]
    for node in region.nodes:
        for out in node.outputs:
            outside = []
            for use in _uses(out):
                if use.node in region.members:
                    continue
                if _perm(use.node) == to_first:
                    outside.append(("bypass", use.node))
                else:
                    outside.append(("insert", None))
            if out.is_graph_output():
                outside.append(("insert", None))
            if outside:
                region.exits[out] = outside
    # Keep the graph's order (the rewrite inserts each new node where its old one was).
    return region


def plan_regions(container) -> list[_Region]:
    """Every region in ``container`` around a channels-last node of our op (not yet rewritten)."""
    regions, taken = [], set()
    _index(container)
    alive = {n for n, top in _READERS.items() if n is top}
    order = {n: k for k, n in enumerate(container)}
    for node in list(container):
        if not is_ours(node) or node in taken:
            continue
        rank = _channels_last_rank(node)
        if rank is None:
            continue
        region = _grow(node, rank, taken, alive)
        taken |= region.members
        region.nodes.sort(key=order.__getitem__)
        regions.append(region)
    return regions


def _unique_name(container, base: str) -> str:
    if not isinstance(container, ir.Graph):
        return base
    name, i = base, 0
    while name in container.initializers:
        i += 1
        name = f"{base}_{i}"
    return name


def _new_const(container, array: np.ndarray, base: str, before: ir.Node) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(array), name=base)
    if isinstance(container, ir.Graph):
        tensor.name = _unique_name(container, base)
        value = ir.Value(
            name=tensor.name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(list(array.shape)), const_value=tensor
        )
        container.register_initializer(value)
        return value
    constant = ir.node("Constant", [], {"value": tensor}, name=base + "_const")
    container.insert_before(before, constant)
    return constant.outputs[0]


def _transpose(value: ir.Value, perm: list[int], name: str) -> ir.Node:
    return ir.node("Transpose", [value], {"perm": perm}, name=name)


def _set_output(container, old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` the graph/function output that ``old`` was, under ``old``'s name."""
    name = old.name
    old.name = (name or "v") + "__nhwc"
    new.name = name
    for k, out in enumerate(container.outputs):
        if out is old:
            container.outputs[k] = new


def _channels_first_shape(old_out: ir.Value, new: ir.Node, rank: int) -> ir.Shape | None:
    """The shape of a region node's channels-first output: the old one permuted, or (our op's
    outputs carry none: onnx cannot infer through a custom op) its data input's, so that a
    later lowering (the ``onnx`` target) knows the rank of every tensor this move created."""
    if old_out.shape is not None and len(old_out.shape) == rank:
        return ir.Shape([old_out.shape[k] for k in _to_first(rank)])
    if is_ours(new) or _std(new, _UNARY):
        source = new.inputs[0]
        return ir.Shape(list(source.shape)) if source is not None and source.shape is not None else None
    full = [v.shape for v in new.inputs if v is not None and v.shape is not None and len(v.shape) == rank]
    if len(full) == len([v for v in new.inputs if v is not None and _const(v) is None]) and full:
        # Elementwise broadcast of rank-r operands: a static dim > 1 wins, else the first's.
        dims = []
        for k in range(rank):
            column = [s[k] for s in full]
            static = [d for d in column if isinstance(d, int) and d != 1]
            dims.append(static[0] if static else column[0])
        return ir.Shape(dims)
    return None


def _back_to_last(container, old_out: ir.Value, new_out: ir.Value, to_last: list[int], backs: dict) -> ir.Value:
    """``Transpose(new_out, perm=to_last)``, typed as ``old_out``: inserted after its producer
    once per value (``backs`` remembers it)."""
    if new_out in backs:
        return backs[new_out]
    producer_new = new_out.producer()
    t = _transpose(new_out, to_last, f"{_label(producer_new)}_to_nhwc")
    container.insert_after(producer_new, t)
    back = t.outputs[0]
    back.type = old_out.type
    back.shape = old_out.shape
    backs[new_out] = back
    return back


def _channels_first_input(container, region: _Region, node: ir.Node, i: int, new_of: dict, inserted_in: dict) -> ir.Value | None:
    """The channels-first value for data input ``i`` of region node ``node`` (None: keep it,
    a scalar constant): a region value's copy, an entry Transpose's source, a re-laid-out
    constant, or an inserted ``Transpose(perm=to_first)`` (one per outside value)."""
    value = node.inputs[i]
    if value in new_of:
        return new_of[value]
    kind = region.entries.get((node, i))
    if kind == "transpose":
        return value.producer().inputs[0]
    if kind == "const":
        array = _const(value)
        if array.ndim == 0:
            return None
        # Left-pad to rank r and transpose: a [C] constant becomes [1, C, 1, ..] (broadcasts on NCHW).
        array = array.reshape((1,) * (region.rank - array.ndim) + array.shape).transpose(_to_first(region.rank))
        return _new_const(container, array, (value.name or "const") + CHANNELS_FIRST_SUFFIX, node)
    if kind == "insert":
        if value not in inserted_in:
            t = _transpose(value, _to_first(region.rank), f"{_label(node)}_to_nchw_{i}")
            container.insert_before(node, t)
            inserted_in[value] = t.outputs[0]
        return inserted_in[value]
    raise AssertionError(f"unplanned input {i} of {_label(node)}")  # pragma: no cover


def _channels_first_attributes(node: ir.Node, rank: int) -> tuple[list, str]:
    """(attributes, overload) of the copy: our op gets ``axis=1`` and the cf body."""
    if not is_ours(node):
        return list(node.attributes.values()), node.overload
    attrs = dict(node.attributes.items())
    attrs["axis"] = ir.AttrInt64("axis", 1)
    x = node.inputs[0]
    scale = len(node.inputs) > 1 and node.inputs[1] is not None
    center = len(node.inputs) > 2 and node.inputs[2] is not None
    activation = attrs["activation"].as_int() if "activation" in attrs else contract.ACTIVATION_NONE
    channels, groups = _channels_and_groups(node)
    variant = variant_for(rank, 1, int(x.dtype), scale, center, activation, channels=channels, groups=groups)
    return list(attrs.values()), variant.overload


def _copy_region(container, region: _Region) -> dict[ir.Value, ir.Value]:
    """Step 1: a channels-first copy of every region node, inserted before it; returns the
    map old (channels-last) value -> new (channels-first) value."""
    new_of: dict[ir.Value, ir.Value] = {}
    inserted_in: dict[ir.Value, ir.Value] = {}
    for node in region.nodes:
        inputs = list(node.inputs)
        for i in _data_inputs(node):
            value = _channels_first_input(container, region, node, i, new_of, inserted_in)
            if value is not None:
                inputs[i] = value
        attributes, overload = _channels_first_attributes(node, region.rank)
        new = ir.Node(
            node.domain, node.op_type, inputs, attributes, overload=overload,
            num_outputs=len(node.outputs), name=node.name, version=node.version,
        )
        new.metadata_props.update(node.metadata_props)
        for old_out, new_out in zip(node.outputs, new.outputs):
            new_out.type = old_out.type
            new_out.shape = _channels_first_shape(old_out, new, region.rank)
            new_out.name = f"{old_out.name}{CHANNELS_FIRST_SUFFIX}" if old_out.name else None
            new_of[old_out] = new_out
        container.insert_before(node, new)
    return new_of


def _reconnect_readers(container, region: _Region, new_of: dict) -> None:
    """Step 2: readers outside the region read the copies: a bypassed ``Transpose(to_first)``'s
    readers take the channels-first value, any other reader a ``Transpose(to_last)`` of it."""
    to_last = _to_last(region.rank)
    backs: dict[ir.Value, ir.Value] = {}  # new (NCHW) value -> its Transpose back to NHWC
    for old_out, uses in region.exits.items():
        new_out = new_of[old_out]
        for kind, transpose in uses:
            if kind == "bypass" and transpose is not None and transpose.graph is not None:
                back_to_first = transpose.outputs[0]
                if back_to_first.is_graph_output():  # the NCHW value becomes that output
                    new_out.type, new_out.shape = back_to_first.type, back_to_first.shape
                    _set_output(container, back_to_first, new_out)
                ir.convenience.replace_all_uses_with(back_to_first, new_out)
        if any(kind == "insert" for kind, _ in uses):
            back = _back_to_last(container, old_out, new_out, to_last, backs)
            for use in list(_uses(old_out)):
                if use.node not in region.members:
                    use.node.replace_input_with(use.idx, back)
            if old_out.is_graph_output():
                _set_output(container, old_out, back)
    # Dead readers (nodes whose outputs nobody reads, which exporters leave behind) did not
    # count while planning, but they must not keep the old region alive beside its copy (two
    # nodes with one name): they read the channels-last value through a Transpose of their own
    # (the pipeline's clean-up removes it with them when they were dead code of the fusion).
    present = _all_nodes(container)
    for node in region.nodes:
        for old_out in node.outputs:
            dead_uses = [
                use for use in old_out.uses()
                if use.node not in region.members and use.node in present and use.node not in _READERS
            ]
            if dead_uses:
                back = _back_to_last(container, old_out, new_of[old_out], to_last, backs)
                for use in dead_uses:
                    use.node.replace_input_with(use.idx, back)


def _remove_old(container, region: _Region) -> None:
    """Step 3: remove the old region, the bypassed Transposes and the entry Transposes and
    constants nobody reads any more."""
    pending = list(reversed(region.nodes))
    for uses in region.exits.values():
        pending.extend(t for kind, t in uses if kind == "bypass")
    for (node, i), kind in region.entries.items():
        producer = node.inputs[i].producer()
        if kind in ("transpose", "const") and producer is not None:
            pending.append(producer)
    present = _all_nodes(container)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            outs = node.outputs
            if any(o.is_graph_output() or any(u.node in present for u in o.uses()) for o in outs):
                continue  # still read
            for out in outs:
                for use in list(out.uses()):  # stale readers, in no graph
                    use.node.replace_input_with(use.idx, None)
            container.remove(node, safe=True)
            present.discard(node)
            pending.remove(node)
            changed = True


def _rewrite(container, region: _Region) -> None:
    """Move ``region`` to channels-first: copy, reconnect the readers, remove the old nodes."""
    new_of = _copy_region(container, region)
    _reconnect_readers(container, region, new_of)
    _remove_old(container, region)


def lower(model: ir.Model, report: FuseReport) -> None:
    """Move channels-last regions of our op onto the channels-first tensors, in place."""
    total_removed = total_inserted = 0
    for container in list(graph_likes(model)):
        _detach_stale(container)
        for region in plan_regions(container):
            removed = region.removed_transposes()
            inserted = region.inserted_transposes()
            ours = [_label(n) for n in region.nodes if is_ours(n)]
            if len(removed) < inserted:
                report.notes.append(
                    f"ort target: kept {', '.join(ours)} channels-last: moving it to channels-first would remove "
                    f"{len(removed)} Transpose(s) and insert {inserted}"
                )
                continue
            _index(container)
            _rewrite(container, region)
            total_removed += len(removed)
            total_inserted += inserted
            for name in ours:
                report.lowered.append({
                    "node": name, "form": "our op, channels-first (axis=1, cf body)",
                    "region_nodes": len(region.nodes), "transposes_removed": len(removed),
                    "transposes_inserted": inserted, "rank": region.rank,
                })
    if total_removed or total_inserted:
        logger.info("ort target: removed %d and inserted %d layout Transpose(s)", total_removed, total_inserted)


def keep_export_arithmetic(model: ir.Model, report: FuseReport) -> None:
    """Give the layers torch exported as ``Reshape -> InstanceNormalization -> Mul -> Add`` the
    cf body without its precision shift, in place (``fuse(precise=True)`` skips this step).

    Our shift (``Slice`` + ``Sub``) is one more pass over the tensor than torch's own export
    makes, and onnxruntime offers no kernel to hide it in: its InstanceNormalization is
    single-threaded and applies ``x * (1/std) + (-mean/std)``, so the shift must come from the data
    before it (``ops.functions``). On ResNet-50 with GroupNorm that pass made the fused model ~3%
    slower than the export, and the unshifted body ~3% faster (``benchmarks/realsize/``). Unshifted, the
    layer runs the export's own InstanceNormalization on the same data, so it is as precise as
    the export, never less; its gamma/beta take one BatchNormalization pass instead of the
    export's Mul and Add. Every other form keeps the shift: their exports compute ``E[x^2] - E[x]^2``
    and our body is both faster and precise there.
    """
    for container in graph_likes(model):
        for node in container:
            if not is_ours(node) or not node.overload:
                continue
            # The tag names every rule that rewrote the node, e.g. "AbsorbSiLU, TorchInstanceNorm...".
            names = node.metadata_props.get(RULE_NAME_TAG, "").split(",")
            if not any(rules.family_of(name.strip()) in EXPORT_ARITHMETIC_FAMILIES for name in names):
                continue
            variant = Variant.from_overload(node.overload)
            if variant.layout != "cf" or not variant.shift:
                continue
            node.overload = variant._replace(shift=False).overload
            report.lowered.append({"node": _label(node), "form": UNSHIFTED_FORM})
