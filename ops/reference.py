"""NumPy reference of Keras 3 ``keras.layers.GroupNormalization``, line for line.

Mirrors ``GroupNormalization.call`` / ``_apply_normalization`` of Keras 3.15 (tensorflow
backend ``ops.moments``: mean, then mean of squared differences). float16 and bfloat16
inputs are normalised in float32 and cast back, as Keras 3 does; float32 stays float32 and
float64 stays float64. Checked against recorded Keras outputs in
``tests/data/keras_reference.npz`` (made by ``tests/data/make_keras_reference.py``).
"""

from __future__ import annotations

import numpy as np

from . import contract

__all__ = ["group_normalization"]

_LOW_PRECISION = ("float16", "bfloat16")


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.name in _LOW_PRECISION:
        return np.dtype(np.float32)
    if dtype.kind != "f":
        raise NotImplementedError(f"group_normalization supports float inputs, got {dtype}")
    return dtype


def group_normalization(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    *,
    groups: int = contract.DEFAULT_GROUPS,
    axis: int = contract.DEFAULT_AXIS,
    epsilon: float = contract.DEFAULT_EPSILON,
    activation: int = contract.ACTIVATION_NONE,
) -> np.ndarray:
    """Keras GroupNormalization of ``x``; ``gamma``/``beta`` None means scale/center off.

    ``activation=1`` applies SiLU ``y * sigmoid(y)`` (Keras' ``swish``) to the result, in the
    statistics' precision before the cast back, as our op's ``activation`` attribute does.
    """
    x = np.asarray(x)
    config = contract.GroupNormConfig(
        groups=groups, axis=axis, epsilon=epsilon, center=beta is not None, scale=gamma is not None
    )
    axis, channels, groups = config.validate(x.shape)
    for name, param in (("gamma", gamma), ("beta", beta)):
        if param is not None and np.shape(param) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {np.shape(param)}")

    # group_shape: [..., C, ...] -> [..., G, C // G, ...], the channel split in place.
    group_shape = list(x.shape)
    group_shape[axis] = channels // groups
    group_shape.insert(axis, groups)
    compute = _compute_dtype(x.dtype)
    x_g = x.reshape(group_shape).astype(compute)

    # moments over every axis except batch (0) and the group axis.
    axes = tuple(i for i in range(1, x_g.ndim) if i != axis)
    mean = np.mean(x_g, axis=axes, keepdims=True)
    variance = np.mean(np.square(x_g - mean), axis=axes, keepdims=True)
    inv = (1.0 / np.sqrt(variance + compute.type(epsilon))).astype(compute)

    # gamma/beta broadcast shape: 1 everywhere except (G, C // G) at the channel position.
    broadcast_shape = [1] * x_g.ndim
    broadcast_shape[axis] = groups
    broadcast_shape[axis + 1] = channels // groups
    if gamma is not None:
        inv = inv * np.asarray(gamma).astype(compute).reshape(broadcast_shape)
    res = -mean * inv
    if beta is not None:
        res = res + np.asarray(beta).astype(compute).reshape(broadcast_shape)
    y_g = x_g * inv + res
    if activation == contract.ACTIVATION_SILU:
        y_g = y_g / (1 + np.exp(-y_g))
    elif activation != contract.ACTIVATION_NONE:
        raise NotImplementedError(f"activation {activation}")
    return y_g.astype(x.dtype).reshape(x.shape)
