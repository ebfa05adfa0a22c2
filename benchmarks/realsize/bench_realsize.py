"""Real-size benchmark: every model of ``make_*_models.py``, fused with every CPU target.

Run in the package's venv (``.venv`` of the checkout, plus ``pip install openvino``)::

    .venv/bin/python benchmarks/realsize/bench_realsize.py [--only NAME ..] [--out FILE.md]
    .venv/bin/python benchmarks/realsize/bench_realsize.py --profile --only NAME [--targets T ..]

Per model and target (``onnx_groupnorm.rewriter.TARGETS`` read at run time, minus the targets of
``NOT_ON_CPU``, plus ``ort+precise``: ``--target ort --precise``, what our precision shift costs on
the layers ``ort`` otherwise leaves with torch's InstanceNormalization arithmetic) it prints one
markdown row:

* fuse time and peak RSS: a child process running the CLI (``onnx-groupnorm fuse IN -o OUT --target
  T --report R``), its own high-water RSS (``VmHWM``); layers fused / the export's GroupNorms;
* parity: max abs error of the fused model in onnxruntime CPU against the FRAMEWORK's recorded
  output (``NAME.npz``), the original export's error beside it;
* onnxruntime CPU: 2 intra-op threads, ``session.intra_op.allow_spinning=0``, all sessions in one
  process; after one warm-up run each, rounds of original, target 1, target 2 .. (the order of the
  targets rotates each round); ratio = median over rounds of (target run / the same round's original
  run), below 1 is faster; the pairing within a round compensates the drift of a shared machine;
* OpenVINO CPU, the same rounds, ``INFERENCE_PRECISION_HINT=f32`` and 2 threads
  (``INFERENCE_NUM_THREADS``); a model OpenVINO cannot compile gets ``fails: <reason>`` (each model
  is first compiled in a child process: some crash OpenVINO instead of raising).

* ``--tract`` (opt-in): tract (PyPI ``tract``, single-threaded here), the original and the ``portable``
  output only (tract runs no custom-domain function), ``--tract-repeats`` rounds after one warm-up
  (default 3: the SD VAE decoder takes ~45 s a run in tract on this machine), ratio and max abs
  error against the framework as above; ``fails: <reason>`` where tract cannot load or run a model
  (loaded first in a child process, as for OpenVINO).

``--profile``: onnxruntime's per-node profiler (``SessionOptions.enable_profiling``, same session
settings) over ``--profile-runs`` runs after one warm-up, aggregated by op type: share of node time
of Conv, Transpose, ReorderInput/ReorderOutput (the NCHWc layout changes onnxruntime inserts), the
normalisation arithmetic (``NORM_OPS``) and the rest, original vs each target, and the top op types.
``--profile-openvino``: the same from OpenVINO's own counters (``PERF_COUNT``, ``get_profiling_info``,
executed nodes only, by their executed layer type), original vs each target OpenVINO compiles.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

from onnx_groupnorm.rewriter import TARGETS

try:
    from onnx_groupnorm.rewriter.targets import NOT_ON_CPU
except ImportError:  # older layouts: only the GPU target is known not to run on the CPU
    NOT_ON_CPU = {"ort-gpu": ""}

MODELS = pathlib.Path(os.environ.get("BIGMODELS", "/work/bigmodels"))
THREADS = 2
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS}


#: A target with our precision shift in every layer (``--precise``): what the shift costs.
PRECISE = "+precise"


def cpu_targets(chosen=None):
    names = [t for t in TARGETS if t not in NOT_ON_CPU] + ["ort" + PRECISE]
    return [t for t in names if t in chosen] if chosen else names


def ready_models(only=None):
    names = sorted(p.stem for p in MODELS.glob("*.ready"))
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            sys.exit(f"not ready in {MODELS}: {missing}")
        names = list(dict.fromkeys(only))  # in the order given: the most wanted rows first
    return names


def load_data(name):
    with np.load(MODELS / f"{name}.npz") as d:
        ins = [d[k] for k in sorted((k for k in d if k.startswith("in_")), key=lambda k: int(k[3:]))]
        outs = [d[k] for k in sorted((k for k in d if k.startswith("out_")), key=lambda k: int(k[4:]))]
    meta = json.loads((MODELS / f"{name}.json").read_text())
    return ins, outs, meta


def max_err(got, ref):
    return float(max(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64))) for g, r in zip(got, ref)))


# The CLI's main, then the child's own high-water RSS (VmHWM) on the last line of stderr. Not
# getrusage: Linux carries the parent's RSS across fork/vfork + exec into the child's ru_maxrss.
_CHILD = """import sys
from onnx_groupnorm.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
    print("VmHWM_kB", hwm, file=sys.stderr)
