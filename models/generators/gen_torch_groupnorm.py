"""Generate ``torch.nn.GroupNorm`` ONNX exports into ``models/torch/``.

Routes (see shared/research/exported-patterns.md, section 5):

* ``torch_groupnorm_ts``: ``torch.onnx.export(module, (x,), dynamo=False, opset_version=13/17/18/21)``,
  static or with ``dynamic_axes``. Pattern ``Reshape(x,[0,G,-1]) -> InstanceNormalization -> Reshape ->
  Mul(gamma[C,1..]) -> Add(beta[C,1..])`` (family ``torch-instancenorm``), at every opset including 21.
* ``torch_groupnorm_dynamo``: ``torch.onnx.export(module, (x,), dynamo=True, opset_version=18/20)``
  (family ``torch-instancenorm``) and ``opset_version=21`` (a native ``GroupNormalization-21``; family
  ``onnx-GroupNormalization-op``).

Architectures (``body``) beyond a bare GroupNorm and the Conv-GN-SiLU-Conv ``block``, small but in the
shape of real models, with dynamic H/W where the model allows and the framework outputs at two input
sizes (``data_sets`` 2, the second odd where the model accepts odd sizes):

* ``audio``: Conv1d -> ``GroupNorm(C, C)`` -> GELU -> LayerNorm(C) over channels (initial ones/zeros) ->
  Linear, an audio feature encoder's first layer (wav2vec2 style) on N x 1 x T;
* ``stdconv``: weight-standardised Convs (weight normalised in ``forward`` and ``reshape_as``'d back, as
  BiT / ResNetV2 do), a padded max-pool and GroupNorms;
* ``res``: a GroupNorm-SiLU-Conv residual block; ``unet``: a small UNet (stride-2 Conv down, nearest 2x
  up, skip Concat, GroupNorm over the concatenation).

Expected outputs are torch's own ``module(x)`` (eval mode, CPU), never onnxruntime's. Every model is
checked with ``onnx.checker.check_model(full_check=True)`` and run with onnxruntime CPU against them.

Rebuild from nothing (Python 3.11.7, ``python3.11`` from pyenv; same venv as gen_keras_torch.py)::

    python3.11 -m venv /opt/venvs/torch
    /opt/venvs/torch/bin/pip install -q -r models/generators/requirements-torch.txt
    # i.e. torch==2.13.0 (the CPU wheel, +cpu) onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0
    #      numpy==2.4.6 keras==3.15.1 (full pin list in the requirements file)
    /opt/venvs/torch/bin/python models/generators/gen_torch_groupnorm.py

Options: ``--out DIR`` (write there and leave the manifest alone), ``--only NAME [NAME ...]``.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

SCRIPT = "gen_torch_groupnorm.py"
SUBDIR = "torch"
PYTHON = ".".join(map(str, sys.version_info[:3]))
FRAMEWORKS = {
    "torch": torch.__version__,
    "onnx": onnx.__version__,
    "onnxscript": onnxscript.__version__,
    "onnxruntime": ort.__version__,
    "numpy": np.__version__,
}
TS = "torch_groupnorm_ts"
DY = "torch_groupnorm_dynamo"
EXPORTER = {TS: "torch.onnx.export(dynamo=False)", DY: "torch.onnx.export(dynamo=True)"}


def C(name, route, opset, *, rank=4, channels=16, groups=4, eps=1e-5, affine=True, dtype="float32",
      body="gn", dyn=(), weights="random", seed=0, spatial=8, sizes=None):
    """body: "gn" (GroupNorm on the input), "block" (Conv-GN-SiLU-Conv) or one of ARCHITECTURES.
    dyn: subset of {"batch","hw"}. sizes: the spatial sizes of the recorded data sets (the first is
    also the trace size); default: one set, at the size the generator picks."""
    return dict(name=name, route=route, opset=opset, rank=rank, channels=channels, groups=groups, eps=eps,
                affine=affine, dtype=dtype, body=body, dyn=tuple(dyn), weights=weights, seed=seed,
                spatial=spatial, sizes=tuple(sizes) if sizes else None)


CONFIGS = [
    # TorchScript exporter
    C("torch_gn_ts_r4_g4_opset13_static", TS, 13, seed=1),
    C("torch_gn_ts_r4_g4_opset17_dynbatchhw", TS, 17, dyn=("batch", "hw"), seed=2),
    C("torch_gn_ts_r4_g1_opset18_dynbatch", TS, 18, groups=1, dyn=("batch",), seed=3),
    C("torch_gn_ts_r4_g16_c16_opset21_static", TS, 21, groups=16, seed=4),
    C("torch_gn_ts_r4_g8_noaffine_opset17_static", TS, 17, groups=8, affine=False, seed=5),
    C("torch_gn_ts_r3_g4_opset17_dynbatchlen", TS, 17, rank=3, dyn=("batch", "hw"), seed=6),
    C("torch_gn_ts_r5_g2_c8_opset18_static", TS, 18, rank=5, channels=8, groups=2, spatial=4, seed=7),
    C("torch_gn_ts_r4_g32_c64_eps1e6_opset21_dynbatchhw", TS, 21, channels=64, groups=32, eps=1e-6,
      dyn=("batch", "hw"), seed=8),
    C("torch_gn_ts_r4_g4_opset17_initial", TS, 17, weights="initial", seed=9),
    C("torch_gn_ts_r4_g4_opset17_float16", TS, 17, dtype="float16", seed=10),
    C("torch_gn_ts_block_c32_g8_opset17_dynbatch", TS, 17, channels=32, groups=8, body="block",
      dyn=("batch",), seed=11),
    # dynamo exporter
    C("torch_gn_dynamo_r4_g4_opset18_static", DY, 18, seed=21),
    C("torch_gn_dynamo_r4_g8_opset20_dynbatchhw", DY, 20, groups=8, dyn=("batch", "hw"), seed=22),
    C("torch_gn_dynamo_r3_g2_c8_noaffine_opset18", DY, 18, rank=3, channels=8, groups=2, affine=False,
      seed=23),
    C("torch_gn_dynamo_r4_g4_opset21_static", DY, 21, seed=24),
    C("torch_gn_dynamo_r4_g16_c16_opset21_dynbatch", DY, 21, groups=16, dyn=("batch",), seed=25),
    C("torch_gn_dynamo_r3_g1_opset21_static", DY, 21, rank=3, groups=1, eps=1e-3, seed=26),
    C("torch_gn_dynamo_r5_g4_c8_opset21_static", DY, 21, rank=5, channels=8, groups=4, spatial=4, seed=27),
    C("torch_gn_dynamo_r4_g4_noaffine_opset21_static", DY, 21, affine=False, seed=28),
    C("torch_gn_dynamo_block_c32_g8_opset21_static", DY, 21, channels=32, groups=8, body="block", seed=29),
    C("torch_gn_dynamo_block_c32_g8_opset18_dynbatchhw", DY, 18, channels=32, groups=8, body="block",
      dyn=("batch", "hw"), seed=30),
    # architectures (issue 12): GroupNorm(C, C) on N x C x T, constants in disguise, dynamic H/W
    C("torch_gn_dynamo_audio_c512_g512_static", DY, 18, rank=3, channels=512, groups=512, body="audio",
      sizes=(400,), seed=41),
    C("torch_gn_dynamo_audio_c512_g512_dynt", DY, 18, rank=3, channels=512, groups=512, body="audio",
      dyn=("hw",), sizes=(400, 333), seed=42),
    C("torch_gn_ts_audio_c512_g512_static", TS, 17, rank=3, channels=512, groups=512, body="audio",
      sizes=(400,), seed=43),
    C("torch_gn_ts_stdconv_c32_g8_opset18_static", TS, 18, channels=32, groups=8, body="stdconv", sizes=(32,), seed=44),
    C("torch_gn_ts_stdconv_c32_g8_opset18_dynhw", TS, 18, channels=32, groups=8, body="stdconv", dyn=("hw",),
      sizes=(32, 27), seed=45),
    C("torch_gn_dynamo_stdconv_c32_g8_static", DY, 18, channels=32, groups=8, body="stdconv", sizes=(32,),
      seed=46),
    C("torch_gn_dynamo_stdconv_c32_g8_dynhw", DY, 18, channels=32, groups=8, body="stdconv", dyn=("hw",),
      sizes=(32, 27), seed=47),
    C("torch_gn_ts_res_c32_g8_dynhw", TS, 17, channels=32, groups=8, body="res", dyn=("hw",), sizes=(16, 11),
      seed=48),
    C("torch_gn_dynamo_res_c32_g8_dynhw", DY, 18, channels=32, groups=8, body="res", dyn=("hw",),
      sizes=(16, 11), seed=49),
    # initial weights: the TorchScript exporter shares the equal gamma/beta as Identity of one initializer
    C("torch_gn_ts_unet_c32_g8_dynhw_initial", TS, 17, channels=32, groups=8, body="unet", dyn=("hw",),
      sizes=(16, 12), weights="initial", seed=50),
    C("torch_gn_dynamo_unet_c32_g8_dynhw", DY, 18, channels=32, groups=8, body="unet", dyn=("hw",),
      sizes=(16, 12), seed=51),
]


def family(cfg):
    return "onnx-GroupNormalization-op" if cfg["route"] == DY and cfg["opset"] >= 21 else "torch-instancenorm"


class Block(torch.nn.Module):
    def __init__(self, rank, c, g, eps, affine):
        super().__init__()
        conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[rank]
        self.conv1 = conv(c, c, 3, padding=1)
        self.gn = torch.nn.GroupNorm(g, c, eps=eps, affine=affine)
        self.act = torch.nn.SiLU()
        self.conv2 = conv(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.gn(self.conv1(x))))


class AudioEncoder(torch.nn.Module):
    """wav2vec2's first feature-encoder layer and feature projection, small: the LayerNorm keeps its
    initial ones/zeros, which the dynamo exporter may share with the InstanceNormalization's."""

    def __init__(self, c, g, eps, affine):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, c, 10, stride=5, bias=False)
        self.gn = torch.nn.GroupNorm(g, c, eps=eps, affine=affine)
        self.norm = torch.nn.LayerNorm(c)
        self.proj = torch.nn.Linear(c, 8)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.gn(self.conv(x)))
        return self.proj(self.norm(h.transpose(1, 2)))


