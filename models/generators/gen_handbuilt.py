"""Hand-built ONNX models with the standard GroupNormalization op, into ``models/handbuilt/``.

No framework made these graphs (``hand_built: true``, route ``hand_built``, family
``onnx-GroupNormalization-op``); they are built with ``onnx.helper``. Their expected outputs come from
a NumPy implementation of the ONNX operator spec written below ("NumPy of the ONNX spec"):

* ``GroupNormalization-18`` (opset 18): scale/bias are PER GROUP, shape ``[G]``, applied to the grouped
  ``[N, G, C/G * S...]`` tensor. onnx >= 1.16 marks this version deprecated and its checker rejects it
  (the message is recorded in the model's notes); onnxruntime still runs it.
* ``GroupNormalization-21`` (opset 21): scale/bias PER CHANNEL ``[C]``; stage 1 (normalisation) in the
  ``stash_type`` precision (1 = float32), cast back to X's type, stage 2 (``scale * norm + bias``) in
  X's type.

Any venv with onnx + numpy (+ onnxruntime for the check) works; the recorded one (Python 3.11.7)::

    python3.11 -m venv /opt/venvs/torch
    /opt/venvs/torch/bin/pip install -q -r models/generators/requirements-torch.txt
    # needs only onnx==1.23.2 numpy==2.4.6 onnxruntime==1.32.0 from that list
    /opt/venvs/torch/bin/python models/generators/gen_handbuilt.py

Options: ``--out DIR`` (write there and leave the manifest alone), ``--only NAME [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _manifest import MANIFEST, MODELS_DIR, save_npz, update_manifest  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SCRIPT = "gen_handbuilt.py"
SUBDIR = "handbuilt"
ROUTE = "hand_built"
PYTHON = ".".join(map(str, sys.version_info[:3]))
FRAMEWORKS = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}


def C(name, opset, *, rank=4, channels=16, groups=4, eps=1e-5, dtype="float32", stash_type=None,
      batch=2, dyn_batch=False, spatial=8, seed=0):
    return dict(name=name, opset=opset, rank=rank, channels=channels, groups=groups, eps=eps, dtype=dtype,
                stash_type=stash_type, batch=batch, dyn_batch=dyn_batch, spatial=spatial, seed=seed)


CONFIGS = [
    C("hand_gn18_r4_c16_g4_pergroup", 18, seed=1),
    C("hand_gn21_r4_c16_g4", 21, seed=2),
    C("hand_gn21_r4_c32_g8_dynbatch", 21, channels=32, groups=8, eps=1e-6, dyn_batch=True, batch=3, seed=3),
    C("hand_gn21_r3_c8_g2", 21, rank=3, channels=8, groups=2, eps=1e-3, spatial=16, seed=4),
    C("hand_gn21_r4_c16_g4_float16_stash1", 21, dtype="float16", stash_type=1, seed=5),
]


# ---------------------------------------------------------------------- NumPy of the ONNX spec
def gn18_reference(x, scale_g, bias_g, groups, eps):
    """GroupNormalization-18: normalise per (n, group); scale/bias per GROUP; computed in x's dtype."""
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(axis=-1, keepdims=True, dtype=x.dtype)
    var = ((xg - mean) ** 2).mean(axis=-1, keepdims=True, dtype=x.dtype)
    norm = (xg - mean) / np.sqrt(var + np.asarray(eps, x.dtype))
    y = scale_g.reshape(1, groups, 1) * norm + bias_g.reshape(1, groups, 1)
    return y.reshape(x.shape).astype(x.dtype)


def gn21_reference(x, scale_c, bias_c, groups, eps, stash_type=1):
    """GroupNormalization-21: stage 1 in stash_type precision, cast back; stage 2 per CHANNEL in x's dtype."""
    stash = np.float32 if stash_type in (None, 1) else x.dtype
    n, c = x.shape[:2]
    xg = x.astype(stash).reshape(n, groups, -1)
    mean = xg.mean(axis=-1, keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=-1, keepdims=True)
    norm = ((xg - mean) / np.sqrt(var + stash(eps))).reshape(x.shape).astype(x.dtype)
    bshape = (1, c) + (1,) * (x.ndim - 2)
    y = scale_c.reshape(bshape) * norm + bias_c.reshape(bshape)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------- building
def build(cfg):
    rng = np.random.default_rng(1000 + cfg["seed"])
    dt = np.dtype(cfg["dtype"])
    elem = helper.np_dtype_to_tensor_dtype(dt)
    c, g = cfg["channels"], cfg["groups"]
    nparam = g if cfg["opset"] == 18 else c
    scale = rng.uniform(0.5, 1.5, nparam).astype(dt)
    bias = rng.normal(0.0, 0.5, nparam).astype(dt)
    sp = (cfg["spatial"],) * (cfg["rank"] - 2)
    shape = ["batch" if cfg["dyn_batch"] else cfg["batch"], c, *sp]
    attrs = {"num_groups": g, "epsilon": cfg["eps"]}
    if cfg["stash_type"] is not None:
        attrs["stash_type"] = cfg["stash_type"]
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], name="group_norm", **attrs)
    graph = helper.make_graph(
        [node], cfg["name"],
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)],
        initializer=[numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cfg["opset"])],
                              producer_name="gen_handbuilt.py", producer_version="1")
    model.ir_version = 10  # opset 21 needs IR >= 10; onnxruntime 1.32 loads IR 10
    return model, scale, bias


TOL_LADDER = {"float32": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "float16": [3e-3, 1e-2, 3e-2, 1e-1]}


