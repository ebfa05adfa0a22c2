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
SUBDIR = "keras36"
L = keras.layers

ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 16: "bfloat16"}


def versions() -> dict:
    out = {}
    for pkg in ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy", "protobuf", "ml-dtypes"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


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


def spec(name, build, data_shape, route, **kw):
    kw.setdefault("policy", "float32")
    kw.setdefault("opset", 17)
    kw.setdefault("initial", False)
    kw.setdefault("notes", "")
    kw.setdefault("extra_shapes", [])
    kw.setdefault("expect_fail", False)
    SPECS[name] = dict(build=build, data_shape=data_shape, route=route, **kw)


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

def set_weights(model, rng, initial):
    for layer in model.layers:
        is_norm = isinstance(layer, L.GroupNormalization)
        if is_norm and initial:
            continue
        for v in layer.weights:
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
    for layer in model.layers:
        if isinstance(layer, L.GroupNormalization):
            shp = layer.input.shape
            out.append({
                "groups": int(getattr(layer, "_configured_groups", layer.groups)), "axis": int(layer.axis),
                "epsilon": float(layer.epsilon), "center": bool(layer.center), "scale": bool(layer.scale),
                "channels": int(shp[layer.axis]), "input_rank": len(shp),
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
    if route == "tf2onnx_cli_savedmodel":
        return {"name": "python -m tf2onnx.convert --saved-model", "version": vers["tf2onnx"]}
    return {"name": "tf2onnx.convert.from_keras", "version": vers["tf2onnx"]}


def export(model, route, path, opset, in_shape):
    """Export with tf2onnx by ``route``; input named ``x`` with a dynamic batch."""
    if route == "tf2onnx_cli_savedmodel":
        with tempfile.TemporaryDirectory(prefix="k36sm_") as d:
            sm = os.path.join(d, "sm")
            model.export(sm, format="tf_saved_model")
            cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", sm, "--output", str(path)]
            if opset is not None:
                cmd += ["--opset", str(opset)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-3:]
                raise RuntimeError("tf2onnx CLI failed: " + " | ".join(tail))
    else:
        sig = (tf.TensorSpec([None] + list(in_shape[1:]), tf.float32, name="x"),)
        kw = {} if opset is None else {"opset": opset}
        tf2onnx.convert.from_keras(model, input_signature=sig, output_path=str(path), **kw)


# --------------------------------------------------------------------------- main

def check_and_record(name, sp, model, x, y, path, out_dir, subdir, vers, rng, *, negative=False,
                     family=None, layers=None, route=None, framework_label="Keras"):
    """Checker + ORT vs framework comparison, write the .npz and return the manifest entry."""
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
        notes.append(f"ORT also matches {framework_label} for input shapes {[list(s) for s in sp['extra_shapes']]}.")
    err = float(np.max(np.abs(got.astype(np.float64) - y.astype(np.float64))))
    fp16 = outs[0]["dtype"] == "float16"
    notes.append(f"ORT CPU {vers.get('onnxruntime')} vs {framework_label} max abs err {err:.3g}; tolerance = tightest of "
                 + ("an fp16 ladder (1e-3, 3e-3, 1e-2, 3e-2)" if fp16 else "an fp32 ladder (1e-5, 1e-4, 1e-3)")
                 + " passing at 1/3 of itself" + (" (TF CPU and ORT round f16 intermediates differently)." if fp16 else "."))
    save_npz(out_dir / subdir / f"{name}.npz", [x], [y])
    entry = {
        "name": name,
        "file": f"{subdir}/{name}.onnx",
        "data": f"{subdir}/{name}.npz",
        "route": route or sp["route"],
        "pattern_family": family,
        "exporter": exporter_of(route or sp["route"], vers),
        "frameworks": vers,
        "python": platform.python_version(),
        "opset": int(opset),
        "dtype_policy": sp["policy"],
        "inputs": ins,
        "outputs": outs,
        "expected_group_norms": 0 if negative else len(layers),
        "layers": [] if negative else layers,
        "negative": bool(negative),
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
    export(model, sp["route"], path, sp["opset"], sp["data_shape"])
    return check_and_record(name, sp, model, x, y, path, out_dir, SUBDIR, vers, rng,
                            family=FAMILY_BY_POLICY[sp["policy"]], layers=gn_layers(model))


def run_all(generator, specs, generate_fn, subdir, seed_base, argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(MODELS_DIR))
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out).resolve()
    default_out = out_dir == MODELS_DIR.resolve()
    names = list(specs)
    if args.only:
        unknown = [n for n in args.only if n not in specs]
        if unknown:
            ap.error(f"unknown names: {unknown}; known: {names}")
        names = args.only
    vers = versions()
    models, failures = [], []
    for idx, name in enumerate(specs):
        if name not in names:
            continue
        sp = specs[name]
        try:
            entry, ops, size = generate_fn(name, sp, out_dir, seed_base + idx, vers)
        except Exception as e:
            for ext in (".onnx", ".npz"):
                (out_dir / subdir / f"{name}{ext}").unlink(missing_ok=True)
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
        print(f"ok   {name}: opset {entry['opset']}, {size} B, tol {entry['tolerance']}, ops {json.dumps(ops, sort_keys=True)}",
              flush=True)
    if default_out:
        if args.only and MANIFEST.exists():  # keep this script's other entries
            data = json.loads(MANIFEST.read_text(encoding="utf-8"))
            regenerated = set(names)
            keep_m = [m for m in data.get("models", []) if m.get("generator") == generator
                      and m["name"] not in regenerated]
            keep_f = [f for f in data.get("failures", []) if f.get("generator") == generator
                      and f.get("name") not in regenerated]
            models, failures = keep_m + models, keep_f + failures
        update_manifest(generator, models, failures)
        print(f"manifest updated: {len(models)} models, {len(failures)} failures")
    unexpected = [f["name"] for f in failures if not f["expected"]]
    if unexpected:
        print(f"UNEXPECTED failures: {unexpected}")
        return 1
    return 0


def main(argv=None):
    return run_all(GENERATOR, SPECS, generate, SUBDIR, 4000, argv)


if __name__ == "__main__":
    sys.exit(main())
