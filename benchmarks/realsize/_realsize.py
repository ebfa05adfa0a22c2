"""Shared by the real-size model scripts: where the models go, how one is recorded, the driver.

Standard library, NumPy, onnx and onnxruntime only, so every framework's virtual environment can
import it. A model ``NAME`` is four files in ``OUT_DIR`` (default ``/work/bigmodels``, outside git,
``$BIGMODELS`` overrides): ``NAME.onnx``; ``NAME.npz`` with the inputs ``in_0..`` and the
FRAMEWORK's outputs ``out_0..`` (the convention of ``models/``); ``NAME.json`` (route, exporter,
versions, onnxruntime's error against the framework); and ``NAME.ready``, written last, so other
work can start on a model as soon as it is complete.

A model above 2 GB (weights in external data: TorchScript writes one file per tensor beside the
``.onnx``, dynamo one ``.data`` file) gets its own folder, the same four files in
``OUT_DIR/NAME/`` with the external data beside them (``main(.., folders=NAMES)``). Its ``.ready``
is then not in ``OUT_DIR`` itself, so the benchmark's latency pairs (``bench_realsize.py``) do not
pick it up; ``tests/test_big_real.py`` and ``benchmarks/fuse_memory.py --model`` use it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "models" / "generators"))
from _common import package_versions  # noqa: E402
from _manifest import save_npz  # noqa: E402  (the npz convention of models/)

__all__ = ["OUT_DIR", "model_dir", "external_files", "versions", "ort_outputs", "max_err", "record", "main"]

OUT_DIR = pathlib.Path(os.environ.get("BIGMODELS", "/work/bigmodels"))


def model_dir(name: str, folders=()) -> pathlib.Path:
    """Where ``NAME.onnx`` and its npz / json / ready go: ``OUT_DIR``, or ``OUT_DIR/NAME`` for a
    name in ``folders`` (a model whose external data is many files)."""
    return OUT_DIR / name if name in folders else OUT_DIR


def external_files(model: onnx.ModelProto) -> list:
    """The external data files the initializers of ``model`` (loaded without its data) point at."""
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return sorted(locations)


def versions(packages) -> dict:
    return {"python": platform.python_version(), **package_versions(packages)}


def ort_outputs(path, inputs) -> list:
    """onnxruntime CPU (all optimisations, 2 threads) on ``path`` with ``inputs`` in graph input order."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)


def max_err(got, ref) -> float:
    return float(max(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)))
                     for g, r in zip(got, ref)))


def record(name, path, inputs, outputs, *, route, exporter, expected_gn, packages, notes="",
           extra=None, export_s=None):
    """Check the export against the framework's outputs in onnxruntime, write npz / json / ready.

    ``extra``: ``(inputs, framework outputs)`` at another input size (dynamic exports), checked too.
    """
    path = pathlib.Path(path)
    m = onnx.load(str(path), load_external_data=False)
    got = ort_outputs(path, inputs)
    if [g.shape for g in got] != [np.shape(o) for o in outputs]:
        raise RuntimeError(f"{name}: onnxruntime shapes {[g.shape for g in got]} != framework "
                           f"{[np.shape(o) for o in outputs]}")
    err = max_err(got, outputs)
    ext = external_files(m)
    meta = {
        "name": name, "route": route, "exporter": exporter, "expected_group_norms": expected_gn,
        "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input],
        "input_shapes": [list(np.shape(x)) for x in inputs],
        "ort_vs_framework_max_abs_err": err,
        "output_max_abs": float(max(np.max(np.abs(o)) for o in outputs)),
        "bytes": path.stat().st_size + sum((path.parent / f).stat().st_size for f in ext),
        "external_data_files": len(ext), "export_s": export_s, "versions": versions(packages), "notes": notes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if extra is not None:
        xin, xout = extra
        meta["extra_input_shapes"] = [list(np.shape(x)) for x in xin]
        meta["extra_ort_vs_framework_max_abs_err"] = max_err(ort_outputs(path, xin), xout)
    save_npz(path.with_suffix(".npz"), list(inputs), list(outputs))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    path.with_suffix(".ready").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    print(f"ok   {name}: {meta['bytes'] / 2**20:.0f} MiB, opset {meta['opset']}, ORT vs framework "
          f"{err:.2e} (|y| max {meta['output_max_abs']:.2g}), export {export_s:.0f} s, "
          f"peak RSS {meta['peak_rss_mib']:.0f} MiB", flush=True)
    return meta


def main(script: str, names: list, build, description: str, folders=()) -> int:
    """``--only NAME..`` / ``--force``; each model in its own child process (memory is returned
    between exports and one failing exporter does not stop the others). ``build(name, out_dir)``
    makes one model in ``out_dir`` (``model_dir(name, folders)``); an existing ``NAME.ready`` is
    skipped unless ``--force``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--only", nargs="+", default=None, choices=names, metavar="NAME")
    ap.add_argument("--force", action="store_true", help="rebuild models that are already ready")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if args.child:
        out_dir = model_dir(args.child, folders)
        if out_dir != OUT_DIR:  # a rebuild must not leave tensor files of the previous export
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir()
        try:
            build(args.child, out_dir)
        except Exception:  # noqa: BLE001 - reported to the parent through the exit status
            traceback.print_exc()
            if out_dir != OUT_DIR:
                shutil.rmtree(out_dir, ignore_errors=True)
            for ext in (".onnx", ".npz", ".json", ".ready", ".onnx.data"):
                (OUT_DIR / f"{args.child}{ext}").unlink(missing_ok=True)
            return 1
        return 0
    failed = []
    for name in args.only or names:
        ready = model_dir(name, folders) / f"{name}.ready"
        if ready.exists() and not args.force:
            print(f"skip {name}: ready", flush=True)
            continue
        ready.unlink(missing_ok=True)
        rc = subprocess.run([sys.executable, script, "--child", name]).returncode
        if rc != 0:
            print(f"FAIL {name} (exit {rc})", flush=True)
            failed.append(name)
    print(f"failed: {failed}" if failed else "all built", flush=True)
    return 1 if failed else 0
