"""Peak memory and time of a fuse on a model with ~200 MB of weights in external data.

Builds (once, in --workdir) a chain of Conv 3x3 (C=512) + GroupNorm blocks in the form
TorchScript exports ``torch.nn.GroupNorm`` (Reshape, InstanceNormalization, Reshape, Mul,
Add), weights in one external ``.data`` file, then fuses it in fresh processes under
``/usr/bin/time -v`` and prints peak RSS (as a multiple of the weights) and wall time:

* ``proto``: ``onnx.load`` + ``fuse(ModelProto)`` + ``onnx.save`` with external data (what the
  CLI did before the onnx-ir pass);
* ``ir``: ``ir.load`` (external tensors lazy, memory-mapped) + ``fuse(ir.Model)`` + ``ir.save``
  with external data (what the CLI does with the pass).

Goal (issue #8): peak RSS within 2.5x the weights + 300 MiB, under ~3 s per 100 MB.
``--pythonpath DIR`` measures another checkout (a tree holding ``onnx_groupnorm`` with its
``ops`` and ``rewriter`` inside) for a before/after table.

``--model PATH`` measures a given model instead (e.g. the 3.4 GB Stable Diffusion UNet of
``realsize/make_torch_models.py``, ``/work/bigmodels/sd_unet_ts_static/sd_unet_ts_static.onnx``):
the CLI itself (``python -m onnx_groupnorm fuse PATH -o OUT --report R --target T``) once per
``--targets`` entry, under ``/usr/bin/time -v``; per row also the layers fused against the
GroupNorms the export recorded (``NAME.json`` beside the model), whether the input's files
(the model and every external data file it references) hash the same after the run, whether
the output holds its weights in external data, and, when ``NAME.npz`` is beside the model,
onnxruntime's max abs difference fused vs original on its inputs and fused vs the framework's
output (in a child process, one session at a time: ~2x the model in memory).

``--model PATH --modes cli,cli-verify`` measures the command line on that model: ``onnx-groupnorm fuse``
(``cli``) and ``onnx-groupnorm fuse --verify`` (``cli-verify``), peak RSS against the
``--verify`` goal of issue #8 (3x the model file + 300 MiB), in fresh processes alternated
round by round; ``--before ROOT`` adds the same runs of another checkout (its repository
root, e.g. /work/main) for a before/after table with the ratio of wall times.

    python benchmarks/fuse_memory.py [--workdir /tmp/fuse_memory] [--blocks 21] [--constant-mib 64] [--pythonpath DIR]
    python benchmarks/fuse_memory.py --model PATH [--targets ort,portable] [--no-parity]
    python benchmarks/fuse_memory.py --model MODEL.onnx --modes cli,cli-verify [--before ROOT] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

CHANNELS = 512
GROUPS = 32
SPATIAL = 8

_RUN = {
    "proto": """
import onnx, time
from onnx_groupnorm.rewriter import fuse
t = time.perf_counter()
m = onnx.load({src!r})
fused, report = fuse(m)
onnx.save(fused, {dst!r}, save_as_external_data=True, location="out.onnx.data")
print(f"fused {{len(report.fused)}}; load+fuse+save {{time.perf_counter() - t:.2f}} s")
""",
    "ir": """
