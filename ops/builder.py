"""Build nodes and models of our GroupNormalization op, and attach its function bodies."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from . import contract
from .functions import Variant, function_proto, variant_for

__all__ = ["make_node", "make_model", "attach_functions", "assign_overloads", "IR_VERSION", "VARIANT_KEY"]

#: Function overloads need IR version 10.
IR_VERSION = 10


def make_node(
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    variant: Variant,
    groups: int,
    axis: int,
    epsilon: float,
    activation: int = contract.ACTIVATION_NONE,
    name: str = "",
) -> onnx.NodeProto:
    """One node of our op; ``inputs`` is ``[X, gamma or "", beta or ""]`` (trailing "" dropped)."""
    inputs = list(inputs)
    while len(inputs) > 1 and not inputs[-1]:
        inputs.pop()
    extra = {"activation": int(activation)} if activation else {}
    node = onnx.helper.make_node(
        contract.OP_TYPE,
        inputs,
        list(outputs),
        name=name,
        domain=contract.DOMAIN,
        groups=int(groups),
        axis=int(axis),
        epsilon=float(epsilon),
        **extra,
    )
    node.overload = variant.overload
    return node


def _our_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        if node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE:
            yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _our_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _our_nodes(g)


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ValueError("the model imports no default-domain opset")


VARIANT_KEY = "onnx_groupnorm.variant"


def _is_ours(function: onnx.FunctionProto) -> bool:
    return function.domain == contract.DOMAIN and function.name == contract.OP_TYPE


def _variant_of(node: onnx.NodeProto, default: str | None) -> str:
    if node.overload:
        return node.overload
    if default is None:
        raise ValueError(
            f"node {node.name!r} of our GroupNormalization has no overload and the model has no "
            "default body to say which variant it is"
        )
    return default


def assign_overloads(top: Sequence, nested: Sequence, old_default: str | None) -> tuple[str | None, dict[str, int]]:
    """Choose the default variant and set every node's overload ("" for the default).

    ``top``: our nodes in the main graph and its subgraphs; ``nested``: those inside
    model-local functions (NodeProtos or onnx-ir Nodes: only ``name`` and ``overload`` are
    read). Returns the default variant and how many nodes use each variant.
    """
    variants = {id(n): _variant_of(n, old_default) for n in [*top, *nested]}
    nested_variants = sorted({variants[id(n)] for n in nested})
    if len(nested_variants) > 1:
        raise ValueError(
            "onnxruntime ignores function overloads inside model-local functions, so all our "
            f"GroupNormalization nodes inside functions must share one variant; found {nested_variants}"
        )
    counts: dict[str, int] = {}
    for v in variants.values():
        counts[v] = counts.get(v, 0) + 1
    default = nested_variants[0] if nested_variants else (max(sorted(counts), key=counts.get) if counts else None)
    for node in [*top, *nested]:
        variant = variants[id(node)]
        node.overload = "" if variant == default else variant
    return default, counts


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every variant of our op used in ``model`` its function body, in place.

    The variant used inside model-local functions (or else the most used one) becomes the
    *default* body, overload "": onnxruntime ignores overloads of nodes nested in another
    function and onnx's ReferenceEvaluator ignores them everywhere, so a model with one
    variant runs on both. Other variants keep a named overload. Each body records its
    variant in ``metadata_props``, so attaching again (after another fuse) is stable.

    Imports our domain, raises the IR version to 10 if lower (overloads need it), rebuilds
    bodies for the model's opset, drops bodies no node uses. Returns ``model``.
    """
    old_default = None
    for function in model.functions:
        if _is_ours(function) and not function.overload:
            old_default = {p.key: p.value for p in function.metadata_props}.get(VARIANT_KEY)
    top = list(_our_nodes(model.graph))
    nested = [
        node
        for function in model.functions
        if not _is_ours(function)
        for node in function.node
        if node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE
    ]
    default, counts = assign_overloads(top, nested, old_default)
    kept = [f for f in model.functions if not _is_ours(f)]
    opset = _default_opset(model)
    bodies = []
    for variant in sorted(counts):
        body = function_proto(Variant.from_overload(variant), opset)
        if variant == default:
            body.overload = ""
        body.metadata_props.add(key=VARIANT_KEY, value=variant)
        bodies.append(body)
    del model.functions[:]
    model.functions.extend(kept + bodies)
    if not counts:  # e.g. every node lowered to another op: no import of an unused domain
        kept_imports = [o for o in model.opset_import if o.domain != contract.DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept_imports)
    if counts:
        if not any(o.domain == contract.DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(contract.DOMAIN, contract.VERSION))
        model.ir_version = max(model.ir_version, IR_VERSION)
    return model


def _dim(d: int | str | None, i: int) -> int | str:
    if d is None:
        return f"d{i}"
    return d


def make_model(
    input_shape: Sequence[int | str | None],
    *,
    groups: int = contract.DEFAULT_GROUPS,
    axis: int = contract.DEFAULT_AXIS,
    epsilon: float = contract.DEFAULT_EPSILON,
    center: bool = True,
    scale: bool = True,
    dtype=np.float32,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    opset: int = 21,
    activation: int = contract.ACTIVATION_NONE,
) -> onnx.ModelProto:
    """A model with one node of our op: input ``X``, output ``Y``, gamma/beta initializers.

    ``input_shape`` entries may be ints, None or strings (symbolic); the channel dimension
    must be an int. ``gamma``/``beta`` default to Keras' initial ones/zeros when ``scale``/
    ``center`` are on; they are stored in their own float dtype (default: ``dtype``).
    ``activation=1`` applies SiLU to the output.
    Raises ValueError for an invalid configuration.
    """
    config = contract.GroupNormConfig(groups, axis, epsilon, center, scale)
    norm_axis, channels, resolved_groups = config.validate(list(input_shape))
    np_dtype = np.dtype(dtype)
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(np_dtype)
    variant = variant_for(len(input_shape), norm_axis, elem_type, scale, center, activation, channels=channels, groups=resolved_groups)
    params = {}
    for name, on, value, default in (("gamma", scale, gamma, np.ones), ("beta", center, beta, np.zeros)):
        if not on:
            if value is not None:
                raise ValueError(f"{name} was given but {'scale' if name == 'gamma' else 'center'}=False")
            continue
        value = default(channels, np_dtype) if value is None else np.asarray(value)
        if value.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {value.shape}")
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            raise ValueError(f"{name} must be a float array, got {value.dtype}")
        params[name] = value
    node = make_node(
        ["X", "gamma" if scale else "", "beta" if center else ""],
        ["Y"],
        variant=variant,
        groups=groups,
        axis=axis,
        epsilon=epsilon,
        activation=activation,
        name="GroupNormalization",
    )
    shape = [_dim(d, i) for i, d in enumerate(input_shape)]
    graph = onnx.helper.make_graph(
        [node],
        "group_normalization",
        [onnx.helper.make_tensor_value_info("X", elem_type, shape)],
        [onnx.helper.make_tensor_value_info("Y", elem_type, shape)],
        [onnx.numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", opset),
            onnx.helper.make_opsetid(contract.DOMAIN, contract.VERSION),
        ],
        ir_version=IR_VERSION,
        producer_name="onnx-groupnorm",
    )
    return attach_functions(model)
