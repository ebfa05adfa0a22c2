"""Generate Keras 3 (torch backend) GroupNormalization ONNX exports into ``models/keras_torch/``.

Routes (see shared/research/exported-patterns.md, section 3):

* ``keras_export_torch_torchscript``: ``model.export(p, format="onnx")`` with the default signature
  (batch is always ``None`` there, so Keras takes the TorchScript exporter with ``dynamic_axes``).
* ``keras_export_torch_dynamo``: ``model.export`` with a fully static
  ``input_signature=[keras.InputSpec(shape=...)]`` (Keras then takes ``torch.onnx.export(dynamo=True)``
  + ``optimize()``; if that raises, Keras silently falls back to TorchScript: this script checks the
  exported graph and refuses a fallback graph).
* ``torch_onnx_export_keras_ts``: ``torch.onnx.export(keras_model, (x,), dynamo=False, ...)`` with and
  without ``dynamic_axes``.
* ``torch_onnx_export_keras_dynamo``: ``torch.onnx.export(keras_model, (x,), dynamo=True, ...)`` with
  and without ``dynamic_shapes`` (an extra tuple level, because Keras models take ``*args``).

Expected outputs are Keras' own ``model(x, training=False)`` (torch backend, CPU), never onnxruntime's.
Every model is checked with ``onnx.checker.check_model(full_check=True)`` and run with onnxruntime CPU
against those outputs before it is recorded.

Rebuild from nothing (Python 3.11.7, ``python3.11`` from pyenv)::

    python3.11 -m venv /opt/venvs/torch
    /opt/venvs/torch/bin/pip install -q -r models/generators/requirements-torch.txt
    # i.e. torch==2.13.0 (the CPU wheel, +cpu) keras==3.15.1 onnx==1.23.2 onnxscript==0.7.2
    #      onnxruntime==1.32.0 numpy==2.4.6 (full pin list in the requirements file)
    KERAS_BACKEND=torch /opt/venvs/torch/bin/python models/generators/gen_keras_torch.py

Options: ``--out DIR`` (write there and leave the manifest alone), ``--only NAME [NAME ...]``.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import warnings

os.environ["KERAS_BACKEND"] = "torch"

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import keras  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

SCRIPT = "gen_keras_torch.py"
SUBDIR = "keras_torch"
PYTHON = ".".join(map(str, sys.version_info[:3]))
FRAMEWORKS = {
    "keras": keras.__version__,
    "torch": torch.__version__,
    "onnx": onnx.__version__,
    "onnxscript": onnxscript.__version__,
    "onnxruntime": ort.__version__,
    "numpy": np.__version__,
}

ROUTE_FAMILY = {
    "keras_export_torch_torchscript": "keras-torch-torchscript",
    "keras_export_torch_dynamo": "keras-torch-dynamo",
    "torch_onnx_export_keras_ts": "keras-torch-torchscript",
    "torch_onnx_export_keras_dynamo": "keras-torch-dynamo",
}
EXPORTER = {
    "keras_export_torch_torchscript": "keras.Model.export(format='onnx') -> torch.onnx.export(dynamo=False)",
    "keras_export_torch_dynamo": "keras.Model.export(format='onnx', static input_signature) -> torch.onnx.export(dynamo=True)",
    "torch_onnx_export_keras_ts": "torch.onnx.export(dynamo=False)",
    "torch_onnx_export_keras_dynamo": "torch.onnx.export(dynamo=True)",
}


def C(name, route, *, rank=4, fmt="channels_last", channels=16, groups=4, eps=1e-3, center=True,
      scale=True, policy="float32", body="conv", dyn=(), opset=None, weights="random", seed=0,
      negative=None, spatial=8, notes="", sizes=None):
    """One model configuration.

    body: "conv" (Conv -> GN), "plain" (GN on the input), "dense" (rank 2: Dense -> GN),
          "block" (Conv-GN-swish-Conv-GN-swish + residual Add, then a final GN),
          "unet" (Conv, GN, stride-2 Conv, GN, 2x UpSampling + Conv, skip Concat, GN over 2C; even H/W),
          "lnx" (RWKV-7 ln_x: GN on the (B*T, C) view of a (B, T, H, N) input, reshaped back to (B, T, C)),
          "layernorm" / "batchnorm" (negatives: Conv -> LayerNormalization / BatchNormalization).
    dyn:  which dims are dynamic in the export: subset of {"batch", "hw"}.
    sizes: spatial sizes of the recorded data sets (several for a dynamic H/W; default: one, 12 or static).
    """
    return dict(name=name, route=route, rank=rank, fmt=fmt, channels=channels, groups=groups, eps=eps,
                center=center, scale=scale, policy=policy, body=body, dyn=tuple(dyn), opset=opset,
                weights=weights, seed=seed, negative=negative, spatial=spatial, notes=notes,
                sizes=tuple(sizes) if sizes else None)


KT = "keras_export_torch_torchscript"
KD = "keras_export_torch_dynamo"
TT = "torch_onnx_export_keras_ts"
TD = "torch_onnx_export_keras_dynamo"

CONFIGS = [
    # --- model.export, default signature -> TorchScript (dynamic batch always) ---
    C("keras_torch_export_ts_nhwc_r4_g4", KT, seed=1),
    C("keras_torch_export_ts_nhwc_r4_g1_eps1e5", KT, groups=1, eps=1e-5, seed=2),
    C("keras_torch_export_ts_nchw_r4_g4", KT, fmt="channels_first", seed=3),
    C("keras_torch_export_ts_nhwc_r3_g2", KT, rank=3, groups=2, channels=8, seed=4),
    C("keras_torch_export_ts_r2_g4_dense", KT, rank=2, body="dense", seed=5),
    C("keras_torch_export_ts_nhwc_r4_g32_c64_eps1e6", KT, channels=64, groups=32, eps=1e-6, seed=6),
    C("keras_torch_export_ts_nhwc_r4_gm1_c8", KT, channels=8, groups=-1, seed=7),
    C("keras_torch_export_ts_nhwc_r4_g4_dynhw", KT, dyn=("hw",), seed=8),
    C("keras_torch_export_ts_nchw_r4_g4_dynhw", KT, fmt="channels_first", dyn=("hw",), seed=20),
    C("keras_torch_export_ts_nhwc_r4_g4_nocenter", KT, center=False, seed=9),
    C("keras_torch_export_ts_nchw_r4_g8_noscale", KT, fmt="channels_first", groups=8, scale=False, seed=10),
    C("keras_torch_export_ts_nhwc_r4_g4_opset17", KT, opset=17, seed=11),
    C("keras_torch_export_ts_nhwc_r4_g4_opset18", KT, opset=18, seed=12),
    C("keras_torch_export_ts_nhwc_r4_g4_float16", KT, policy="float16", seed=13),
    C("keras_torch_export_ts_nhwc_r4_g4_mixed16", KT, policy="mixed_float16", seed=14),
    C("keras_torch_export_ts_nhwc_r4_block_c32_g8", KT, body="block", channels=32, groups=8, seed=15),
    C("keras_torch_export_ts_nhwc_r4_g4_initial", KT, weights="initial", seed=16),
    C("keras_torch_export_ts_nhwc_r5_conv3d_g4", KT, rank=5, channels=8, groups=4, spatial=4, seed=17),
    C("keras_torch_export_ts_nhwc_r5_plain_g4", KT, rank=5, body="plain", channels=8, groups=4, spatial=4,
      seed=18),
    C("keras_torch_export_ts_layernorm_neg", KT, body="layernorm", negative="layernorm", seed=19),
    # --- model.export, fully static input_signature -> dynamo ---
    C("keras_torch_export_dynamo_nhwc_r4_g4", KD, seed=21),
    C("keras_torch_export_dynamo_nchw_r4_g2_eps1e5", KD, fmt="channels_first", groups=2, eps=1e-5, seed=22),
    C("keras_torch_export_dynamo_nhwc_r3_g4", KD, rank=3, seed=23),
    C("keras_torch_export_dynamo_r2_gm1_c8_dense", KD, rank=2, body="dense", channels=8, groups=-1, seed=24),
    C("keras_torch_export_dynamo_nhwc_r5_conv3d_g2", KD, rank=5, channels=8, groups=2, spatial=4, seed=25),
    C("keras_torch_export_dynamo_nchw_r5_conv3d_g4", KD, rank=5, fmt="channels_first", channels=8, groups=4,
      spatial=4, seed=26),
    C("keras_torch_export_dynamo_nhwc_r4_g32_c64_opset18", KD, channels=64, groups=32, opset=18, seed=27),
    C("keras_torch_export_dynamo_nhwc_r4_g4_opset21", KD, opset=21, eps=1e-6, seed=28),
    C("keras_torch_export_dynamo_nhwc_r4_g4_noscale_nocenter", KD, center=False, scale=False, seed=29),
    C("keras_torch_export_dynamo_nhwc_r4_g4_float16", KD, policy="float16", seed=30),
    C("keras_torch_export_dynamo_nchw_r4_g4_mixed16", KD, fmt="channels_first", policy="mixed_float16",
      seed=31),
    C("keras_torch_export_dynamo_nhwc_r4_block_c32_g8_initial", KD, body="block", channels=32, groups=8,
      weights="initial", seed=32),
    C("keras_torch_export_dynamo_layernorm_neg", KD, body="layernorm", negative="layernorm", seed=33),
    C("keras_torch_export_dynamo_batchnorm_neg", KD, body="batchnorm", negative="batchnorm", seed=34),
    # --- direct torch.onnx.export(dynamo=False) ---
    C("torch_export_keras_ts_nhwc_r4_g4_opset17_static", TT, opset=17, seed=41),
    C("torch_export_keras_ts_nhwc_r4_g4_opset17_dynbatchhw", TT, opset=17, dyn=("batch", "hw"), seed=42),
    C("torch_export_keras_ts_nchw_r4_g8_opset18_dynbatch", TT, fmt="channels_first", groups=8, opset=18,
      dyn=("batch",), seed=43),
    C("torch_export_keras_ts_nhwc_r4_g4_opset20_static", TT, opset=20, eps=1e-5, seed=44),
    C("torch_export_keras_ts_nhwc_r5_conv3d_g4_opset17", TT, rank=5, channels=8, groups=4, spatial=4,
      opset=17, seed=45),
    C("torch_export_keras_ts_batchnorm_neg_opset17", TT, body="batchnorm", negative="batchnorm", opset=17,
      seed=46),
    # --- direct torch.onnx.export(dynamo=True) ---
    C("torch_export_keras_dynamo_nhwc_r4_g4_static", TD, opset=18, seed=51),
    C("torch_export_keras_dynamo_nhwc_r4_g4_dynbatchhw", TD, opset=18, dyn=("batch", "hw"), seed=52),
    C("torch_export_keras_dynamo_nchw_r4_g4_dynbatch_opset20", TD, fmt="channels_first", opset=20,
      dyn=("batch",), seed=53),
    C("torch_export_keras_dynamo_ncw_r3_g2_dynbatchlen", TD, rank=3, fmt="channels_first", groups=2,
      channels=8, opset=18, dyn=("batch", "hw"), seed=55),
    C("torch_export_keras_dynamo_nhwc_r4_g16_c64_opset21", TD, channels=64, groups=16, opset=21, seed=54),
    # --- a small UNet with dynamic H/W (issue 12): Reshape targets computed from the input's shape ---
    C("torch_export_keras_dynamo_nhwc_unet_c32_g8_dynhw", TD, body="unet", channels=32, groups=8, opset=18,
      dyn=("hw",), spatial=16, sizes=(16, 12), seed=56),
    C("torch_export_keras_ts_nhwc_unet_c32_g8_dynhw", TT, body="unet", channels=32, groups=8, opset=18,
      dyn=("hw",), spatial=16, sizes=(16, 12), seed=57),
    # --- RWKV-7 ln_x: GN on the (B*T, C) view of (B, T, H, N); the exporter merges the reshapes around it ---
    C("torch_export_keras_dynamo_lnx_rows_g4_c256", TD, rank=2, body="lnx", channels=256, groups=4, eps=64e-5,
      opset=18, seed=58),
]


# --------------------------------------------------------------------------------------------
def feature_shape(cfg, spatial=None):
    """Input shape without batch (spatial=None: static spatial size from cfg)."""
    s = cfg["spatial"] if spatial is None else spatial
    if cfg["body"] == "lnx":
        return (16, cfg["groups"], cfg["channels"] // cfg["groups"])  # (T, H, N)
    r, c = cfg["rank"], cfg["channels"] if cfg["body"] != "unet" else 3
    if r == 2:
        return (c,)
    sp = (s,) * (r - 2)
    return sp + (c,) if cfg["fmt"] == "channels_last" else (c,) + sp


def build_model(cfg):
    keras.utils.set_random_seed(cfg["seed"])
    keras.config.set_dtype_policy(cfg["policy"])
    try:
        r, c, fmt = cfg["rank"], cfg["channels"], cfg["fmt"]
        axis = -1 if fmt == "channels_last" else 1
        shape = feature_shape(cfg)
        if "hw" in cfg["dyn"]:
            shape = tuple(None if i != (len(shape) - 1 if fmt == "channels_last" else 0) else d
                          for i, d in enumerate(shape))
        inp = keras.Input(shape=shape, name="x")  # fixed name: stable graph input names across runs
        conv = {3: keras.layers.Conv1D, 4: keras.layers.Conv2D, 5: keras.layers.Conv3D}.get(r)

        def gn(name):
            return keras.layers.GroupNormalization(groups=cfg["groups"], axis=axis, epsilon=cfg["eps"],
                                                   center=cfg["center"], scale=cfg["scale"], name=name)

        body = cfg["body"]
        if body == "dense":
            y = gn("gn_0")(keras.layers.Dense(c, name="dense")(inp))
        elif body == "plain":
            y = gn("gn_0")(inp)
        elif body == "conv":
            y = gn("gn_0")(conv(c, 3, padding="same", data_format=fmt, name="conv")(inp))
        elif body == "block":
            h = conv(c, 3, padding="same", data_format=fmt, name="conv_in")(inp)
            skip = h
            h = keras.layers.Activation("swish")(gn("gn_0")(h))
            h = conv(c, 3, padding="same", data_format=fmt, name="conv_1")(h)
            h = keras.layers.Activation("swish")(gn("gn_1")(h))
            h = conv(c, 3, padding="same", data_format=fmt, name="conv_2")(h)
            h = keras.layers.Add()([h, skip])
            y = gn("gn_2")(h)
        elif body == "lnx":
            rows = keras.ops.reshape(inp, (-1, c))
            y = keras.ops.reshape(gn("gn_0")(rows), (-1, shape[0], c))
        elif body == "unet":
            a = conv(c, 3, padding="same", data_format=fmt, name="conv_in")(inp)
            h = keras.layers.Activation("swish")(gn("gn_0")(a))
            h = conv(c, 3, strides=2, padding="same", data_format=fmt, name="down")(h)
            h = keras.layers.Activation("swish")(gn("gn_1")(h))
            h = keras.layers.UpSampling2D(2, data_format=fmt, name="up")(h)
            h = conv(c, 3, padding="same", data_format=fmt, name="conv_up")(h)
            h = keras.layers.Concatenate(axis=axis, name="skip")([a, h])
            h = keras.layers.Activation("swish")(gn("gn_2")(h))
            y = conv(3, 3, padding="same", data_format=fmt, name="conv_out")(h)
        elif body == "layernorm":
            y = keras.layers.LayerNormalization(axis=-1, epsilon=cfg["eps"], name="ln")(
                conv(c, 3, padding="same", data_format=fmt, name="conv")(inp))
        elif body == "batchnorm":
            y = keras.layers.BatchNormalization(axis=axis, epsilon=cfg["eps"], name="bn")(
                conv(c, 3, padding="same", data_format=fmt, name="conv")(inp))
        else:
            raise ValueError(body)
        model = keras.Model(inp, y, name=cfg["name"])
    finally:
        keras.config.set_dtype_policy("float32")
    return model


def gn_layers(model):
    return [l for l in model.layers if isinstance(l, keras.layers.GroupNormalization)]


def randomize_weights(model, seed):
    """Seeded random gamma/beta/biases/BN statistics (kernels keep Keras' seeded initialisers)."""
    rng = np.random.default_rng(1000 + seed)
    for layer in model.layers:
        for v in layer.weights:
            n = v.path.split("/")[-1]
            shp = tuple(v.shape)
            if n == "gamma":
                val = rng.uniform(0.5, 1.5, shp)
            elif n == "beta":
                val = rng.normal(0.0, 0.5, shp)
            elif n == "bias":
                val = rng.normal(0.0, 0.2, shp)
            elif n == "moving_mean":
                val = rng.normal(0.0, 0.3, shp)
            elif n == "moving_variance":
                val = rng.uniform(0.5, 2.0, shp)
            else:
                continue
            v.assign(np.asarray(val).astype(v.dtype))


def make_input(cfg, batch, spatial, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (batch,) + feature_shape(cfg, spatial)).astype("float32")


def hw_axes(cfg):
    r = cfg["rank"]
    if r == 2:
        return []
    return list(range(1, r - 1)) if cfg["fmt"] == "channels_last" else list(range(2, r))


def export(cfg, model, x_trace, path):
    route, opset = cfg["route"], cfg["opset"]
    if route == KT:
        kw = {} if opset is None else {"opset_version": opset}
        model.export(str(path), format="onnx", verbose=False, **kw)
    elif route == KD:
        kw = {} if opset is None else {"opset_version": opset}
        model.export(str(path), format="onnx", verbose=False,
                     input_signature=[keras.InputSpec(shape=x_trace.shape)], **kw)
    elif route == TT:
        model.eval()
        kw = {}
        if cfg["dyn"]:
            axes = {}
            if "batch" in cfg["dyn"]:
                axes[0] = "batch"
            if "hw" in cfg["dyn"]:
                for i, a in enumerate(hw_axes(cfg)):
                    axes[a] = "hw"[i] if i < 2 else f"s{i}"
            kw["dynamic_axes"] = {"x": axes, "y": dict(axes)}
        torch.onnx.export(model, (torch.from_numpy(x_trace),), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], do_constant_folding=True, **kw)
    elif route == TD:
        model.eval()
        kw = {}
        if cfg["dyn"]:
            Dim = torch.export.Dim
            axes = {}
            if "batch" in cfg["dyn"]:
                axes[0] = Dim("batch", min=1, max=64)
            if "hw" in cfg["dyn"]:
                for i, a in enumerate(hw_axes(cfg)):
                    name = "hw"[i] if i < 2 else f"s{i}"
                    # the UNet's skip Concat needs even sizes: declare them so
                    axes[a] = 2 * Dim(name + name, min=2, max=128) if cfg["body"] == "unet" else Dim(name, min=2, max=256)
            kw["dynamic_shapes"] = ((axes,),)  # Keras' forward takes *args: one more tuple level
        prog = torch.onnx.export(model, (torch.from_numpy(x_trace),), dynamo=True, opset_version=opset,
                                 input_names=["x"], output_names=["y"], **kw)
        prog.save(str(path))
    else:
        raise ValueError(route)


