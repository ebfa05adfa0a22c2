"""Shared by the corpus generators: ORT-vs-framework checks, tolerance ladders, manifest entries, main loop.

Imports only the standard library, NumPy, onnx and onnxruntime (every framework's virtual environment has
them); framework modules (keras, tf_keras, torch ...) stay in the scripts and are passed in where needed.

Two tolerance schemes are in use and kept as they were:

* ``choose_tol`` (the Keras / tf_keras generators): ``np.allclose`` at a third of an (rtol, atol) ladder;
* ``pick_tolerance`` (the torch and hand-built generators): rtol = atol from ``TOL_LADDER``, 3x margin.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from _manifest import MANIFEST, MODELS_DIR, save_npz, update_manifest

__all__ = [
    "add_spec",     "ONNX_DTYPES", "TOL_LADDER", "package_versions", "first_lines", "exception_lines", "op_summary",
    "default_opset", "value_info", "io_json", "config_text", "choose_tol", "pick_tolerance",
    "tf_ladder_note", "seeded_value", "set_seeded_weights", "assign_each", "build_seeded_keras",
    "tf2onnx_cli_export", "python_version", "layer_record",
    "FrameworkCheck", "check_against_framework", "record_framework_model", "run_specs", "check_against_reference", "manifest_entry",
    "failure_entry", "run_generator", "save_npz", "MODELS_DIR",
]

ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 16: "bfloat16"}

# Floors (1e-5 fp32, 3e-3 fp16, i.e. a few fp16 ulps): ORT often matches the framework to ~1e-6, but a fused
# GroupNormalization computes the variance as E[(x-m)^2] (not E[x^2]-m^2) / reduces in another order and must
# not be rejected on float rounding alone.
TOL_LADDER = {"float32": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "float16": [3e-3, 1e-2, 3e-2, 1e-1]}


# --------------------------------------------------------------------------- small helpers

def add_spec(specs, name, build, data_shape, defaults, **kw):
    """``specs[name] = {build, data_shape, **kw}`` with ``defaults`` (copied) for the keys not given."""
    for key, value in defaults.items():
        kw.setdefault(key, copy.copy(value))
    specs[name] = dict(build=build, data_shape=data_shape, **kw)


def package_versions(packages: Iterable[str]) -> dict:
    """``{package: version}`` for the installed ones among ``packages`` (in that order)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def first_lines(exc, n=3):
    """``"Type: message"`` without ANSI colours, first ``n`` non-blank lines."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return "\n".join(lines[:n])


def exception_lines(exc, n=3):
    """``traceback.format_exception_only`` (qualified type name), first ``n`` non-blank lines."""
    msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return [ln for ln in msg.splitlines() if ln.strip()][:n]


def op_summary(m):
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def default_opset(m):
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _dim(d):
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return None


def value_info(vis):
    """Graph inputs/outputs as manifest dicts, dtype named through ``ONNX_DTYPES`` (Keras generators)."""
    return [{"name": vi.name, "shape": [_dim(d) for d in vi.type.tensor_type.shape.dim],
             "dtype": ONNX_DTYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))}
            for vi in vis]


def io_json(vis):
    """Graph inputs/outputs as manifest dicts, dtype named by NumPy (torch / hand-built generators)."""
    return [{"name": vi.name, "shape": [_dim(d) for d in vi.type.tensor_type.shape.dim],
             "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name} for vi in vis]


def config_text(cfg, keys):
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


# --------------------------------------------------------------------------- tolerances

def choose_tol(got, ref, dtype, label="Keras"):
    """Tightest (rtol, atol) of the fp32 / fp16 ladder that passes at a third of itself."""
    ladder = [(1e-5, 1e-5), (1e-4, 1e-4), (1e-3, 1e-3)] if dtype != "float16" else \
        [(1e-3, 1e-3), (3e-3, 3e-3), (1e-2, 1e-2), (3e-2, 3e-2)]
    g = np.asarray(got, np.float64)
    r = np.asarray(ref, np.float64)
    for rtol, atol in ladder:  # margin: must pass at a third of the recorded tolerance
        if np.allclose(g, r, rtol=rtol / 3, atol=atol / 3):
            return {"rtol": rtol, "atol": atol}
    raise AssertionError(f"ORT vs {label} mismatch: max abs err {np.max(np.abs(g - r))}")


def tf_ladder_note(ort_version, label, err, fp16):
    return (f"ORT CPU {ort_version} vs {label} max abs err {err:.3g}; tolerance = tightest of "
            + ("an fp16 ladder (1e-3, 3e-3, 1e-2, 3e-2)" if fp16 else "an fp32 ladder (1e-5, 1e-4, 1e-3)")
            + " passing at 1/3 of itself" + (" (TF CPU and ORT round f16 intermediates differently)." if fp16 else "."))


def pick_tolerance(ref, got, kind, label="framework"):
    """Tightest rtol = atol of ``TOL_LADDER[kind]`` that passes with three times the observed error."""
    ref = ref.astype(np.float64)
    err = np.abs(ref - got.astype(np.float64))
    for t in TOL_LADDER[kind]:
        # margin x3: the recorded tolerance passes even with three times the observed error
        if np.all(3 * err <= t + t * np.abs(ref)):
            return t, float(err.max())
    raise RuntimeError(f"onnxruntime vs {label}: max abs err {err.max():.3g} beyond the {kind} ladder")


# --------------------------------------------------------------------------- seeded weights (Keras-style)

def seeded_value(rng, vname, shape, norm, bn_stats=False):
    """The value of one variable: gamma ~ 1 + 0.5 N, beta ~ 0.5 N (norm layers only), bias ~ 0.2 N,
    BN moving statistics (``bn_stats``), anything else N / sqrt(fan_in)."""
    if norm and vname == "gamma":
        return 1.0 + 0.5 * rng.standard_normal(shape)
    if norm and vname == "beta":
        return 0.5 * rng.standard_normal(shape)
    if bn_stats and vname == "moving_mean":
        return 0.5 * rng.standard_normal(shape)
    if bn_stats and vname == "moving_variance":
        return rng.uniform(0.5, 1.5, shape)
    if vname == "bias":
        return 0.2 * rng.standard_normal(shape)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))


def set_seeded_weights(layers, rng, *, weights, vname, is_norm, skip, assign, bn_stats=False):
    """Give every variable of ``layers`` its ``seeded_value`` (in layer and variable order).

    ``weights(layer)`` lists the variables, ``vname(v)`` the short name, ``is_norm(layer)`` says whether
    gamma/beta are norm parameters, ``skip(layer, norm)`` leaves a layer at its initial weights and
    ``assign(layer, [(v, value), ...])`` writes the values (dtype conversion is the framework's business).
    """
    for layer in layers:
        norm = is_norm(layer)
        if skip(layer, norm):
            continue
        pairs = [(v, seeded_value(rng, vname(v), tuple(v.shape), norm, bn_stats)) for v in weights(layer)]
        if pairs:
            assign(layer, pairs)


def assign_each(layer, pairs):
    """``set_seeded_weights`` writer for Keras 3 variables: ``v.assign(value in v's dtype)``."""
    for v, val in pairs:
        v.assign(val.astype(v.dtype))


def build_seeded_keras(keras, sp, seed):
    """Keras 3: fresh session, the spec's global dtype policy around ``sp["build"]()``, seeded.

    Returns the model and ``np.random.default_rng(seed)`` (weights, inputs)."""
    keras.backend.clear_session()
    keras.config.set_dtype_policy(sp.get("policy", "float32"))
    try:
        keras.utils.set_random_seed(seed)
        model = sp["build"]()
    finally:
        keras.config.set_dtype_policy("float32")
    return model, np.random.default_rng(seed)


def layer_record(*, groups, axis, epsilon, center, scale, channels, input_rank, dtype_policy):
    """One ``layers[]`` item of a manifest entry."""
    return {"groups": int(groups), "axis": int(axis), "epsilon": float(epsilon), "center": bool(center),
            "scale": bool(scale), "channels": int(channels), "input_rank": int(input_rank),
            "dtype_policy": dtype_policy}


# --------------------------------------------------------------------------- export helpers

def tf2onnx_cli_export(model, path, opset, *, prefix, **export_kw):
    """``model.export(dir, format="tf_saved_model", **export_kw)`` then
    ``python -m tf2onnx.convert --saved-model dir --output path [--opset N]`` in this interpreter."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        sm = str(pathlib.Path(d) / "sm")
        model.export(sm, format="tf_saved_model", **export_kw)
        cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", sm, "--output", str(path)]
        if opset is not None:
            cmd += ["--opset", str(opset)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-3:]
            raise RuntimeError("tf2onnx CLI failed: " + " | ".join(tail))


# --------------------------------------------------------------------------- ORT checks

@dataclass
class FrameworkCheck:
    model: onnx.ModelProto
    opset: int
    inputs: list
    outputs: list
    y: np.ndarray              # the framework output in the ONNX output dtype
    tol: dict
    err: float
    fp16: bool
    notes: list = field(default_factory=list)


def check_against_framework(name, path, x, y, *, predict, extra_shapes, rng, label, notes, graph_notes=None):
    """Keras-style check: onnx checker (a failure is recorded in ``notes``, not raised), one input / one
    output, ORT CPU (1 thread) vs the framework output ``y`` with ``choose_tol``, then ``extra_shapes``
    (fresh ``rng`` inputs, ``predict(x)``) at that tolerance. ``graph_notes(model)`` may add notes after
    the checker's. Appends to ``notes`` (returned in the result too)."""
    m = onnx.load(str(path))
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:  # record, do not hide
        notes.append(f"onnx.checker full_check FAILED: {first_lines(e, 1)}")
        print(f"WARN {name}: checker failed: {first_lines(e, 1)}", flush=True)
    if graph_notes is not None:
        notes.extend(graph_notes(m))
    opset = default_opset(m)
    ins, outs = value_info(m.graph.input), value_info(m.graph.output)
    assert len(ins) == 1 and len(outs) == 1, (ins, outs)
    out_dtype = outs[0]["dtype"]
    y = y.astype(out_dtype)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {ins[0]["name"]: x})[0]
    assert got.dtype == y.dtype and got.shape == y.shape, (got.dtype, y.dtype, got.shape, y.shape)
    tol = choose_tol(got, y, out_dtype, label)
    for shp in extra_shapes:  # dynamic dims really dynamic
        xe = rng.standard_normal(shp).astype("float32")
        ye = np.asarray(predict(xe)).astype(out_dtype)
        ge = sess.run(None, {ins[0]["name"]: xe})[0]
        np.testing.assert_allclose(ge.astype(np.float64), ye.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])
    if extra_shapes:
        notes.append(f"ORT also matches {label} for input shapes {[list(s) for s in extra_shapes]}.")
    err = float(np.max(np.abs(got.astype(np.float64) - y.astype(np.float64))))
    return FrameworkCheck(m, int(opset), ins, outs, y, tol, err, out_dtype == "float16", notes)


