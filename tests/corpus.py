"""The models/ corpus as test parameters (imported by the corpus tests)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
MANIFEST = MODELS / "manifest.json"

__all__ = ["MODELS", "MANIFEST", "manifest", "entries", "load", "data", "data_sets", "default_opset"]


def manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def entries(predicate=lambda entry: True):
    """pytest params, one per manifest model that satisfies ``predicate``, id = its name."""
    return [pytest.param(e, id=e["name"]) for e in manifest()["models"] if predicate(e)]


def load(entry) -> onnx.ModelProto:
    return onnx.load(MODELS / entry["file"])


def data(entry, index: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inputs and framework outputs of data set ``index`` (``data_sets`` in the manifest;
    dynamic models may have several, at different input sizes)."""
    prefix = f"set{index}_" if index else ""
    with np.load(MODELS / entry["data"]) as d:
        inputs = [d[f"{prefix}in_{i}"] for i in range(len(entry["inputs"]))]
        outputs = [d[f"{prefix}out_{i}"] for i in range(len(entry["outputs"]))]
    return inputs, outputs


def data_sets(entry) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Every data set of ``entry``, the first one first."""
    return [data(entry, k) for k in range(entry.get("data_sets", 1))]


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
