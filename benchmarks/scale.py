"""How fusing scales: wall time of load / fuse / save and peak RSS, one child process per
point. Peak RSS is the child's own VmHWM (/proc/self/status), read after load, after fuse
and at the end: ``getrusage`` / ``wait4`` (and /usr/bin/time) would report the parent's
size at fork instead when that is larger, because Linux carries ru_maxrss across exec.

Points:

* ``chain-N``: N = 1, 10, 100, 1000 blocks of Conv 3x3 + GroupNorm (the TorchScript
  exporter's form of ``torch.nn.GroupNorm``: Reshape, InstanceNormalization, Reshape, Mul,
  Add) + SiLU, C = 32, 8 groups: fuse time per layer should stay flat;
* ``big``: a >2 GB model of the same blocks at C = 2048 (Conv kernels of 151 MB, random
  weights in one external data file), the shape of a diffusion UNet's widest stage, written
  block by block (never all in memory); ``--no-big`` skips it (it writes ~4.6 GB to disk);
* every ``*.onnx`` in ``--models DIR`` (e.g. the VAE decoders the bench helper exported to
  /work/bigmodels), when given.

The goal (issue #8): peak RSS <= 2.5 x model size + 300 MiB (3 x + 300 MiB with ``--verify``);
fuse time < ~3 s per 100 MB.
``--verify``: the fuse step runs with ``verify=True`` (what ``onnx-groupnorm fuse --verify`` does), and
a second table gives, per chain size, the time per layer and the growth exponent against the
previous size (log t2/t1 / log n2/n1: 1 is linear).

    python benchmarks/scale.py [--no-big] [--models /work/bigmodels] [--keep DIR] [--verify]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper

MiB = 2**20

#: What the child runs: the CLI's own steps (io.load_model, fuse, io.save_model), timed apart.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from onnx_groupnorm.rewriter import fuse, io
def hwm():
    return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
t1 = time.perf_counter()
model = io.load_model(sys.argv[1])
t2, h2 = time.perf_counter(), hwm()
verify = sys.argv[4] == "verify"  # as cli._fuse: weights stay mapped, the original verified from its file
fused, report = fuse(model, target=sys.argv[3], verify=verify, verify_original=sys.argv[1] if verify else None)
t3, h3 = time.perf_counter(), hwm()
io.save_model(fused, sys.argv[2], input_path=sys.argv[1])
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "fuse": t3 - t2, "save": t4 - t3, "fused": len(report.fused),
                  "verdict": report.verification.verdict if verify else "",
                  "peak_rss": hwm(), "peak_load": h2, "peak_fuse": h3}))
"""


def _block(i: int, x: str, c: int, groups: int) -> tuple[list[onnx.NodeProto], list[tuple[str, tuple, str]]]:
    """Conv + torch GroupNorm (TorchScript form) + SiLU; returns nodes and (name, shape, kind)
    of the initializers it needs (kind: "normal" random, "ones", "zeros", or an int64 value)."""
    p = f"b{i}_"
    nodes = [
        helper.make_node("Conv", [x, p + "w", p + "bias"], [p + "conv"], pads=[1, 1, 1, 1], name=p + "Conv"),
        helper.make_node("Reshape", [p + "conv", p + "grouped"], [p + "r"], name=p + "Reshape"),
        helper.make_node("InstanceNormalization", [p + "r", p + "in_s", p + "in_b"], [p + "in"], epsilon=1e-5, name=p + "InstanceNormalization"),
        helper.make_node("Shape", [p + "conv"], [p + "shape"], name=p + "Shape"),
        helper.make_node("Reshape", [p + "in", p + "shape"], [p + "r2"], name=p + "Reshape_1"),
        helper.make_node("Mul", [p + "r2", p + "gamma"], [p + "mul"], name=p + "Mul"),
        helper.make_node("Add", [p + "mul", p + "beta"], [p + "gn"], name=p + "Add"),
        helper.make_node("Sigmoid", [p + "gn"], [p + "sig"], name=p + "Sigmoid"),
        helper.make_node("Mul", [p + "gn", p + "sig"], [p + "out"], name=p + "Mul_1"),
    ]
    inits = [
        (p + "w", (c, c, 3, 3), "normal"),
        (p + "bias", (c,), "normal"),
        (p + "grouped", (3,), [0, groups, -1]),
        (p + "in_s", (groups,), "ones"),
        (p + "in_b", (groups,), "zeros"),
        (p + "gamma", (c, 1, 1), "normal"),
        (p + "beta", (c, 1, 1), "normal"),
    ]
    return nodes, inits


def _array(shape, kind, rng, c) -> np.ndarray:
    if isinstance(kind, list):
        return np.array(kind, np.int64)
    if kind == "ones":
        return np.ones(shape, np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(9 * c)).astype(np.float32)


