"""Shared test setup: versions in the report header, seeded generators, onnxruntime runner."""

from __future__ import annotations

import importlib.metadata

import pytest


def pytest_report_header(config):
    names = ["onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "ml_dtypes"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return "results depend on: " + ", ".join(found)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's node id, so each test is reproducible."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only when asked for: ``-m slow`` (or any -m naming it), or
    ONNX_GROUPNORM_SLOW=1; the default run stays fast."""
    import os

    if "slow" in (config.getoption("-m") or "") or os.environ.get("ONNX_GROUPNORM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or ONNX_GROUPNORM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
