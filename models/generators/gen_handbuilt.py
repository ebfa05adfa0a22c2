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

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

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


CONFIG_KEYS = ("opset", "rank", "channels", "groups", "eps", "dtype", "stash_type", "dyn_batch")


def generate(cfg, out_dir):
    name = cfg["name"]
    model, scale, bias = build(cfg)
    notes = [f"config: {common.config_text(cfg, CONFIG_KEYS)}."]
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
    y, tol, maxerr, kind = common.check_against_reference(path, model, x, y, "NumPy spec")
    notes.append(f"ORT CPU max abs err {maxerr:.3g}; tolerance (rtol=atol) = tightest of the {kind} ladder "
                 f"{common.TOL_LADDER[kind]} passing with 3x margin.")
    common.save_npz(path.with_suffix(".npz"), [x], [y])
    return common.manifest_entry(
        name=name, subdir=SUBDIR, route=ROUTE, family="onnx-GroupNormalization-op",
        exporter={"name": "onnx.helper (hand-built, gen_handbuilt.py)", "version": f"onnx {onnx.__version__}"},
        frameworks=dict(FRAMEWORKS), python=PYTHON, opset=cfg["opset"], dtype_policy=cfg["dtype"],
        inputs=common.io_json(model.graph.input), outputs=common.io_json(model.graph.output),
        layers=[common.layer_record(groups=cfg["groups"], axis=1, epsilon=cfg["eps"], center=True, scale=True,
                                    channels=cfg["channels"], input_rank=cfg["rank"], dtype_policy=cfg["dtype"])],
        negative=False, hand_built=True, weights="random", tolerance={"rtol": tol, "atol": tol}, notes=notes)


def main(argv=None):
    by_name = {c["name"]: c for c in CONFIGS}

    def failure(name, e):
        cfg = by_name[name]
        return common.failure_entry(
            route=ROUTE, name=name, config=common.config_text(cfg, CONFIG_KEYS),
            exporter={"name": "onnx.helper (hand-built)", "version": f"onnx {onnx.__version__}"},
            frameworks=dict(FRAMEWORKS), error="\n".join(common.exception_lines(e))[:1000])

    return common.run_generator(SCRIPT, list(by_name), lambda name, idx, out_dir: generate(by_name[name], out_dir),
                                failure, subdir_of=lambda name: SUBDIR, argv=argv,
                                description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