def record_framework_model(name, sp, x, y, path, *, predict, rng, vers, route, family, exporter, layers,
                           dtype_policy, negative=False, label="Keras", graph_notes=None, tol_note=tf_ladder_note):
    """``check_against_framework`` (notes start with ``sp["notes"]``, end with ``tol_note``), write
    ``<path>.npz`` (``x`` and the framework output) and return the manifest entry (``sp["initial"]``
    truthy = ``weights: initial``). ``sp.get("data_shapes")``: further input shapes whose inputs and
    framework outputs are saved too (``set1_in_0`` ..., see ``save_npz``) after ORT matches them at
    the recorded tolerance."""
    chk = check_against_framework(name, path, x, y, predict=predict, extra_shapes=sp["extra_shapes"], rng=rng,
                                  label=label, notes=[sp["notes"]], graph_notes=graph_notes)
    chk.notes.append(tol_note(vers.get("onnxruntime"), label, chk.err, chk.fp16))
    more = []
    if sp.get("data_shapes"):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for shape in sp["data_shapes"]:
            xe = rng.standard_normal(shape).astype(x.dtype)
            ye = np.asarray(predict(xe)).astype(chk.y.dtype)
            ge = sess.run(None, {chk.inputs[0]["name"]: xe})[0]
            np.testing.assert_allclose(ge.astype(np.float64), ye.astype(np.float64), rtol=chk.tol["rtol"], atol=chk.tol["atol"])
            more.append(([xe], [ye]))
        chk.notes.append(f"data sets at input shapes {[list(x.shape)] + [list(s) for s in sp['data_shapes']]} "
                         "(npz set0 = in_0/out_0, set1 = set1_in_0/set1_out_0 ...), each within the tolerance.")
    save_npz(path.with_suffix(".npz"), [x], [chk.y], more)
    entry = manifest_entry(
        name=name, subdir=path.parent.name, route=route, family=family, exporter=exporter, frameworks=vers,
        python=python_version(), opset=chk.opset, dtype_policy=dtype_policy, inputs=chk.inputs,
        outputs=chk.outputs, layers=layers, negative=negative,
        weights="initial" if sp["initial"] else "random", tolerance=chk.tol, notes=chk.notes)
    if more:
        entry["data_sets"] = 1 + len(more)
    return entry