import onnx_ir as ir, time
from onnx_groupnorm.rewriter import fuse
t = time.perf_counter()
m = ir.load({src!r})
fused, report = fuse(m)
ir.save(fused, {dst!r}, external_data="out.onnx.data")
print(f"fused {{len(report.fused)}}; load+fuse+save {{time.perf_counter() - t:.2f}} s")
""",
}


def build(path: pathlib.Path, blocks: int, constant_mib: int) -> int:
    """The model, saved with its weights external; returns the weight bytes. ``constant_mib``
    adds a 1-D int64 Constant node of that size on a side branch (the case where onnx's shape
    inference with data propagation took ~57x the constant)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.array([0, GROUPS, -1], np.int64), "group_shape"))
    inits.append(numpy_helper.from_array(np.ones(GROUPS, np.float32), "in_scale"))
    inits.append(numpy_helper.from_array(np.zeros(GROUPS, np.float32), "in_bias"))
    x = "x"
    for i in range(blocks):
        w = rng.standard_normal((CHANNELS, CHANNELS, 3, 3), dtype=np.float32) * 0.02
        inits += [
            numpy_helper.from_array(w, f"conv{i}.weight"),
            numpy_helper.from_array(rng.standard_normal(CHANNELS, dtype=np.float32), f"conv{i}.bias"),
            numpy_helper.from_array(rng.normal(1, 0.1, (CHANNELS, 1, 1)).astype(np.float32), f"gn{i}.gamma"),
            numpy_helper.from_array(rng.normal(0, 0.1, (CHANNELS, 1, 1)).astype(np.float32), f"gn{i}.beta"),
        ]
        p = f"b{i}_"
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [p + "conv"], pads=[1, 1, 1, 1], name=p + "conv"),
            helper.make_node("Reshape", [p + "conv", "group_shape"], [p + "xg"], name=p + "gn_reshape"),
            helper.make_node("InstanceNormalization", [p + "xg", "in_scale", "in_bias"], [p + "n"], epsilon=1e-5, name=p + "gn_in"),
            helper.make_node("Shape", [p + "conv"], [p + "shape"], name=p + "gn_shape"),
            helper.make_node("Reshape", [p + "n", p + "shape"], [p + "r"], name=p + "gn_restore"),
            helper.make_node("Mul", [p + "r", f"gn{i}.gamma"], [p + "m"], name=p + "gn_mul"),
            helper.make_node("Add", [p + "m", f"gn{i}.beta"], [p + "y"], name=p + "gn_add"),
        ]
        x = p + "y"
    weights = sum(len(i.raw_data) for i in inits)
    if constant_mib:
        table = numpy_helper.from_array(np.arange(constant_mib * 2**20 // 8, dtype=np.int64), "table")
        weights += len(table.raw_data)
        nodes += [
            helper.make_node("Constant", [], ["table"], value=table, name="table"),
            helper.make_node("Add", ["table", "table"], ["table2"], name="table_add"),
            helper.make_node("ReduceMax", ["table2"], ["table_max"], keepdims=0, name="table_max"),
            helper.make_node("Cast", ["table_max"], ["table_f"], to=onnx.TensorProto.FLOAT, name="table_cast"),
            helper.make_node("Add", [x, "table_f"], ["with_table"], name="with_table"),
        ]
        x = "with_table"
    shape = [1, CHANNELS, SPATIAL, SPATIAL]
    graph = helper.make_graph(
        nodes, "fuse_memory", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, shape)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")
    return weights


#: The command line, in-process (``cli.main``), printing which checkout ran.
_CLI = """
import sys, onnx_groupnorm.rewriter as r
from onnx_groupnorm import cli
code = cli.main(sys.argv[1:])
print("exit", code, "checkout", r.__file__)
"""
#: The --verify goal of issue #8: peak RSS within this multiple of the model file + 300 MiB.
VERIFY_GOAL = 3.0


def measure(mode: str, src: pathlib.Path, dst: pathlib.Path, pythonpath: str | None) -> tuple[float, float, str]:
    """Peak RSS (MiB) and wall seconds of one fuse in a fresh process, and its output."""
    if mode.startswith("cli"):
        argv = ["-c", _CLI, "fuse", str(src), "-o", str(dst), "-q"] + (["--verify"] if mode == "cli-verify" else [])
    else:
        argv = ["-c", _RUN[mode].format(src=str(src), dst=str(dst))]
    # exit 1 (verification failed) is measured all the same
    return timed(["nice", "-n", "10", sys.executable, *argv], pythonpath, accept=(0, 1) if mode.startswith("cli") else (0,))


def timed(command: list[str], pythonpath: str | None = None, accept: tuple[int, ...] = (0,)) -> tuple[float, float, str]:
    """Peak RSS (MiB) and wall seconds of ``command`` under ``/usr/bin/time -v``, and its stdout
    (``/usr/bin/time`` is the parent: the peak is the command's own, not this process' size)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    if done.returncode not in accept:
        errors = [line for line in done.stderr.splitlines() if "Error" in line]
        return float("nan"), float("nan"), "failed: " + (errors[-1] if errors else "see stderr")[:160]
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", done.stderr).group(1).split(":")
    seconds = float(wall[-1]) + 60 * float(wall[-2])
    return rss_kib / 1024, seconds, done.stdout.strip()


# ---------------------------------------------------------------- --model: the CLI on a given model

_PARITY = r"""
import json, sys, numpy as np, onnxruntime as ort
data = np.load(sys.argv[3])
inputs = [data[f"in_{i}"] for i in range(sum(k.startswith("in_") for k in data))]
framework = [data[f"out_{i}"] for i in range(sum(k.startswith("out_") for k in data))]
so = ort.SessionOptions(); so.log_severity_level = 3; so.intra_op_num_threads = 2
outs = []
for path in sys.argv[1:3]:
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    outs.append(s.run(None, {i.name: x for i, x in zip(s.get_inputs(), inputs)})); del s
err = lambda a, b: max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b))
print(json.dumps({"fused_vs_original": err(outs[1], outs[0]), "fused_vs_framework": err(outs[1], framework),
                  "original_vs_framework": err(outs[0], framework)}))
