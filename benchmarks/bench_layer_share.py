"""How much of a block's time its GroupNormalizations take, before and after fusion.

Profiles (onnxruntime's per-kernel profiler, 2 threads, spinning off, basic graph
optimisations so that kernels keep their node names) the original export
and the ``function`` and ``ort`` targets of the block models, and sums the kernel time of
the GroupNormalization work in each: in the original, every node the fusion removed (the
exported statistics, affine and shape subgraph, plus the layout Transposes the ``ort``
target drops); in the fused models, the kernels inlined from our op's function body.
Prints per model: total kernel ms, GroupNormalization ms and share, and the speed-up of
the GroupNormalization part per layer.

    python benchmarks/bench_layer_share.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import THREADS, machine  # noqa: E402

from onnx_groupnorm.rewriter import fuse  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKS = [
    "benchmarks/models/keras_tf_block_nhwc_64x64x256.onnx",
    "benchmarks/models/keras_torch_block_nhwc_64x64x256.onnx",
    "models/keras_tf/keras_tf_export_keras_hub_vae_encoder_static.onnx",
    "models/keras_tf/keras_tf_fromkeras_keras_hub_vae_decoder_dynhw.onnx",
    "models/keras_tf/keras_tf_export_nhwc_r4_resblock_g8.onnx",
    "models/keras_torch/keras_torch_export_ts_nhwc_r4_block_c32_g8.onnx",
    "models/keras_jax/keras_jax_export_resblock_gn3.onnx",
]


def _inputs(model: onnx.ModelProto) -> dict:
    rng = np.random.default_rng(0)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = [d.dim_value if d.dim_value > 0 else (1 if i == 0 else 16) for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.normal(size=dims).astype(dtype)
    return feeds


def _kernel_times(model: onnx.ModelProto, feeds: dict, repeats: int) -> dict[str, float]:
    """Median microseconds per node name."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Basic optimisations only (constant folding, no node fusions), so that every kernel in
    # the profile keeps the name of its node and can be attributed.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/onnx_groupnorm_profile"
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(3 + repeats):
        session.run(None, feeds)
    path = session.end_profiling()
    events = json.loads(pathlib.Path(path).read_text())
    pathlib.Path(path).unlink()
    per_node = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][: -len("_kernel_time")]].append(e["dur"])
    # The first 3 runs are warm-up: keep the last ``repeats`` samples of each node.
    return {k: float(np.median(v[-repeats:])) for k, v in per_node.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print("| model | layers | original: total ms, GN ms (share) | function: GN ms, GN speed-up | ort: GN ms, GN speed-up |")
    print("|---|---|---|---|---|")
    for rel in BLOCKS:
        path = ROOT / rel
        if not path.exists():
            print(f"| {path.stem} | missing: run benchmarks/make_keras_models.py | | | |")
            continue
        original = onnx.load(path)
        feeds = _inputs(original)
        base = _kernel_times(original, feeds, args.repeats)
        cells = []
        layers = 0
        for target in ("function", "ort"):
            fused, report = fuse(original, target=target)
            layers = len(report.fused)
            kept = {n.name for n in fused.graph.node}
            removed = sum(t for name, t in base.items() if name not in kept)
            times = _kernel_times(fused, feeds, args.repeats)
            ours = sum(t for name, t in times.items() if "_inlfunc_GroupNormalization" in name)
            cells.append((removed, ours))
        total = sum(base.values())
        removed_f = cells[0][0]
        print(
            f"| {path.stem} | {layers} | {total / 1e3:.3f}, {removed_f / 1e3:.3f} ({removed_f / total:.0%}) "
            f"| {cells[0][1] / 1e3:.3f}, {cells[0][0] / cells[0][1]:.1f}x | {cells[1][1] / 1e3:.3f}, {cells[1][0] / cells[1][1]:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
