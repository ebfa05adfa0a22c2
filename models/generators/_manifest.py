"""Shared by every generator: write model files and update ``models/manifest.json``.

Standard library and NumPy only, so each framework's virtual environment can import it.
Each generator owns the manifest entries whose ``generator`` field is its own script name:
``update_manifest`` replaces exactly those (under a file lock, because generators may run
at the same time) and leaves every other generator's entries alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import tempfile

__all__ = ["MODELS_DIR", "MANIFEST", "SCHEMA_VERSION", "update_manifest", "save_npz"]

MODELS_DIR = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = MODELS_DIR / "manifest.json"
SCHEMA_VERSION = 1


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def update_manifest(generator: str, models: list[dict], failures: list[dict]) -> None:
    """Replace this generator's model entries and failure records in the manifest.

    ``generator`` is the script's file name (e.g. ``"gen_keras_tf.py"``); it is stored in
    every entry so the next run replaces only its own.
    """
    lock_path = MODELS_DIR / ".manifest.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if MANIFEST.exists():
            data = json.loads(MANIFEST.read_text(encoding="utf-8"))
        else:
            data = {"schema": SCHEMA_VERSION, "models": [], "failures": []}
        for entry in models:
            entry["generator"] = generator
        for entry in failures:
            entry["generator"] = generator
        data["models"] = [m for m in data["models"] if m.get("generator") != generator] + models
        data["failures"] = [f for f in data["failures"] if f.get("generator") != generator] + failures
        data["models"].sort(key=lambda m: m["name"])
        data["failures"].sort(key=lambda f: (f.get("route", ""), f.get("name", "")))
        _atomic_write_text(MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


def save_npz(path: pathlib.Path, inputs: list, outputs: list, more_sets: list = ()) -> None:
    """Save inputs as ``in_0, in_1, ...`` and framework outputs as ``out_0, ...``.

    The order is the ONNX graph's input and output order. ``more_sets`` holds further
    ``(inputs, outputs)`` pairs (a dynamic model at other input sizes), saved as
    ``set1_in_0, set1_out_0, ...``; the manifest entry's ``data_sets`` counts all sets.
    """
    import numpy as np

    arrays = {f"in_{i}": np.asarray(a) for i, a in enumerate(inputs)}
    arrays.update({f"out_{i}": np.asarray(a) for i, a in enumerate(outputs)})
    for k, (ins, outs) in enumerate(more_sets, start=1):
        arrays.update({f"set{k}_in_{i}": np.asarray(a) for i, a in enumerate(ins)})
        arrays.update({f"set{k}_out_{i}": np.asarray(a) for i, a in enumerate(outs)})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