class StdConv2d(torch.nn.Conv2d):
    """timm's StdConv2d: the weight standardised at run time and put back with ``reshape_as``."""

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvBlock(torch.nn.Module):
    """BiT / ResNetV2 stem and one pre-activation unit: StdConv stride 2, a max-pool padded with -inf
    by ``F.pad`` (TorchScript builds the pads from constants), GroupNorm-ReLU-StdConv twice, residual."""

    def __init__(self, c, g, eps, affine):
        super().__init__()
        self.stem = StdConv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.gn1 = torch.nn.GroupNorm(g, c, eps=eps, affine=affine)
        self.conv1 = StdConv2d(c, c, 3, padding=1, bias=False)
        self.gn2 = torch.nn.GroupNorm(g, c, eps=eps, affine=affine)
        self.conv2 = StdConv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        x = torch.nn.functional.pad(self.stem(x), (0, 1, 0, 1), value=float("-inf"))
        x = torch.nn.functional.max_pool2d(x, 3, 2)
        y = self.conv1(torch.relu(self.gn1(x)))
        return x + self.conv2(torch.relu(self.gn2(y)))


class ResBlock(torch.nn.Module):
    """A diffusion-style residual block: (GroupNorm-SiLU-Conv) twice plus the skip."""

    def __init__(self, c, g, eps, affine):
        super().__init__()
        self.gn1 = torch.nn.GroupNorm(g, c, eps=eps, affine=affine)
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.gn2 = torch.nn.GroupNorm(g, c, eps=eps, affine=affine)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(torch.nn.functional.silu(self.gn1(x)))
        return x + self.conv2(torch.nn.functional.silu(self.gn2(h)))


