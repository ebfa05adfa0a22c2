"""Record real ``keras.layers.GroupNormalization`` outputs for the NumPy reference's tests.

Made with Keras 3.15.1 on the TensorFlow 2.21.0 backend (CPU), Python 3.11. Rebuild from
nothing (outside the checkout, TensorFlow in its own virtual environment):

    python3.11 -m venv /opt/venvs/tfk3
    /opt/venvs/tfk3/bin/pip install -r models/generators/requirements-tf.txt
    KERAS_BACKEND=tensorflow /opt/venvs/tfk3/bin/python tests/data/make_keras_reference.py

Writes ``tests/data/keras_reference.npz``: per case ``cNNN_x``, ``cNNN_gamma`` (when
scale), ``cNNN_beta`` (when center), ``cNNN_y`` (Keras' output, in Keras' output dtype),
plus ``configs`` (JSON list of {groups, axis, epsilon, center, scale, dtype, policy,
shape}) and ``meta`` (JSON: versions, backend). Inputs and weights are seeded.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "keras_reference.npz"

# (shape, axis, groups): ranks 2-5; channels-last, channels-first, middle axes (positive
# and negative); groups 1, several, -1 and == C.
LAYOUTS = [
    ((3, 12), -1, 3), ((3, 12), -1, -1), ((3, 12), 1, 1),
    ((2, 5, 12), -1, 4), ((2, 12, 5), 1, 3), ((2, 5, 12), 2, 12),
    ((2, 6, 6, 16), -1, 4), ((2, 6, 6, 16), -1, 1), ((2, 6, 6, 16), -1, -1), ((2, 6, 6, 16), -1, 16),
    ((2, 16, 6, 6), 1, 4), ((2, 16, 6, 6), 1, -1),
    ((2, 5, 12, 4), 2, 3), ((2, 5, 12, 4), -2, 6),
    ((2, 3, 4, 5, 8), -1, 2), ((2, 8, 3, 4, 5), 1, 4), ((2, 3, 8, 4, 5), 2, 2), ((2, 3, 4, 8, 5), -2, 4),
]
EPSILONS = [1e-3, 1e-5, 1e-6]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


def main() -> None:
    rng = np.random.default_rng(20261124)
    arrays, configs = {}, []
    cases = []
    for i, (shape, axis, groups) in enumerate(LAYOUTS):
        center, scale = AFFINE[i % 4]
        cases.append((shape, axis, groups, EPSILONS[i % 3], center, scale, "float32", "float32"))
        if i % 2 == 0:  # float16 layer (float16 variables) on about half the layouts
            cases.append((shape, axis, groups, EPSILONS[(i + 1) % 3], *AFFINE[(i + 1) % 4], "float16", "float16"))
    cases.append(((2, 6, 6, 16), -1, 4, 1e-3, True, True, "float16", "mixed_float16"))
    cases.append(((2, 16, 6, 6), 1, 4, 1e-5, True, True, "float16", "mixed_float16"))
    for index, (shape, axis, groups, epsilon, center, scale, dtype, policy) in enumerate(cases):
        layer = keras.layers.GroupNormalization(groups=groups, axis=axis, epsilon=epsilon, center=center, scale=scale, dtype=policy)
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
        arrays[f"{key}_x"] = x
        arrays[f"{key}_y"] = y
        configs.append({"groups": groups, "axis": axis, "epsilon": epsilon, "center": center, "scale": scale, "dtype": dtype, "policy": policy, "shape": list(shape)})
    import tensorflow as tf

    meta = {"keras": keras.__version__, "backend": keras.backend.backend(), "tensorflow": tf.__version__, "numpy": np.__version__}
    np.savez_compressed(OUT, configs=np.array(json.dumps(configs)), meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {OUT}: {len(configs)} cases, {OUT.stat().st_size} bytes, {meta}")


if __name__ == "__main__":
    main()