sys.exit(rc)
"""


def fuse_child(src, dst, target):
    """CLI in a child: (seconds, peak RSS MiB of that child, report dict or None, error text)."""
    rep = dst.with_suffix(".report.json")
    flags = ["--target", target.removesuffix(PRECISE)] + (["--precise"] if target.endswith(PRECISE) else [])
    cmd = [sys.executable, "-c", _CHILD, "fuse", str(src), "-o", str(dst), *flags, "--report", str(rep)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    hwm = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("VmHWM_kB")]
    rss = int(hwm[-1]) / 1024 if hwm else float("nan")
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "VmHWM" not in ln][-2:]
        return seconds, rss, None, f"exit {proc.returncode}: " + " | ".join(tail)
    return seconds, rss, json.loads(rep.read_text()), ""


def ort_session(path, profile_prefix=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle sessions' spinning threads would steal the two cores from the one being timed
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(path, inputs):
    sess = ort_session(path)
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), inputs)}
    return lambda: sess.run(None, feeds)


_OV_PROBE = """import sys, json, openvino
openvino.Core().compile_model(sys.argv[1], "CPU", json.loads(sys.argv[2]))
"""


def ov_probe(path):
    """Why OpenVINO cannot compile ``path`` (None if it can), asked in a child process: on some of
    these models ``compile_model`` does not raise but crashes the process (SIGSEGV)."""
    proc = subprocess.run([sys.executable, "-c", _OV_PROBE, str(path), json.dumps(OV_CONFIG)],
                          capture_output=True, text=True)
    if proc.returncode < 0:
        return f"compile_model crashes (signal {-proc.returncode})"
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        text = next((ln for ln in lines if "conversion rule" in ln), lines[-1] if lines else "")
        return text[:160]
    return None


def ov_runner(core, path, inputs):
    compiled = core.compile_model(str(path), "CPU", OV_CONFIG)
    req = compiled.create_infer_request()

    def run():
        req.infer(list(inputs))
        return [req.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]
    return run


#: tract's type names for the input facts it needs before its analysis.
_TRACT_TYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32"}

_TRACT_PROBE = """import sys, json, tract
model = tract.onnx().load(sys.argv[1])
for i, fact in enumerate(json.loads(sys.argv[2])):
    model.set_input_fact(i, fact)
