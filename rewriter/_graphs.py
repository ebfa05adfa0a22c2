"""Walking a model's graphs and recognising our op's nodes: shared by the pipeline and the
targets."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from ..ops import contract

__all__ = ["graph_likes", "is_ours", "is_our_function", "node_config"]


def is_ours(node: ir.Node) -> bool:
    """A node of our GroupNormalization op."""
    return node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE


def is_our_function(function: ir.Function) -> bool:
    """One of our op's function bodies (attached by ``ops.attach_functions``)."""
    return function.domain == contract.DOMAIN and function.name == contract.OP_TYPE


def graph_likes(model: ir.Model) -> Iterable[ir.Graph | ir.Function]:
    """The main graph, every subgraph (If/Loop/Scan bodies), and every model-local
    function except our op's own bodies, with their subgraphs (onnx-ir's own walk)."""
    yield from model.graphs()
    for function in model.functions.values():
        if not is_our_function(function):
            yield function
            yield from function.subgraphs()


def node_config(node: ir.Node) -> contract.GroupNormConfig:
    """The Keras configuration one of our nodes carries (absent attributes: defaults)."""
    attrs = node.attributes

    def get(name, default, kind):
        attr = attrs.get(name)
        return default if attr is None else kind(attr)

    return contract.GroupNormConfig(
        groups=get("groups", contract.DEFAULT_GROUPS, lambda a: a.as_int()),
        axis=get("axis", contract.DEFAULT_AXIS, lambda a: a.as_int()),
        epsilon=get("epsilon", contract.DEFAULT_EPSILON, lambda a: a.as_float()),
        center=len(node.inputs) > 2 and node.inputs[2] is not None,
        scale=len(node.inputs) > 1 and node.inputs[1] is not None,
    )
