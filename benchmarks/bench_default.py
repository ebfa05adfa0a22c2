"""Whole-model latency of every target against the original export, in onnxruntime CPU and
OpenVINO CPU (f32), plus an onnxruntime per-node profile by op type.

Models: the real-size exports in /work/bigmodels (or ``--big DIR``; ``NAME.onnx`` with a
``NAME.ready`` marker, made by benchmarks/realsize/) when present, else the diffusion-sized
layer exports in benchmarks/models/ and the block models of models/. For each model every
target's output is made with ``fuse``; all forms are timed in one process, runs alternated
round-robin (``_timing.time_alternated``), medians; ratio = form / original (below 1 is
faster). OpenVINO runs at ``INFERENCE_PRECISION_HINT=f32`` (its bf16 default on this CPU is
faster and far less precise: every OpenVINO figure here is f32).

    python benchmarks/bench_default.py [--only SUBSTRING] [--repeats N] [--profile] [--no-openvino]

``--profile`` adds, per form (original, ``function``, ``ort``, ``onnx``), the share of
onnxruntime's per-node time held by each op type (Conv forms grouped, NCHWc
ReorderInput/ReorderOutput grouped).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pathlib
import sys
import tempfile

import numpy as np
import onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import THREADS, machine, random_inputs, session, time_alternated  # noqa: E402

from onnx_groupnorm.rewriter import TARGETS, fuse  # noqa: E402
from onnx_groupnorm.rewriter.targets import NOT_ON_CPU  # noqa: E402

__all__ = ["main"]

logger = logging.getLogger("bench_default")

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIG = pathlib.Path(os.environ.get("ONNX_GROUPNORM_BIGMODELS", "/work/bigmodels"))
BENCH_MODELS = pathlib.Path(__file__).resolve().parent / "models"
#: Only layers at least this large (spatial H*W) count for the "never slower" claim.
MIN_SPATIAL = 32 * 32


def _models(big: pathlib.Path, only: str | None) -> list[pathlib.Path]:
    found = sorted(p.with_suffix(".onnx") for p in big.glob("*.ready")) if big.is_dir() else []
    if not found:
        found = sorted(BENCH_MODELS.glob("keras_*_gn_*.onnx"))
        manifest = json.loads((ROOT / "models" / "manifest.json").read_text(encoding="utf-8"))
        found += [ROOT / "models" / e["file"] for e in manifest["models"] if "block" in e["name"] and not e["negative"]]
    return [p for p in found if p.exists() and (not only or only in p.stem)]


def _inputs(path: pathlib.Path, model: onnx.ModelProto) -> list[np.ndarray]:
    """The inputs saved beside the model (``in_*`` arrays), else seeded normal data of the
    static shape (symbolic dims: 1 for the batch, 64 elsewhere)."""
    data = path.with_suffix(".npz")
    if data.exists():
        with np.load(data) as d:
            saved = [d[k] for k in sorted(d.files) if k.startswith("in_")]
        if saved:
            return saved
    return random_inputs(model, size=64)


def _ov_runner(model: onnx.ModelProto, inputs):
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.onnx")
        onnx.save(model, path)
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS,
        })
    request = compiled.create_infer_request()
    return lambda: request.infer(list(inputs)), lambda: [np.asarray(request.infer(list(inputs))[o]) for o in compiled.outputs]


def _bucket(op: str) -> str:
    """onnxruntime's kernel name -> the op type it runs (NCHWc reorders and Conv forms grouped)."""
    if op in ("ReorderInput", "ReorderOutput"):
        return "NCHWc reorders"
    if op in ("Conv", "FusedConv", "NchwcConv"):
        return "Conv"
    return op


