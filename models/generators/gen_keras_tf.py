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

import os
import pathlib
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import tf2onnx  # noqa: E402

tf.get_logger().setLevel("ERROR")

GENERATOR = pathlib.Path(__file__).name
SUBDIR = "keras_tf"
L = keras.layers

PACKAGES = ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy", "protobuf", "keras-hub")


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


def unet(shape, ch, groups, eps=1e-5):
    """A small UNet: Conv-GN-swish, stride-2 Conv-GN-swish, 2x UpSampling2D + Conv, skip Concatenate, GN over 2C,
    Conv to 3 channels (even H/W: the skip needs the upsampled size back)."""
    i = keras.Input(shape, name="x")
    a = L.Conv2D(ch, 3, padding="same")(i)
    h = L.Activation("swish")(gn(groups, epsilon=eps)(a))
    h = L.Conv2D(ch, 3, strides=2, padding="same")(h)
    h = L.Activation("swish")(gn(groups, epsilon=eps)(h))
    h = L.Conv2D(ch, 3, padding="same")(L.UpSampling2D(2)(h))
    h = L.Concatenate()([a, h])
    h = L.Activation("swish")(gn(groups, epsilon=eps)(h))
    return keras.Model(i, L.Conv2D(3, 3, padding="same")(h))


def ln_x(steps, heads, head_size):
    """RWKV-7's ``ln_x``: GroupNormalization(groups=heads) on the (B*T, C) view of (B, T, H, N), back to (B, T, C)."""
    i = keras.Input((steps, heads, head_size), name="x")
    rows = keras.ops.reshape(i, (-1, heads * head_size))
    y = gn(heads, epsilon=64e-5)(rows)
    return keras.Model(i, keras.ops.reshape(y, (-1, steps, heads * head_size)))


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


# signature: batch: [None, ...static]; static: data_shape; keras: Input's shape. opset None = the exporter's
# default (15).
SPEC_DEFAULTS = dict(policy="float32", opset=None, initial=False, notes="", extra_shapes=[], expect_fail=False,
                     signature="batch")


def spec(name, build, data_shape, route, **kw):
    common.add_spec(SPECS, name, build, data_shape, SPEC_DEFAULTS, route=route, **kw)


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
spec("keras_tf_fromkeras_nhwc_r4_resblock_c32_g8_dynhw", lambda: resblock((None, None, 16), 32, 8), (1, 12, 10, 16), F,
     signature="keras", opset=17, data_shapes=[(1, 9, 7, 16)],
     notes="resnet block with Input((None,None,16)): dynamic batch/H/W (odd sizes too); from_keras opset 17.")
spec("keras_tf_fromkeras_nhwc_r4_unet_c32_g8_dynhw", lambda: unet((None, None, 3), 32, 8), (1, 16, 16, 3), F,
     signature="keras", opset=17, data_shapes=[(1, 12, 12, 3)],
     notes="small UNet (stride-2 Conv, UpSampling2D, skip Concatenate, GN over 64 channels) with Input((None,None,3)); "
           "even H/W; from_keras opset 17.")
spec("keras_tf_fromkeras_lnx_rows_g4_c256", lambda: ln_x(16, 4, 64), (1, 16, 4, 64), F, opset=17,
     data_shapes=[(2, 16, 4, 64)],
     notes="RWKV-7 ln_x: GroupNormalization(groups=4, eps=64e-5) on the (B*T, 256) view of (B, 16, 4, 64); tf2onnx "
           "merges the reshape to (B*T, 256) into the grouping Reshape (-> (B*T, 4, 64)) and the closing one into the "
           "reshape back to (B, 16, 256); dynamic batch.")
spec("keras_tf_export_lnx_rows_g4_c256", lambda: ln_x(16, 4, 64), (1, 16, 4, 64), E,
     data_shapes=[(2, 16, 4, 64)],
     notes="RWKV-7 ln_x as keras_tf_fromkeras_lnx_rows_g4_c256, through model.export(format='onnx').")
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
    common.set_seeded_weights(
        all_layers(model), rng, weights=lambda layer: layer._trainable_variables + layer._non_trainable_variables,
        vname=lambda v: v.name.split("/")[-1], is_norm=lambda layer: isinstance(layer, L.GroupNormalization),
        skip=lambda layer, norm: norm and initial, assign=common.assign_each)


def gn_layers(model):
    # input_spec is set by build(): InputSpec(ndim, axes={axis: C})
    return [common.layer_record(
        groups=getattr(layer, "_configured_groups", layer.groups), axis=layer.axis, epsilon=layer.epsilon,
        center=layer.center, scale=layer.scale, channels=layer.input_spec.axes[layer.axis],
        input_rank=layer.input_spec.ndim, dtype_policy=layer.dtype_policy.name)
        for layer in all_layers(model) if isinstance(layer, L.GroupNormalization)]


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
        common.tf2onnx_cli_export(model, path, opset, prefix="ktfsm_", verbose=False)
    elif route == F:
        kw = {} if opset is None else {"opset": opset}
        tf2onnx.convert.from_keras(model, input_signature=tuple(signature(model, sp)), output_path=str(path), **kw)
    else:
        kw = {} if opset is None else {"opset_version": opset}
        sig = signature(model, sp) if sp["signature"] != "batch" else None  # None: Keras' default (batch None)
        model.export(str(path), format="onnx", verbose=False, input_signature=sig, **kw)


# --------------------------------------------------------------------------- main

def generate(name, sp, out_dir, seed, vers):
    model, rng = common.build_seeded_keras(keras, sp, seed)
    set_weights(model, rng, sp["initial"])
    x = rng.standard_normal(sp["data_shape"]).astype("float32")
    y = np.asarray(model(x, training=False))
    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, sp, path)
    return common.record_framework_model(
        name, sp, x, y, path, predict=lambda a: model(a, training=False), rng=rng, vers=vers, route=sp["route"],
        family=FAMILY, exporter=exporter_of(sp["route"], vers), layers=gn_layers(model), dtype_policy=sp["policy"])


def main(argv=None):
    return common.run_specs(GENERATOR, SPECS, generate, seed_base=7000, packages=PACKAGES, exporter_of=exporter_of,
                            subdir_of=lambda name: SUBDIR, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