def build(path: pathlib.Path, blocks: int, c: int, groups: int, hw: int, *, external: bool) -> int:
    """Write the model (and with ``external``, its weights to ``<name>.data``, tensor by
    tensor); return the weight bytes."""
    rng = np.random.default_rng(blocks)
    nodes, initializers, x, total = [], [], "x", 0
    data = open(str(path) + ".data", "wb") if external else None
    try:
        for i in range(blocks):
            block_nodes, inits = _block(i, x, c, groups)
            nodes += block_nodes
            x = block_nodes[-1].output[0]
            for name, shape, kind in inits:
                array = _array(shape, kind, rng, c)
                total += array.nbytes
                if data is not None and array.nbytes > 1024:
                    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
                    tensor.data_location = TensorProto.EXTERNAL
                    for key, value in (("location", path.name + ".data"), ("offset", data.tell()), ("length", array.nbytes)):
                        tensor.external_data.add(key=key, value=str(value))
                    data.write(array.tobytes())
                else:
                    tensor = onnx.numpy_helper.from_array(array, name)
                initializers.append(tensor)
                del array
    finally:
        if data is not None:
            data.close()
    graph = helper.make_graph(
        nodes, "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, hw, hw])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="benchmarks/scale.py")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return total


def measure(model: pathlib.Path, out: pathlib.Path, target: str, verify: bool = False) -> dict:
    """Run the child on ``model``: its timings and its peak RSS."""
    command = [sys.executable, "-c", _CHILD, str(model), str(out), target, "verify" if verify else "fuse"]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        last = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
        return {"error": f"exit {child.returncode}: {last}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


_CHECK = r"""
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
outs = []
for path in sys.argv[1:3]:
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape]).astype(np.float32)
    outs.append(s.run(None, {s.get_inputs()[0].name: x})[0]); del s
print(float(np.abs(outs[0] - outs[1]).max()), float(np.abs(outs[0]).max()))
"""


def check(model: pathlib.Path, out: pathlib.Path) -> str:
    """max |fused - input| in onnxruntime on one random input (sessions one after the other)."""
    done = subprocess.run([sys.executable, "-c", _CHECK, str(model), str(out)], capture_output=True, text=True)
    if done.returncode:
        return f"onnxruntime failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    error, scale = done.stdout.split()
    return f"max |fused - input| = {float(error):.3g} (outputs up to {float(scale):.3g})"


def _size(model: pathlib.Path) -> int:
    """The model file and every external data file it references."""
    from onnx_groupnorm.rewriter import io

    return model.stat().st_size + sum(p.stat().st_size for p in io.referenced_files(model))


def _row(name: str, size: int, layers: int, r: dict, verify: bool = False) -> str:
    if "error" in r:
        return f"| {name} | {size / MiB:,.1f} | {layers} | {r['error']} ||||||||"
    goal = (3 if verify else 2.5) * size + 300 * MiB  # issue #8: --verify within 3x + 300 MiB
    per_layer = 1000 * r["fuse"] / max(layers, 1)
    per_100mb = r["fuse"] / max(size / (100 * 1e6), 1e-9)
    return (
        f"| {name} | {size / MiB:,.1f} | {layers} / {r['fused']} | {r['load']:.2f} | {r['fuse']:.2f} | {per_layer:.1f} | "
        f"{per_100mb:.2f} | {r['save']:.2f} | {r['peak_load'] / MiB:,.0f} / {r['peak_fuse'] / MiB:,.0f} / {r['peak_rss'] / MiB:,.0f} | "
        f"{goal / MiB:,.0f} | {'yes' if r['peak_rss'] <= goal else 'NO'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-big", action="store_true", help="skip the >2 GB model")
    parser.add_argument("--models", type=pathlib.Path, help="also fuse every *.onnx in this folder")
    parser.add_argument("--target", default="function")
    parser.add_argument("--keep", type=pathlib.Path, help="build the models here (default: a temporary folder, removed)")
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--check", action="store_true", help="run input and output in onnxruntime and compare (needs ~2x the largest model in RAM)")
    parser.add_argument("--verify", action="store_true", help="fuse with verify=True (the fuse columns include it) and print its growth with N")
    args = parser.parse_args()

    work = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="onnx-groupnorm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, onnx {onnx.__version__}, {os.cpu_count()} CPUs, target={args.target}, verify={args.verify}, in {work}")
    print()
    print("| model | size MiB | layers / fused | load s | fuse s | fuse ms/layer | fuse s/100 MB | save s | peak RSS MiB after load / fuse / save | goal MiB | within |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    points, checks, chain = [], [], []
    for n in (int(s) for s in args.sizes.split(",")):
        folder = work / f"chain{n}"
        folder.mkdir(exist_ok=True)
        path = folder / f"chain{n}.onnx"
        build(path, n, c=32, groups=8, hw=8, external=False)
        points.append((f"chain-{n}", path, n))
    if not args.no_big:
        folder = work / "big"
        folder.mkdir(exist_ok=True)
        path = folder / "big.onnx"
        build(path, 15, c=2048, groups=32, hw=4, external=True)
        points.append(("big (15 x Conv 2048x2048x3x3)", path, 15))
    if args.models:
        paths = sorted(args.models.glob("*.onnx"))
        if any(args.models.glob("*.ready")):  # a writer that marks finished models: only those
            paths = [p for p in paths if p.with_suffix(".ready").exists()]
        points += [(path.stem, path, -1) for path in paths]
    for name, path, layers in points:
        out = work / "out" / (path.stem + ".fused.onnx")
        out.parent.mkdir(exist_ok=True)
        result = measure(path, out, args.target, args.verify)
        size = _size(path)
        if name.startswith("chain-") and "error" not in result:
            chain.append((layers, result["fuse"], result["verdict"]))
        if layers < 0:
            layers = result.get("fused", 0)
        print(_row(name, size, layers, result, args.verify), flush=True)
        if args.check and "error" not in result:
            checks.append(f"{name}: {check(path, out)}")
        for p in out.parent.iterdir():
            p.unlink()
    for line in checks:
        print(f"- {line}")
    if args.verify and chain:
        print("\n| chain N | fuse + verify s | ms per layer | growth exponent vs the previous N | verdict |\n|---:|---:|---:|---:|---|")
        for k, (n, seconds, verdict) in enumerate(chain):
            exponent = "" if k == 0 else f"{np.log(seconds / chain[k - 1][1]) / np.log(n / chain[k - 1][0]):.2f}"
            print(f"| {n} | {seconds:.2f} | {1000 * seconds / n:.1f} | {exponent} | {verdict} |")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
