"""Record real ``keras.layers.GroupNormalization`` outputs for the NumPy reference's tests.

Made with Keras 3.15.1 on the TensorFlow 2.21.0 backend (``KERAS_BACKEND=tensorflow``, CPU),
NumPy 2.4.6, Python 3.11.7. Rebuild from nothing (TensorFlow in its own virtual environment,
outside the checkout), from the repository root:

    python3.11 -m venv /opt/venvs/tf
    /opt/venvs/tf/bin/pip install -r models/generators/requirements-tf.txt
    KERAS_BACKEND=tensorflow /opt/venvs/tf/bin/python tests/data/make_keras_reference.py

(``requirements-tf.txt`` pins keras==3.15.1 tensorflow==2.21.0 numpy==2.4.6 and the rest of
that venv; only keras, tensorflow and numpy are needed here.)

Writes ``tests/data/keras_reference.npz``. Per case ``cNNN``:

* ``cNNN_x``      the input (float32, or float16 for the float16 / mixed_float16 cases),
* ``cNNN_gamma``  the gamma weight, shape ``[C]`` in the layer's variable dtype (only when scale),
* ``cNNN_beta``   the beta weight, shape ``[C]`` in the layer's variable dtype (only when center),
* ``cNNN_y``      ``layer(x, training=False)`` as Keras returns it (Keras' output dtype);

plus ``configs`` (0-d string array: JSON list, one dict per case with ``groups`` (as configured,
-1 allowed), ``axis`` (as configured, may be negative), ``epsilon``, ``center``, ``scale``,
``dtype`` (input = compute dtype), ``policy`` (the layer's dtype policy name) and ``shape``)
and ``meta`` (0-d string array: JSON with the keras / backend / tensorflow / numpy versions).

Inputs are ``normal(loc=U(-2, 2), scale=U(0.5, 2))`` per case; gamma ~ N(1, 0.5) and
beta ~ N(0, 0.5), all from ``numpy.random.default_rng(20261124)``. The layer is called eagerly.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "keras_reference.npz"
SEED = 20261124

# (shape, axis, groups): ranks 2-5; channels-last (-1), channels-first (1), middle axes
# (positive and the same as negative); groups 1, several, -1 and == C.
LAYOUTS = [
    ((3, 12), -1, 3), ((3, 12), -1, -1), ((3, 12), 1, 1), ((4, 16), -1, 16),
    ((2, 5, 12), -1, 4), ((2, 12, 5), 1, 3), ((2, 5, 12), 2, 12), ((2, 6, 7), 1, 2),
    ((2, 6, 6, 16), -1, 4), ((2, 6, 6, 16), -1, 1), ((2, 6, 6, 16), -1, -1), ((2, 6, 6, 16), -1, 16),
    ((2, 16, 6, 6), 1, 4), ((2, 16, 6, 6), 1, -1), ((2, 4, 4, 64), -1, 32),
    ((2, 5, 12, 4), 2, 3), ((2, 5, 12, 4), -2, 3), ((2, 5, 12, 4), -2, 6),
    ((2, 3, 4, 5, 8), -1, 2), ((2, 8, 3, 4, 5), 1, 4), ((2, 3, 8, 4, 5), 2, 2), ((2, 3, 4, 8, 5), -2, 4),
]
EPSILONS = [1e-3, 1e-5, 1e-6]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]  # (center, scale)


def cases() -> list[tuple]:
    out = []
    for i, (shape, axis, groups) in enumerate(LAYOUTS):
        # every layout in float32; a second float32 variant on odd layouts
        out.append((shape, axis, groups, EPSILONS[i % 3], *AFFINE[i % 4], "float32", "float32"))
        if i % 2 == 1:
            out.append((shape, axis, groups, EPSILONS[(i + 1) % 3], *AFFINE[(i + 2) % 4], "float32", "float32"))
        else:  # float16 layer (float16 variables, float16 input) on even layouts
            out.append((shape, axis, groups, EPSILONS[(i + 1) % 3], *AFFINE[(i + 1) % 4], "float16", "float16"))
    # mixed_float16: float16 compute, float32 variables; input given in float16
    out.append(((2, 6, 6, 16), -1, 4, 1e-3, True, True, "float16", "mixed_float16"))
    out.append(((2, 16, 6, 6), 1, 4, 1e-5, True, True, "float16", "mixed_float16"))
    out.append(((2, 5, 12), -1, -1, 1e-6, True, False, "float16", "mixed_float16"))
    return out


def main() -> None:
    rng = np.random.default_rng(SEED)
    arrays, configs = {}, []
    for index, (shape, axis, groups, epsilon, center, scale, dtype, policy) in enumerate(cases()):
        layer = keras.layers.GroupNormalization(
            groups=groups, axis=axis, epsilon=epsilon, center=center, scale=scale, dtype=policy
        )
        x = rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 2), size=shape).astype(dtype)
        layer.build(shape)
        channels = shape[axis]
        key = f"c{index:03d}"
        weights = []
        if scale:
            gamma = rng.normal(1.0, 0.5, channels).astype(layer.variable_dtype)
            weights.append(gamma)
            arrays[f"{key}_gamma"] = gamma
        if center:
            beta = rng.normal(0.0, 0.5, channels).astype(layer.variable_dtype)
            weights.append(beta)
            arrays[f"{key}_beta"] = beta
        layer.set_weights(weights)
        y = keras.ops.convert_to_numpy(layer(x, training=False))
        assert y.dtype == np.dtype(layer.compute_dtype), (y.dtype, layer.compute_dtype)
        arrays[f"{key}_x"] = x
        arrays[f"{key}_y"] = y
        configs.append({
            "groups": groups, "axis": axis, "epsilon": epsilon, "center": center, "scale": scale,
            "dtype": dtype, "policy": policy, "shape": list(shape),
        })
    import tensorflow as tf

    meta = {"keras": keras.__version__, "backend": keras.backend.backend(),
            "tensorflow": tf.__version__, "numpy": np.__version__}
    np.savez_compressed(OUT, configs=np.array(json.dumps(configs)), meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {OUT}: {len(configs)} cases, {OUT.stat().st_size} bytes, {meta}")


if __name__ == "__main__":
    main()
