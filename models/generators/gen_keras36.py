"""Corpus generator: Keras 3.6.0 (TF backend) GroupNormalization models exported with tf2onnx 1.17.

Keras 3.6.0 has no ``model.export(format="onnx")``; two routes are used:

* ``keras36_tf2onnx``: ``tf2onnx.convert.from_keras(model, input_signature=..., opset=...)``;
* ``tf2onnx_cli_savedmodel``: ``model.export(dir, format="tf_saved_model")`` then
  ``python -m tf2onnx.convert --saved-model dir --output f.onnx --opset N``.

Pattern families: ``tf2onnx-moments-fp16clip`` for float16 / mixed_float16 dtype policies (Keras 3.6 GN does
not up-cast before ``ops.moments``, so TF's ``moments`` up-casts to f32 and clips to +-65504 before casting
back: ``Cast(FLOAT) -> ReduceMean -> Min/Max -> Cast(FLOAT16)``, see ``shared/research/exported-patterns.md``
§2.3), ``tf2onnx-moments`` for the float32 control model (identical to Keras 3.15's graph). Files go to
``models/keras36/<name>.onnx`` + ``<name>.npz`` (inputs ``in_0..``, Keras' own ``model(x, training=False)``
outputs ``out_0..`` in the model's output dtype: float16 for float16 / mixed_float16).

Environment (Python 3.11.7 via pyenv). TF 2.17.1 needs ``ml-dtypes<0.5`` and ``protobuf<5`` (resolves to
4.25.x); the newest onnx pip picks (1.19) needs ``ml_dtypes.float4_e2m1fn`` (ml-dtypes >= 0.5) and fails at
import, so onnx is pinned to 1.17.0::

    python3.11 -m venv /opt/venvs/keras36
    /opt/venvs/keras36/bin/pip install -q keras==3.6.0 tensorflow==2.17.1 tf2onnx==1.17.0 onnx==1.17.0 onnxruntime==1.32.0
    # exact versions of everything: models/generators/requirements-keras36.txt
    #   /opt/venvs/keras36/bin/pip install -q -r models/generators/requirements-keras36.txt

Run from the repository root::

    /opt/venvs/keras36/bin/python models/generators/gen_keras36.py [--out DIR] [--only NAME ...]

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
SUBDIR = "keras36"
L = keras.layers

PACKAGES = ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy", "protobuf", "ml-dtypes")


# --------------------------------------------------------------------------- model builders

def gn(groups, **kw):
    layer = L.GroupNormalization(groups=groups, **kw)
    layer._configured_groups = groups
    return layer


def conv_gn(shape, ch, groups, gn_kw=None):
    i = keras.Input(shape, name="x")
    x = L.Conv2D(ch, 3, padding="same")(i)
    x = gn(groups, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def only_gn(shape, groups, gn_kw=None):
    """GroupNormalization directly on the (float32) graph input: Keras autocasts it to the compute dtype."""
    i = keras.Input(shape, name="x")
    x = gn(groups, **(gn_kw or {}))(i)
    return keras.Model(i, x)


# --------------------------------------------------------------------------- specs
SPECS: dict[str, dict] = {}


SPEC_DEFAULTS = dict(policy="float32", opset=17, initial=False, notes="", extra_shapes=[], expect_fail=False)


def spec(name, build, data_shape, route, **kw):
    common.add_spec(SPECS, name, build, data_shape, SPEC_DEFAULTS, route=route, **kw)


spec("keras36_tf2onnx_nhwc_r4_g4_float16",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), "keras36_tf2onnx", policy="float16",
     extra_shapes=[(3, 8, 8, 8)],
     notes="global dtype policy float16: Input float32 -> Conv2D(16,3,same) (f16) -> GroupNormalization(groups=4) "
           "(f16 gamma/beta), output float16; from_keras, batch None, opset 17.")
spec("keras36_tf2onnx_nhwc_r4_g4_mixed_float16",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), "keras36_tf2onnx", policy="mixed_float16",
     notes="global dtype policy mixed_float16 (f32 variables, f16 compute): Conv2D -> GroupNormalization(groups=4), "
           "output float16; from_keras, opset 17.")
spec("keras36_tf2onnx_nhwc_r4_g8_c16_float16_noconv",
     lambda: only_gn((8, 8, 16), 8), (2, 8, 8, 16), "keras36_tf2onnx", policy="float16",
     notes="float16 policy, GroupNormalization(groups=8) directly on the float32 graph input (Keras autocast -> "
           "Cast(FLOAT16) before the grouping Reshape), no Conv in front; opset 17.")
spec("keras36_tf2onnx_nhwc_r4_g2_mixed_float16_nocenter_noconv",
     lambda: only_gn((8, 8, 16), 2, dict(center=False, epsilon=1e-5)), (2, 8, 8, 16), "keras36_tf2onnx",
     policy="mixed_float16", opset=13,
     notes="mixed_float16 policy, GroupNormalization(groups=2, center=False, eps=1e-5) directly on the input, "
           "no Conv; opset 13 (ReduceMean axes attribute).")
spec("keras36_tf2onnx_nhwc_r4_g4_float16_initial",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), "keras36_tf2onnx", policy="float16", initial=True,
     notes="float16 policy, GN at its initial weights (gamma=1, beta=0: the beta Add is folded away); Conv random.")
spec("keras36_cli_savedmodel_nhwc_r4_g4_float16",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), "tf2onnx_cli_savedmodel", policy="float16",
     extra_shapes=[(1, 8, 8, 8)],
     notes="float16 policy Conv2D -> GroupNormalization(groups=4); model.export(format='tf_saved_model') + "
           "`python -m tf2onnx.convert --saved-model DIR --opset 17`.")
spec("keras36_cli_savedmodel_nhwc_r4_g4_mixed_float16",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), "tf2onnx_cli_savedmodel", policy="mixed_float16",
     notes="mixed_float16 policy Conv2D -> GroupNormalization(groups=4); SavedModel + tf2onnx CLI, opset 17.")
spec("keras36_tf2onnx_nhwc_r4_g4_float32",
     lambda: conv_gn((8, 8, 8), 16, 4), (2, 8, 8, 8), "keras36_tf2onnx",
     extra_shapes=[(3, 8, 8, 8)],
     notes="float32 control: Conv2D -> GroupNormalization(groups=4); from_keras, opset 17. Same op pattern as "
           "Keras 3.15 (family tf2onnx-moments): no Cast/Min/Max. Checked when generating: the node op-type sequence "
           "equals that of the same model built with Keras 3.15.1 / TF 2.21 / tf2onnx 1.17 from_keras.")


FAMILY_BY_POLICY = {"float32": "tf2onnx-moments", "float16": "tf2onnx-moments-fp16clip",
                    "mixed_float16": "tf2onnx-moments-fp16clip"}


# --------------------------------------------------------------------------- helpers

def set_weights(model, rng, initial, *, is_norm=lambda layer: isinstance(layer, L.GroupNormalization),
                bn_stats=False):
    """Seeded weights (``common.seeded_value``); GN layers stay at their initial weights when ``initial``."""
    common.set_seeded_weights(
        model.layers, rng, weights=lambda layer: layer.weights, vname=lambda v: v.name.split("/")[-1],
        is_norm=is_norm, skip=lambda layer, norm: norm and initial, bn_stats=bn_stats,
        assign=common.assign_each)


def gn_layers(model):
    return [common.layer_record(
        groups=getattr(layer, "_configured_groups", layer.groups), axis=layer.axis, epsilon=layer.epsilon,
        center=layer.center, scale=layer.scale, channels=layer.input.shape[layer.axis],
        input_rank=len(layer.input.shape), dtype_policy=layer.dtype_policy.name)
        for layer in model.layers if isinstance(layer, L.GroupNormalization)]


def exporter_of(route, vers):
    if route == "tf2onnx_cli_savedmodel":
        return {"name": "python -m tf2onnx.convert --saved-model", "version": vers["tf2onnx"]}
    return {"name": "tf2onnx.convert.from_keras", "version": vers["tf2onnx"]}


def export(model, route, path, opset, in_shape):
    """Export with tf2onnx by ``route``; input named ``x`` with a dynamic batch."""
    if route == "tf2onnx_cli_savedmodel":
        common.tf2onnx_cli_export(model, path, opset, prefix="k36sm_")
    else:
        sig = (tf.TensorSpec([None] + list(in_shape[1:]), tf.float32, name="x"),)
        kw = {} if opset is None else {"opset": opset}
        tf2onnx.convert.from_keras(model, input_signature=sig, output_path=str(path), **kw)


# --------------------------------------------------------------------------- main

def check_and_record(name, sp, model, x, y, path, vers, rng, *, family, layers, negative=False):
    """Checker + ORT vs Keras comparison, write the .npz and return the manifest entry."""
    return common.record_framework_model(
        name, sp, x, y, path, predict=lambda a: model(a, training=False), rng=rng, vers=vers, route=sp["route"],
        family=family, exporter=exporter_of(sp["route"], vers), layers=layers, dtype_policy=sp["policy"],
        negative=negative)


def generate(name, sp, out_dir, seed, vers):
    model, rng = common.build_seeded_keras(keras, sp, seed)
    set_weights(model, rng, sp["initial"])
    x = rng.standard_normal(sp["data_shape"]).astype("float32")
    y = np.asarray(model(x, training=False))
    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, sp["route"], path, sp["opset"], sp["data_shape"])
    return check_and_record(name, sp, model, x, y, path, vers, rng, family=FAMILY_BY_POLICY[sp["policy"]],
                            layers=gn_layers(model))


def run_all(generator, specs, generate_fn, subdir, seed_base, argv):
    """``common.run_specs`` with this venv's packages (``gen_negatives.py`` uses it too)."""
    return common.run_specs(generator, specs, generate_fn, seed_base=seed_base, packages=PACKAGES,
                            exporter_of=exporter_of, subdir_of=lambda name: subdir, argv=argv)


def main(argv=None):
    return run_all(GENERATOR, SPECS, generate, SUBDIR, 4000, argv)


if __name__ == "__main__":
    sys.exit(main())
