"""The models/ corpus as test parameters (imported by the corpus tests)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
MANIFEST = MODELS / "manifest.json"

__all__ = ["MODELS", "MANIFEST", "manifest", "entries", "load", "data", "default_opset"]


def manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def entries(predicate=lambda entry: True):
    """pytest params, one per manifest model that satisfies ``predicate``, id = its name."""
    return [pytest.param(e, id=e["name"]) for e in manifest()["models"] if predicate(e)]


def load(entry) -> onnx.ModelProto:
    return onnx.load(MODELS / entry["file"])


def data(entry) -> tuple[list[np.ndarray], list[np.ndarray]]:
    with np.load(MODELS / entry["data"]) as d:
        inputs = [d[f"in_{i}"] for i in range(len(entry["inputs"]))]
        outputs = [d[f"out_{i}"] for i in range(len(entry["outputs"]))]
    return inputs, outputs


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