model.into_model().into_runnable()
"""


def tract_facts(inputs):
    return [",".join([*map(str, x.shape), _TRACT_TYPES[x.dtype.name]]) for x in inputs]


def tract_probe(path, inputs):
    """Why tract cannot load ``path`` (None if it can), asked in a child process (a panic may abort)."""
    proc = subprocess.run([sys.executable, "-c", _TRACT_PROBE, str(path), json.dumps(tract_facts(inputs))],
                          capture_output=True, text=True)
    if proc.returncode < 0:
        return f"tract crashes (signal {-proc.returncode})"
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        return (lines[-1] if lines else f"exit {proc.returncode}")[:160]
    return None


def tract_runner(path, inputs):
    import tract

    model = tract.onnx().load(str(path))
    for i, fact in enumerate(tract_facts(inputs)):
        model.set_input_fact(i, fact)
    runnable = model.into_model().into_runnable()
    return lambda: [out.to_numpy() for out in runnable.run(list(inputs))]


def bench_tract(paths, ins, ref, orig, rows, repeats):
    """tract: the original and the ``portable`` output (if fused), ratio and error into the rows."""
    keys = [k for k in ("original", "portable") if k in paths]
    runners = {}
    for k in keys:
        why = tract_probe(paths[k], ins)
        if not why:
            try:
                runners[k] = tract_runner(paths[k], ins)
            except Exception as e:  # noqa: BLE001 - a model tract cannot load is a result
                why = first_line(e)
        if why:
            (orig if k == "original" else rows[k])["tract_fail"] = why
    if not runners:
        return
    if "original" not in runners:  # the fused model alone: its time, no ratio
        runners = {"original": runners["portable"], **runners}
    ms, ratio, outs = rounds(runners, repeats)
    if "tract_fail" not in orig:
        orig.update(tract_ms=ms.get("original"), tract_err=max_err(outs["original"], ref))
    if "portable" in runners:
        rows["portable"].update(tract_ratio=ratio.get("portable"), tract_ms=ms.get("portable"),
                                tract_err=max_err(outs["portable"], ref))


def rounds(runners: dict, repeats: int):
    """``runners['original']`` then the others (order rotating), ``repeats`` rounds after one warm-up.
    Returns ({key: median ms}, {key: median of per-round ratio to the original}, {key: outputs})."""
    outputs = {k: fn() for k, fn in runners.items()}  # warm-up, and the outputs for parity
    others = [k for k in runners if k != "original"]
    ms = {k: [] for k in runners}
    ratio = {k: [] for k in others}
    for r in range(repeats):
        order = ["original"] + others[r % max(len(others), 1):] + others[:r % max(len(others), 1)]
        t = {}
        for k in order:
            t0 = time.perf_counter()
            runners[k]()
            t[k] = (time.perf_counter() - t0) * 1e3
            ms[k].append(t[k])
        for k in others:
            ratio[k].append(t[k] / t["original"])
    return ({k: statistics.median(v) for k, v in ms.items() if v},
            {k: spread(v) for k, v in ratio.items() if v}, outputs)


def spread(values):
    """(median, first quartile, third quartile): the quartiles show how much the machine moved."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


def fmt_ratio(value):
    return "—" if value is None else f"{value[0]:.2f} [{value[1]:.2f}–{value[2]:.2f}]"


def first_line(exc):
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln for ln in lines if "conversion rule" in ln or "rror" in ln), lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:160]}"


