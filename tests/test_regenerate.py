"""Exporter drift: re-export one model per framework and compare its structure with the
committed twin. Skipped unless ONNX_GROUPNORM_REGENERATE=1 and the framework's virtual
environment exists (see models/README.md; override a path with ONNX_GROUPNORM_VENV_<NAME>,
e.g. ONNX_GROUPNORM_VENV_TORCH=/path/to/python)."""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys

import onnx
import pytest
from corpus import MODELS, manifest

# generator script -> the virtual environment it runs in (models/README.md)
GENERATORS = {
    "gen_keras_tf.py": "tf",
    "gen_tf_keras.py": "tfkeras",
    "gen_keras36.py": "keras36",
    "gen_negatives.py": "keras36",
    "gen_keras_torch.py": "torch",
    "gen_torch_groupnorm.py": "torch",
    "gen_keras_jax.py": "jax",
    "gen_handbuilt.py": "torch",
}


def _python(venv: str) -> pathlib.Path:
    override = os.environ.get(f"ONNX_GROUPNORM_VENV_{venv.upper()}")
    return pathlib.Path(override) if override else pathlib.Path("/opt/venvs") / venv / "bin" / "python"


def _structure(model: onnx.ModelProto):
    ops = collections.Counter((n.domain, n.op_type) for n in model.graph.node if n.op_type != "Constant")
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    return opsets, sorted(ops.items()), len(model.graph.input), len(model.graph.output)


def _cases():
    first = {}
    for entry in manifest()["models"]:
        first.setdefault(entry["generator"], entry)
    return [pytest.param(script, first[script], id=script) for script in GENERATORS if script in first]


@pytest.mark.regenerate
@pytest.mark.parametrize("script,entry", _cases())
def test_reexport_matches_committed_structure(script, entry, tmp_path):
    if os.environ.get("ONNX_GROUPNORM_REGENERATE") != "1":
        pytest.skip("set ONNX_GROUPNORM_REGENERATE=1 to re-export (needs the frameworks' venvs)")
    python = _python(GENERATORS[script])
    if not python.exists():
        pytest.skip(f"{python} not found")
    cmd = [str(python), str(MODELS / "generators" / script), "--out", str(tmp_path), "--only", entry["name"]]
    done = subprocess.run(cmd, cwd=MODELS.parent, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    (fresh,) = list(tmp_path.rglob(f"{entry['name']}.onnx"))
    assert _structure(onnx.load(fresh)) == _structure(onnx.load(MODELS / entry["file"]))


def test_every_generator_has_a_regeneration_case():
    assert {m["generator"] for m in manifest()["models"]} <= set(GENERATORS), "add new generators to GENERATORS"
    assert sys.version_info >= (3, 10)