def _profile(model: onnx.ModelProto, inputs, runs: int = 2) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as folder:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(folder, "p")
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {i.name: x for i, x in zip(s.get_inputs(), inputs)}
        s.run(None, feeds)  # warm-up, not counted below
        for _ in range(runs):
            s.run(None, feeds)
        events = json.loads(pathlib.Path(s.end_profiling()).read_text())
    per_run = collections.Counter()
    run_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in run_events[len(run_events) // (runs + 1):]:  # drop the warm-up run's share
        per_run[_bucket(e["args"]["op_name"])] += e["dur"]
    total = sum(per_run.values()) or 1
    return {k: v / total for k, v in per_run.items()}


def _ort_pair(original, form: bytes, inputs, repeats: int) -> tuple[float, float]:
    """(ratio form / original, max |error| vs the original), the two sessions alternated."""
    fused = session(onnx.ModelProto.FromString(form))
    feeds = [{i.name: x for i, x in zip(s.get_inputs(), inputs)} for s in (original, fused)]
    reference = original.run(None, feeds[0])
    err = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(fused.run(None, feeds[1]), reference))
    ms = time_alternated({"original": lambda: original.run(None, feeds[0]), "form": lambda: fused.run(None, feeds[1])}, repeats)
    return ms["form"] / ms["original"], err


def _ov_pair(original, form: bytes, inputs, repeats: int) -> float:
    run = _ov_runner(onnx.ModelProto.FromString(form), inputs)[0]
    ms = time_alternated({"original": original, "form": run}, repeats)
    return ms["form"] / ms["original"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only")
    parser.add_argument("--big", type=pathlib.Path, default=BIG)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--no-ort", action="store_true", help="time OpenVINO only")
    parser.add_argument("--targets", default=",".join(t for t in TARGETS if t not in NOT_ON_CPU))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    targets = args.targets.split(",")
    ov_targets = [t for t in ("portable", "openvino") if t in targets]
    try:
        import openvino  # noqa: F401
        with_ov = not args.no_openvino
    except ImportError:
        with_ov = False
    print(f"machine: {machine()}; each form timed against the original in its own alternated pair "
          f"({args.repeats} runs each), medians; OpenVINO at f32\n")
    header = "| model | " + " | ".join(f"ort `{t}`" for t in targets) + " | ort orig ms"
    if with_ov:
        header += " | " + " | ".join(f"OV `{t}`" for t in ov_targets) + " | OV orig ms"
    print(header + " | max err vs orig |")
    print("|" + "---|" * (header.count("|") + 1))
    profiles = {}
    for path in _models(args.big, args.only):
        model = onnx.load(path)
        inputs = _inputs(path, model)
        original, original_ms = None, float("nan")
        if not args.no_ort:
            original = session(model)
            feeds = {i.name: x for i, x in zip(original.get_inputs(), inputs)}
            original_ms = time_alternated({"o": lambda: original.run(None, feeds)}, 3)["o"]
        ratios, ov_ratios, err = {}, {}, 0.0
        by_form = {"original": _profile(model, inputs)} if args.profile else {}
        for target in targets:
            # One form at a time: a real-size model is ~200 MB per copy and per session.
            form = fuse(model, target=target)[0].SerializeToString()
            if not args.no_ort:
                ratios[target], e = _ort_pair(original, form, inputs, args.repeats)
                err = max(err, e)
            if args.profile and target in ("function", "ort", "onnx"):
                by_form[target] = _profile(onnx.ModelProto.FromString(form), inputs)
            if with_ov and target in ov_targets:
                ov_original = _ov_runner(model, inputs)[0]
                ov_ratios[target] = _ov_pair(ov_original, form, inputs, args.repeats)
                ov_ratios["original_ms"] = time_alternated({"o": ov_original}, 3)["o"]
                del ov_original
            del form
        row = " | ".join(f"{ratios[t]:.3f}" if t in ratios else "n/a" for t in targets) + f" | {original_ms:.1f}"
        if with_ov:
            row += " | " + " | ".join(f"{ov_ratios[t]:.3f}" for t in ov_targets) + f" | {ov_ratios.get('original_ms', float('nan')):.1f}"
        print(f"| {path.stem} | {row} | {err:.1e} |", flush=True)
        if by_form:
            profiles[path.stem] = by_form
        del original, model
    for stem, by_form in profiles.items():
        print(f"\nonnxruntime profile of {stem} (share of node time, op types above 1% in some form):\n")
        shown = sorted({b for shares in by_form.values() for b, v in shares.items() if v >= 0.01})
        print("| form | " + " | ".join(shown) + " | rest |")
        print("|" + "---|" * (len(shown) + 2))
        for name, shares in by_form.items():
            rest = 1 - sum(shares.get(b, 0) for b in shown)
            print(f"| {name} | " + " | ".join(f"{100 * shares.get(b, 0):.1f}%" for b in shown) + f" | {100 * rest:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
