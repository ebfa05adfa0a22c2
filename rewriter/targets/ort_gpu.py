"""Target ``ort-gpu``: onnxruntime's ``com.microsoft.GroupNorm`` (CUDA, ROCm, DirectML providers).

The contrib op takes ``X`` (4-D, float16 or float32), ``gamma`` and ``beta`` (``[C]``) and the
attributes ``groups``, ``epsilon``, ``activation`` (0 none, 1 SiLU/swish) and ``channels_last``
(default 1). The CUDA kernel returns NOT_IMPLEMENTED for ``channels_last=0`` and for gamma/beta
that are not float32, and rejects inputs that are not 4-D; so each of our nodes that is rank 4
with the channel on the last axis and a float16/float32 input becomes
``GroupNorm(X, gamma, beta, groups=G, epsilon=eps, activation=a, channels_last=1)`` with
gamma/beta as float32 ``[C]`` (constants converted; a computed one gets a ``Cast``; a missing
one becomes a ones/zeros initializer, a ``Constant`` inside a function). A following SiLU is
absorbed by the pipeline by default (``ABSORBS_ACTIVATION``) and carried as ``activation=1``.
Every other node (rank != 4, channels-first, float64/bfloat16, unknown shape) stays our op with
a note saying why. There is no CPU kernel: the result runs only on those providers.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ...ops import contract
from ..report import FuseReport
from .._graphs import graph_likes, is_ours, node_config
from .onnx_standard import _detach, _label

__all__ = ["lower", "ABSORBS_ACTIVATION", "MS_DOMAIN", "MS_OP"]

logger = logging.getLogger(__name__)

#: Whether this target's form gains from a SiLU absorbed into the op (pipeline default).
ABSORBS_ACTIVATION = True

MS_DOMAIN = "com.microsoft"
MS_OP = "GroupNorm"

_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _reason(node: ir.Node) -> str | tuple[int, int]:
    """``(channels, groups)`` when the contrib op can express the node, else why not."""
    x = node.inputs[0]
    if x is None or x.shape is None:
        return "the input's rank is unknown"
    rank = len(x.shape)
    if rank != 4:
        return f"rank-{rank} input: com.microsoft.GroupNorm takes 4-D NHWC inputs only"
    config = node_config(node)
    try:
        axis = config.normalized_axis(rank)
    except ValueError as e:
        return str(e)
    if axis != 3:
        return (
            f"channel axis {axis}: com.microsoft.GroupNorm's CUDA kernel supports channels_last=1 "
            "(channel on axis 3) only"
        )
    if x.dtype not in _DTYPES:
        return f"{x.dtype} input: com.microsoft.GroupNorm takes float16 or float32"
    channels = x.shape[3]
    if not isinstance(channels, int):
        return "the channel dimension is not static"
    return channels, config.resolved_groups(channels)


def _param(node: ir.Node, container, index: int, fill: float, channels: int, new_nodes: list[ir.Node], suffix: str) -> ir.Value:
    value = node.inputs[index] if index < len(node.inputs) else None
    base = (node.name or node.outputs[0].name or "gn") + suffix
    if value is not None and value.dtype == ir.DataType.FLOAT:
        return value
    array = None
    if value is None:
        array = np.full([channels], fill, np.float32)
    elif value.const_value is not None and not value.is_graph_input():
        array = value.const_value.numpy().astype(np.float32).reshape(-1)
    if array is None:
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=base + "_cast")
        new_nodes.append(cast)
        return cast.outputs[0]
    tensor = ir.tensor(array.astype(np.float32), name=base)
    if isinstance(container, ir.Graph):
        name, i = base, 0
        while name in container.initializers:
            i += 1
            name = f"{base}_{i}"
        tensor.name = name
        init = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([channels]), const_value=tensor)
        container.register_initializer(init)
        return init
    constant = ir.node("Constant", [], {"value": tensor}, name=base + "_const")
    new_nodes.append(constant)
    return constant.outputs[0]


def lower(model: ir.Model, report: FuseReport) -> None:
    """Replace each expressible node of our op with com.microsoft.GroupNorm, in place."""
    count = 0
    for container in graph_likes(model):
        for node in list(container):
            if not is_ours(node):
                continue
            reason = _reason(node)
            if isinstance(reason, str):
                report.notes.append(f"ort-gpu target: kept {_label(node)} as our op: {reason}")
                continue
            channels, groups = reason
            attrs = node.attributes
            epsilon = attrs["epsilon"].as_float() if "epsilon" in attrs else contract.DEFAULT_EPSILON
            activation = attrs["activation"].as_int() if "activation" in attrs else contract.ACTIVATION_NONE
            new_nodes: list[ir.Node] = []
            gamma = _param(node, container, 1, 1.0, channels, new_nodes, "_gamma")
            beta = _param(node, container, 2, 0.0, channels, new_nodes, "_beta")
            gn = ir.node(
                MS_OP,
                [node.inputs[0], gamma, beta],
                {"groups": groups, "epsilon": float(epsilon), "activation": activation, "channels_last": 1},
                domain=MS_DOMAIN,
                name=node.name,
            )
            new_nodes.append(gn)
            ir.convenience.replace_nodes_and_values(container, node, [node], new_nodes, [node.outputs[0]], [gn.outputs[0]])
            _detach([node])
            for imports in {id(i): i for i in (model.opset_imports, container.opset_imports)}.values():
                imports.setdefault(MS_DOMAIN, 1)
            report.lowered.append({
                "node": _label(gn), "form": f"{MS_DOMAIN}.{MS_OP}", "groups": groups, "channels": channels,
                "epsilon": float(epsilon), "activation": activation, "channels_last": 1,
            })
            count += 1
    if count:
        logger.info("lowered %d GroupNormalization node(s) to com.microsoft.GroupNorm", count)
