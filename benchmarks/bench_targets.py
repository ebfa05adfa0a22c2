"""Time each deployment target against the original export on onnxruntime CPU.

For every corpus model with at least one GroupNormalization (block models included), and the
diffusion-VAE-sized models in benchmarks/models/ when present, this times the original export,
the ``function`` target, the ``ort`` target, ``ort`` with the SiLU absorbed (only where there is
one to absorb: it decides ``ort_cpu.ABSORBS_ACTIVATION``) and the ``onnx`` target (n/a where it
refuses or is not available), all in one process with sessions from ``_timing.session``
(spinning off) and runs alternated round-robin; medians. Prints a Markdown table: ms per form,
ratio to the original, node and Transpose counts per form, max |error| vs the original. When
torch is importable, torch's native ``group_norm`` is timed on the NCHW tensors of the
benchmarks/models/keras_tf_gn_* sizes for reference.

    /opt/venvs/dev/bin/python benchmarks/bench_targets.py [--quick] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import THREADS, machine, random_inputs, session, time_alternated  # noqa: E402

from onnx_groupnorm.rewriter import fuse  # noqa: E402

__all__ = ["main"]

logger = logging.getLogger("bench_targets")

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
BENCH_MODELS = pathlib.Path(__file__).resolve().parent / "models"
BLOCK_MARKERS = ("block", "resblock")

def _cases(only: str | None) -> list[tuple[str, onnx.ModelProto, list[np.ndarray] | None]]:
    cases = []
    manifest = json.loads((MODELS / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest["models"]:
        if entry["negative"] or (entry["expected_group_norms"] < 1 and not any(m in entry["name"] for m in BLOCK_MARKERS)):
            continue
        if only and only not in entry["name"]:
            continue
        if any(i["dtype"] == "bfloat16" for i in entry["inputs"]):
            continue  # onnxruntime's Python API cannot feed bfloat16
        with np.load(MODELS / entry["data"]) as d:
            inputs = [d[f"in_{i}"] for i in range(len(entry["inputs"]))]
        cases.append((entry["name"], onnx.load(MODELS / entry["file"]), inputs))
    if BENCH_MODELS.is_dir():
        # Keras exports at diffusion-VAE sizes, TensorFlow (keras_tf_*) and torch (keras_torch_*) backends.
        names = sorted(BENCH_MODELS.glob("keras_*_gn_*.onnx")) + sorted(BENCH_MODELS.glob("keras_*_block_nhwc_64x64x256.onnx"))
        for path in names:
            if only and only not in path.stem:
                continue
            data = path.with_suffix(".npz")
            inputs = None
            if data.exists():
                with np.load(data) as d:
                    inputs = [d[k] for k in sorted(d.files) if k.startswith("in_")] or None
            cases.append((path.stem, onnx.load(path), inputs))
    return cases


def _counts(model: onnx.ModelProto) -> tuple[int, int]:
    return len(model.graph.node), sum(1 for n in model.graph.node if n.op_type == "Transpose")


def _forms(model: onnx.ModelProto) -> tuple[dict[str, onnx.ModelProto | str], dict]:
    forms: dict[str, onnx.ModelProto | str] = {"original": model}
    info = {}
    for name, kwargs in (
        ("function", {"target": "function"}),
        ("ort", {"target": "ort"}),
        ("ort+silu", {"target": "ort", "absorb_activation": True}),
        ("onnx", {"target": "onnx"}),
    ):
        try:
            fused, report = fuse(model, **kwargs)
        except (NotImplementedError, ValueError) as e:
            forms[name] = f"n/a ({type(e).__name__})"
            continue
        if name == "ort+silu" and not any(f.activation for f in report.fused):
            continue  # nothing to absorb: same as ort
        if name == "onnx" and not report.lowered:
            forms[name] = "n/a (kept our op)"
            continue
        forms[name] = fused
        info[name] = report
    return forms, info


def _torch_group_norm(name: str, model: onnx.ModelProto, info: dict, repeats: int) -> float | None:
    """torch.nn.functional.group_norm on the NCHW equivalent of a keras_tf_gn_* input."""
    try:
        import torch
    except ImportError:
        return None
    report = info.get("function")
    if report is None or len(report.fused) != 1:
        return None
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    layer = report.fused[0]
    if "nhwc" in name:
        n, h, w, c = [d or 1 for d in dims]
    else:
        n, c, h, w = [d or 1 for d in dims]
    torch.set_num_threads(THREADS)
    x = torch.randn(n, c, h, w)
    weight, bias = torch.ones(c), torch.zeros(c)
    with torch.inference_mode():
        fn = lambda: torch.nn.functional.group_norm(x, layer.groups, weight, bias, layer.epsilon)  # noqa: E731
        return time_alternated({"torch": fn}, repeats)["torch"]


def _fmt_ms(ms: float | None, base: float) -> str:
    return "n/a" if ms is None else f"{ms:.3f} ({ms / base:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--only", help="only models whose name contains this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("onnx_groupnorm", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    started = time.perf_counter()
    order = ["original", "function", "ort", "ort+silu", "onnx"]
    rows = []
    torch_rows = []
    for name, model, inputs in _cases(args.only):
        forms, info = _forms(model)
        feeds_list = inputs if inputs is not None else random_inputs(model)
        sessions, outputs = {}, {}
        for form, m in forms.items():
            if isinstance(m, str):
                continue
            try:
                sess = session(m)
                feeds = {i.name: x for i, x in zip(sess.get_inputs(), feeds_list)}
                outputs[form] = sess.run(None, feeds)
                sessions[form] = (sess, feeds)
            except Exception as e:  # noqa: BLE001 - a form onnxruntime cannot run is reported
                forms[form] = f"n/a ({type(e).__name__})"
        if "original" not in sessions:
            continue
        size = sum(x.nbytes for x in feeds_list)
        repeats = (5 if args.quick else 15) if size > 4 << 20 else (10 if args.quick else 50)
        runners = {f: (lambda s=s, fd=fd: s.run(None, fd)) for f, (s, fd) in sessions.items()}
        times = time_alternated(runners, repeats)
        base = times["original"]
        cells, counts, transposes, errors = [], [], [], []
        for form in order:
            m = forms.get(form)
            if m is None:
                cells.append("-")
                counts.append("-")
                transposes.append("-")
                if form != "original":
                    errors.append("-")
                continue
            if isinstance(m, str):
                cells.append(m)
                counts.append("-")
                transposes.append("-")
                errors.append("-")
                continue
            cells.append(_fmt_ms(times.get(form), base) if form != "original" else f"{base:.3f}")
            n, t = _counts(m)
            counts.append(str(n))
            transposes.append(str(t))
            if form != "original":
                err = max(
                    float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
                    for a, b in zip(outputs[form], outputs["original"])
                )
                errors.append(f"{err:.2g}")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {'/'.join(counts)} | {'/'.join(transposes)} | {'/'.join(errors)} |")
        if name.startswith("keras_tf_gn_"):
            torch_ms = _torch_group_norm(name, model, info, repeats)
            if torch_ms is not None:
                torch_rows.append(f"| {name} | {base:.3f} | {times.get('ort', float('nan')):.3f} | {torch_ms:.3f} |")
        logger.info("%s done", name)

    print(f"Machine: {machine()}")
    print(f"Repeats: {'quick' if args.quick else 'default'}; medians of alternated runs; ratios to the original export.\n")
    print("| model | original ms | function ms | ort ms | ort+silu ms | onnx ms | nodes o/f/ort/silu/onnx "
          "| Transposes o/f/ort/silu/onnx | max abs err f/ort/silu/onnx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if torch_rows:
        print("\ntorch.nn.functional.group_norm (NCHW tensor of the same size, same threads):\n")
        print("| model | original ms | ort target ms | torch group_norm ms |")
        print("|---|---|---|---|")
        for row in torch_rows:
            print(row)
    print(f"\nTotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
