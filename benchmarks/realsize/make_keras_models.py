"""keras_hub's Stable Diffusion 3 VAE (random weights) exported by Keras with the torch or TF backend.

``keras_hub.src.models.vae.vae_backbone.VAEBackbone`` (keras-hub 0.32, installed ``--no-deps``) with
SD3's config (encoder 128/256/512/512 x 2 blocks, decoder 512/512/256/128 x 3 blocks, 32 sample
channels = 16 latent channels): the decoder on a latent 1x32x32x16 (256x256 image; 30
GroupNormalizations), the encoder on 1x256x256x3 (22). Channels-last, as keras_hub builds it.

    KERAS_BACKEND=torch /opt/venvs/bench-torch/bin/python benchmarks/realsize/make_keras_models.py
    KERAS_BACKEND=tensorflow /opt/venvs/bench-tf/bin/python benchmarks/realsize/make_keras_models.py

Routes (the file name says which):

* torch backend: ``keras_torch_*_ts_dyn``: ``model.export(format="onnx")`` on ``Input((None, None, C))``
  (Keras takes torch.onnx's TorchScript exporter with every ``None`` dimension dynamic);
  ``keras_torch_*_dynamo_static``: ``model.export`` with a static ``input_signature`` (Keras takes
  torch.onnx's dynamo exporter).
* TF backend: ``keras_tf_*_static`` / ``keras_tf_*_dyn``: ``model.export(format="onnx")`` (tf2onnx) on
  ``Input((32, 32, 16))`` (batch dynamic) / ``Input((None, None, 16))``.

Weights: ``keras.utils.set_random_seed`` then Keras' initialisers; every GroupNormalization's gamma
~ 1 + 0.5 N and beta ~ 0.5 N (as in models/). The recorded outputs are Keras' ``model(x)``.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _realsize  # noqa: E402

BACKEND = os.environ["KERAS_BACKEND"]
PACKAGES = ["keras", "keras-hub", "torch", "tensorflow", "tf2onnx", "onnx", "onnxscript", "onnxruntime", "numpy"]
SEED = 20261201
SD3_VAE = dict(encoder_num_filters=[128, 256, 512, 512], encoder_num_blocks=[2, 2, 2, 2],
               decoder_num_filters=[512, 512, 256, 128], decoder_num_blocks=[3, 3, 3, 3],
               sampler_method="mode", input_channels=3, sample_channels=32, output_channels=3)
PART = {  # part: (static input shape without batch, expected GroupNormalizations, second size for dynamic H/W)
    "decoder": ((32, 32, 16), 30, (24, 40, 16)),
    "encoder": ((256, 256, 3), 22, (192, 320, 3)),
}
ROUTES = {"torch": ("ts_dyn", "dynamo_static"), "tensorflow": ("static", "dyn")}[BACKEND]
PREFIX = {"torch": "keras_torch", "tensorflow": "keras_tf"}[BACKEND]
NAMES = [f"{PREFIX}_sd3_vae_{part}_{route}" for part in PART for route in ROUTES]


def _model(part, dynamic):
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED)
    vae = VAEBackbone(**SD3_VAE)
    shape = PART[part][0]
    inp = keras.Input((None, None, shape[-1]) if dynamic else shape, name="x")
    model = keras.Model(inp, getattr(vae, part)(inp))
    rng = np.random.default_rng(SEED)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.GroupNormalization):
            layer.gamma.assign((1 + 0.5 * rng.standard_normal(layer.gamma.shape)).astype("float32"))
            layer.beta.assign((0.5 * rng.standard_normal(layer.beta.shape)).astype("float32"))
    if BACKEND == "torch":  # TorchScript cannot export constants that require grad
        for v in model.variables:
            v.value.requires_grad_(False)
    return model


def build(name, out_dir):
    part = "decoder" if "_decoder_" in name else "encoder"
    route = name.split(f"_{part}_", 1)[1]
    dynamic = route.endswith("dyn")
    shape, gn, extra_shape = PART[part]
    model = _model(part, dynamic)
    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((1, *shape)).astype(np.float32)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    extra = None
    if dynamic:
        xe = rng.standard_normal((1, *extra_shape)).astype(np.float32)
        extra = ([xe], [keras.ops.convert_to_numpy(model(xe, training=False))])
    path = out_dir / f"{name}.onnx"
    t0 = time.perf_counter()
    kw = {}
    if route == "dynamo_static":
        kw["input_signature"] = [keras.InputSpec(shape=(1, *shape), dtype="float32")]
    model.export(str(path), format="onnx", verbose=False, **kw)
    export_s = time.perf_counter() - t0
    how = {"ts_dyn": "model.export(format='onnx') -> torch.onnx TorchScript, H/W dynamic",
           "dynamo_static": "model.export(format='onnx', static input_signature) -> torch.onnx dynamo",
           "static": "model.export(format='onnx') -> tf2onnx, H/W static (batch dynamic)",
           "dyn": "model.export(format='onnx') -> tf2onnx, H/W dynamic"}[route]
    return _realsize.record(name, path, [x], [y], route=how, exporter=f"keras {BACKEND}", expected_gn=gn,
                            packages=PACKAGES, export_s=export_s, extra=extra,
                            notes=f"keras_hub VAEBackbone {SD3_VAE} .{part}, channels_last")


if __name__ == "__main__":
    sys.exit(_realsize.main(__file__, NAMES, build, __doc__.splitlines()[0]))
