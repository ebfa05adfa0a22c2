"""``fuse --verify`` on the real-size models, and the float32 noise its judgement rests on.

For each model (default: every ready ``*_static`` model directly in ``$BIGMODELS``, default
/work/bigmodels; the dynamic ones are verified at two sizes and cost twice): the CLI
``onnx-groupnorm fuse M -o OUT --verify --report R`` in a fresh process under
``/usr/bin/time -v`` (``nice -n 10``), one model at a time; the table gives its verdict, the
outputs' max |fused - original| and its ratio of the tolerance, the noise floor verify measured
(only on the path that needs it, else ``-``), the worst layer ratio of each side against its
float64 reference, wall seconds and peak RSS.

``--noise`` adds, per model, in a child process on verify's first input set (seed 0): the
original in onnxruntime with graph optimisations on and off (``ORT_DISABLE_ALL``: no NCHWc
Convs, no fusions: another float32 summation order of the same model), and the fused model
(the CLI's output) with them on: max |original(on) - original(off)| (the export's own float32
noise floor), max |fused - original(on)| and their quotient, the evidence for
``rewriter.verify.NOISE_FACTOR``. Sessions one at a time.

``--force-noise-run`` runs the CLI with verify's noise run forced (after the verdict, on the
first input set, whatever the verdict), to measure its peak RSS against the plain ``--verify``.

    python benchmarks/verify_noise.py [--models NAME ...] [--noise | --noise-only] [--force-noise-run] [--workdir DIR]

Timings are on whatever machine runs it (a shared one gives noisy wall times).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parent))
from fuse_memory import timed  # noqa: E402

BIGMODELS = pathlib.Path(os.environ.get("BIGMODELS", "/work/bigmodels"))

_NOISE = r"""
import json, sys, numpy as np, onnx_ir as ir, onnxruntime as ort
from onnx_groupnorm.rewriter import inputs
original, fused = sys.argv[1], sys.argv[2]
plan = inputs.Plan(ir.load(original), None, seed=0)
feeds = plan.feeds(next(iter(plan.growth())))

def run(path, optimized):
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [np.asarray(o, np.float64) for o in session.run(None, feeds)]

def max_abs(a, b):
    return max(float(np.nanmax(np.abs(x - y))) for x, y in zip(a, b))

on = run(original, True)
noise = max_abs(run(original, False), on)
drift = max_abs(run(fused, True), on)
print(json.dumps({"noise": noise, "drift": drift}))
"""


#: The CLI with verify's noise run forced: _judge, then one noise run on the first input set.
_FORCED = r"""
import sys
from onnx_groupnorm import cli
from onnx_groupnorm.rewriter import verify
judge = verify._judge
def forced(before, tally, sets, fused, shapes):
    result = judge(before, tally, sets, fused, shapes)
    floor = verify._noise_floor(before, sets, [0])
    print("noise floor", floor, file=sys.stderr)
    return result
verify._judge = forced
raise SystemExit(cli.main(sys.argv[1:]))
"""


def _models(names: list[str]) -> list[pathlib.Path]:
    if names:
        return [BIGMODELS / f"{n}.onnx" for n in names]
    return sorted(p.with_suffix(".onnx") for p in BIGMODELS.glob("*_static.ready"))


def _verified(model: pathlib.Path, workdir: pathlib.Path, forced: bool = False) -> dict:
    out, report = workdir / f"{model.stem}.fused.onnx", workdir / f"{model.stem}.report.json"
    entry = ["-c", _FORCED] if forced else ["-m", "onnx_groupnorm"]
    command = ["nice", "-n", "10", sys.executable, *entry, "fuse", os.fspath(model), "-o", os.fspath(out),
               "--verify", "--report", os.fspath(report)]
    rss, wall, _ = timed(command, accept=(0, 1))
    v = json.loads(report.read_text())["verification"]
    floors = [o["noise_floor"] for o in v["outputs"] if o.get("noise_floor") is not None]
    return {
        "verdict": v["verdict"], "error": v["max_abs_error"], "ratio": v["worst_ratio"],
        "floor": max(floors) if floors else None,
        "fused_layer": max((c["fused_ratio"] for c in v["layers"]), default=0.0),
        "original_layer": max((c["original_ratio"] or 0.0 for c in v["layers"]), default=0.0),
        "wall_s": wall, "rss_mib": rss,
    }


def _noise(model: pathlib.Path, workdir: pathlib.Path) -> dict:
    """The export's noise floor and the fused drift (module docstring); fuses without verifying."""
    out = workdir / f"{model.stem}.plain.onnx"
    subprocess.run(["nice", "-n", "10", sys.executable, "-m", "onnx_groupnorm", "fuse", os.fspath(model), "-o", os.fspath(out)],
                   capture_output=True, check=True)
    done = subprocess.run(["nice", "-n", "10", sys.executable, "-c", _NOISE, os.fspath(model), os.fspath(out)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model}: the noise run failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(model: pathlib.Path, workdir: pathlib.Path, verify: bool, noise: bool, forced: bool) -> dict:
    row = {"model": model.stem}
    if verify:
        row.update(_verified(model, workdir, forced))
    if noise:
        row.update(_noise(model, workdir))
    for path in workdir.glob(f"{model.stem}.*"):
        path.unlink()
    return row


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="names in $BIGMODELS (default: every ready *_static one)")
    parser.add_argument("--noise", action="store_true", help="also measure the export's float32 noise floor and the fused drift")
    parser.add_argument("--noise-only", action="store_true", help="only that (no --verify run)")
    parser.add_argument("--force-noise-run", action="store_true", help="force verify's noise run (its memory and time)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    verify, noise = not args.noise_only, args.noise or args.noise_only
    columns = (["verdict", "max abs err", "of tolerance", "verify's noise floor", "worst layer fused / original", "wall s", "peak MiB"] if verify else []) \
        + (["original opt on vs off", "fused vs original", "quotient"] if noise else [])
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for model in _models(args.models):
            r = _row(model, pathlib.Path(tmp), verify, noise, args.force_noise_run)
            cells = [r["model"]]
            if verify:
                cells += [r["verdict"], _fmt(r["error"]), _fmt(r["ratio"]), _fmt(r["floor"]),
                          f"{r['fused_layer']:.3g} / {r['original_layer']:.3g}", f"{r['wall_s']:.0f}", f"{r['rss_mib']:.0f}"]
            if noise:
                cells += [_fmt(r["noise"]), _fmt(r["drift"]), _fmt(r["drift"] / r["noise"] if r["noise"] else float("inf"))]
            print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