def check_against_reference(path, m, x, y, label):
    """torch-style check: ORT CPU on ``path`` vs the reference ``y`` (cast to the graph's output dtype),
    ``pick_tolerance``. Returns ``(y, tol, max_err, kind)``."""
    out_dtype = onnx.helper.tensor_dtype_to_np_dtype(m.graph.output[0].type.tensor_type.elem_type)
    y = y.astype(out_dtype)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if got.shape != y.shape:
        raise RuntimeError(f"onnxruntime output shape {got.shape} != {label} {y.shape}")
    kind = "float16" if out_dtype == np.float16 else "float32"
    tol, maxerr = pick_tolerance(y, got, kind, label)
    return y, tol, maxerr, kind


# --------------------------------------------------------------------------- manifest records

def manifest_entry(*, name, subdir, route, family, exporter, frameworks, python, opset, dtype_policy, inputs,
                   outputs, layers, negative, hand_built=False, weights, tolerance, notes):
    """One ``models[]`` entry (``generator`` is added by ``update_manifest``). A negative has no layers."""
    return {
        "name": name,
        "file": f"{subdir}/{name}.onnx",
        "data": f"{subdir}/{name}.npz",
        "route": route,
        "pattern_family": family,
        "exporter": exporter,
        "frameworks": frameworks,
        "python": python,
        "opset": int(opset),
        "dtype_policy": dtype_policy,
        "inputs": inputs,
        "outputs": outputs,
        "expected_group_norms": 0 if negative else len(layers),
        "layers": [] if negative else layers,
        "negative": bool(negative),
        "hand_built": bool(hand_built),
        "weights": weights,
        "tolerance": tolerance,
        "notes": " ".join(n for n in notes if n),
    }


