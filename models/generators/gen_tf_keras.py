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

import argparse
import json
import os
import pathlib
import platform
import re
import sys
import traceback
from importlib import metadata

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _manifest import MANIFEST, MODELS_DIR, save_npz, update_manifest  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tf2onnx  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

tf.get_logger().setLevel("ERROR")

GENERATOR = pathlib.Path(__file__).name
ROUTE = "tf_keras_from_keras"
FAMILY = "tf_keras-weighted-moments"
L = tf_keras.layers

ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 16: "bfloat16"}


def versions() -> dict:
    out = {}
    for pkg in ("tf_keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy", "protobuf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


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


def spec(name, build, data_shape, **kw):
    kw.setdefault("opset", 17)
    kw.setdefault("static_batch", False)
    kw.setdefault("initial", False)
    kw.setdefault("notes", "")
    kw.setdefault("extra_shapes", [])
    kw.setdefault("expect_fail", False)
    kw.setdefault("negative", False)
    kw.setdefault("subdir", "tf_keras")
    SPECS[name] = dict(build=build, data_shape=data_shape, **kw)


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
    for layer in model.layers:
        ws = layer.weights
        if not ws:
            continue
        is_norm = isinstance(layer, (L.GroupNormalization, L.LayerNormalization))
        if is_norm and initial:
            continue
        new = []
        for v in ws:
            shape = tuple(v.shape)
            vname = v.name.split("/")[-1].split(":")[0]
            if is_norm and vname == "gamma":
                val = 1.0 + 0.5 * rng.standard_normal(shape)
            elif is_norm and vname == "beta":
                val = 0.5 * rng.standard_normal(shape)
            elif vname == "bias":
                val = 0.2 * rng.standard_normal(shape)
            else:
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                val = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
            new.append(val.astype(v.dtype.as_numpy_dtype))
        layer.set_weights(new)


def gn_layers(model, configured):
    out = []
    for layer in model.layers:
        if isinstance(layer, L.GroupNormalization):
            shp = layer.input_shape
            rank = len(shp)
            axis = layer.axis if layer.axis >= 0 else rank + layer.axis
            out.append({
                "groups": int(configured), "axis": int(layer.axis), "epsilon": float(layer.epsilon),
                "center": bool(layer.center), "scale": bool(layer.scale),
                "channels": int(shp[axis]), "input_rank": rank,
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
    raise AssertionError(f"ORT vs tf_keras mismatch: max abs err {np.max(np.abs(g - r))}")


def op_summary(m):
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def first_lines(exc, n=3):
    msg = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return "\n".join(lines[:n])


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
        notes.append(f"ORT also matches tf_keras for input shapes {[list(s) for s in sp['extra_shapes']]}.")
    err = float(np.max(np.abs(got.astype(np.float64) - y.astype(np.float64))))
    notes.append(f"ORT CPU {vers.get('onnxruntime')} vs tf_keras max abs err {err:.3g}; tolerance = tightest of an "
                 f"fp32 ladder (1e-5, 1e-4, 1e-3) passing at 1/3 of itself.")
    save_npz(out_dir / sp["subdir"] / f"{name}.npz", [x], [y])

    layers = [] if sp["negative"] else gn_layers(model, _configured_groups(name))
    entry = {
        "name": name,
        "file": f"{sp['subdir']}/{name}.onnx",
        "data": f"{sp['subdir']}/{name}.npz",
        "route": ROUTE,
        "pattern_family": "negative" if sp["negative"] else FAMILY,
        "exporter": {"name": "tf2onnx.convert.from_keras", "version": vers["tf2onnx"]},
        "frameworks": vers,
        "python": platform.python_version(),
        "opset": int(opset),
        "dtype_policy": "float32",
        "inputs": ins,
        "outputs": outs,
        "expected_group_norms": 0 if sp["negative"] else len(layers),
        "layers": layers,
        "negative": bool(sp["negative"]),
        "hand_built": False,
        "weights": "initial" if sp["initial"] else "random",
        "tolerance": tol,
        "notes": " ".join(n for n in notes if n),
    }
    return entry, op_summary(m), path.stat().st_size


def _configured_groups(name):
    """groups as written in the spec (tf_keras overwrites layer.groups=-1 with C in build)."""
    m = re.search(r"_g(m?)(\d+)", name)
    return -int(m.group(2)) if m.group(1) else int(m.group(2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        seed = 3000 + idx
        try:
            entry, ops, size = generate(name, sp, out_dir, seed, vers)
        except Exception as e:
            for ext in (".onnx", ".npz"):
                (out_dir / sp["subdir"] / f"{name}{ext}").unlink(missing_ok=True)
            print(f"FAIL {name}: {first_lines(e, 2)}", flush=True)
            if not sp["expect_fail"]:
                traceback.print_exc()
            failures.append({
                "route": ROUTE, "name": name, "config": sp["notes"],
                "exporter": {"name": "tf2onnx.convert.from_keras", "version": vers["tf2onnx"]},
                "frameworks": vers, "python": platform.python_version(),
                "error": first_lines(e, 4), "expected": bool(sp["expect_fail"]),
            })
            continue
        models.append(entry)
        print(f"ok   {name}: opset {entry['opset']}, {size} B, tol {entry['tolerance']}, ops {json.dumps(ops, sort_keys=True)}",
              flush=True)
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
