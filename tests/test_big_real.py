"""Slow: the CLI on a real architecture above 2 GB (issue #8), not a padded toy.

The models are Stable Diffusion 1.x's UNet (diffusers ``UNet2DConditionModel``, ~860 M
parameters, 3.4 GB float32, seeded random weights) as exported by
``benchmarks/realsize/make_torch_models.py`` into ``$ONNX_GROUPNORM_BIG_MODELS/NAME/``
(default ``/work/bigmodels``): TorchScript writes one external file per tensor beside the
``.onnx``, dynamo one ``.onnx.data`` file. Each test skips when its model is not built.

Asserted per model and target: the CLI exits 0; every GroupNorm is fused (the count the export
recorded from the torch model's ``torch.nn.GroupNorm`` modules) and none skipped; the input's
folder is byte-identical afterwards (no file changed, none added); the output holds its weights
in one external data file beside it; the fused model agrees with the original in onnxruntime on
the export's recorded inputs within the float32 verification tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_groupnorm import cli
from onnx_groupnorm.rewriter import io
from onnx_groupnorm.rewriter.verify import VERIFY_TOLERANCES

BIG_MODELS = pathlib.Path(os.environ.get("ONNX_GROUPNORM_BIG_MODELS", "/work/bigmodels"))
NAMES = ["sd_unet_ts_static", "sd_unet_dynamo_static"]
#: The default target and the one that lowers to standard ops only.
TARGETS = ["ort", "portable"]
#: Graph against graph, as ``--verify`` judges it (the fused op vs the export's subgraph,
#: 61 layers deep through Convs and attention).
TOLERANCE = VERIFY_TOLERANCES["float32"]

#: onnxruntime's outputs of each original model, computed once (a 3.4 GB session is slow).
_ORIGINAL_OUTPUTS: dict[str, list[np.ndarray]] = {}


def _built(name: str) -> pathlib.Path:
    model = BIG_MODELS / name / f"{name}.onnx"
    if not model.with_suffix(".ready").exists():
        pytest.skip(f"{model} is not built: run benchmarks/realsize/make_torch_models.py --only {name} "
                    "(/opt/venvs/bench-torch, up to ~8 GB of memory), or set ONNX_GROUPNORM_BIG_MODELS to the folder holding it")
    return model


def _folder_digest(folder: pathlib.Path) -> dict[str, str]:
    """Every file of the folder by name: its SHA-256."""
    digests = {}
    for path in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        digests[path.name] = h.hexdigest()
    return digests


def _inputs(model: pathlib.Path) -> list[np.ndarray]:
    with np.load(model.with_suffix(".npz")) as data:
        return [data[f"in_{i}"] for i in range(sum(k.startswith("in_") for k in data))]


def _run_ort(path: pathlib.Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", NAMES)
def test_cli_fuses_every_group_norm_of_sd_unet_over_2_gb(name, target, tmp_path, capsys):
    model = _built(name)
    meta = json.loads(model.with_suffix(".json").read_text())
    input_files = [model, *io.referenced_files(model)]
    assert sum(p.stat().st_size for p in input_files) > io.EXTERNAL_DATA_THRESHOLD  # the point of the test
    before = _folder_digest(model.parent)

    out, report = tmp_path / "fused.onnx", tmp_path / "report.json"
    code = cli.main(["fuse", str(model), "-o", str(out), "--report", str(report), "--target", target, "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err

    fused = json.loads(report.read_text())
    assert len(fused["fused"]) == meta["expected_group_norms"] and not fused["skipped"], fused["skipped"]
    assert _folder_digest(model.parent) == before
    proto = onnx.load(out, load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"fused.onnx.data"} and (tmp_path / "fused.onnx.data").stat().st_size > io.EXTERNAL_DATA_THRESHOLD
    assert out.stat().st_size < io.EXTERNAL_DATA_THRESHOLD

    inputs = _inputs(model)
    if name not in _ORIGINAL_OUTPUTS:
        _ORIGINAL_OUTPUTS[name] = _run_ort(model, inputs)
    for got, want in zip(_run_ort(out, inputs), _ORIGINAL_OUTPUTS[name], strict=True):
        np.testing.assert_allclose(got, want, rtol=TOLERANCE.rtol, atol=TOLERANCE.atol)