class SmallUNet(torch.nn.Module):
    """Conv in, ResBlock, stride-2 Conv down, ResBlock, nearest 2x up + Conv, skip Concat, GroupNorm over
    2C channels, Conv out. Even H/W only (the skip Concat needs the upsampled size back)."""

    def __init__(self, c, g, eps, affine):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, c, 3, padding=1)
        self.res1 = ResBlock(c, g, eps, affine)
        self.down = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.res2 = ResBlock(c, g, eps, affine)
        self.up = torch.nn.Conv2d(c, c, 3, padding=1)
        self.gn_out = torch.nn.GroupNorm(g, 2 * c, eps=eps, affine=affine)
        self.conv_out = torch.nn.Conv2d(2 * c, 3, 3, padding=1)

    def forward(self, x):
        a = self.res1(self.conv_in(x))
        b = self.res2(self.down(a))
        b = self.up(torch.nn.functional.interpolate(b, scale_factor=2.0, mode="nearest"))
        h = torch.cat([a, b], 1)
        return self.conv_out(torch.nn.functional.silu(self.gn_out(h)))


ARCHITECTURES = {"audio": AudioEncoder, "stdconv": StdConvBlock, "res": ResBlock, "unet": SmallUNet}
#: Input channels of the architectures that do not take C channels in.
IN_CHANNELS = {"audio": 1, "stdconv": 3, "unet": 3}


