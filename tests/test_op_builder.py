"""make_model: valid models for every configuration, clear errors for invalid ones."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_groupnorm import ops


@pytest.mark.parametrize(
    "shape",
    [(2, 8, 8, 16), (None, 8, 8, 16), ("batch", "h", "w", 16), (None, None, 16)],
)
def test_model_is_valid_with_static_and_symbolic_dims(shape):
    model = ops.make_model(shape, groups=4)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["X"]
    assert [o.name for o in model.graph.output] == ["Y"]
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == (ops.DOMAIN, ops.OP_TYPE)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d, s in zip(dims, shape) if not isinstance(s, int))


def test_attributes_and_defaults_follow_keras():
    model = ops.make_model((2, 8, 8, 64))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["groups"] == 32 and attrs["axis"] == -1
    assert attrs["epsilon"] == pytest.approx(1e-3)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(init["gamma"], np.ones(64, np.float32))
    np.testing.assert_array_equal(init["beta"], np.zeros(64, np.float32))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_shape=(2, 8, 8, 12), groups=5), "C=12 is not divisible by groups=5"),
        (dict(input_shape=(2, 8, 8, 12), groups=24), "groups=24 is larger than the number of channels C=12"),
        (dict(input_shape=(2, 8, 8, 12), groups=0), "groups must be >= 1 or -1"),
        (dict(input_shape=(2, 8, 8, 12), groups=-2), "groups must be >= 1 or -1"),
        (dict(input_shape=(2, 8, 8, 12), groups=4, axis=4), "axis=4 is out of range for an input of rank 4"),
        (dict(input_shape=(2, 8, 8, 12), groups=4, axis=-5), "axis=-5 is out of range"),
        (dict(input_shape=(2, 8, 8, 12), groups=4, axis=0), "axis=0 is the batch axis"),
        (dict(input_shape=(12,), groups=4), "rank >= 2, got rank 1"),
        (dict(input_shape=(2, 8, None), groups=4), "channel dimension .* must be a static positive int"),
        (dict(input_shape=(2, 12), groups=4, gamma=np.ones(6, np.float32)), r"gamma must have shape \(12,\), got \(6,\)"),
        (dict(input_shape=(2, 12), groups=4, beta=np.ones((12, 1), np.float32)), r"beta must have shape \(12,\)"),
        (dict(input_shape=(2, 12), groups=4, scale=False, gamma=np.ones(12, np.float32)), "gamma was given but scale=False"),
        (dict(input_shape=(2, 12), groups=4, epsilon=-1.0), "epsilon must be >= 0"),
        (dict(input_shape=(2, 12), groups=4, dtype=np.int32), "supports float16, bfloat16, float32 and float64"),
    ],
)
def test_invalid_configuration_raises(kwargs, message):
    shape = kwargs.pop("input_shape")
    with pytest.raises(ValueError, match=message):
        ops.make_model(shape, **kwargs)


def test_opset_below_minimum_is_refused():
    with pytest.raises(ValueError, match="opset >= 13"):
        ops.make_model((2, 8), groups=2, opset=12)
