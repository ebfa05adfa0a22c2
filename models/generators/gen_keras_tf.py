"""Corpus generator: Keras 3.15.1 + TensorFlow 2.21 GroupNormalization models, exported through tf2onnx 1.17.

Three routes (all give the ``tf2onnx-moments`` pattern family, see ``shared/research/exported-patterns.md`` §2):

* ``keras_export_tf``: ``model.export(path, format="onnx"[, input_signature=..., opset_version=N])``
  (Keras wraps ``model`` in a ``tf.function`` and calls ``tf2onnx.convert.from_function``);
* ``tf2onnx_from_keras``: ``tf2onnx.convert.from_keras(model, input_signature=..., opset=N)``;
* ``tf2onnx_cli_savedmodel``: ``model.export(dir, format="tf_saved_model")`` then
  ``python -m tf2onnx.convert --saved-model dir --output f.onnx [--opset N]``.

Configurations are spread over the routes (ranks 2-5, channels-last / channels-first / middle axis,
groups 1 / several / 32 with C=64 / -1, epsilons 1e-3 / 1e-5 / 1e-6, center / scale off, static / dynamic
batch / dynamic H,W signatures, opsets 13 / 15 / 17 / 18 (21 is refused by tf2onnx and recorded as an
expected failure), float16 and mixed_float16 policies, a Conv-GN-swish-Conv-GN-swish + residual block, a
keras_hub VAE encoder and decoder (GroupNormalization(groups=32, eps=1e-6) inside), and a few models left at
their initial GN weights (beta = 0 is folded away by Grappler)). Files go to ``models/keras_tf/<name>.onnx`` +
``<name>.npz`` (input ``in_0``, Keras' own ``model(x, training=False)`` output ``out_0`` in the model's output
dtype).

Environment (Python 3.11.7 via pyenv; protobuf 7.36.2 works with tf2onnx 1.17.0 here, no pin needed)::

    python3.11 -m venv /opt/venvs/tf
    /opt/venvs/tf/bin/pip install -q keras==3.15.1 tensorflow==2.21.0 tf2onnx==1.17.0 keras-hub==0.32.0 \\
        onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6
    # exact versions of everything: models/generators/requirements-tf.txt
    #   /opt/venvs/tf/bin/pip install -q -r models/generators/requirements-tf.txt

Run from the repository root::

    /opt/venvs/tf/bin/python models/generators/gen_keras_tf.py [--out DIR] [--only NAME ...]

``KERAS_BACKEND`` is forced to ``tensorflow``. With the default ``--out`` the manifest entries of this script
are replaced (with ``--only`` this script's other entries are kept); with any other ``--out`` the files are
written there and the manifest is left alone. Failed exports are recorded as ``failures``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import traceback
from importlib import metadata

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _manifest import MANIFEST, MODELS_DIR, save_npz, update_manifest  # noqa: E402

import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import tf2onnx  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

tf.get_logger().setLevel("ERROR")

GENERATOR = pathlib.Path(__file__).name
SUBDIR = "keras_tf"
L = keras.layers

ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 16: "bfloat16"}


def versions() -> dict:
    out = {}
    for pkg in ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy", "protobuf", "keras-hub"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- model builders

def gn(groups, **kw):
    layer = L.GroupNormalization(groups=groups, **kw)
    layer._configured_groups = groups  # build() replaces -1 by C
    return layer


def conv_gn(shape, ch, groups, gn_kw=None):
    """Conv2D(ch, 3, same) -> GroupNormalization, channels_last rank 4."""
    i = keras.Input(shape, name="x")
    x = L.Conv2D(ch, 3, padding="same")(i)
    x = gn(groups, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def conv1d_gn(shape, ch, groups, gn_kw=None):
    i = keras.Input(shape, name="x")
    x = L.Conv1D(ch, 3, padding="same")(i)
    x = gn(groups, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def conv3d_gn(shape, ch, groups, gn_kw=None):
    i = keras.Input(shape, name="x")
    x = L.Conv3D(ch, 3, padding="same")(i)
    x = gn(groups, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def dense_gn(features, ch, groups, gn_kw=None):
    i = keras.Input((features,), name="x")
    x = L.Dense(ch)(i)
    x = gn(groups, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def only_gn(shape, groups, gn_kw=None):
    """GroupNormalization directly on the graph input (any rank / axis)."""
    i = keras.Input(shape, name="x")
    x = gn(groups, **(gn_kw or {}))(i)
    return keras.Model(i, x)


def permute_gn(shape, ch, groups, gn_kw=None):
    """Conv2D (NHWC) -> Permute to NCHW -> GroupNormalization(axis=1) -> Permute back -> Conv2D 1x1."""
    i = keras.Input(shape, name="x")
    x = L.Conv2D(ch, 3, padding="same")(i)
    x = L.Permute((3, 1, 2))(x)
    x = gn(groups, axis=1, **(gn_kw or {}))(x)
    x = L.Permute((2, 3, 1))(x)
    x = L.Conv2D(ch, 1)(x)
    return keras.Model(i, x)


def resblock(shape, ch, groups, eps=1e-6):
    """UNet / VAE-style resnet block: Conv-GN-swish-Conv-GN-swish + (1x1-Conv) residual Add."""
    i = keras.Input(shape, name="x")
    h = L.Conv2D(ch, 3, padding="same")(i)
    h = gn(groups, epsilon=eps)(h)
    h = L.Activation("swish")(h)
    h = L.Conv2D(ch, 3, padding="same")(h)
    h = gn(groups, epsilon=eps)(h)
    h = L.Activation("swish")(h)
    skip = L.Conv2D(ch, 1)(i) if shape[-1] != ch else i
    out = L.Add()([h, skip])
    return keras.Model(i, out)


def vae_backbone():
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    return VAEBackbone(encoder_num_filters=[32], encoder_num_blocks=[1], decoder_num_filters=[32],
                       decoder_num_blocks=[1], input_channels=3, sample_channels=4, output_channels=3,
                       sampler_method="mode")


def vae_encoder(hw=(16, 16)):
    vae = vae_backbone()
    i = keras.Input((*hw, 3), name="images")
    return keras.Model(i, vae.encoder(i))


def vae_decoder(hw=(None, None)):
    vae = vae_backbone()
    i = keras.Input((*hw, 2), name="latents")  # sampler 'mode' keeps sample_channels // 2 = 2 latent channels
    return keras.Model(i, vae.decoder(i))


# --------------------------------------------------------------------------- specs
SPECS: dict[str, dict] = {}

E, F, C = "keras_export_tf", "tf2onnx_from_keras", "tf2onnx_cli_savedmodel"


def spec(name, build, data_shape, route, **kw):
    kw.setdefault("policy", "float32")
    kw.setdefault("opset", None)           # None = the exporter's default (15)
    kw.setdefault("initial", False)
    kw.setdefault("notes", "")
    kw.setdefault("extra_shapes", [])
    kw.setdefault("expect_fail", False)
    kw.setdefault("signature", "batch")    # batch: [None, ...static]; static: data_shape; keras: Input's shape
    SPECS[name] = dict(build=build, data_shape=data_shape, route=route, **kw)


# ---- keras_export_tf: model.export(format="onnx")
spec("keras_tf_export_nhwc_r4_g4", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), E,
     extra_shapes=[(3, 8, 8, 8)],
     notes="Conv2D(16,3,same) -> GroupNormalization(groups=4) (eps 1e-3 default); default signature (batch None), "
           "default opset 15.")
spec("keras_tf_export_nhwc_r4_g1_eps1e5", lambda: conv_gn((8, 8, 8), 16, 1, dict(epsilon=1e-5)), (2, 8, 8, 8), E,
     notes="Conv2D -> GroupNormalization(groups=1, eps=1e-5) (LayerNorm-like over H,W,C); opset 15.")
spec("keras_tf_export_nhwc_r4_gm1_eps1e6", lambda: conv_gn((8, 8, 8), 16, -1, dict(epsilon=1e-6)), (2, 8, 8, 8), E,
     notes="Conv2D -> GroupNormalization(groups=-1 -> 16 = C, eps=1e-6) (InstanceNorm-like); opset 15.")
spec("keras_tf_export_nhwc_r4_g32_c64", lambda: conv_gn((8, 8, 8), 64, 32), (2, 8, 8, 8), E,
     notes="Conv2D(64) -> GroupNormalization(groups=32) (C/G=2, the SD/UNet setting); opset 15.")
spec("keras_tf_export_nc_r2_g4_dense", lambda: dense_gn(12, 16, 4), (3, 12), E, extra_shapes=[(5, 12)],
     notes="Dense(16) -> GroupNormalization(groups=4) on rank 2 [N,C]: grouping Reshape to [-1,4,4], reduce over "
           "axis 2 (tf2onnx rewrites both ReduceMeans to GlobalAveragePool); opset 15.")
spec("keras_tf_export_nwc_r3_g2_conv1d_opset13", lambda: conv1d_gn((10, 6), 8, 2, dict(epsilon=1e-5)), (2, 10, 6), E,
     opset=13, notes="Conv1D(8,3,same) -> GroupNormalization(groups=2, eps=1e-5), rank 3 channels_last; opset 13 "
                     "(ReduceMean axes attribute).")
spec("keras_tf_export_ndhwc_r5_g4_conv3d_opset17", lambda: conv3d_gn((4, 4, 4, 4), 8, 4), (2, 4, 4, 4, 4), E,
     opset=17, notes="Conv3D(8,3,same) -> GroupNormalization(groups=4), rank 5 channels_last; opset 17.")
spec("keras_tf_export_nchw_r4_g4_axis1_input", lambda: only_gn((16, 6, 6), 4, dict(axis=1)), (2, 16, 6, 6), E,
     extra_shapes=[(1, 16, 6, 6)],
     notes="GroupNormalization(groups=4, axis=1) directly on an NCHW graph input (channels_first, no Conv: TF CPU "
           "Conv2D has no channels_first kernel); GlobalAveragePool rewrite expected; opset 15.")
spec("keras_tf_export_nchw_r4_g4_permute", lambda: permute_gn((8, 8, 8), 16, 4, dict(epsilon=1e-5)), (2, 8, 8, 8), E,
     notes="Conv2D(16) NHWC -> Permute((3,1,2)) -> GroupNormalization(groups=4, axis=1, eps=1e-5) -> Permute back "
           "-> Conv2D(16,1); opset 15.")
spec("keras_tf_export_nhwc_r4_g4_nocenter", lambda: conv_gn((8, 8, 8), 16, 4, dict(center=False)), (2, 8, 8, 8), E,
     notes="Conv2D -> GroupNormalization(groups=4, center=False): no beta Add; opset 15.")
spec("keras_tf_export_nhwc_r4_g4_noscale_eps1e5",
     lambda: conv_gn((8, 8, 8), 16, 4, dict(scale=False, epsilon=1e-5)), (2, 8, 8, 8), E,
     notes="Conv2D -> GroupNormalization(groups=4, scale=False, eps=1e-5): no gamma Mul; opset 15.")
spec("keras_tf_export_nhwc_r4_g8_noaffine",
     lambda: conv_gn((8, 8, 8), 16, 8, dict(scale=False, center=False)), (2, 8, 8, 8), E,
     notes="Conv2D -> GroupNormalization(groups=8, scale=False, center=False); opset 15.")
spec("keras_tf_export_nhwc_r4_g4_static", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), E, signature="static",
     notes="Conv2D -> GroupNormalization(groups=4); fully static input_signature=[tf.TensorSpec((2,8,8,8))] "
           "(no Shape ops; constant final Reshape target); opset 15.")
spec("keras_tf_export_nhwc_r4_g4_dynhw", lambda: conv_gn((None, None, 8), 16, 4), (2, 8, 8, 8), E, signature="keras",
     extra_shapes=[(1, 12, 10, 8)],
     notes="Input((None,None,8)) -> Conv2D -> GroupNormalization(groups=4): dynamic batch, H and W (grouping Reshape "
           "target built at run time); opset 15.")
spec("keras_tf_export_nhwc_r4_g4_opset18", lambda: conv_gn((8, 8, 8), 16, 4, dict(epsilon=1e-6)), (2, 8, 8, 8), E,
     opset=18, notes="Conv2D -> GroupNormalization(groups=4, eps=1e-6); opset_version=18 (ReduceMean axes input).")
spec("keras_tf_export_nhwc_r4_g4_opset21", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), E, opset=21,
     expect_fail=True, notes="Conv2D -> GroupNormalization(groups=4); opset_version=21 (tf2onnx 1.17 max is 18).")
spec("keras_tf_export_nhwc_r4_g4_initial", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), E, initial=True,
     notes="Conv2D (random) -> GroupNormalization(groups=4) at its initial weights gamma=1, beta=0: Grappler folds "
           "the beta Add away (gamma Mul stays); opset 15.")
spec("keras_tf_export_nhwc_r4_g4_float16", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), E, policy="float16",
     notes="global dtype policy float16 (f16 variables; Keras docs say export wants float32, but it works): "
           "float32 Input -> Conv2D (f16) -> GroupNormalization(groups=4) computed in f32 by Keras 3.15 "
           "(Cast to FLOAT after the grouping Reshape, Cast to FLOAT16 before the final Reshape); output float16.")
spec("keras_tf_export_nhwc_r4_resblock_g8", lambda: resblock((8, 8, 16), 32, 8), (2, 8, 8, 16), E,
     notes="resnet block Conv2D(32)-GN(8,eps=1e-6)-swish-Conv2D(32)-GN(8,eps=1e-6)-swish + Conv2D(32,1) skip, Add; "
           "two GNs between tf2onnx NCHW<->NHWC Transposes; opset 15.")
spec("keras_tf_export_keras_hub_vae_encoder_static", lambda: vae_encoder((16, 16)), (1, 16, 16, 3), E,
     signature="static",
     notes="keras_hub 0.32 VAEBackbone(encoder_num_filters=[32], encoder_num_blocks=[1], decoder [32]/[1], "
           "sample_channels=4, sampler_method='mode').encoder wrapped in a functional model on Input((16,16,3)); "
           "8 GroupNormalization(groups=32, eps=1e-6) (resnet blocks, mid attention, output norm), Conv weights "
           "random seeded, GN gamma/beta random; static input_signature (1,16,16,3); opset 15.")

# ---- tf2onnx_from_keras
spec("keras_tf_fromkeras_nhwc_r4_g4_opset17", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), F, opset=17,
     extra_shapes=[(3, 8, 8, 8)],
     notes="Conv2D(16) -> GroupNormalization(groups=4); tf2onnx.convert.from_keras, signature [None,8,8,8], opset 17.")
spec("keras_tf_fromkeras_nhwc_r4_g8_mixed_float16", lambda: conv_gn((8, 8, 8), 16, 8), (2, 8, 8, 8), F,
     policy="mixed_float16", opset=17,
     notes="mixed_float16 policy (f32 variables, f16 compute): Conv2D -> GroupNormalization(groups=8) computed in f32 "
           "by Keras 3.15; output float16; from_keras opset 17.")
spec("keras_tf_fromkeras_ncdhw_r5_g4_axis1_input_opset13",
     lambda: only_gn((8, 3, 4, 4), 4, dict(axis=1, epsilon=1e-5)), (2, 8, 3, 4, 4), F, opset=13, expect_fail=True,
     notes="GroupNormalization(groups=4, axis=1, eps=1e-5) directly on a rank-5 channels_first input [N,8,3,4,4]; "
           "from_keras opset 13. The export itself succeeds, but tf2onnx rewrites the moments of the rank-6 grouped "
           "tensor [-1,4,2,3,4,4] into GlobalAveragePool over 4 spatial dims, which onnxruntime CPU refuses "
           "('Unsupported pooling size'), so the model cannot be checked against Keras and is not kept.")
spec("keras_tf_fromkeras_nhwc_r4_g2_dynhw_opset18", lambda: conv_gn((None, None, 8), 16, 2, dict(epsilon=1e-5)),
     (2, 8, 8, 8), F, signature="keras", opset=18, extra_shapes=[(1, 6, 12, 8)],
     notes="Input((None,None,8)) -> Conv2D -> GroupNormalization(groups=2, eps=1e-5); signature [None,None,None,8], "
           "from_keras opset 18.")
spec("keras_tf_fromkeras_nchw_r4_g4_dynhw_input", lambda: only_gn((16, None, None), 4, dict(axis=1)),
     (2, 16, 6, 6), F, signature="keras", opset=17, extra_shapes=[(1, 16, 5, 7)],
     notes="GroupNormalization(groups=4, axis=1) directly on an NCHW input with dynamic H,W (Input((16,None,None))): "
           "tf2onnx's Unsqueeze + Reshape [-1,G,C/G,0,0] form; from_keras opset 17.")
spec("keras_tf_fromkeras_r4_axis2_middle", lambda: only_gn((5, 12, 4), 3, dict(axis=2, epsilon=1e-6)),
     (2, 5, 12, 4), F, opset=17,
     notes="GroupNormalization(groups=3, axis=2, eps=1e-6) on [N,5,12,4]: channel axis in the middle (grouping Reshape "
           "[-1,5,3,4,4], reduce over [1,3,4]); from_keras opset 17.")
spec("keras_tf_fromkeras_r4_axism2_middle_noscale", lambda: only_gn((5, 12, 4), 6, dict(axis=-2, scale=False)),
     (2, 5, 12, 4), F,
     notes="GroupNormalization(groups=6, axis=-2, scale=False) on [N,5,12,4] (same middle axis given as -2); "
           "from_keras default opset 15.")
spec("keras_tf_fromkeras_nhwc_r4_resblock_g8_initial", lambda: resblock((8, 8, 32), 32, 8), (2, 8, 8, 32), F,
     initial=True, opset=17,
     notes="resnet block Conv-GN(8,eps=1e-6)-swish-Conv-GN-swish + identity residual Add (C=32 in and out); both GNs "
           "at initial weights (beta Add folded away), Convs random; from_keras opset 17.")
spec("keras_tf_fromkeras_keras_hub_vae_decoder_dynhw", lambda: vae_decoder((None, None)), (1, 8, 8, 2), F,
     signature="keras", opset=17, extra_shapes=[(2, 4, 6, 2)],
     notes="keras_hub 0.32 VAEBackbone(encoder [32]/[1], decoder_num_filters=[32], decoder_num_blocks=[1], "
           "sample_channels=4).decoder on Input((None,None,2)) (2 latent channels): dynamic batch/H/W, GroupNormalization(groups=32, "
           "eps=1e-6) layers (resnet blocks, mid attention, output norm), Conv weights random seeded, GN gamma/beta "
           "random; from_keras opset 17.")
spec("keras_tf_fromkeras_nhwc_r4_g4_opset21", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), F, opset=21,
     expect_fail=True, notes="Conv2D -> GroupNormalization(groups=4); from_keras opset=21 (tf2onnx 1.17 max is 18).")

# ---- tf2onnx_cli_savedmodel
spec("keras_tf_cli_nhwc_r4_g4", lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), C, extra_shapes=[(1, 8, 8, 8)],
     notes="Conv2D(16) -> GroupNormalization(groups=4); model.export(format='tf_saved_model') + "
           "`python -m tf2onnx.convert --saved-model DIR` (default opset 15).")
spec("keras_tf_cli_nhwc_r4_g16_float16", lambda: conv_gn((8, 8, 8), 32, 16, dict(epsilon=1e-5)), (2, 8, 8, 8), C,
     policy="float16", opset=17,
     notes="float16 policy: Conv2D(32) -> GroupNormalization(groups=16, eps=1e-5) (f32 inside GN), output float16; "
           "SavedModel + tf2onnx CLI --opset 17.")
spec("keras_tf_cli_nhwc_r4_gm1_mixed_float16_initial", lambda: conv_gn((8, 8, 8), 8, -1), (2, 8, 8, 8), C,
     policy="mixed_float16", initial=True, opset=17,
     notes="mixed_float16 policy: Conv2D(8) -> GroupNormalization(groups=-1 -> 8) at initial weights (beta Add "
           "folded); output float16; SavedModel + CLI --opset 17.")
spec("keras_tf_cli_ndhwc_r5_g2_conv3d_noaffine", lambda: conv3d_gn((4, 4, 4, 4), 8, 2, dict(center=False, scale=False,
                                                                                            epsilon=1e-6)),
     (2, 4, 4, 4, 4), C, opset=17,
     notes="Conv3D(8) -> GroupNormalization(groups=2, center=False, scale=False, eps=1e-6); SavedModel + CLI "
           "--opset 17.")
spec("keras_tf_cli_nc_r2_g1_dense_nocenter", lambda: dense_gn(10, 12, 1, dict(center=False)), (4, 10), C,
     notes="Dense(12) -> GroupNormalization(groups=1, center=False) on rank 2; SavedModel + CLI default opset 15.")
spec("keras_tf_cli_nwc_r3_gm1_conv1d_opset13", lambda: conv1d_gn((12, 4), 8, -1, dict(epsilon=1e-6)), (2, 12, 4), C,
     opset=13, notes="Conv1D(8) -> GroupNormalization(groups=-1 -> 8, eps=1e-6); SavedModel + CLI --opset 13.")
spec("keras_tf_cli_nhwc_r4_resblock_g4_opset18", lambda: resblock((8, 8, 8), 16, 4, eps=1e-5), (2, 8, 8, 8), C,
     opset=18,
     notes="resnet block Conv2D(16)-GN(4,eps=1e-5)-swish-Conv2D(16)-GN(4)-swish + Conv2D(16,1) skip, Add; "
           "SavedModel + CLI --opset 18.")
spec("keras_tf_cli_nchw_r4_g2_permute_dynhw", lambda: permute_gn((None, None, 8), 8, 2), (2, 8, 8, 8), C,
     opset=17, extra_shapes=[(1, 6, 10, 8)],
     notes="Input((None,None,8)) -> Conv2D(8) -> Permute to NCHW -> GroupNormalization(groups=2, axis=1) -> Permute "
           "back -> Conv2D 1x1; dynamic batch/H/W; SavedModel + CLI --opset 17.")


FAMILY = "tf2onnx-moments"


# --------------------------------------------------------------------------- helpers

def all_layers(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def set_weights(model, rng, initial):
    for layer in all_layers(model):
        is_norm = isinstance(layer, L.GroupNormalization)
        if is_norm and initial:
            continue
        for v in layer._trainable_variables + layer._non_trainable_variables:
            shape = tuple(v.shape)
            vname = v.name.split("/")[-1]
            if is_norm and vname == "gamma":
                val = 1.0 + 0.5 * rng.standard_normal(shape)
            elif is_norm and vname == "beta":
                val = 0.5 * rng.standard_normal(shape)
            elif vname == "bias":
                val = 0.2 * rng.standard_normal(shape)
            else:
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                val = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
            v.assign(val.astype(v.dtype))


def gn_layers(model):
    out = []
    for layer in all_layers(model):
        if isinstance(layer, L.GroupNormalization):
            spec_ = layer.input_spec  # set by build(): InputSpec(ndim, axes={axis: C})
            out.append({
                "groups": int(getattr(layer, "_configured_groups", layer.groups)), "axis": int(layer.axis),
                "epsilon": float(layer.epsilon), "center": bool(layer.center), "scale": bool(layer.scale),
                "channels": int(spec_.axes[layer.axis]), "input_rank": int(spec_.ndim),
                "dtype_policy": layer.dtype_policy.name,
            })
    return out


def value_info(vis):
    res = []
    for vi in vis:
        tt = vi.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        res.append({"name": vi.name, "shape": dims, "dtype": ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))})
    return res


def choose_tol(got, ref, dtype):
    ladder = [(1e-5, 1e-5), (1e-4, 1e-4), (1e-3, 1e-3)] if dtype != "float16" else \
        [(1e-3, 1e-3), (3e-3, 3e-3), (1e-2, 1e-2), (3e-2, 3e-2)]
    g = np.asarray(got, np.float64)
    r = np.asarray(ref, np.float64)
    for rtol, atol in ladder:  # margin: must pass at a third of the recorded tolerance
        if np.allclose(g, r, rtol=rtol / 3, atol=atol / 3):
            return {"rtol": rtol, "atol": atol}
    raise AssertionError(f"ORT vs Keras mismatch: max abs err {np.max(np.abs(g - r))}")


def op_summary(m):
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def first_lines(exc, n=3):
    msg = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return "\n".join(lines[:n])


def exporter_of(route, vers):
    if route == C:
        return {"name": "python -m tf2onnx.convert --saved-model", "version": vers["tf2onnx"]}
    if route == F:
        return {"name": "tf2onnx.convert.from_keras", "version": vers["tf2onnx"]}
    return {"name": "keras.Model.export(format='onnx') -> tf2onnx.convert.from_function",
            "version": f"keras {vers['keras']}, tf2onnx {vers['tf2onnx']}"}


def signature(model, sp):
    shape = sp["data_shape"]
    if sp["signature"] == "static":
        return [tf.TensorSpec(shape, tf.float32, name=model.inputs[0].name)]
    if sp["signature"] == "keras":
        return [tf.TensorSpec(model.inputs[0].shape, tf.float32, name=model.inputs[0].name)]
    return [tf.TensorSpec([None] + list(shape[1:]), tf.float32, name=model.inputs[0].name)]


def export(model, sp, path):
    route, opset = sp["route"], sp["opset"]
    if route == C:
        with tempfile.TemporaryDirectory(prefix="ktfsm_") as d:
            sm = os.path.join(d, "sm")
            model.export(sm, format="tf_saved_model", verbose=False)
            cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", sm, "--output", str(path)]
            if opset is not None:
                cmd += ["--opset", str(opset)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-3:]
                raise RuntimeError("tf2onnx CLI failed: " + " | ".join(tail))
    elif route == F:
        kw = {} if opset is None else {"opset": opset}
        tf2onnx.convert.from_keras(model, input_signature=tuple(signature(model, sp)), output_path=str(path), **kw)
    else:
        kw = {} if opset is None else {"opset_version": opset}
        sig = signature(model, sp) if sp["signature"] != "batch" else None  # None: Keras' default (batch None)
        model.export(str(path), format="onnx", verbose=False, input_signature=sig, **kw)


# --------------------------------------------------------------------------- main

def check_and_record(name, sp, model, x, y, path, vers, rng, out_dir):
    m = onnx.load(str(path))
    notes = [sp["notes"]]
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:  # record, do not hide
        notes.append(f"onnx.checker full_check FAILED: {first_lines(e, 1)}")
        print(f"WARN {name}: checker failed: {first_lines(e, 1)}", flush=True)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    ins, outs = value_info(m.graph.input), value_info(m.graph.output)
    assert len(ins) == 1 and len(outs) == 1, (ins, outs)
    y = y.astype(outs[0]["dtype"])

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {ins[0]["name"]: x})[0]
    assert got.dtype == y.dtype and got.shape == y.shape, (got.dtype, y.dtype, got.shape, y.shape)
    tol = choose_tol(got, y, outs[0]["dtype"])
    for shp in sp["extra_shapes"]:  # dynamic dims really dynamic
        xe = rng.standard_normal(shp).astype("float32")
        ye = np.asarray(model(xe, training=False)).astype(outs[0]["dtype"])
        ge = sess.run(None, {ins[0]["name"]: xe})[0]
        np.testing.assert_allclose(ge.astype(np.float64), ye.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])
    if sp["extra_shapes"]:
        notes.append(f"ORT also matches Keras for input shapes {[list(s) for s in sp['extra_shapes']]}.")
    err = float(np.max(np.abs(got.astype(np.float64) - y.astype(np.float64))))
    fp16 = outs[0]["dtype"] == "float16"
    notes.append(f"ORT CPU {vers.get('onnxruntime')} vs Keras max abs err {err:.3g}; tolerance = tightest of "
                 + ("an fp16 ladder (1e-3, 3e-3, 1e-2, 3e-2)" if fp16 else "an fp32 ladder (1e-5, 1e-4, 1e-3)")
                 + " passing at 1/3 of itself" + (" (TF CPU and ORT round f16 intermediates differently)." if fp16 else "."))
    save_npz(out_dir / SUBDIR / f"{name}.npz", [x], [y])
    layers = gn_layers(model)
    entry = {
        "name": name,
        "file": f"{SUBDIR}/{name}.onnx",
        "data": f"{SUBDIR}/{name}.npz",
        "route": sp["route"],
        "pattern_family": FAMILY,
        "exporter": exporter_of(sp["route"], vers),
        "frameworks": vers,
        "python": platform.python_version(),
        "opset": int(opset),
        "dtype_policy": sp["policy"],
        "inputs": ins,
        "outputs": outs,
        "expected_group_norms": len(layers),
        "layers": layers,
        "negative": False,
        "hand_built": False,
        "weights": "initial" if sp["initial"] else "random",
        "tolerance": tol,
        "notes": " ".join(n for n in notes if n),
    }
    return entry, op_summary(m), path.stat().st_size


def generate(name, sp, out_dir, seed, vers):
    keras.backend.clear_session()
    keras.config.set_dtype_policy(sp["policy"])
    try:
        keras.utils.set_random_seed(seed)
        model = sp["build"]()
    finally:
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(seed)
    set_weights(model, rng, sp["initial"])
    x = rng.standard_normal(sp["data_shape"]).astype("float32")
    y = np.asarray(model(x, training=False))
    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, sp, path)
    return check_and_record(name, sp, model, x, y, path, vers, rng, out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(MODELS_DIR))
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out).resolve()
    default_out = out_dir == MODELS_DIR.resolve()
    names = list(SPECS)
    if args.only:
        unknown = [n for n in args.only if n not in SPECS]
        if unknown:
            ap.error(f"unknown names: {unknown}; known: {names}")
        names = args.only
    vers = versions()
    models, failures = [], []
    for idx, name in enumerate(SPECS):
        if name not in names:
            continue
        sp = SPECS[name]
        try:
            entry, ops, size = generate(name, sp, out_dir, 7000 + idx, vers)
        except Exception as e:
            for ext in (".onnx", ".npz"):
                (out_dir / SUBDIR / f"{name}{ext}").unlink(missing_ok=True)
            print(f"FAIL {name}: {first_lines(e, 2)}", flush=True)
            if not sp["expect_fail"]:
                traceback.print_exc()
            failures.append({
                "route": sp["route"], "name": name, "config": sp["notes"],
                "exporter": exporter_of(sp["route"], vers),
                "frameworks": vers, "python": platform.python_version(),
                "error": first_lines(e, 4), "expected": bool(sp["expect_fail"]),
            })
            continue
        models.append(entry)
        print(f"ok   {name}: opset {entry['opset']}, {size} B, GN {entry['expected_group_norms']}, "
              f"tol {entry['tolerance']}, ops {json.dumps(ops, sort_keys=True)}", flush=True)
    if default_out:
        if args.only and MANIFEST.exists():  # keep this script's other entries
            data = json.loads(MANIFEST.read_text(encoding="utf-8"))
            regenerated = set(names)
            keep_m = [m for m in data.get("models", []) if m.get("generator") == GENERATOR
                      and m["name"] not in regenerated]
            keep_f = [f for f in data.get("failures", []) if f.get("generator") == GENERATOR
                      and f.get("name") not in regenerated]
            models, failures = keep_m + models, keep_f + failures
        update_manifest(GENERATOR, models, failures)
        print(f"manifest updated: {len(models)} models, {len(failures)} failures")
    unexpected = [f["name"] for f in failures if not f["expected"]]
    if unexpected:
        print(f"UNEXPECTED failures: {unexpected}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
