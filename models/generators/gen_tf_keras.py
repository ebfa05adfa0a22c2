"""Corpus generator: tf_keras (Keras 2) GroupNormalization models exported with tf2onnx.convert.from_keras.

Route ``tf_keras_from_keras`` (``tf2onnx.convert.from_keras(model, input_signature=..., opset=...)`` on a
``tf_keras`` 2.21 model), pattern family ``tf_keras-weighted-moments`` (tf_keras' GN is written with
``tf.nn.weighted_moments`` over an all-ones mask and ``tf.nn.batch_normalization``, see
``shared/research/exported-patterns.md`` §2.4). Files go to ``models/tf_keras/<name>.onnx`` + ``<name>.npz``
(inputs ``in_0..``, tf_keras' own ``model(x, training=False)`` outputs ``out_0..``).

One negative is also written here because it needs this venv: a tf_keras ``LayerNormalization``
(``models/negatives/neg_tf_keras_from_keras_layernorm_lastaxis``, ``negative: true``,
``expected_group_norms: 0``, pattern family ``negative``).

Environment (Python 3.11.7 via pyenv; tf2onnx 1.17 works with protobuf 7 here, so no protobuf pin
beyond what pip resolves)::

    python3.11 -m venv /opt/venvs/tfkeras
    /opt/venvs/tfkeras/bin/pip install -q tensorflow==2.21.0 tf_keras==2.21.0 tf2onnx==1.17.0 onnxruntime==1.32.0
    # exact versions of everything: models/generators/requirements-tfkeras.txt
    #   /opt/venvs/tfkeras/bin/pip install -q -r models/generators/requirements-tfkeras.txt

Run from the repository root::

    /opt/venvs/tfkeras/bin/python models/generators/gen_tf_keras.py [--out DIR] [--only NAME ...]

``TF_USE_LEGACY_KERAS=1`` is set by this script (so ``tf.keras`` is ``tf_keras`` inside tf2onnx too). With the
default ``--out`` the manifest entries of this script are replaced (with ``--only`` this script's other
entries are kept); with any other ``--out`` the files are written there and the manifest is left alone.
Failed exports are recorded as ``failures``.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tf2onnx  # noqa: E402

tf.get_logger().setLevel("ERROR")

GENERATOR = pathlib.Path(__file__).name
ROUTE = "tf_keras_from_keras"
FAMILY = "tf_keras-weighted-moments"
L = tf_keras.layers

PACKAGES = ("tf_keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy", "protobuf")


# --------------------------------------------------------------------------- model builders

def conv(ch, rank, k=3):
    return {3: L.Conv1D, 4: L.Conv2D}[rank](ch, k, padding="same")


def conv_gn(shape, ch, groups, rank=4, gn_kw=None, batch=None):
    i = tf_keras.Input(shape, batch_size=batch, name="x")
    x = conv(ch, rank)(i)
    x = L.GroupNormalization(groups=groups, **(gn_kw or {}))(x)
    return tf_keras.Model(i, x)


def dense_gn(shape, ch, groups, gn_kw=None):
    i = tf_keras.Input(shape, name="x")
    x = L.Dense(ch)(i)
    x = L.GroupNormalization(groups=groups, **(gn_kw or {}))(x)
    return tf_keras.Model(i, x)


def conv_ln(shape, ch):
    i = tf_keras.Input(shape, name="x")
    x = L.Conv2D(ch, 3, padding="same")(i)
    x = L.LayerNormalization(axis=-1)(x)
    return tf_keras.Model(i, x)


# --------------------------------------------------------------------------- specs
SPECS: dict[str, dict] = {}


SPEC_DEFAULTS = dict(opset=17, static_batch=False, initial=False, notes="", extra_shapes=[], expect_fail=False,
                     negative=False, subdir="tf_keras", route=ROUTE)


def spec(name, build, data_shape, **kw):
    common.add_spec(SPECS, name, build, data_shape, SPEC_DEFAULTS, **kw)


spec("tf_keras_from_keras_nhwc_r4_g4",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), extra_shapes=[(3, 8, 8, 8)],
     notes="Conv2D(16,3,same) -> GroupNormalization(groups=4, eps=1e-3 default), rank 4 channels_last; "
           "input_signature batch None (dynamic), opset 17. Grouping Reshape target is built at run time "
           "(Concat(Slice(Cast(Gather(Shape(conv_out_NCHW),[0,2,3,1]),INT32),0:1), 8, 8, 4, Div(C,4)) -> Cast INT64), "
           "no -1; gamma/beta are the raw [C] initialisers reshaped to a run-time [1,1,1,G,C/G].")
spec("tf_keras_from_keras_nhwc_r4_g4_opset13",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), opset=13, extra_shapes=[(1, 8, 8, 8)],
     notes="same model as tf_keras_from_keras_nhwc_r4_g4 but opset 13 (ReduceSum-13: axes as input).")
spec("tf_keras_from_keras_nhwc_r4_g4_static",
     lambda: conv_gn((8, 8, 8), 16, 4, batch=2), (2, 8, 8, 8), static_batch=True,
     notes="Input(batch_size=2) and a fully static input_signature (2,8,8,8), opset 17. Unlike the dynamic-batch "
           "exports, tf2onnx folds everything shape-driven here: no ConstantOfShape mask and no Mul by it, "
           "sum_of_weights is a constant [2,1,1,G,1] tensor (=H*W*C/G=64) feeding Div and Equal, grouping Reshape "
           "target is the constant [2,8,8,4,4] (batch baked in, no -1), gamma/beta are constants [1,1,1,G,C/G], "
           "final Reshape target constant [2,8,8,16].")
spec("tf_keras_from_keras_nhwc_r4_g4_initial",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), initial=True,
     notes="GN left at its initial weights (gamma=ones, beta=zeros); Conv weights random/seeded. opset 17.")
spec("tf_keras_from_keras_nhwc_r4_gm1_eps1e5",
     lambda: conv_gn((8, 8, 8), 16, -1, gn_kw=dict(epsilon=1e-5)), (2, 8, 8, 8),
     notes="groups=-1 as configured (tf_keras resolves it to C=16 in build: instance-norm-like, C/G=1), eps=1e-5, opset 17.")
spec("tf_keras_from_keras_nhwc_r4_g1_nocenter",
     lambda: conv_gn((8, 8, 8), 16, 1, gn_kw=dict(center=False)), (2, 8, 8, 8),
     notes="groups=1 (one group over H,W,C), center=False (no beta), opset 17.")
spec("tf_keras_from_keras_nhwc_r4_g8_c32_noscale_dynhw",
     lambda: conv_gn((None, None, 8), 32, 8, gn_kw=dict(scale=False, epsilon=1e-6)), (2, 12, 10, 8),
     extra_shapes=[(1, 8, 8, 8), (3, 6, 14, 8)],
     notes="Input((None,None,8)): dynamic batch/H/W; Conv2D 8->32, groups=8 (C/G=4), scale=False (no gamma), "
           "eps=1e-6, opset 17; ORT also checked on other H/W.")
spec("tf_keras_from_keras_nwc_r3_g2",
     lambda: conv_gn((12, 8), 16, 2, rank=3), (2, 12, 8), extra_shapes=[(3, 12, 8)],
     notes="rank 3 channels_last: Conv1D(16,3,same) -> GroupNormalization(groups=2), opset 17.")
spec("tf_keras_from_keras_nc_r2_g4",
     lambda: dense_gn((24,), 16, 4), (2, 24), opset=None, extra_shapes=[(5, 24)],
     notes="rank 2: Dense(16) -> GroupNormalization(groups=4) (reduce over C/G only); tf2onnx default opset "
           "(no opset argument: tf2onnx 1.17 writes opset 15).")
# Negative (needs tf_keras, so it lives here; files in models/negatives/).
spec("neg_tf_keras_from_keras_layernorm_lastaxis",
     lambda: conv_ln((8, 8, 8), 16), (2, 8, 8, 8), negative=True, subdir="negatives",
     notes="NEGATIVE: Conv2D(16) -> tf_keras LayerNormalization(axis=-1), opset 17. tf_keras LN uses "
           "fused_batch_norm: Reshape(x, [1, N*H*W, C, 1]) (run-time target from Shape/ReduceProd), mean/var by "
           "ReduceMean / ReduceSumSquare over [0,2,3] / Div, an ONNX BatchNormalization node fed those run-time "
           "statistics with Expand'ed ones/zeros scale/bias, Reshape back, then Mul(gamma[C]) / Add(beta[C]). "
           "A reshape-then-normalise shape that resembles torch's InstanceNormalization GN form but is a LayerNorm "
           "over C.")


# --------------------------------------------------------------------------- helpers

def set_weights(model, rng, initial):
    common.set_seeded_weights(
        model.layers, rng, weights=lambda layer: layer.weights, vname=lambda v: v.name.split("/")[-1].split(":")[0],
        is_norm=lambda layer: isinstance(layer, (L.GroupNormalization, L.LayerNormalization)),
        skip=lambda layer, norm: norm and initial,
        assign=lambda layer, pairs: layer.set_weights([val.astype(v.dtype.as_numpy_dtype) for v, val in pairs]))


def gn_layers(model, configured):
    out = []
    for layer in model.layers:
        if isinstance(layer, L.GroupNormalization):
            shp = layer.input_shape
            rank = len(shp)
            axis = layer.axis if layer.axis >= 0 else rank + layer.axis
            out.append(common.layer_record(
                groups=configured, axis=layer.axis, epsilon=layer.epsilon, center=layer.center, scale=layer.scale,
                channels=shp[axis], input_rank=rank, dtype_policy=layer.dtype_policy.name))
    return out


def exporter_of(route, vers):
    return {"name": "tf2onnx.convert.from_keras", "version": vers["tf2onnx"]}


# --------------------------------------------------------------------------- main

def generate(name, sp, out_dir, seed, vers):
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(seed)
    model = sp["build"]()
    rng = np.random.default_rng(seed)
    set_weights(model, rng, sp["initial"])
    x = rng.standard_normal(sp["data_shape"]).astype("float32")
    y = np.asarray(model(x, training=False))

    in_shape = list(model.inputs[0].shape)
    if not sp["static_batch"]:
        in_shape[0] = None
    sig = (tf.TensorSpec(in_shape, tf.float32, name="x"),)
    path = out_dir / sp["subdir"] / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {} if sp["opset"] is None else {"opset": sp["opset"]}
    tf2onnx.convert.from_keras(model, input_signature=sig, output_path=str(path), **kw)

    return common.record_framework_model(
        name, sp, x, y, path, predict=lambda a: model(a, training=False), rng=rng, vers=vers, route=ROUTE,
        family="negative" if sp["negative"] else FAMILY, exporter=exporter_of(ROUTE, vers),
        layers=[] if sp["negative"] else gn_layers(model, _configured_groups(name)), dtype_policy="float32",
        negative=sp["negative"], label="tf_keras")


def _configured_groups(name):
    """groups as written in the spec (tf_keras overwrites layer.groups=-1 with C in build)."""
    m = re.search(r"_g(m?)(\d+)", name)
    return -int(m.group(2)) if m.group(1) else int(m.group(2))


def main(argv=None):
    return common.run_specs(GENERATOR, SPECS, generate, seed_base=3000, packages=PACKAGES, exporter_of=exporter_of,
                            subdir_of=lambda name: SPECS[name]["subdir"], argv=argv,
                            description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
