"""Corpus generator: Keras 3 (JAX backend) GroupNormalization models exported to ONNX with jax2onnx.

Route ``keras_export_jax`` (``model.export(path, format="onnx")`` under ``KERAS_BACKEND=jax``, which
calls ``jax2onnx.to_onnx``), pattern family ``jax2onnx-moments-var``. Files go to
``models/keras_jax/<name>.onnx`` + ``<name>.npz`` (inputs ``in_0..``, Keras' own
``model(x, training=False)`` outputs ``out_0..`` in the model's output dtype).

Environment (Python 3.12.1 via pyenv; jax >= 0.11 needs Python >= 3.11, and jax 0.12.x breaks
jax2onnx 0.17.1 with ``module 'jax._src.core' has no attribute 'ClosedJaxpr'``)::

    python3.12 -m venv /opt/venvs/jax        # e.g. /root/.pyenv/versions/3.12.1/bin/python3.12
    /opt/venvs/jax/bin/pip install -q --upgrade pip
    /opt/venvs/jax/bin/pip install -q -r models/generators/requirements-jax.txt
    # = jax==0.11.2 jaxlib==0.11.2 keras==3.15.1 jax2onnx==0.17.1 onnx==1.23.2
    #   onnxruntime==1.32.0 numpy==2.5.5 (full pinned list in requirements-jax.txt)

Run from the repository root::

    /opt/venvs/jax/bin/python models/generators/gen_keras_jax.py [--out DIR] [--only NAME ...]

``KERAS_BACKEND`` is forced to ``jax`` by this script. With the default ``--out`` the manifest
(``models/manifest.json``) entries of this script are replaced (with ``--only`` the other entries of
this script are kept); with any other ``--out`` the files are written there and the manifest is left
alone. Export attempts that fail (Conv3D, UNet with dynamic H/W + Concatenate) are recorded as
``failures``.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import keras  # noqa: E402

GENERATOR = pathlib.Path(__file__).name
SUBDIR = "keras_jax"
ROUTE = "keras_export_jax"
FAMILY = "jax2onnx-moments-var"
L = keras.layers

PACKAGES = ("keras", "jax", "jaxlib", "jax2onnx", "onnx", "onnxruntime", "numpy", "onnx-ir")


# --------------------------------------------------------------------------- model builders
# Each builder returns a built (and once called) keras.Model. Global dtype policy is set by
# the caller around the builder.


def conv(ch, rank, data_format="channels_last", k=3, **kw):
    cls = {3: L.Conv1D, 4: L.Conv2D, 5: L.Conv3D}[rank]
    return cls(ch, k, padding="same", data_format=data_format, **kw)


def group_norm(groups, **kw):
    """GroupNormalization that remembers the configured ``groups`` (Keras rewrites -1 to C in build)."""
    layer = L.GroupNormalization(groups=groups, **kw)
    layer._configured_groups = groups
    return layer


def conv_gn(shape, ch, groups, rank=4, data_format="channels_last", gn_kw=None):
    axis = 1 if data_format == "channels_first" else -1
    i = keras.Input(shape, name="x")
    x = conv(ch, rank, data_format)(i)
    x = group_norm(groups, axis=axis, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def dense_gn(shape, ch, groups, gn_kw=None):
    """Dense on the last axis (works for any rank), then GN channels_last."""
    i = keras.Input(shape, name="x")
    x = L.Dense(ch)(i)
    x = group_norm(groups, **(gn_kw or {}))(x)
    return keras.Model(i, x)


def res_block(shape=(8, 8, 16), ch=16, groups=4):
    """Conv-GN-swish-Conv-GN-swish + residual Add, then a third GN (left at initial weights)."""
    i = keras.Input(shape, name="x")
    h = L.Conv2D(ch, 3, padding="same", name="conv_a")(i)
    h = L.GroupNormalization(groups=groups, epsilon=1e-5, name="gn_a")(h)
    h = L.Activation("swish")(h)
    h = L.Conv2D(ch, 3, padding="same", name="conv_b")(h)
    h = L.GroupNormalization(groups=groups, epsilon=1e-5, name="gn_b")(h)
    h = L.Activation("swish")(h)
    skip = L.Conv2D(ch, 1, name="conv_skip")(i)
    x = L.Add()([skip, h])
    x = L.GroupNormalization(groups=groups * 2, epsilon=1e-6, name="gn_out_init")(x)
    x = L.Conv2D(ch, 1, name="conv_out")(x)
    return keras.Model(i, x)


def unet_small(shape=(None, None, 8), ch=8, groups=4):
    i = keras.Input(shape, name="x")
    a = L.Conv2D(ch, 3, padding="same")(i)
    a = L.GroupNormalization(groups)(a)
    d = L.Conv2D(ch * 2, 3, strides=2, padding="same")(a)
    d = L.GroupNormalization(groups)(d)
    u = L.UpSampling2D(2)(d)
    x = L.Concatenate()([a, u])
    x = L.Conv2D(ch, 3, padding="same")(x)
    x = L.GroupNormalization(groups)(x)
    return keras.Model(i, x)


# --------------------------------------------------------------------------- specs
# name -> dict(build, policy, sig (None = Keras default signature: batch None), opset (None = default),
#              data_shape, initial (set of GN layer names left at initial weights, or "all"), notes,
#              extra_shapes (additional input shapes that ORT must accept: dynamic dims), expect_fail)
SPECS: dict[str, dict] = {}


# initial: names of GN layers left at their initial weights, or "all"
SPEC_DEFAULTS = dict(policy="float32", sig=None, opset=None, initial=set(), notes="", extra_shapes=[],
                     expect_fail=False, route=ROUTE)


def spec(name, build, data_shape, **kw):
    common.add_spec(SPECS, name, build, data_shape, SPEC_DEFAULTS, **kw)


spec("keras_jax_export_nhwc_r4_g4",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16),
     extra_shapes=[(3, 8, 8, 16)],
     notes="Conv2D(16,3,same) -> GroupNormalization(groups=4, eps=1e-3 default); default signature (dynamic batch), default opset 23.")
spec("keras_jax_export_nhwc_r4_g1_eps1e5",
     lambda: conv_gn((8, 8, 16), 16, 1, gn_kw=dict(epsilon=1e-5)), (2, 8, 8, 16),
     notes="groups=1 (LayerNorm over H,W,C), epsilon=1e-5.")
spec("keras_jax_export_nhwc_r4_g32_c64_eps1e6",
     lambda: conv_gn((8, 8, 8), 64, 32, gn_kw=dict(epsilon=1e-6)), (2, 8, 8, 8),
     notes="Conv2D 8->64 channels, groups=32 (C/G=2), epsilon=1e-6.")
spec("keras_jax_export_nhwc_r4_gm1",
     lambda: conv_gn((8, 8, 16), 16, -1), (2, 8, 8, 16),
     notes="groups=-1 as configured (layers[].groups = -1); Keras resolves it to groups=C=16 in build (instance norm), so the graph has G=16, C/G=1.")
spec("keras_jax_export_nhwc_r4_g4_nocenter",
     lambda: conv_gn((8, 8, 16), 16, 4, gn_kw=dict(center=False)), (2, 8, 8, 16),
     notes="center=False (no beta).")
spec("keras_jax_export_nhwc_r4_g4_noscale",
     lambda: conv_gn((8, 8, 16), 16, 4, gn_kw=dict(scale=False)), (2, 8, 8, 16),
     notes="scale=False (no gamma).")
spec("keras_jax_export_nhwc_r4_g4_initial",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16), initial="all",
     notes="GN left at Keras' initial weights (gamma=ones, beta=zeros); conv weights random/seeded.")
spec("keras_jax_export_nchw_r4_g4_axis1",
     lambda: conv_gn((16, 8, 8), 16, 4, data_format="channels_first"), (2, 16, 8, 8),
     notes="channels_first: Conv2D(data_format=channels_first) -> GroupNormalization(groups=4, axis=1).")
spec("keras_jax_export_ncw_r3_g2_axis1",
     lambda: conv_gn((8, 12), 8, 2, rank=3, data_format="channels_first"), (2, 8, 12),
     notes="rank 3 channels_first: Conv1D(8, data_format=channels_first) -> GroupNormalization(groups=2, axis=1).")
spec("keras_jax_export_nwc_r3_g4",
     lambda: conv_gn((12, 16), 16, 4, rank=3), (2, 12, 16),
     notes="rank 3 channels_last: Conv1D(16,3,same) -> GroupNormalization(groups=4).")
spec("keras_jax_export_nc_r2_g4",
     lambda: dense_gn((24,), 16, 4), (2, 24),
     notes="rank 2: Dense(16) -> GroupNormalization(groups=4) (reduce over C/G only).")
spec("keras_jax_export_ndhwc_r5_g4_dense",
     lambda: dense_gn((4, 4, 4, 8), 16, 4), (2, 4, 4, 4, 8),
     notes="rank 5 channels_last without Conv3D (Conv3D export fails in jax2onnx, see failures): Dense(16) on the last axis -> GroupNormalization(groups=4).")
spec("keras_jax_export_nhwc_r4_g4_static",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16),
     sig=[keras.InputSpec(shape=(2, 8, 8, 16), dtype="float32", name="x")],
     notes="fully static input_signature (batch 2): broadcast targets / NaN fallback / final Reshape target are constants.")
spec("keras_jax_export_nhwc_r4_g4_dynhw",
     lambda: conv_gn((None, None, 8), 16, 4), (2, 12, 10, 8),
     extra_shapes=[(1, 8, 8, 8), (3, 6, 14, 8)],
     notes="Input((None,None,8)): dynamic batch, H and W; data is 12x10 (non-square) so nothing can be baked in; ORT also checked on other H/W.")
spec("keras_jax_export_nhwc_r4_g4_opset18",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16), opset=18,
     notes="model.export(..., opset_version=18).")
spec("keras_jax_export_nhwc_r4_g4_opset21",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16), opset=21,
     notes="model.export(..., opset_version=21); still decomposed (Keras never emits a native GroupNormalization).")
spec("keras_jax_export_nhwc_r4_g4_float16",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16), policy="float16",
     notes="global dtype policy float16 (input float32 per default Keras Input, cast to f16; gamma/beta f16; GN math up-cast to f32 by Keras 3.15; output float16).")
spec("keras_jax_export_nhwc_r4_g4_mixed_float16",
     lambda: conv_gn((8, 8, 16), 16, 4), (2, 8, 8, 16), policy="mixed_float16",
     notes="global dtype policy mixed_float16 (f32 variables, f16 compute; output float16).")
spec("keras_jax_export_resblock_gn3",
     res_block, (2, 8, 8, 16), initial={"gn_out_init"},
     notes="Conv-GN(4,eps1e-5)-swish-Conv-GN(4,eps1e-5)-swish + 1x1-conv skip, residual Add, then GN(8,eps1e-6) "
           "LEFT AT INITIAL WEIGHTS (gamma=1, beta=0; layer gn_out_init) and a 1x1 Conv. gn_a/gn_b gamma/beta random.")
spec("keras_jax_export_resblock_gn3_dynhw",
     lambda: res_block(shape=(None, None, 16)), (2, 12, 10, 16), initial={"gn_out_init"},
     data_shapes=[(1, 9, 7, 16)],
     notes="res_block with Input((None,None,16)): dynamic batch, H and W. jax2onnx shares the shape computation of "
           "equal-shaped layers: a count read from one layer's grouped tensor also feeds the next layer's guard.")
# Expected failures (recorded in `failures`).
spec("keras_jax_export_ndhwc_r5_g4_conv3d",
     lambda: conv_gn((4, 4, 4, 8), 16, 4, rank=5), (2, 4, 4, 4, 8), expect_fail=True,
     notes="Conv3D(channels_last) -> GroupNormalization(groups=4).")
spec("keras_jax_export_ncdhw_r5_g4_conv3d_axis1",
     lambda: conv_gn((8, 4, 4, 4), 16, 4, rank=5, data_format="channels_first"), (2, 8, 4, 4, 4), expect_fail=True,
     notes="Conv3D(channels_first) -> GroupNormalization(groups=4, axis=1).")
spec("keras_jax_export_unet_dynhw_concat",
     unet_small, (2, 8, 8, 8), expect_fail=True,
     notes="small UNet (stride-2 Conv, UpSampling2D, Concatenate skip) with Input((None,None,8)).")


# --------------------------------------------------------------------------- helpers

def set_weights(model, rng, initial):
    """Seeded random weights for everything except GN layers left at their initial values."""
    common.set_seeded_weights(
        model.layers, rng, weights=lambda layer: layer.weights, vname=lambda v: v.path.split("/")[-1],
        is_norm=lambda layer: isinstance(layer, L.GroupNormalization),
        skip=lambda layer, norm: norm and (initial == "all" or layer.name in initial), assign=common.assign_each)


def gn_layers(model):
    return [common.layer_record(
        groups=getattr(layer, "_configured_groups", layer.groups), axis=layer.axis, epsilon=layer.epsilon,
        center=layer.center, scale=layer.scale, channels=layer.input.shape[layer.axis],
        input_rank=len(layer.input.shape), dtype_policy=layer.dtype_policy.name)
        for layer in model.layers if isinstance(layer, L.GroupNormalization)]


def unused_initializers(m):
    used = {i for n in m.graph.node for i in n.input}
    unused = [t.name for t in m.graph.initializer if t.name not in used]
    return [f"jax2onnx leaves unused initializer(s) {unused} (ORT warns and removes them)."] if unused else []


def ladder_note(ort_version, label, err, fp16):
    return (f"ORT CPU {ort_version} vs {label} max abs err {err:.3g}; tolerance = tightest of a "
            f"{'fp16' if fp16 else 'fp32'} ladder passing at 1/3 of itself.")


def exporter_of(route, vers):
    return {"name": "jax2onnx", "version": vers["jax2onnx"]}


# --------------------------------------------------------------------------- main

def generate(name, sp, out_dir, seed, vers):
    model, rng = common.build_seeded_keras(keras, sp, seed)
    dummy = np.zeros((1,) + tuple(d if d is not None else 8 for d in model.inputs[0].shape[1:]), "float32")
    model(dummy, training=False)
    set_weights(model, rng, sp["initial"])
    x = rng.standard_normal(sp["data_shape"]).astype("float32")
    y = np.asarray(model(x, training=False))

    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {}
    if sp["sig"] is not None:
        kw["input_signature"] = sp["sig"]
    if sp["opset"] is not None:
        kw["opset_version"] = sp["opset"]
    model.export(str(path), format="onnx", verbose=False, **kw)

    entry = common.record_framework_model(
        name, dict(sp, initial=sp["initial"] == "all"), x, y, path, predict=lambda a: model(a, training=False),
        rng=rng, vers=vers, route=ROUTE, family=FAMILY, exporter=exporter_of(ROUTE, vers), layers=gn_layers(model),
        dtype_policy=sp["policy"], graph_notes=unused_initializers, tol_note=ladder_note)
    if sp["expect_fail"]:
        print(f"NOTE {name}: expected to fail but exported fine", flush=True)
    return entry


def main(argv=None):
    return common.run_specs(GENERATOR, SPECS, generate, seed_base=1000, packages=PACKAGES, exporter_of=exporter_of,
                            subdir_of=lambda name: SUBDIR, argv=argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