def bench_model(name, targets, repeats, workdir, use_ov, tract_repeats=None):
    ins, ref, meta = load_data(name)
    src = MODELS / f"{name}.onnx"
    rows = {}
    paths = {"original": src}
    for t in targets:
        dst = workdir / f"{name}.{t}.onnx"
        sec, rss, report, err = fuse_child(src, dst, t)
        rows[t] = {"fuse_s": sec, "rss_mib": rss, "error": err,
                   "fused": len(report["fused"]) if report else None, "expected": meta.get("expected_group_norms")}
        if report:
            paths[t] = dst
        print(f"  fuse {name} --target {t}: {sec:.1f} s, peak RSS {rss:.0f} MiB, "
              f"{rows[t]['fused']} fused {err}", flush=True)
    runners = {k: ort_runner(p, ins) for k, p in paths.items()}
    ms, ratio, outs = rounds(runners, repeats)
    del runners
    orig = {"ort_ms": ms.get("original"), "ort_err": max_err(outs["original"], ref)}
    for t in paths:
        if t != "original":
            rows[t].update(ort_ratio=ratio.get(t), ort_ms=ms.get(t), ort_err=max_err(outs[t], ref))
    if use_ov:
        import openvino as ov
        core = ov.Core()
        ov_runners = {}
        for k, p in paths.items():
            why = ov_probe(p)
            if why:
                (orig if k == "original" else rows[k])["ov_fail"] = why
                continue
            try:
                ov_runners[k] = ov_runner(core, p, ins)
            except Exception as e:  # noqa: BLE001 - a model OpenVINO cannot load is a result
                (orig if k == "original" else rows[k])["ov_fail"] = first_line(e)
        if "original" in ov_runners:
            ms, ratio, outs = rounds(ov_runners, repeats)
            orig.update(ov_ms=ms.get("original"), ov_err=max_err(outs["original"], ref))
            for k in ov_runners:
                if k != "original":
                    rows[k].update(ov_ratio=ratio.get(k), ov_ms=ms.get(k), ov_err=max_err(outs[k], ref))
        elif len(ov_runners) > 0:  # fused loads where the original did not: times alone
            ms, _, outs = rounds({"original": next(iter(ov_runners.values())), **ov_runners}, repeats)
            for k in ov_runners:
                rows[k].update(ov_ms=ms.get(k), ov_err=max_err(outs[k], ref))
        del ov_runners
    if tract_repeats is not None:
        bench_tract(paths, ins, ref, orig, rows, tract_repeats)
    for t in targets:
        (workdir / f"{name}.{t}.onnx").unlink(missing_ok=True)
        (workdir / f"{name}.{t}.report.json").unlink(missing_ok=True)
    return meta, orig, rows


def fmt_ms(value):
    return "—" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def num(value, spec):
    return "—" if value is None else format(value, spec)


def runtime_cells(row, orig, key):
    """One runtime's cells (``key``: ``ov`` or ``tract``): ratio (or why not), error fused (export)."""
    if f"{key}_fail" in row:
        return [f"fails: {row[f'{key}_fail']}", "—"]
    if f"{key}_err" not in row:
        return ["—", "—"]
    err = f"{row[f'{key}_err']:.1e} ({num(orig.get(f'{key}_err'), '.1e')})"
    if f"{key}_fail" in orig:
        return [f"original fails; fused {fmt_ms(row.get(f'{key}_ms'))} ms", err]
    return [fmt_ratio(row.get(f"{key}_ratio")), err]


def ov_cells(row, orig):
    """OpenVINO: ratio (or why not), error fused (export)."""
    return runtime_cells(row, orig, "ov")


def tract_cells(t, row, orig):
    """tract: ratio (or why not), error fused (export); only the ``portable`` rows run there."""
    if t != "portable" or row["error"]:
        return ["—", "—"]
    return runtime_cells(row, orig, "tract")


def table(results, use_ov, use_tract=False):
    cols = ["model", "route", "target", "GN fused", "fuse s", "fuse peak RSS MiB",
            "ORT max abs err vs framework: fused (export)", "ORT CPU fused/original [quartiles]", "ORT original ms"]
    if use_ov:
        cols += ["OpenVINO f32 fused/original [quartiles]", "OpenVINO max abs err: fused (export)", "OpenVINO original ms"]
    if use_tract:
        cols += ["tract fused/original [quartiles]", "tract max abs err: fused (export)", "tract original ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, (meta, orig, rows) in results.items():
        for t, row in rows.items():
            cells = [name, meta["route"], t]
            if row["error"]:
                cells += [f"fails: {row['error'][:120]}", f"{row['fuse_s']:.1f}", f"{row['rss_mib']:.0f}", "—", "—",
                          fmt_ms(orig["ort_ms"])]
            else:
                cells += [f"{row['fused']}/{row['expected']}", f"{row['fuse_s']:.1f}", f"{row['rss_mib']:.0f}",
                          f"{row['ort_err']:.1e} ({orig['ort_err']:.1e})", fmt_ratio(row.get("ort_ratio")),
                          fmt_ms(orig["ort_ms"])]
            if use_ov:
                ov_orig = f"fails: {orig['ov_fail']}" if "ov_fail" in orig else fmt_ms(orig.get("ov_ms"))
                cells += (["—", "—"] if row["error"] else ov_cells(row, orig)) + [ov_orig]
            if use_tract:
                tract_orig = f"fails: {orig['tract_fail']}" if "tract_fail" in orig else fmt_ms(orig.get("tract_ms"))
                cells += tract_cells(t, row, orig) + [tract_orig]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args, load_before):
    import onnx
    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        ov_version = "not installed"
    tract_note = ""
    if args.tract:
        import importlib.metadata
        tract_note = f", tract {importlib.metadata.version('tract')} ({args.tract_repeats} rounds)"
    cpu = platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}, {os.cpu_count()} cores; onnxruntime "
            f"{ort.__version__} CPU ({THREADS} intra-op threads, spinning off), OpenVINO {ov_version} CPU "
            f"(f32, {THREADS} threads){tract_note}, onnx {onnx.__version__}, Python {platform.python_version()}; "
            f"{args.repeats} rounds after 1 warm-up; load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after")