"""


def input_files(model: pathlib.Path) -> list[pathlib.Path]:
    """The model file and every external data file it references."""
    from onnx_groupnorm.rewriter import io

    return [model, *sorted(io.referenced_files(model))]


def digest(paths: list[pathlib.Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def parity(original: pathlib.Path, fused: pathlib.Path, npz: pathlib.Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _PARITY, str(original), str(fused), str(npz)], capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(model: pathlib.Path, targets: list[str], workdir: pathlib.Path, check_parity: bool) -> None:
    """The CLI on ``model`` once per target: one markdown row each (see the module docstring)."""
    files = input_files(model)
    weights_mib = sum(p.stat().st_size for p in files) / 2**20
    meta_path, npz = model.with_suffix(".json"), model.with_suffix(".npz")
    expected = json.loads(meta_path.read_text()).get("expected_group_norms") if meta_path.exists() else None
    before = digest(files)
    budget = 2.5 * weights_mib + 300
    print(f"model: {model}, {weights_mib:,.0f} MiB in {len(files)} file(s), {expected} GroupNorms recorded by the export")
    print("| target | peak RSS MiB | RSS / model | budget 2.5x+300 MiB | wall s | s per 100 MB | fused / GroupNorms | input unchanged | "
          "output external data | max abs fused vs original | fused vs framework (export's own) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for target in targets:
        with tempfile.TemporaryDirectory(dir=workdir) as out:
            fused, report_path = pathlib.Path(out) / "fused.onnx", pathlib.Path(out) / "report.json"
            command = [sys.executable, "-m", "onnx_groupnorm", "fuse", str(model), "-o", str(fused), "--report", str(report_path), "--target", target, "-q"]
            rss, wall, stdout = timed(command)
            if not report_path.exists():
                print(f"| {target} | {stdout} ||||||||||")
                continue
            layers = len(json.loads(report_path.read_text())["fused"])
            external = sorted({e.value for t in onnx.load(fused, load_external_data=False).graph.initializer for e in t.external_data if e.key == "location"})
            unchanged = "yes" if digest(files) == before else "NO"
            errors = parity(model, fused, npz) if check_parity and npz.exists() else {}
        per_100mb = wall / (weights_mib * 2**20 / 1e8)
        if "error" in errors:
            diffs = f"| onnxruntime failed: {errors['error']} |"
        elif errors:
            diffs = f"| {errors['fused_vs_original']:.2e} | {errors['fused_vs_framework']:.2e} ({errors['original_vs_framework']:.2e}) |"
        else:
            diffs = "| - | - |"
        print(f"| {target} | {rss:,.0f} | {rss / weights_mib:.2f} | {'within' if rss <= budget else 'OVER'} ({budget:,.0f}) | {wall:.1f} | "
              f"{per_100mb:.2f} | {layers} / {expected} | {unchanged} | {', '.join(external) or 'none'} {diffs}", flush=True)


def _checkout_tree(root: pathlib.Path, into: pathlib.Path) -> str:
    """A PYTHONPATH entry importing ``onnx_groupnorm`` from the repository at ``root``
    (its src/onnx_groupnorm with ops/ and rewriter/ inside, as the editable install maps it)."""
    package = into / "onnx_groupnorm"
    package.mkdir(parents=True, exist_ok=True)
    for f in (root / "src" / "onnx_groupnorm").iterdir():
        if not (package / f.name).exists():
            (package / f.name).symlink_to(f)
    for sub in ("ops", "rewriter"):
        if not (package / sub).exists():
            (package / sub).symlink_to(root / sub)
    return str(into)


def main_cli(args) -> None:
    """The command line on ``args.model``: fuse and fuse --verify, this checkout (and --before)."""
    model = args.model.resolve()
    size_mib = sum(p.stat().st_size for p in input_files(model)) / 2**20  # with its external data
    goal = VERIFY_GOAL * size_mib + 300
    checkouts = {"this": None}
    if args.before:
        checkouts["before"] = _checkout_tree(args.before.resolve(), args.workdir / "before_tree")
    modes = args.modes.split(",") if args.modes != "proto,ir" else ["cli", "cli-verify"]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    outputs: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):  # alternated: a load change hits every variant alike
        for mode in modes:
            for name, pythonpath in checkouts.items():
                with tempfile.TemporaryDirectory(dir=args.workdir) as out:
                    rss, wall, stdout = measure(mode, model, pathlib.Path(out) / "out.onnx", pythonpath)
                results.setdefault((mode, name), []).append((rss, wall))
                outputs[(mode, name)] = stdout.splitlines()[-1] if stdout else ""
    print(f"model: {model} ({size_mib:.0f} MiB); --verify goal {VERIFY_GOAL:g}x + 300 MiB = {goal:.0f} MiB; "
          f"{args.rounds} round(s), medians; load: {os.getloadavg()[0]:.1f}")
    print("| mode | checkout | peak RSS MiB | RSS / model | within the goal | wall s | wall / before | last line |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for name in checkouts:
            runs = results[(mode, name)]
            rss, wall = statistics.median(r for r, _ in runs), statistics.median(w for _, w in runs)
            before = results.get((mode, "before"))
            ratio = f"{wall / statistics.median(w for _, w in before):.2f}" if before and name != "before" else ""
            inside = ("yes" if rss <= goal else "NO") if mode == "cli-verify" else ""
            print(f"| {mode} | {name} | {rss:.0f} | {rss / size_mib:.2f} | {inside} | {wall:.1f} | {ratio} | {outputs[(mode, name)][:60]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "fuse_memory")
    parser.add_argument("--blocks", type=int, default=21, help="Conv+GroupNorm blocks (21: ~199 MB of weights)")
    parser.add_argument("--constant-mib", type=int, default=0, help="add a 1-D int64 Constant node of this size (MiB)")
    parser.add_argument("--pythonpath", help="measure the onnx_groupnorm found on this path instead")
    parser.add_argument("--modes", default="proto,ir", help="proto,ir (synthetic model) or cli,cli-verify (--model)")
    parser.add_argument("--model", type=pathlib.Path, help="measure the CLI on this model instead of building one")
    parser.add_argument("--before", type=pathlib.Path, help="with --model --modes cli,...: also measure the checkout at this repository root")
    parser.add_argument("--rounds", type=int, default=1, help="with --model --modes cli,...: alternated rounds (medians)")
    parser.add_argument("--targets", default="ort,portable", help="with --model: the CLI's --target values, comma-separated")
    parser.add_argument("--no-parity", action="store_true", help="with --model: skip the onnxruntime comparison")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model and (args.before or args.modes.startswith("cli")):
        main_cli(args)
        return
    if args.model:
        measure_model(args.model, args.targets.split(","), args.workdir, not args.no_parity)
        return
    src = args.workdir / f"blocks{args.blocks}_constant{args.constant_mib}.onnx"
    size_file = src.with_suffix(".bytes")
    if not src.exists() or not size_file.exists():
        size_file.write_text(str(build(src, args.blocks, args.constant_mib)))
    weights_mib = int(size_file.read_text()) / 2**20
    extra = f" + a {args.constant_mib} MiB int64 Constant node" if args.constant_mib else ""
    print(f"model: {args.blocks} Conv+GroupNorm blocks{extra}, {weights_mib:.0f} MiB of weights and constants ({src})")
    print("| mode | peak RSS MiB | RSS / weights | budget 2.5x+300 MiB | process wall s | load+fuse+save s per 100 MB | output |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(dir=args.workdir) as out:
            rss, wall, stdout = measure(mode, src, pathlib.Path(out) / "out.onnx", args.pythonpath)
        budget = 2.5 * weights_mib + 300
        inside = re.search(r"save ([0-9.]+) s", stdout)
        per_100mb = float(inside.group(1)) / (weights_mib * 2**20 / 1e8) if inside else float("nan")
        print(f"| {mode} | {rss:.0f} | {rss / weights_mib:.2f} | {'within' if rss <= budget else 'OVER'} ({budget:.0f}) | {wall:.1f} | {per_100mb:.2f} | {stdout} |")


if __name__ == "__main__":
    main()