def failure_entry(*, route, name, config, exporter, frameworks, error, python=None, expected=None):
    """One ``failures[]`` record; ``python`` / ``expected`` only where the generator records them."""
    out = {"route": route, "name": name, "config": config, "exporter": exporter, "frameworks": frameworks}
    if python is not None:
        out["python"] = python
    out["error"] = error
    if expected is not None:
        out["expected"] = bool(expected)
    return out


def run_specs(script, specs, generate, *, seed_base, packages, exporter_of, subdir_of, argv=None,
              description=None):
    """``run_generator`` over a ``{name: spec}`` dict (the Keras / tf_keras generators).

    ``generate(name, spec, out_dir, seed, versions)`` with ``seed = seed_base + index``; a failure is
    recorded with the spec's route, notes, ``exporter_of(route, versions)`` and ``expected: expect_fail``."""
    vers = package_versions(packages)

    def failure(name, e):
        sp = specs[name]
        return failure_entry(route=sp["route"], name=name, config=sp["notes"], exporter=exporter_of(sp["route"], vers),
                             frameworks=vers, python=python_version(), error=first_lines(e, 4),
                             expected=sp["expect_fail"])

    return run_generator(script, list(specs),
                         lambda name, idx, out_dir: generate(name, specs[name], out_dir, seed_base + idx, vers),
                         failure, subdir_of=subdir_of, argv=argv, description=description)


