"""Make the real Keras ONNX exports that the benchmarks time (not corpus models), through the
TensorFlow backend (tf2onnx) or, with ``KERAS_BACKEND=torch``, the torch backend (torch.onnx's
TorchScript exporter, the route Keras' ``model.export`` takes for a dynamic batch).

TensorFlow:
Made with Keras 3.15.1 / TensorFlow 2.21.0 / tf2onnx 1.17.0 (``model.export(path, format="onnx")``,
``KERAS_BACKEND=tensorflow``, CPU), Python 3.11.7, in the venv ``/opt/venvs/tf``. Rebuild from
nothing, from the repository root::

    python3.11 -m venv /opt/venvs/tf
    /opt/venvs/tf/bin/pip install -q -r models/generators/requirements-tf.txt
    KERAS_BACKEND=tensorflow /opt/venvs/tf/bin/python benchmarks/make_keras_models.py

(``requirements-tf.txt`` pins keras==3.15.1 tensorflow==2.21.0 tf2onnx==1.17.0 and the rest of that venv.)

torch (torch 2.13.0 CPU, Keras 3.15.1)::

    python3.11 -m venv /opt/venvs/torch
    /opt/venvs/torch/bin/pip install -q -r models/generators/requirements-torch.txt
    KERAS_BACKEND=torch /opt/venvs/torch/bin/python benchmarks/make_keras_models.py

The file names start with ``keras_tf_`` or ``keras_torch_`` by backend; below, ``keras_tf_``.

Writes to ``benchmarks/models/``:

* ``keras_tf_gn_nhwc_{H}x{W}x{C}.onnx`` for (H, W, C) in (64, 64, 512), (128, 128, 256), (32, 32, 320):
  a model that is just ``keras.layers.GroupNormalization(groups=32, epsilon=1e-6)`` (axis=-1) on
  ``Input((H, W, C))`` (batch dim dynamic, Keras' default export signature);
* ``keras_tf_gn_nchw_{H}x{W}x{C}.onnx``: the same on ``Input((C, H, W))`` with ``axis=1``;
* beside each an ``.npz`` with ``gamma`` and ``beta`` (float32 ``[C]``), the random weights set after
  build (``numpy.random.default_rng(SEED + i)``: gamma ~ N(1, 0.3), beta ~ N(0, 0.3));
* ``keras_tf_block_nhwc_64x64x256.onnx``: a residual block on ``Input((64, 64, 256))`` (batch dynamic):
  GN(32, eps 1e-6) -> swish -> Conv2D(256, 3, same) -> GN(32, eps 1e-6) -> swish -> Conv2D(256, 3, same),
  plus the input (Add). Conv weights from Keras' seeded initialisers, GN gamma/beta random. No .npz.

Each export is checked: onnxruntime CPU output vs Keras ``model(x, training=False)`` on a batch-1 input
(the check is printed, nothing is saved).
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "models"
SEED = 20261125
SHAPES = [(64, 64, 512), (128, 128, 256), (32, 32, 320)]  # (H, W, C)
GROUPS, EPSILON = 32, 1e-6
PREFIX = {"tensorflow": "keras_tf", "torch": "keras_torch"}[os.environ["KERAS_BACKEND"]]


def _set_gn_weights(layer, rng):
    c = layer.gamma.shape[0]
    gamma = rng.normal(1.0, 0.3, c).astype(np.float32)
    beta = rng.normal(0.0, 0.3, c).astype(np.float32)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    if os.environ["KERAS_BACKEND"] == "torch":
        for variable in (layer.gamma, layer.beta):  # TorchScript cannot export grad-requiring constants
            variable.value.requires_grad_(False)
    return gamma, beta


def _export_and_check(model, path, shape, rng, atol):
    x = rng.normal(0.5, 2.0, (1, *shape)).astype(np.float32)
    want = keras.ops.convert_to_numpy(model(x, training=False))  # also marks the model as called (export requires it)
    model.export(str(path), format="onnx", verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    err = float(np.abs(got - want).max())
    print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB, ORT vs Keras max abs err {err:.2e}", flush=True)
    assert err < atol, err


def _gn_model(i, shape_hwc, channels_last):
    h, w, c = shape_hwc
    shape = (h, w, c) if channels_last else (c, h, w)
    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED + i)
    inp = keras.Input(shape, name="x")
    layer = keras.layers.GroupNormalization(groups=GROUPS, axis=-1 if channels_last else 1, epsilon=EPSILON)
    model = keras.Model(inp, layer(inp))
    rng = np.random.default_rng(SEED + i)
    gamma, beta = _set_gn_weights(layer, rng)
    layout = "nhwc" if channels_last else "nchw"
    path = OUT / f"{PREFIX}_gn_{layout}_{h}x{w}x{c}.onnx"
    # torch's E[x^2] - E[x]^2 variance rounds differently in Keras and in onnxruntime: ~1e-4.
    _export_and_check(model, path, shape, rng, 1e-4 if PREFIX == "keras_tf" else 1e-3)
    np.savez(path.with_suffix(".npz"), gamma=gamma, beta=beta)


def _block_model():
    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED + 100)
    rng = np.random.default_rng(SEED + 100)
    L = keras.layers
    inp = keras.Input((64, 64, 256), name="x")
    gn1, gn2 = L.GroupNormalization(GROUPS, epsilon=EPSILON), L.GroupNormalization(GROUPS, epsilon=EPSILON)
    h = L.Activation("swish")(gn1(inp))
    h = L.Conv2D(256, 3, padding="same")(h)
    h = L.Activation("swish")(gn2(h))
    h = L.Conv2D(256, 3, padding="same")(h)
    model = keras.Model(inp, L.Add()([h, inp]))
    _set_gn_weights(gn1, rng)
    _set_gn_weights(gn2, rng)
    path = OUT / f"{PREFIX}_block_nhwc_64x64x256.onnx"
    _export_and_check(model, path, (64, 64, 256), rng, 1e-3)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    i = 0
    for channels_last in (True, False):
        for shape in SHAPES:
            _gn_model(i, shape, channels_last)
            i += 1
    _block_model()


if __name__ == "__main__":
    main()
