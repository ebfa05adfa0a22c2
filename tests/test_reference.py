"""The NumPy reference: recorded Keras outputs, and properties that hold for any input."""

from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_groupnorm import ops

DATA = pathlib.Path(__file__).parent / "data" / "keras_reference.npz"

# Keras (TF backend, float32) vs the reference in float32: both follow the same formula in
# the same order, differing only in the reductions' summation order (TF's reduce_mean vs
# NumPy's pairwise sum), ~1e-7 relative on the statistics, amplified by inv*|x| in
# x*inv - mean*inv: 1e-5 covers groups of a few thousand elements with epsilon 1e-6.
# float16 outputs: one rounding of a float32 result that may itself differ in the last
# float32 bits, i.e. at most 1 float16 ulp (9.8e-4 relative): 2e-3.
KERAS_TOLERANCE = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}


def _keras_cases():
    if not DATA.exists():
        return []
    with np.load(DATA) as data:
        configs = json.loads(str(data["configs"]))
    return [pytest.param(i, c, id=f"c{i:03d}-{c['dtype']}-r{len(c['shape'])}-ax{c['axis']}-g{c['groups']}") for i, c in enumerate(configs)]


def test_keras_reference_file_is_present_and_broad():
    with np.load(DATA) as data:
        configs = json.loads(str(data["configs"]))
        meta = json.loads(str(data["meta"]))
    assert meta["backend"] and meta["keras"].startswith("3.")
    ranks = {len(c["shape"]) for c in configs}
    assert ranks >= {2, 3, 4, 5}
    assert {c["dtype"] for c in configs} >= {"float32", "float16"}
    axes = {c["axis"] % len(c["shape"]) == len(c["shape"]) - 1 for c in configs}
    assert axes == {True, False}  # channels-last and others
    assert {(c["center"], c["scale"]) for c in configs} == {(True, True), (True, False), (False, True), (False, False)}
    assert len({c["epsilon"] for c in configs}) >= 3
    assert {1, -1} <= {c["groups"] for c in configs}


@pytest.mark.parametrize("index,config", _keras_cases())
def test_reference_matches_keras(index, config):
    with np.load(DATA) as data:
        x = data[f"c{index:03d}_x"]
        gamma = data[f"c{index:03d}_gamma"] if config["scale"] else None
        beta = data[f"c{index:03d}_beta"] if config["center"] else None
        expected = data[f"c{index:03d}_y"]
    actual = ops.group_normalization(x, gamma, beta, groups=config["groups"], axis=config["axis"], epsilon=config["epsilon"])
    assert actual.dtype == expected.dtype
    rtol, atol = KERAS_TOLERANCE[expected.dtype.name]
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([((2, 6, 6, 8), -1), ((2, 8, 5), 1), ((3, 4, 8, 2), 2), ((2, 8), 1)]),
    st.sampled_from([1, 2, 4, -1]),
    st.floats(-50, 50),
    st.floats(0.1, 10),
    st.integers(0, 2**32 - 1),
)
def test_output_is_normalised_per_group(layout, groups, loc, scale, seed):
    """Without gamma/beta each (sample, group) has mean 0 and variance var/(var+eps)."""
    shape, axis = layout
    x = np.random.default_rng(seed).normal(loc, scale, size=shape)
    y = ops.group_normalization(x, groups=groups, axis=axis, epsilon=1e-3)
    axis %= len(shape)
    g = shape[axis] if groups == -1 else groups
    grouped_shape = list(shape)
    grouped_shape[axis : axis + 1] = [g, shape[axis] // g]
    yg, xg = y.reshape(grouped_shape), x.reshape(grouped_shape)
    axes = tuple(i for i in range(1, len(grouped_shape)) if i != axis)
    var = xg.var(axis=axes)
    np.testing.assert_allclose(yg.mean(axis=axes), 0, atol=1e-9)
    np.testing.assert_allclose(yg.var(axis=axes), var / (var + 1e-3), rtol=1e-9)


def test_affine_is_per_channel(rng):
    x = rng.normal(size=(2, 4, 4, 8))
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    plain = ops.group_normalization(x, groups=2)
    np.testing.assert_allclose(ops.group_normalization(x, gamma, beta, groups=2), plain * gamma + beta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_low_precision_statistics_are_float32(rng, dtype):
    x = rng.normal(3, 2, size=(2, 4, 4, 8)).astype(dtype)
    y = ops.group_normalization(x, groups=2)
    assert y.dtype == np.dtype(dtype)
    expected = ops.group_normalization(x.astype(np.float32), groups=2).astype(dtype)
    np.testing.assert_array_equal(y.astype(np.float32), expected.astype(np.float32))


def test_integer_input_is_not_implemented():
    with pytest.raises(NotImplementedError, match="float inputs"):
        ops.group_normalization(np.ones((2, 4), np.int32), groups=2)