def build(cfg):
    torch.manual_seed(cfg["seed"])
    c, g = cfg["channels"], cfg["groups"]
    if cfg["body"] == "block":
        mod = Block(cfg["rank"], c, g, cfg["eps"], cfg["affine"])
    elif cfg["body"] in ARCHITECTURES:
        mod = ARCHITECTURES[cfg["body"]](c, g, cfg["eps"], cfg["affine"])
    else:
        mod = torch.nn.GroupNorm(g, c, eps=cfg["eps"], affine=cfg["affine"])
    if cfg["weights"] == "random":
        rng = np.random.default_rng(1000 + cfg["seed"])
        with torch.no_grad():
            for m in mod.modules():
                if isinstance(m, torch.nn.GroupNorm) and m.affine:
                    n = m.num_channels
                    m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype("float32")))
                    m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.5, n).astype("float32")))
    mod.eval()
    if cfg["dtype"] == "float16":
        mod = mod.half()
    return mod


def in_shape(cfg, batch, spatial):
    return (batch, IN_CHANNELS.get(cfg["body"], cfg["channels"])) + (spatial,) * (cfg["rank"] - 2)



def make_input(cfg, batch, spatial, seed):
    rng = np.random.default_rng(seed)
    # a non-zero mean per sample/channel, so the normalisation has something to remove
    x = rng.normal(0.5, 1.5, in_shape(cfg, batch, spatial))
    return x.astype(cfg["dtype"])


def export(cfg, mod, x_trace, path):
    spatial_axes = list(range(2, cfg["rank"]))
    names = ["h", "w", "d"]
    if cfg["route"] == TS:
        kw = {}
        if cfg["dyn"]:
            axes = {}
            if "batch" in cfg["dyn"]:
                axes[0] = "batch"
            if "hw" in cfg["dyn"]:
                for i, a in enumerate(spatial_axes):
                    axes[a] = names[i]
            kw["dynamic_axes"] = {"x": axes, "y": dict(axes)}
        torch.onnx.export(mod, (torch.from_numpy(x_trace),), str(path), dynamo=False,
                          opset_version=cfg["opset"], input_names=["x"], output_names=["y"],
                          do_constant_folding=True, **kw)
    else:
        kw = {}
        if cfg["dyn"]:
            Dim = torch.export.Dim
            axes = {}
            if "batch" in cfg["dyn"]:
                axes[0] = Dim("batch", min=1, max=64)
            if "hw" in cfg["dyn"]:
                for i, a in enumerate(spatial_axes):
                    # the UNet's skip Concat needs even sizes; the audio Conv1d needs 10 samples
                    axes[a] = 2 * Dim(names[i], min=2, max=128) if cfg["body"] == "unet" else \
                        Dim(names[i], min=16 if cfg["body"] == "audio" else 2, max=100_000)
            kw["dynamic_shapes"] = (axes,)
        prog = torch.onnx.export(mod, (torch.from_numpy(x_trace),), dynamo=True, opset_version=cfg["opset"],
                                 input_names=["x"], output_names=["y"], **kw)
        prog.save(str(path))


def check_pattern(cfg, m):
    ops = {n.op_type for n in m.graph.node}
    want = "GroupNormalization" if family(cfg) == "onnx-GroupNormalization-op" else "InstanceNormalization"
    if want not in ops:
        raise RuntimeError(f"expected a {want} node, got ops {sorted(ops)}")


CONFIG_KEYS = ("rank", "channels", "groups", "eps", "affine", "dtype", "body", "dyn", "opset", "weights", "sizes")