def check_exporter_path(cfg, m):
    """Refuse a graph that did not come from the exporter the route names (Keras falls back silently)."""
    if cfg["negative"]:
        return
    reshape_allowzero = [a.i for n in m.graph.node if n.op_type == "Reshape" for a in n.attribute
                         if a.name == "allowzero"]
    ops = {n.op_type for n in m.graph.node}
    # dynamo writes allowzero=1 on Keras' dynamic reshapes (TorchScript never writes it; a dynamic-shape graph
    # also has scalar index Reshapes with allowzero=0) and names every node "node_<op>" (TorchScript: "/<op>")
    dynamo_names = all(n.name.startswith("node_") for n in m.graph.node)
    is_dynamo = (any(reshape_allowzero) or dynamo_names) and "Pow" in ops
    want_dynamo = cfg["route"] in (KD, TD)
    if is_dynamo != want_dynamo:
        raise RuntimeError(f"graph does not look like the {'dynamo' if want_dynamo else 'TorchScript'} "
                           f"exporter's output (ops={sorted(ops)}, Reshape allowzero={reshape_allowzero})")


CONFIG_KEYS = ("rank", "fmt", "channels", "groups", "eps", "center", "scale", "policy", "body", "dyn", "opset",
               "weights", "sizes")


def generate(cfg, out_dir):
    name = cfg["name"]
    model = build_model(cfg)
    if cfg["weights"] == "random":
        randomize_weights(model, cfg["seed"])
    model.eval()
    static_batch = 2
    x_trace = make_input(cfg, static_batch, None, 10_000 + cfg["seed"])
    # TorchScript export via model.export always has a dynamic batch; test data then uses batch 3, and a
    # different spatial size when H/W are dynamic, so the .npz exercises the dynamic dims.
    dyn_batch = cfg["route"] == KT or "batch" in cfg["dyn"]
    batch = 3 if dyn_batch else static_batch
    spatial = 12 if "hw" in cfg["dyn"] else None
    sizes = cfg["sizes"] or (spatial,)
    x = make_input(cfg, batch, sizes[0], 20_000 + cfg["seed"])
    model(x_trace, training=False)  # a functional model must have been called before export

    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = pathlib.Path(td) / "m.onnx"
        export(cfg, model, x_trace, tmp)
        m = onnx.load(str(tmp))  # external data (if any) is folded back into the single file below
        onnx.save(m, str(path))
    check_exporter_path(cfg, m)
    onnx.checker.check_model(m, full_check=True)

    sets = []
    for k, size in enumerate(sizes):
        xs = x if k == 0 else make_input(cfg, batch, size, 30_000 + 100 * k + cfg["seed"])
        ys = keras.ops.convert_to_numpy(model(xs, training=False))
        ys, tol_k, err_k, kind = common.check_against_reference(path, m, xs, ys, "Keras")
        sets.append((xs, ys, tol_k, err_k))
    tol, maxerr = max(t for *_, t, _ in sets), max(e for *_, e in sets)
    (x, y, *_), more = sets[0], sets[1:]
    common.save_npz(path.with_suffix(".npz"), [x], [y], [([xs], [ys]) for xs, ys, *_ in more])

    # groups as configured (-1 kept; Keras resolves it to C)
    layers = [common.layer_record(groups=cfg["groups"], axis=1 if cfg["fmt"] == "channels_first" else -1,
                                  epsilon=l.epsilon, center=l.center, scale=l.scale,
                                  channels=int(l.input.shape[1 if cfg["fmt"] == "channels_first" else -1]),
                                  input_rank=cfg["rank"], dtype_policy=cfg["policy"])
              for l in gn_layers(model)]
    neg = cfg["negative"]
    notes = [f"config: {common.config_text(cfg, CONFIG_KEYS)}.",
             f"Keras model(x, training=False) on CPU gives the expected output; ORT CPU max abs err "
             f"{maxerr:.3g}; tolerance (rtol=atol) = tightest of the {kind} ladder "
             f"{common.TOL_LADDER[kind]} that passes with 3x margin (the floor leaves room for a fused GN's "
             f"different variance rounding)."]
    if cfg["route"] == KT:
        notes.append("model.export default signature: batch dim exported dynamic ('batch'), traced with "
                     "batch 1; test data uses batch 3.")
    if "hw" in cfg["dyn"]:
        notes.append("spatial dims dynamic; test data uses spatial 12 (traced with 8 or 1).")
    if cfg["body"] == "block":
        notes.append("block: Conv-GN-swish-Conv-GN-swish-Conv + residual Add (from first conv) -> GN; 3 GN layers.")
    if cfg["body"] == "unet":
        notes.append("unet: Conv-GN-swish, stride-2 Conv-GN-swish, 2x UpSampling2D + Conv, skip Concatenate, GN over "
                     "2C, Conv to 3 channels; 3 GN layers; H/W declared even (2*hh, 2*ww) for dynamo.")
    if len(sets) > 1:
        notes.append(f"data sets at input shapes {[list(xs.shape) for xs, *_ in sets]} (npz set0 = in_0/out_0, "
                     f"set1 = set1_in_0/set1_out_0); the tolerance is the largest the sets need.")
    if cfg["weights"] == "initial":
        notes.append("weights left at Keras initial values (gamma=1, beta=0, conv bias=0; kernels seeded).")
    if cfg["opset"] == 21 and cfg["route"] in (KD, TD):
        notes.append("opset 21 asked: Keras never calls torch.group_norm, so still the decomposed pattern.")
    if neg == "layernorm":
        notes.append("negative: keras LayerNormalization(axis=-1); not a GroupNormalization.")
    if neg == "batchnorm":
        notes.append("negative: keras BatchNormalization (inference, random moving stats); not a GroupNormalization.")
    if cfg["notes"]:
        notes.append(cfg["notes"])
    entry = common.manifest_entry(
        name=name, subdir=SUBDIR, route=cfg["route"], family="negative" if neg else ROUTE_FAMILY[cfg["route"]],
        exporter={"name": EXPORTER[cfg["route"]],
                  "version": f"torch {torch.__version__}" + (f", keras {keras.__version__}"
                                                             if cfg["route"] in (KT, KD) else "")},
        frameworks=dict(FRAMEWORKS), python=PYTHON, opset=common.default_opset(m), dtype_policy=cfg["policy"],
        inputs=common.io_json(m.graph.input), outputs=common.io_json(m.graph.output), layers=layers, negative=neg,
        weights=cfg["weights"], tolerance={"rtol": tol, "atol": tol}, notes=notes)
    if len(sets) > 1:
        entry["data_sets"] = len(sets)
    if cfg["body"] == "unet":
        entry["ops_outside_group_norms"] = ["Expand", "Where"]  # UpSampling2D's, not a GroupNorm's
    return entry


def main(argv=None):
    by_name = {c["name"]: c for c in CONFIGS}

    def failure(name, e):
        cfg = by_name[name]
        return common.failure_entry(
            route=cfg["route"], name=name, config=common.config_text(cfg, CONFIG_KEYS),
            exporter={"name": EXPORTER[cfg["route"]], "version": f"torch {torch.__version__}, keras {keras.__version__}"},
            frameworks=dict(FRAMEWORKS), error="\n".join(common.exception_lines(e))[:1000])

    return common.run_generator(SCRIPT, list(by_name), lambda name, idx, out_dir: generate(by_name[name], out_dir),
                                failure, subdir_of=lambda name: SUBDIR, argv=argv,
                                description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
