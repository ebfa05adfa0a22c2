"""Symbolic dims (rewriter._shapes): traced forward through Conv/Pool/Pad/Resize/Concat from the
model's inputs and compared as integer expressions, so a Reshape target computed from the
input's shape (``(1 + 2*hh)//2``) is proven equal to a stride-2 Conv's output height, and
nothing that differs on some accepted input is. Graphs built with onnx.helper; the real
exports (Keras + torch dynamo UNet, Keras + JAX residual block, dynamic H/W) are in the corpus
and checked at two sizes by test_rule_folded_facts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnx_groupnorm.rewriter import _shapes


def _graph(h: str, *, pads, stride=2, auto_pad=None, numerator_offset=1, resize=False):
    """x [1, 8, h, 5] -> Conv(3x3, stride) [-> Resize x2] -> y; t = (offset + Shape(x)[2]) // stride."""
    conv_attrs = {"kernel_shape": [3, 3], "strides": [stride, stride]}
    if auto_pad:
        conv_attrs["auto_pad"] = auto_pad
    else:
        conv_attrs["pads"] = pads
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], **conv_attrs),
        helper.make_node("Shape", ["x"], ["x_shape"], start=2, end=3),
        helper.make_node("Add", ["x_shape", "offset"], ["num"]),
        helper.make_node("Div", ["num", "stride"], ["t"]),
    ]
    out = "c"
    inits = [
        numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float32), "w"),
        numpy_helper.from_array(np.array([numerator_offset], np.int64), "offset"),
        numpy_helper.from_array(np.array([stride], np.int64), "stride"),
    ]
    if resize:
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes.append(helper.make_node("Resize", ["c", "", "scales"], ["up"], mode="nearest"))
        out = "up"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, h, 5])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None), helper.make_tensor_value_info("t", TensorProto.INT64, None)],
        inits,
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    values = {v.name: v for n in model.graph for v in n.outputs}
    return model, values


def _height(values, name="c"):
    return _shapes.dims_of(values[name])[2]


@pytest.mark.parametrize(
    "h, pads, auto_pad",
    [("2*hh", [0, 0, 1, 1], None), ("2*hh", [1, 1, 1, 1], None), ("h", None, "SAME_UPPER")],
    ids=["even-input-asymmetric-pads", "even-input-symmetric-pads", "same-upper"],
)
def test_stride2_conv_height_equals_the_target_from_the_input_shape(h, pads, auto_pad):
    model, values = _graph(h, pads=pads, auto_pad=auto_pad)
    (target,) = _shapes.int_values(values["t"])
    assert _shapes.same_dims([_height(values)], [target])


def test_facts_pass_records_the_traced_dims():
    model, values = _graph("2*hh", pads=[0, 0, 1, 1])
    _shapes.adopt_folded_facts(model)
    assert _shapes.DIMS_META_KEY in values["c"].meta
    (target,) = _shapes.int_values(values["t"])
    assert _shapes.equal_dims(_height(values), target)


@pytest.mark.parametrize(
    "h, pads, offset, height",
    [
        ("h", [0, 0, 1, 1], 1, 7),  # any h: floor(h/2) + ... vs ceil(h/2) differ on odd h
        ("2*hh", [0, 0, 1, 1], 2, 6),  # (2 + 2*hh)//2 = hh + 1
        ("2*hh", [0, 0, 0, 0], 1, 6),  # unpadded: hh - 1
    ],
    ids=["odd-heights-differ", "off-by-one", "unpadded"],
)
def test_heights_that_differ_on_some_input_are_not_equal(h, pads, offset, height):
    model, values = _graph(h, pads=pads, numerator_offset=offset)
    (target,) = _shapes.int_values(values["t"])
    assert not _shapes.same_dims([_height(values)], [target])
    # the witness, in onnxruntime: an input the model accepts where the two differ
    conv, t = run_ort(ir.to_proto(model), np.zeros((1, 8, height, 5), np.float32))
    assert conv.shape[2] != int(t[0])


def test_resize_by_two_restores_the_even_input_height():
    model, values = _graph("2*hh", pads=[0, 0, 1, 1], resize=True)
    assert _shapes.equal_dims(_height(values, "up"), _shapes.dims_of(model.graph.inputs[0])[2])