def generate(cfg, out_dir):
    name = cfg["name"]
    mod = build(cfg)
    sizes = cfg["sizes"]
    trace_batch = 1 if sizes else 2  # the architectures: batch 1, as deployed
    x_trace = make_input(cfg, trace_batch, sizes[0] if sizes else cfg["spatial"], 10_000 + cfg["seed"])
    batch = 3 if "batch" in cfg["dyn"] else trace_batch
    spatial = 12 if "hw" in cfg["dyn"] else cfg["spatial"]
    if cfg["rank"] == 5 and "hw" in cfg["dyn"]:
        spatial = 6
    if sizes:
        spatial = sizes[0]
    x = make_input(cfg, batch, spatial, 20_000 + cfg["seed"])

    path = out_dir / SUBDIR / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = pathlib.Path(td) / "m.onnx"
        export(cfg, mod, x_trace, tmp)
        m = onnx.load(str(tmp))
        onnx.save(m, str(path))
    check_pattern(cfg, m)
    onnx.checker.check_model(m, full_check=True)

    sets = []
    for k, size in enumerate(sizes or (spatial,)):
        xs = x if k == 0 else make_input(cfg, batch, size, 30_000 + 100 * k + cfg["seed"])
        with torch.no_grad():
            ys = mod(torch.from_numpy(xs)).numpy()
        ys, tol_k, err_k, kind = common.check_against_reference(path, m, xs, ys, "torch")
        sets.append((xs, ys, tol_k, err_k))
    tol, maxerr = max(t for *_, t, _ in sets), max(e for *_, e in sets)
    (x, y, *_), more = sets[0], sets[1:]
    common.save_npz(path.with_suffix(".npz"), [x], [y], [([xs], [ys]) for xs, ys, *_ in more])

    layers = [common.layer_record(groups=gn.num_groups, axis=1, epsilon=gn.eps, center=gn.affine, scale=gn.affine,
                                  channels=gn.num_channels, input_rank=cfg["rank"], dtype_policy=cfg["dtype"])
              for gn in mod.modules() if isinstance(gn, torch.nn.GroupNorm)]
    notes = [f"config: {common.config_text(cfg, CONFIG_KEYS)}.",
             f"torch.nn.GroupNorm (channels-first, axis 1; center=scale=affine); expected output = torch "
             f"module(x) in eval mode on CPU; ORT CPU max abs err {maxerr:.3g}; tolerance (rtol=atol) = "
             f"tightest of the {kind} ladder {common.TOL_LADDER[kind]} passing with 3x margin (the floor leaves "
             f"room for a fused GN's different rounding)."]
    if cfg["dyn"]:
        notes.append(f"dynamic dims {list(cfg['dyn'])}; traced with batch 2 spatial {cfg['spatial']}, test "
                     f"data uses batch {batch} spatial {spatial}.")
    if cfg["body"] == "block":
        notes.append("block: Conv-GroupNorm-SiLU-Conv (3x3, padding 1).")
    if cfg["body"] in ARCHITECTURES:
        notes.append(f"{cfg['body']}: {ARCHITECTURES[cfg['body']].__doc__.split(chr(10))[0]}")
    if len(sets) > 1:
        notes.append(f"data sets at input shapes {[list(xs.shape) for xs, *_ in sets]} (npz set0 = in_0/out_0, "
                     f"set1 = set1_in_0/set1_out_0); the tolerance is the largest the sets need.")
    if cfg["dtype"] == "float16":
        notes.append("module.half(): float16 input, GN run in float16 by torch (CPU) and by ORT.")
    if cfg["weights"] == "initial":
        notes.append("GroupNorm weight/bias left at torch's initial ones/zeros.")
    if not cfg["affine"]:
        notes.append("affine=False (no weight/bias parameters).")
    if family(cfg) == "onnx-GroupNormalization-op":
        notes.append("dynamo opset 21 emits a native GroupNormalization-21 node (per-channel scale/bias).")
    entry = common.manifest_entry(
        name=name, subdir=SUBDIR, route=cfg["route"], family=family(cfg),
        exporter={"name": EXPORTER[cfg["route"]], "version": f"torch {torch.__version__}"},
        frameworks=dict(FRAMEWORKS), python=PYTHON, opset=common.default_opset(m), dtype_policy=cfg["dtype"],
        inputs=common.io_json(m.graph.input), outputs=common.io_json(m.graph.output), layers=layers,
        negative=False, weights=cfg["weights"], tolerance={"rtol": tol, "atol": tol}, notes=notes)
    if len(sets) > 1:
        entry["data_sets"] = len(sets)
    if cfg["body"] == "stdconv":
        entry["ops_outside_group_norms"] = ["ReduceMean"]  # the weight standardisation's, not a GroupNorm's
    return entry


def main(argv=None):
    by_name = {c["name"]: c for c in CONFIGS}

    def failure(name, e):
        cfg = by_name[name]
        return common.failure_entry(
            route=cfg["route"], name=name, config=common.config_text(cfg, CONFIG_KEYS),
            exporter={"name": EXPORTER[cfg["route"]], "version": f"torch {torch.__version__}"},
            frameworks=dict(FRAMEWORKS), error="\n".join(common.exception_lines(e))[:1000])

    return common.run_generator(SCRIPT, list(by_name), lambda name, idx, out_dir: generate(by_name[name], out_dir),
                                failure, subdir_of=lambda name: SUBDIR, argv=argv,
                                description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
