"""Real-size torch models with seeded random weights, exported by torch.onnx (TorchScript and dynamo).

Run in /opt/venvs/bench-torch (see README.md): ``python benchmarks/realsize/make_torch_models.py
[--only NAME ..] [--force]``. Nothing is downloaded: every model is constructed from its config.

* ``sd_vae_decoder`` / ``sd_vae_encoder``: diffusers ``AutoencoderKL`` with Stable Diffusion's VAE
  config (block_out_channels 128/256/512/512, 2 layers per block: 30 / 22 GroupNorms; the class'
  own default config is a one-block toy). Decoder = ``post_quant_conv`` + ``decoder`` on a latent
  1x4x32x32 (256x256 image), encoder = ``encoder`` + ``quant_conv`` on 1x3x256x256: SD's 64x64
  latent takes ~10 s a run on 2 cores, too slow to time in pairs.
* ``unet2d``: diffusers ``UNet2DModel``, a small config with attention, sample 1x3x64x64, timestep.
* ``resnet50_gn``: ResNet-50 (bottleneck 3/4/6/3) written out with torch layers, every BatchNorm a
  ``GroupNorm(32, c)`` (53 of them), 1x3x224x224.
* ``sd_unet``: diffusers ``UNet2DConditionModel`` with Stable Diffusion 1.x's config (320/640/1280/1280,
  2 layers per block, cross-attention dim 768, 8 heads: ~860 M parameters, 3.4 GB float32, 61
  GroupNorms), sample 1x4x32x32 (the weights do not depend on it; SD's 64x64 only makes CPU runs
  slower), timestep, encoder_hidden_states 1x77x768. Above 2 GB: weights in external data, so each
  export gets its own folder ``OUT_DIR/NAME/`` (TorchScript writes one file per tensor there,
  dynamo one ``NAME.onnx.data``). Static shapes only; peak RSS of the export 4.9 GB (TorchScript) /
  7.3 GB (dynamo).

The first four in four routes: ``_ts`` (``torch.onnx.export(dynamo=False)``) / ``_dynamo``, ``_static`` /
``_dyn`` (H, W dynamic: ``dynamic_axes`` / ``dynamic_shapes`` with ``Dim.AUTO``; a dynamic export is
also checked at a second size). Weights: torch's seeded initialisation, then every GroupNorm's
weight ~ 1 + 0.5 N and bias ~ 0.5 N (as in models/), so the affine part is not the identity.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _realsize  # noqa: E402

PACKAGES = ["torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "numpy"]
SEED = 20261201

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD_UNET = dict(  # Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5 unet/config.json)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
UNET = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=32,
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


class Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample


class SdUnet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states).sample


class Bottleneck(torch.nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = torch.nn.Conv2d(cin, width, 1, bias=False)
        self.gn1 = torch.nn.GroupNorm(32, width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.gn2 = torch.nn.GroupNorm(32, width)
        self.conv3 = torch.nn.Conv2d(width, cout, 1, bias=False)
        self.gn3 = torch.nn.GroupNorm(32, cout)
        self.relu = torch.nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.GroupNorm(32, cout))

    def forward(self, x):
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class ResNet50GN(torch.nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.GroupNorm(32, 64),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
        self.blocks = torch.nn.Sequential(*blocks)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _seed_group_norms(module, gen):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))


def _family(family):
    """``(module, inputs, extra inputs at another size, expected GroupNorms, notes)``."""
    rng = np.random.default_rng(SEED)
    if family in ("sd_vae_decoder", "sd_vae_encoder"):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(**SD_VAE)
        if family == "sd_vae_decoder":
            mod, gn = VaeDecoder(vae), 30
            x, xe = rng.standard_normal((1, 4, 32, 32)), rng.standard_normal((1, 4, 24, 40))
        else:
            mod, gn = VaeEncoder(vae), 22
            x, xe = rng.standard_normal((1, 3, 256, 256)), rng.standard_normal((1, 3, 192, 320))
        inputs, extra = [x.astype(np.float32)], [xe.astype(np.float32)]
        notes = "diffusers AutoencoderKL, Stable Diffusion VAE config"
    elif family == "unet2d":
        from diffusers import UNet2DModel
        mod, gn = Unet(UNet2DModel(**UNET)), None
        t = np.array([10], np.int64)
        inputs = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32), t]
        extra = [rng.standard_normal((1, 3, 48, 80)).astype(np.float32), t]
        notes = f"diffusers UNet2DModel {UNET}"
    elif family == "sd_unet":
        from diffusers import UNet2DConditionModel
        mod, gn = SdUnet(UNet2DConditionModel(**SD_UNET)), None
        inputs = [rng.standard_normal((1, 4, 32, 32)).astype(np.float32), np.array([10], np.int64),
                  rng.standard_normal((1, 77, 768)).astype(np.float32)]
        extra = None  # static exports only
        notes = f"diffusers UNet2DConditionModel, Stable Diffusion 1.x config {SD_UNET}"
    elif family == "resnet50_gn":
        mod, gn = ResNet50GN(), 53
        inputs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32)]
        extra = [rng.standard_normal((1, 3, 160, 288)).astype(np.float32)]
        notes = "ResNet-50 (3/4/6/3 bottlenecks) with GroupNorm(32, c) in place of every BatchNorm"
    else:
        raise KeyError(family)
    if gn is None:
        gn = sum(isinstance(m, torch.nn.GroupNorm) for m in mod.modules())
    return mod, inputs, extra, gn, notes


FAMILIES = ["sd_vae_decoder", "sd_vae_encoder", "unet2d", "resnet50_gn"]
# the TorchScript static decoder first: the first model others profile
NAMES = [f"{f}_{exp}_{shape}" for f in FAMILIES for exp in ("ts", "dynamo") for shape in ("static", "dyn")]
# above 2 GB, each in its own folder; last, as they take the longest and the most memory
BIG = ["sd_unet_ts_static", "sd_unet_dynamo_static"]
NAMES += BIG
INPUT_NAMES = {"unet2d": ["sample", "timestep"], "sd_unet": ["sample", "timestep", "encoder_hidden_states"]}


def build(name, out_dir):
    family, exporter, shape = name.rsplit("_", 2)
    torch.manual_seed(SEED)
    mod, inputs, extra, gn, notes = _family(family)
    _seed_group_norms(mod, torch.Generator().manual_seed(SEED))
    mod.eval()
    tin = [torch.from_numpy(x) for x in inputs]
    with torch.no_grad():
        outputs = [mod(*tin).numpy()]
        extra_out = [mod(*[torch.from_numpy(x) for x in extra]).numpy()] if shape == "dyn" else None
    in_names = INPUT_NAMES.get(family, ["x"])
    path = out_dir / f"{name}.onnx"
    t0 = time.perf_counter()
    if exporter == "ts":
        kw = {}
        if shape == "dyn":
            kw["dynamic_axes"] = {in_names[0]: {2: "H", 3: "W"}, "y": {2: "H_out", 3: "W_out"}}
        # above 2 GB it writes every initializer to its own file beside path (no option to change it)
        torch.onnx.export(mod, tuple(tin), str(path), dynamo=False, input_names=in_names, output_names=["y"],
                          opset_version=17, **kw)
        route = "torch.onnx.export(dynamo=False), opset 17"
    else:
        kw = {}
        if shape == "dyn":
            auto = torch.export.Dim.AUTO
            spec = {2: auto, 3: auto}
            kw["dynamic_shapes"] = (spec, None) if family == "unet2d" else (spec,)
        prog = torch.onnx.export(mod, tuple(tin), dynamo=True, input_names=in_names, output_names=["y"], **kw)
        prog.save(str(path), external_data=name in BIG)  # one NAME.onnx.data beside it
        route = "torch.onnx.export(dynamo=True)"
    export_s = time.perf_counter() - t0
    del mod, tin  # the ORT check of a 3.4 GB model needs the memory more
    route += ", H/W dynamic" if shape == "dyn" else ", static"
    return _realsize.record(name, path, inputs, outputs, route=route, exporter=f"torch.onnx {exporter}",
                            expected_gn=gn, packages=PACKAGES, notes=notes, export_s=export_s,
                            extra=(extra, extra_out) if shape == "dyn" else None)


if __name__ == "__main__":
    sys.exit(_realsize.main(__file__, NAMES, build, __doc__.splitlines()[0], folders=BIG))