# --------------------------------------------------------------------------- profile

CATEGORY = {"Conv": "Conv", "FusedConv": "Conv", "NchwcConv": "Conv", "Transpose": "Transpose",
            "ReorderInput": "Reorder (NCHWc)", "ReorderOutput": "Reorder (NCHWc)",
            # OpenVINO's executed layer types (--profile-openvino); its Subgraph (fused elementwise
            # snippets, also the GroupNormalization it runs as one) stays "other"
            "Convolution": "Conv", "Reorder": "Reorder (NCHWc)", "MVN": "normalisation ops", "Reduce": "normalisation ops"}
# The ops the normalisation arithmetic is made of (exported and fused forms); Mul / Add / Sigmoid are
# left out of it: they are also the residual adds, SiLU and attention of these models.
NORM_OPS = {"InstanceNormalization", "GroupNormalization", "GroupNorm", "LayerNormalization", "ReduceMean",
            "ReduceSum", "ReduceSumSquare", "ReduceVariance", "Sqrt", "Div", "Sub", "Pow", "Reciprocal", "Reshape",
            "Tile", "Expand", "GlobalAveragePool"}
for _op in NORM_OPS:
    CATEGORY[_op] = "normalisation ops"
CATEGORIES = ["Conv", "Transpose", "Reorder (NCHWc)", "normalisation ops", "other"]


def profile_ops(path, inputs, runs):
    """``{op type: total µs}`` over ``runs`` runs after a warm-up (node events of the ORT profile)."""
    with tempfile.TemporaryDirectory() as d:
        sess = ort_session(path, profile_prefix=str(pathlib.Path(d) / "p"))
        feeds = {i.name: x for i, x in zip(sess.get_inputs(), inputs)}
        sess.run(None, feeds)
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(pathlib.Path(sess.end_profiling()).read_text())
    model_runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = model_runs[1] if len(model_runs) > 1 else 0  # skip the warm-up run
    out = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            out[e["args"]["op_name"]] += e["dur"]
    return out


def profile_ov_ops(path, inputs, runs):
    """``{executed layer type: total µs}`` from OpenVINO's counters over ``runs`` runs after a
    warm-up (``PERF_COUNT``; nodes with status EXECUTED), or None if OpenVINO cannot compile it."""
    import openvino as ov

    if ov_probe(path):
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {**OV_CONFIG, "PERF_COUNT": True})
    req = compiled.create_infer_request()
    req.infer(list(inputs))
    out = collections.Counter()
    for _ in range(runs):
        req.infer(list(inputs))
        for info in req.get_profiling_info():  # the last inference's counters
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                out[info.node_type] += info.real_time.total_seconds() * 1e6
    return out


