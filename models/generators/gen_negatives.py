"""Corpus generator: NEGATIVE models (must never be fused as GroupNormalization), Keras 3.6.0 + tf2onnx 1.17.

Real tf2onnx exports (``tf2onnx.convert.from_keras``, route ``keras36_tf2onnx``) of normalisations that look
like parts of the Keras GroupNormalization pattern but are not a GroupNormalization. Every entry has
``negative: true``, ``expected_group_norms: 0``, ``layers: []`` and ``pattern_family: "negative"``; the
notes say what the model computes and which check must reject it. Files go to
``models/negatives/<name>.onnx`` + ``<name>.npz`` (inputs ``in_0..``, Keras' own ``model(x, training=False)``
outputs ``out_0..``).

* Keras ``LayerNormalization`` over the last axis, and over axes [1, 2];
* Keras ``BatchNormalization`` (inference: folded into the Conv / into constants);
* custom layers that do Keras GN's grouping Reshape ``[..., G, C/G]`` and the same moments / rsqrt / gamma /
  beta chain but reduce over the WRONG axes ((2, 4) or (1, 2) of the rank-5 grouped tensor, (3,) of a rank-4
  one) - the reduce-axes check is the only thing that rejects them;
* an InstanceNormalization-like custom layer (per-channel moments over H, W of the NHWC tensor, no Reshape);
* an "almost GroupNorm" custom layer whose Reshape splits C as ``[..., C/G, G]`` (strided groups: channel c
  is in group c % G) with gamma/beta in that grouped shape and moments over every axis but batch and the
  last one - statistics differ from GN.

(The tf_keras ``LayerNormalization`` negative needs the tf_keras venv; it is made by ``gen_tf_keras.py``.)

Environment: the Keras 3.6.0 venv of ``gen_keras36.py`` (Python 3.11.7; this script imports its helpers)::

    python3.11 -m venv /opt/venvs/keras36
    /opt/venvs/keras36/bin/pip install -q keras==3.6.0 tensorflow==2.17.1 tf2onnx==1.17.0 onnx==1.17.0 onnxruntime==1.32.0
    # exact versions: models/generators/requirements-keras36.txt

Run from the repository root::

    /opt/venvs/keras36/bin/python models/generators/gen_negatives.py [--out DIR] [--only NAME ...]

With the default ``--out`` the manifest entries of this script are replaced (with ``--only`` this script's
other entries are kept); with any other ``--out`` the files are written there and the manifest is left alone.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_keras36 as k36  # noqa: E402  (sets KERAS_BACKEND=tensorflow before importing keras)

import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402

GENERATOR = pathlib.Path(__file__).name
SUBDIR = "negatives"
ROUTE = "keras36_tf2onnx"
L = keras.layers


# --------------------------------------------------------------------------- custom layers

class GroupedMoments(L.Layer):
    """Keras-GN-shaped computation with configurable split order and reduce axes (NOT a GroupNormalization
    unless ``split == "g_cg"`` and ``axes`` = every axis except 0 and the G axis).

    split ``"g_cg"``: ``reshape(x, [-1, S..., G, C/G])`` (Keras GN's grouping Reshape);
    split ``"cg_g"``: ``reshape(x, [-1, S..., C/G, G])`` (channel c lands in group c % G).
    gamma/beta are ``[C]`` and reshaped to the grouped broadcast shape, exactly like Keras GN.
    """

    def __init__(self, groups, axes, split="g_cg", epsilon=1e-3, **kw):
        super().__init__(**kw)
        self.groups, self.axes, self.split, self.epsilon = groups, tuple(axes), split, epsilon

    def build(self, input_shape):
        c = input_shape[-1]
        self.gamma = self.add_weight(shape=(c,), name="gamma", initializer="ones")
        self.beta = self.add_weight(shape=(c,), name="beta", initializer="zeros")

    def _grouped(self, shape):
        c, g = shape[-1], self.groups
        tail = (g, c // g) if self.split == "g_cg" else (c // g, g)
        return tuple(shape[1:-1]) + tail

    def call(self, x):
        gshape = self._grouped(x.shape)
        xg = ops.reshape(x, (-1,) + gshape)
        mean, var = ops.moments(xg, axes=self.axes, keepdims=True)
        inv = ops.rsqrt(var + self.epsilon)
        bshape = (1,) * (len(gshape) - 1) + gshape[-2:]  # [1, 1.., G, C/G] (rank of xg)
        inv = inv * ops.reshape(self.gamma, bshape)
        res = -mean * inv + ops.reshape(self.beta, bshape)
        y = xg * inv + res
        return ops.reshape(y, ops.shape(x))


class InstanceNormLike(L.Layer):
    """Per-sample, per-channel moments over the spatial axes of a channels_last tensor (no Reshape)."""

    def __init__(self, epsilon=1e-3, **kw):
        super().__init__(**kw)
        self.epsilon = epsilon

    def build(self, input_shape):
        c = input_shape[-1]
        self.gamma = self.add_weight(shape=(c,), name="gamma", initializer="ones")
        self.beta = self.add_weight(shape=(c,), name="beta", initializer="zeros")

    def call(self, x):
        axes = tuple(range(1, len(x.shape) - 1))
        mean, var = ops.moments(x, axes=axes, keepdims=True)
        inv = ops.rsqrt(var + self.epsilon) * self.gamma
        return x * inv + (self.beta - mean * inv)


# --------------------------------------------------------------------------- model builders

def conv_then(shape, ch, layer):
    i = keras.Input(shape, name="x")
    x = L.Conv2D(ch, 3, padding="same")(i) if len(shape) == 3 else L.Conv1D(ch, 3, padding="same")(i)
    x = layer(x)
    return keras.Model(i, x)


SPECS: dict[str, dict] = {}


def spec(name, build, data_shape, **kw):
    k36.common.add_spec(SPECS, name, build, data_shape, k36.SPEC_DEFAULTS, route=ROUTE, **kw)


spec("neg_keras36_layernorm_lastaxis",
     lambda: conv_then((8, 8, 8), 16, L.LayerNormalization(axis=-1)), (2, 8, 8, 8),
     notes="NEGATIVE: Conv2D(16) -> keras LayerNormalization(axis=-1) (moments over C only, gamma/beta [C]); "
           "no grouping Reshape.")
spec("neg_keras36_layernorm_axes12",
     lambda: conv_then((8, 8, 8), 16, L.LayerNormalization(axis=[1, 2])), (2, 8, 8, 8),
     notes="NEGATIVE: Conv2D(16) -> keras LayerNormalization(axis=[1, 2]) (moments over H and W per channel, "
           "gamma/beta [H, W]); no grouping Reshape.")
spec("neg_keras36_batchnorm",
     lambda: conv_then((8, 8, 8), 16, L.BatchNormalization()), (2, 8, 8, 8),
     notes="NEGATIVE: Conv2D(16) -> keras BatchNormalization (inference, random moving mean/variance, "
           "gamma, beta): no moments at run time; tf2onnx/grappler fold it into the Conv or into Mul/Add constants.")
spec("neg_keras36_grouped_wrong_axes_24",
     lambda: conv_then((8, 8, 8), 16, GroupedMoments(4, (2, 4))), (2, 8, 8, 8),
     notes="NEGATIVE: custom layer with Keras GN's grouping Reshape [-1,8,8,G=4,C/G=4] and the same moments/rsqrt/"
           "gamma/beta chain, but moments over axes (2, 4) (W and C/G; H and G kept) instead of GN's [1, 2, 4]. "
           "Only the reduce-axes check rejects it.")
spec("neg_keras36_grouped_spatial_only_12",
     lambda: conv_then((8, 8, 8), 16, GroupedMoments(4, (1, 2))), (2, 8, 8, 8),
     notes="NEGATIVE: same grouping Reshape [-1,8,8,4,4] and GN chain, moments over the spatial axes (1, 2) only "
           "(per channel, i.e. instance-norm statistics in grouped layout) instead of [1, 2, 4].")
spec("neg_keras36_grouped_wrong_axes_3_r3",
     lambda: conv_then((12, 8), 16, GroupedMoments(4, (3,))), (2, 12, 8),
     notes="NEGATIVE: rank 3 (Conv1D(16)) -> grouping Reshape [-1,12,G=4,C/G=4] and GN chain, moments over (3,) only "
           "(within-group channels at each position) instead of GN's [1, 3].")
spec("neg_keras36_instancenorm_like",
     lambda: conv_then((8, 8, 8), 16, InstanceNormLike()), (2, 8, 8, 8),
     notes="NEGATIVE: custom InstanceNormalization-like layer on NHWC: moments over (1, 2) of the un-reshaped "
           "tensor, gamma/beta [C]. Numerically the same as GN(groups=C), but there is no grouping Reshape; it must "
           "not be matched as a Keras GN pattern.")
spec("neg_keras36_almost_gn_cg_g_split",
     lambda: conv_then((8, 8, 8), 16, GroupedMoments(4, (1, 2, 3), split="cg_g")), (2, 8, 8, 8),
     notes="NEGATIVE ('almost GroupNorm'): Reshape to [-1,8,8,C/G=4,G=4] (channels split in the other order: "
           "channel c belongs to group c % 4), gamma/beta [C] reshaped to the grouped shape [1,1,1,4,4], moments over "
           "(1, 2, 3) = every axis but batch and the last (group) axis. Statistics are over strided channel sets, so "
           "it differs from GroupNormalization(groups=4) (and from GN(groups=4 read off the Reshape as [.., 4, 4]), "
           "whose reduce axes would be [1, 2, 4]).")


# --------------------------------------------------------------------------- generation

def generate(name, sp, out_dir, seed, vers):
    model, rng = k36.common.build_seeded_keras(keras, sp, seed)
    # every gamma/beta is a norm parameter here; BN moving statistics random too
    k36.set_weights(model, rng, False, is_norm=lambda layer: True, bn_stats=True)
    x = rng.standard_normal(sp["data_shape"]).astype("float32")
    y = np.asarray(model(x, training=False))
    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    k36.export(model, sp["route"], path, sp["opset"], sp["data_shape"])
    return k36.check_and_record(name, sp, model, x, y, path, vers, rng, negative=True, family="negative", layers=[])


def main(argv=None):
    return k36.run_all(GENERATOR, SPECS, generate, SUBDIR, 5000, argv)


if __name__ == "__main__":
    sys.exit(main())