def pick_tolerance(ref, got, kind):
    ref = ref.astype(np.float64)
    err = np.abs(ref - got.astype(np.float64))
    for t in TOL_LADDER[kind]:
        if np.all(3 * err <= t + t * np.abs(ref)):
            return t, float(err.max())
    raise RuntimeError(f"onnxruntime vs NumPy spec: max abs err {err.max():.3g} beyond the {kind} ladder")


def io_json(vis):
    def dim(d):
        return int(d.dim_value) if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
    return [{"name": vi.name, "shape": [dim(d) for d in vi.type.tensor_type.shape.dim],
             "dtype": helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name} for vi in vis]


def config_text(cfg):
    return ", ".join(f"{k}={cfg[k]}" for k in ("opset", "rank", "channels", "groups", "eps", "dtype",
                                                "stash_type", "dyn_batch"))


def generate(cfg, out_dir):
    name = cfg["name"]
    model, scale, bias = build(cfg)
    notes = [f"config: {config_text(cfg)}."]
    try:
        onnx.checker.check_model(model, full_check=True)
        notes.append("onnx.checker.check_model(full_check=True) passes.")
    except onnx.checker.ValidationError as e:
        if cfg["opset"] != 18:
            raise
        first = str(e).strip().splitlines()[0]
        notes.append(f"onnx {onnx.__version__} checker rejects it (legitimately: GroupNormalization-18 is "
                     f"deprecated since onnx 1.16): '{first}'.")
    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))

    rng = np.random.default_rng(20_000 + cfg["seed"])
    x = rng.normal(0.5, 1.5, (cfg["batch"], cfg["channels"]) + (cfg["spatial"],) * (cfg["rank"] - 2))
    x = x.astype(cfg["dtype"])
    if cfg["opset"] == 18:
        y = gn18_reference(x, scale, bias, cfg["groups"], cfg["eps"])
        notes.append("Expected output: NumPy of the ONNX spec (GroupNormalization-18 semantics: scale/bias "
                     "per GROUP, shape [G], applied on the grouped tensor; computed in float32); no framework "
                     "made it. A fuser must NOT emit this form for per-channel gamma/beta.")
    else:
        y = gn21_reference(x, scale, bias, cfg["groups"], cfg["eps"], cfg["stash_type"])
        notes.append("Expected output: NumPy of the ONNX spec (GroupNormalization-21 semantics: scale/bias "
                     "per CHANNEL [C]; normalisation in stash_type precision (float32), cast back to X's "
                     "type, then scale*norm+bias in X's type); no framework made it.")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    kind = "float16" if cfg["dtype"] == "float16" else "float32"
    tol, maxerr = pick_tolerance(y, got, kind)
    notes.append(f"ORT CPU max abs err {maxerr:.3g}; tolerance (rtol=atol) = tightest of the {kind} ladder "
                 f"{TOL_LADDER[kind]} passing with 3x margin.")
    save_npz(path.with_suffix(".npz"), [x], [y])
    return {
        "name": name,
        "file": f"{SUBDIR}/{name}.onnx",
        "data": f"{SUBDIR}/{name}.npz",
        "route": ROUTE,
        "pattern_family": "onnx-GroupNormalization-op",
        "exporter": {"name": "onnx.helper (hand-built, gen_handbuilt.py)", "version": f"onnx {onnx.__version__}"},
        "frameworks": dict(FRAMEWORKS),
        "python": PYTHON,
        "opset": cfg["opset"],
        "dtype_policy": cfg["dtype"],
        "inputs": io_json(model.graph.input),
        "outputs": io_json(model.graph.output),
        "expected_group_norms": 1,
        "layers": [{"groups": cfg["groups"], "axis": 1, "epsilon": float(cfg["eps"]), "center": True,
                    "scale": True, "channels": cfg["channels"], "input_rank": cfg["rank"],
                    "dtype_policy": cfg["dtype"]}],
        "negative": False,
        "hand_built": True,
        "weights": "random",
        "tolerance": {"rtol": tol, "atol": tol},
        "notes": " ".join(notes),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=MODELS_DIR)
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    out_dir = args.out.resolve()
    cfgs = CONFIGS
    if args.only:
        unknown = set(args.only) - {c["name"] for c in CONFIGS}
        if unknown:
            ap.error(f"unknown names: {sorted(unknown)}")
        cfgs = [c for c in CONFIGS if c["name"] in args.only]
    models, failures = [], []
    for cfg in cfgs:
        try:
            models.append(generate(cfg, out_dir))
            print(f"ok   {cfg['name']}  tol={models[-1]['tolerance']['atol']}", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[:3]
            failures.append({"route": ROUTE, "name": cfg["name"], "config": config_text(cfg),
                             "exporter": {"name": "onnx.helper (hand-built)", "version": f"onnx {onnx.__version__}"},
                             "frameworks": dict(FRAMEWORKS), "error": "\n".join(msg)[:1000]})
            print(f"FAIL {cfg['name']}: {msg[0] if msg else type(e).__name__}", flush=True)
    if out_dir == MODELS_DIR.resolve():
        if args.only and MANIFEST.exists():
            data = json.loads(MANIFEST.read_text())
            done = {c["name"] for c in cfgs}
            models += [m for m in data["models"] if m.get("generator") == SCRIPT and m["name"] not in done]
            failures += [f for f in data["failures"] if f.get("generator") == SCRIPT and f["name"] not in done]
        update_manifest(SCRIPT, models, failures)
    print(f"{len(models)} models, {len(failures)} failures")


if __name__ == "__main__":
    main()