def profile(names, targets, runs, workdir, top, engine="onnxruntime"):
    measure = profile_ov_ops if engine == "openvino" else profile_ops
    for name in names:
        ins, _, meta = load_data(name)
        src = MODELS / f"{name}.onnx"
        prof = {"original": measure(src, ins, runs)}
        if prof["original"] is None:
            print(f"{name}: {engine} cannot run the original")
            continue
        for t in targets:
            dst = workdir / f"{name}.{t}.onnx"
            _, _, report, err = fuse_child(src, dst, t)
            if report:
                found = measure(dst, ins, runs)
                if found is not None:
                    prof[t] = found
                dst.unlink()
                dst.with_suffix(".report.json").unlink(missing_ok=True)
            else:
                print(f"{name} --target {t}: {err}")
        cols = list(prof)
        print(f"\n### {name} ({meta['route']}): share of {engine} node time, {runs} profiled runs\n")
        print("| op type | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        totals = {k: sum(v.values()) for k, v in prof.items()}
        cat = {k: collections.Counter() for k in cols}
        for k, ops in prof.items():
            for op, us in ops.items():
                cat[k][CATEGORY.get(op, "other")] += us
        for c in CATEGORIES:
            print(f"| **{c}** | " + " | ".join(f"{100 * cat[k][c] / totals[k]:.1f}%" for k in cols) + " |")
        order = sorted(set().union(*prof.values()), key=lambda op: -max(prof[k][op] / totals[k] for k in cols))
        for op in order[:top]:
            print(f"| {op} | " + " | ".join(f"{100 * prof[k][op] / totals[k]:.1f}%" for k in cols) + " |")
        print("| total node time per run (ms) | " + " | ".join(fmt_ms(totals[k] / runs / 1e3) for k in cols) + " |",
              flush=True)


#: The fused models of a run live in MODELS/.fused-<pid>-XXXX/ while it runs.
_WORKDIR_PREFIX = ".fused-"


def _remove_stale_workdirs():
    """Remove the fused-model folders of runs that were killed (their pid is gone)."""
    for folder in MODELS.glob(f"{_WORKDIR_PREFIX}*-*"):
        pid = folder.name[len(_WORKDIR_PREFIX):].split("-")[0]
        if pid.isdigit() and not pathlib.Path(f"/proc/{pid}").exists():
            print(f"removing {folder} (left by a killed run)", flush=True)
            shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these models, in this order")
    ap.add_argument("--targets", nargs="+", default=None, help="subset of the CPU targets (default: all)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="timed rounds after one warm-up (default 7; 0: fuse and parity only, no timing)")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--tract", action="store_true", help="also time the original and the portable output in tract")
    ap.add_argument("--tract-repeats", type=int, default=3, help="timed tract rounds after one warm-up (default 3)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="also write the markdown table here")
    ap.add_argument("--profile", action="store_true", help="per-op-type profile instead of the table")
    ap.add_argument("--profile-openvino", action="store_true", help="--profile from OpenVINO's PERF_COUNT counters")
    ap.add_argument("--profile-runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="op types listed per profile")
    args = ap.parse_args()
    targets = cpu_targets(args.targets)
    names = ready_models(args.only)
    _remove_stale_workdirs()
    # SIGTERM unwinds like SIGINT, so that the fused models' folder below is removed (SIGKILL
    # leaves it: the next run removes it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(dir=MODELS, prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-") as work:
        workdir = pathlib.Path(work)
        if args.profile or args.profile_openvino:
            profile(names, targets, args.profile_runs, workdir, args.top,
                    "openvino" if args.profile_openvino else "onnxruntime")
            return 0
        load = os.getloadavg()[0]
        use_ov = not args.no_openvino
        results = {}
        for name in names:
            print(f"{name} ...", flush=True)
            results[name] = bench_model(name, targets, args.repeats, workdir, use_ov,
                                        args.tract_repeats if args.tract else None)
            if args.out:  # after every model: a partial table survives an interrupted run
                args.out.write_text(header(args, load) + "\n\n" + table(results, use_ov, args.tract) + "\n")
        text = header(args, load) + "\n\n" + table(results, use_ov, args.tract)
        print("\n" + text)
        if args.out:
            args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