def python_version():
    return platform.python_version()


# --------------------------------------------------------------------------- main loop

def run_generator(script: str, names: list[str], generate: Callable, failure: Callable, *,
                  subdir_of: Callable | None = None, argv=None, description=None) -> int:
    """``--out DIR`` / ``--only NAME ...`` command line shared by every generator.

    ``generate(name, index, out_dir)`` returns the manifest entry of ``names[index]`` (``index`` is its
    position in the full list: the seed of a model does not depend on ``--only``); on an exception
    ``failure(name, exc)`` returns the ``failures[]`` record and the model's files in
    ``out_dir/<subdir_of(name)>/`` are removed. With the default ``--out`` (``models/``) the manifest
    entries of ``script`` are replaced (with ``--only`` its other entries are kept); with any other
    ``--out`` the manifest is left alone. Returns 1 when a failure is recorded as ``expected: false``.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=str(MODELS_DIR))
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out).resolve()
    selected = set(names)
    if args.only:
        unknown = [n for n in args.only if n not in selected]
        if unknown:
            ap.error(f"unknown names: {unknown}; known: {names}")
        selected = set(args.only)
    models, failures = [], []
    for idx, name in enumerate(names):
        if name not in selected:
            continue
        try:
            entry = generate(name, idx, out_dir)
        except Exception as e:  # noqa: BLE001 - every failing model is recorded
            rec = failure(name, e)
            subdir = subdir_of(name) if subdir_of else None
            if subdir:
                for ext in (".onnx", ".npz"):
                    (out_dir / subdir / f"{name}{ext}").unlink(missing_ok=True)
            print(f"FAIL {name}: {first_lines(e, 2)}", flush=True)
            if rec.get("expected") is False:
                traceback.print_exc()
            failures.append(rec)
            continue
        models.append(entry)
        path = out_dir / entry["file"]
        ops = op_summary(onnx.load(str(path), load_external_data=False))
        print(f"ok   {name}: opset {entry['opset']}, {path.stat().st_size} B, GN {entry['expected_group_norms']}, "
              f"tol {entry['tolerance']}, ops {json.dumps(ops, sort_keys=True)}", flush=True)
    if out_dir == MODELS_DIR.resolve():
        if args.only and MANIFEST.exists():  # keep this script's other entries
            data = json.loads(MANIFEST.read_text(encoding="utf-8"))
            models = [m for m in data.get("models", []) if m.get("generator") == script
                      and m["name"] not in selected] + models
            failures = [f for f in data.get("failures", []) if f.get("generator") == script
                        and f.get("name") not in selected] + failures
        update_manifest(script, models, failures)
        print(f"manifest updated: {len(models)} models, {len(failures)} failures")
    else:
        print(f"{len(models)} models, {len(failures)} failures (written to {out_dir}; manifest left alone)")
    unexpected = [f["name"] for f in failures if f.get("expected") is False]
    if unexpected:
        print(f"UNEXPECTED failures: {unexpected}")
        return 1
    return 0
