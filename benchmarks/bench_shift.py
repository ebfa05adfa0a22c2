"""What the precision shift of our channels-first body costs, against torch's own export form.

torch.onnx exports ``nn.GroupNorm`` as Reshape [N, G, -1] -> InstanceNormalization -> Reshape
-> Mul(gamma) -> Add(beta), which onnxruntime runs well but whose InstanceNormalization kernel
loses digits when |mean| >> std (``benchmarks/precision.py``). Our ``cf`` body subtracts a shift
(every group's first element) before the same kernel. This times,
in one process with sessions alternated (medians), at the channels-first sizes of the SD VAE
decoder and of a ResNet-50 with GroupNorm:

* ``torch``: the export form above;
* ``ours``: our op (cf body, shift included);
* ``noshift``: our cf body with the shift's Sub removed (torch's precision, our single op);

and prints the ratios to ``torch`` and the precision of each at mean 1e3 / std 1e-2.

    python benchmarks/bench_shift.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import numpy as np
import onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import machine, session, time_alternated  # noqa: E402

from onnx_groupnorm import ops  # noqa: E402

__all__ = ["main"]

#: (N, C, H, W): SD VAE decoder layers at a 32x32 latent, ResNet-50 stages at 224x224.
SHAPES = [(1, 512, 64, 64), (1, 256, 128, 128), (1, 128, 256, 256), (1, 256, 56, 56), (1, 1024, 14, 14)]
GROUPS = 32
EPS = 1e-6


def _torch_form(shape, gamma, beta) -> onnx.ModelProto:
    h = onnx.helper
    c = shape[1]
    nodes = [
        h.make_node("Reshape", ["X", "grouped"], ["x3"]),
        h.make_node("InstanceNormalization", ["x3", "ones", "zeros"], ["n3"], epsilon=EPS),
        h.make_node("Reshape", ["n3", "shape"], ["n"]),
        h.make_node("Mul", ["n", "gamma"], ["scaled"]),
        h.make_node("Add", ["scaled", "beta"], ["Y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([0, GROUPS, -1], np.int64), "grouped"),
        onnx.numpy_helper.from_array(np.array(shape, np.int64), "shape"),
        onnx.numpy_helper.from_array(np.ones(GROUPS, np.float32), "ones"),
        onnx.numpy_helper.from_array(np.zeros(GROUPS, np.float32), "zeros"),
        onnx.numpy_helper.from_array(gamma.reshape(c, 1, 1), "gamma"),
        onnx.numpy_helper.from_array(beta.reshape(c, 1, 1), "beta"),
    ]
    graph = h.make_graph(nodes, "torch_form", [h.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
                         [h.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _without_shift(model: onnx.ModelProto) -> onnx.ModelProto:
    """Our model with the body's shift Sub bypassed (its readers take the grouped input)."""
    model = copy.deepcopy(model)
    for function in model.functions:
        subs = [n for n in function.node if n.op_type == "Sub"]
        assert len(subs) == 1, "the cf body has one Sub: the shift"
        sub = subs[0]
        for node in function.node:
            for i, name in enumerate(node.input):
                if name == sub.output[0]:
                    node.input[i] = sub.input[0]
        function.node.remove(sub)
    return model


def _error(y, y64) -> float:
    return float(np.max(np.abs(y.astype(np.float64) - y64) / (1 + np.abs(y64))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}; {args.repeats} alternated runs, medians\n")
    print("| N x C x H x W | torch ms | ours / torch | noshift / torch | err torch | err ours | err noshift (mean 1e3, std 1e-2) |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        c = shape[1]
        gamma = rng.normal(1, 0.2, c).astype(np.float32)
        beta = rng.normal(0, 0.2, c).astype(np.float32)
        ours = ops.make_model(shape, groups=GROUPS, axis=1, epsilon=EPS, gamma=gamma, beta=beta, opset=17)
        forms = {"torch": _torch_form(shape, gamma, beta), "ours": ours, "noshift": _without_shift(ours)}
        sessions = {k: session(m) for k, m in forms.items()}
        x = rng.standard_normal(shape).astype(np.float32)
        ms = time_alternated({k: (lambda s=s: s.run(None, {"X": x})) for k, s in sessions.items()}, args.repeats)
        hard = (1e3 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
        y64 = ops.group_normalization(hard.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), groups=GROUPS, axis=1, epsilon=EPS)
        errors = {k: _error(s.run(None, {"X": hard})[0], y64) for k, s in sessions.items()}
        print(
            f"| {'x'.join(map(str, shape))} | {ms['torch']:.2f} | {ms['ours'] / ms['torch']:.3f} | {ms['noshift'] / ms['torch']:.3f} "
            f"| {errors['torch']:.1e} | {errors['ours']:.1e} | {errors['noshift']:.1e} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
