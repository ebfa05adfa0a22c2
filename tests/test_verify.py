"""Verification (rewriter.verify, rewriter.inputs): inputs the model accepts, each fused layer
judged against its float64 NumPy reference, NaN compared as positions, a wrong fusion fails,
and the CLI's --input-shape / --inputs / exit codes."""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import onnx
import onnx_ir
import pytest
from corpus import entries, load
from helpers import keras_dynamo_group_norm
from keras_graphs import F32, I64, Builder
from onnx import TensorProto, helper

from onnx_groupnorm import cli, ops
from onnx_groupnorm.rewriter import fuse
from onnx_groupnorm.rewriter import verify as verify_module
from onnx_groupnorm.rewriter.errors import ModelFileError, UsageError
from onnx_groupnorm.rewriter.inputs import InputSpec, parse_input_shape

#: The conv stack's receptive field: three Convs of kernel 16, stride 8 need
#: 16 + 8 * 15 + 64 * 15 = 1096 samples; the verifier's first sizes (8, 16, ...) are refused.
CONV_KERNEL, CONV_STRIDE, CONV_LAYERS = 16, 8, 3
MIN_SAMPLES = CONV_KERNEL + sum(CONV_STRIDE**i * (CONV_KERNEL - 1) for i in range(1, CONV_LAYERS))
#: The large-mean input: offset OFFSET added before a one-pass E[x^2]-E[x]^2 export. float32
#: holds E[x^2] ~ OFFSET^2 = 9e4 to ~5e-3 absolute, ~5e-3 of a unit variance: the export is off
#: by ~1e-3 relative, the fused two-pass op by ~OFFSET * 6e-8 ~ 2e-5 (1e-4 tolerance).
OFFSET = 300.0


def torch_group_norm(b: Builder, x: str, channels: int, groups: int, *, seed: int = 0, eps: float = 1e-5, spatial: int = 1) -> str:
    """torch.nn.GroupNorm as TorchScript exports it (Reshape [0, G, -1] -> InstanceNormalization ->
    Reshape(Shape(x)) -> Mul gamma -> Add beta) on ``spatial`` dims: every size but C may be dynamic."""
    rng = np.random.default_rng(seed)
    xg = b.op("Reshape", x, b.i64([0, groups, -1]), allowzero=0)
    n = b.op("InstanceNormalization", xg, np.ones(groups, np.float32), np.zeros(groups, np.float32), epsilon=eps)
    r = b.op("Reshape", n, b.op("Shape", x))
    r = b.op("Mul", r, rng.normal(1, 0.5, (channels,) + (1,) * spatial).astype(np.float32))
    return b.op("Add", r, rng.normal(0, 0.5, (channels,) + (1,) * spatial).astype(np.float32))


def conv_stack_model() -> onnx.ModelProto:
    """audio [1, 1, T] -> three strided Conv1d -> GroupNorm: onnxruntime refuses T < MIN_SAMPLES."""
    rng = np.random.default_rng(1)
    b = Builder("enc")
    h, channels = "audio", 1
    for _ in range(CONV_LAYERS):
        w = (rng.normal(0, 1, (16, channels, CONV_KERNEL)) / np.sqrt(channels * CONV_KERNEL)).astype(np.float32)
        h, channels = b.op("Conv", h, w, strides=[CONV_STRIDE]), 16
    y = torch_group_norm(b, h, channels, 4)
    b.op("Identity", y, name="features")
    return b.model([("audio", F32, [1, 1, "T"])], [("features", F32, [1, 16, None])], opset=17)


def large_mean_model() -> onnx.ModelProto:
    """x + OFFSET through the Keras torch-dynamo export (one-pass variance in float32)."""
    shape = (2, 6, 6, 32)
    nodes, _ = keras_dynamo_group_norm("shifted", "y", shape, 4, epsilon=1e-3)
    offset = helper.make_node("Constant", [], ["offset"], value=onnx.numpy_helper.from_array(np.array(OFFSET, np.float32)))
    nodes = [offset, helper.make_node("Add", ["x", "offset"], ["shifted"]), *nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, shape)], [helper.make_tensor_value_info("y", F32, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


#: The deep model: DEEP_BLOCKS of Conv 3x3 (bias DEEP_OFFSET) + a TorchScript GroupNorm, 32
#: channels at 16x16. Each GroupNorm subtracts a mean of ~DEEP_OFFSET from values of unit
#: spread, so last-bit differences of the Convs (onnxruntime's NCHWc kernels or the plain ones)
#: come out ~DEEP_OFFSET times larger, block after block: the outputs of two float32 runs drift
#: past 1e-4 although every layer is within ~0.3 of the tolerance of its float64 reference.
DEEP_BLOCKS, DEEP_CHANNELS, DEEP_OFFSET, DEEP_SIZE = 24, 32, 100.0, 16
#: A wrong configuration moves the deep model's outputs this many times NOISE_FACTOR times its
#: noise floor or more (measured: epsilon x100 ~35x the floor, gamma x1.01 ~1000x); the right
#: fusion drifts 1.0x it.
FAR_ABOVE_NOISE = 10


def deep_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    b = Builder("deep")
    h, c = "x", DEEP_CHANNELS
    for k in range(DEEP_BLOCKS):
        w = (rng.normal(0, 1, (c, c, 3, 3)) / np.sqrt(c * 9)).astype(np.float32)
        h = b.op("Conv", h, w, np.full(c, DEEP_OFFSET, np.float32), pads=[1, 1, 1, 1])
        h = torch_group_norm(b, h, c, 8, seed=k, spatial=2)
    b.op("Identity", h, name="y")
    shape = [1, c, DEEP_SIZE, DEEP_SIZE]
    return b.model([("x", F32, shape)], [("y", F32, shape)], opset=17)


VOCAB = 50


def masked_tokens_model() -> onnx.ModelProto:
    """ids [B, S] -> embedding -> minus the masked mean over S -> GroupNorm. A mask row of zeros
    divides 0 by 0: NaN over that row, as a recurrent or pooling model gives on random masks."""
    rng = np.random.default_rng(2)
    b = Builder("tok")
    table = b.const(rng.normal(0, 1, (VOCAB, 16)).astype(np.float32), name="table")
    emb = b.op("Transpose", b.op("Gather", table, "ids"), perm=[0, 2, 1])  # [B, 16, S]
    m = b.op("Unsqueeze", b.op("Cast", "mask", to=F32), b.i64([1]))  # [B, 1, S]
    mean = b.op("Div", b.op("ReduceSum", b.op("Mul", emb, m), b.i64([2]), keepdims=1), b.op("ReduceSum", m, b.i64([2]), keepdims=1))
    y = torch_group_norm(b, b.op("Sub", emb, mean), 16, 4)
    b.op("Identity", y, name="y")
    return b.model([("ids", I64, ["B", "S"]), ("mask", TensorProto.BOOL, ["B", "S"])], [("y", F32, ["B", 16, "S"])], opset=17)


def uint8_image_model() -> onnx.ModelProto:
    b = Builder("img")
    x = b.op("Transpose", b.op("Div", b.op("Cast", "image", to=F32), np.array(255.0, np.float32)), perm=[0, 3, 1, 2])
    b.op("Identity", torch_group_norm(b, b.op("Conv", x, np.ones((8, 3, 1, 1), np.float32)), 8, 2), name="y")
    return b.model([("image", TensorProto.UINT8, ["N", "H", "W", 3])], [("y", F32, None)], opset=17)


def _fused(model, **kwargs):
    fused, report = fuse(model, **kwargs)
    assert report.fused, report.summary()
    return fused, report


def _mutated(fused: onnx.ModelProto, mutate) -> onnx.ModelProto:
    """A copy of ``fused`` with ``mutate(node)`` applied to each node of our op: a wrong fusion."""
    wrong = copy.deepcopy(fused)
    for node in wrong.graph.node:
        if node.domain == ops.DOMAIN:
            mutate(node, wrong)
    return wrong


# -- input synthesis ---------------------------------------------------------------------------


def test_dynamic_length_grows_until_the_model_runs():
    model = conv_stack_model()
    _, report = _fused(model, verify=True)
    v = report.verification
    assert v.verdict == "passed", v.summary_lines()
    lengths = [s["audio"][2] for s in v.input_sets]
    assert len(set(lengths)) == 2 and min(lengths) >= MIN_SAMPLES
    assert min(lengths) < 2 * MIN_SAMPLES  # grown by doubling, not a guess far above
    (layer,) = v.layers
    assert layer.original_error is not None and layer.fused_ratio <= 1


def test_input_shape_and_inputs_override(tmp_path):
    model = conv_stack_model()
    fused, _ = _fused(model)
    v = verify_module.verify(model, fused, spec=InputSpec(shapes={"audio": (1, 1, 3000)}))
    assert v.passed and v.input_sets == [{"audio": [1, 1, 3000]}]
    audio = np.random.default_rng(0).normal(size=(1, 1, 2048)).astype(np.float32)
    v = verify_module.verify(model, fused, spec=InputSpec(feeds={"audio": audio}))
    assert v.passed and v.input_sets == [{"audio": [1, 1, 2048]}]
    with pytest.raises(UsageError, match="'audio'.*--input-shape"):
        verify_module.verify(model, fused, spec=InputSpec(shapes={"audio": (1, 1, 100)}))
    with pytest.raises(UsageError, match="'nope' is not an input of the model; its inputs are: audio"):
        verify_module.verify(model, fused, spec=InputSpec(shapes={"nope": (1, 2)}))
    with pytest.raises(UsageError, match="fixes size 1"):
        verify_module.verify(model, fused, spec=InputSpec(shapes={"audio": (2, 1, 3000)}))


@pytest.mark.parametrize("text", ["audio", "audio=", "=1x2", "audio=1xa", "audio=1x-2"])
def test_bad_input_shape_flag(text):
    with pytest.raises(UsageError, match="NAME=DxDxD"):
        parse_input_shape(text)
    assert parse_input_shape("a=b=1x16000") == ("a=b", (1, 16000))


def test_ids_and_masks_fit_the_model():
    """ids below the embedding table's size; masks all ones, then a prefix of ones per row
    (never an empty row): the original is finite and verification passes without notes."""
    model = masked_tokens_model()
    from onnx_groupnorm.rewriter.inputs import Plan
    import onnx_ir as ir

    plan = Plan(ir.from_proto(model), seed=3)
    (first,) = list(plan.growth())[:1]
    ids, mask = plan.feeds(first)["ids"], plan.feeds(first)["mask"]
    assert ids.min() >= 0 and ids.max() < VOCAB and mask.all()
    mixed = plan.feeds(first, index=1)["mask"]
    assert not mixed.all() and mixed.any(axis=-1).all() and (np.diff(mixed.astype(int), axis=-1) <= 0).all()
    _, report = _fused(model, verify=True)
    v = report.verification
    assert v.verdict == "passed" and v.notes == [], v.summary_lines()
    assert [s["ids"] == s["mask"] for s in v.input_sets] == [True, True]


def test_nan_in_the_original_is_compared_as_positions(tmp_path):
    """Random 0/1 masks (given with --inputs) empty some rows: NaN there in both models, reported
    as such and passing; a fused model with NaN elsewhere fails and says where."""
    model = masked_tokens_model()
    fused, _ = _fused(model)
    rng = np.random.default_rng(4)
    feeds = {"ids": rng.integers(0, VOCAB, (4, 3)), "mask": rng.integers(0, 2, (4, 3)).astype(bool)}
    feeds["mask"][0] = False  # at least one empty row
    v = verify_module.verify(model, fused, spec=InputSpec(feeds=feeds))
    assert v.verdict == "passed", v.summary_lines()
    assert any("not finite" in n and "same positions" in n and "NaN" in n for n in v.notes), v.notes
    (out,) = v.outputs
    assert out.nonfinite >= 16 * 3 and np.isfinite(v.max_abs_error)

    def nan_beta(node, model):  # a fusion that writes NaN into one channel
        for init in model.graph.initializer:
            if init.name == node.input[2]:
                beta = onnx.numpy_helper.to_array(init).copy()
                beta.reshape(-1)[5] = np.nan
                init.CopyFrom(onnx.numpy_helper.from_array(beta, init.name))

    v = verify_module.verify(model, _mutated(fused, nan_beta), spec=InputSpec(feeds=feeds))
    assert v.verdict == "FAILED" and "not finite in the original at" in v.detail


def test_uint8_input_is_generated_over_its_range():
    _, report = _fused(uint8_image_model(), verify=True)
    assert report.verification.verdict == "passed"
    assert report.verification.inputs["image"][-1] == 3


# -- the judgement ---------------------------------------------------------------------------


def test_more_accurate_than_the_export():
    model = large_mean_model()
    _, report = _fused(model, verify=True)
    v = report.verification
    assert v.passed and v.verdict == verify_module.MORE_ACCURATE, v.summary_lines()
    (layer,) = v.layers
    # the export's one-pass variance is out of tolerance, ours within it, on the same inputs
    assert layer.original_ratio > 1 >= layer.fused_ratio and layer.confirmed is True
    assert v.worst_ratio > 1  # the outputs do differ beyond the tolerance
    assert any(f"{layer.original_error:.3g}" in n and f"{layer.fused_error:.3g}" in n for n in v.notes)
    data = json.loads(report.to_json())["verification"]
    assert data["verdict"] == verify_module.MORE_ACCURATE
    assert data["layers"][0]["original_error"] == layer.original_error and data["layers"][0]["fused_error"] == layer.fused_error


def _tiny_std_torch_model() -> onnx.ModelProto:
    """x * TINY + HUGE into torch's InstanceNormalization form: mean 1e3, std ~1e-2 at the layer,
    where onnxruntime's InstanceNormalization errs ~1e-2 (its x/std - mean/std cancels ~1e5 terms)."""
    b = Builder("tiny")
    h = b.op("Add", b.op("Mul", "x", np.array(1e-2, np.float32)), np.array(1e3, np.float32))
    b.op("Identity", torch_group_norm(b, h, 16, 4), name="y")
    return b.model([("x", F32, [2, 16, 64])], [("y", F32, [2, 16, 64])], opset=17)


def test_as_far_off_as_the_export_passes_when_its_subgraph_agrees():
    """The ort default keeps torch's InstanceNormalization arithmetic: at mean 1e3 / std 1e-2
    the fused layer is as far from float64 as the export's (both beyond the tolerance); the
    float64 re-run of the export's subgraph shows the configuration is the same, so it passes.
    With ``precise=True`` our shifted body is within the tolerance: more accurate than the export."""
    model = _tiny_std_torch_model()
    _, report = _fused(model, verify=True)
    v = report.verification
    (layer,) = v.layers
    assert v.passed and layer.fused_ratio > 1 and layer.fused_error <= layer.original_error, v.summary_lines()
    assert layer.confirmed is True
    _, report = _fused(model, verify=True, precise=True)
    v = report.verification
    (layer,) = v.layers
    assert v.verdict == verify_module.MORE_ACCURATE and layer.fused_ratio <= 1 < layer.original_ratio, v.summary_lines()


def test_within_the_exports_own_float32_noise():
    """Every layer within the tolerance of its reference on both sides, the outputs beyond it
    only by amplified float32 noise: the fused drift is within NOISE_FACTOR of how far the
    original drifts from itself without graph optimisations -- passed, and said so. (Our shifted
    body: by default the ``ort`` target keeps this torch export's own arithmetic, no drift at all.)"""
    _, report = _fused(deep_model(), verify=True, precise=True)
    v = report.verification
    assert v.verdict == verify_module.WITHIN_NOISE and v.passed, v.summary_lines()
    assert v.worst_ratio > 1  # the plain tolerance is missed (the amplification is real)
    assert all(c.fused_ratio <= 1 and c.original_ratio <= 1 for c in v.layers)
    (out,) = v.outputs
    assert 0 < out.max_abs_error <= verify_module.NOISE_FACTOR * out.noise_floor
    assert out.noise_floor > v.atol / 10  # the floor itself is amplified: not last-bit noise
    assert any("float32 noise" in n and f"{out.noise_floor:.3g}" in n for n in v.notes)
    assert json.loads(report.to_json())["verification"]["outputs"][0]["noise_floor"] == out.noise_floor
    assert v.summary_lines()[0].startswith(f"verification {verify_module.WITHIN_NOISE}:")


def _set_epsilon(node, model):
    for attr in node.attribute:
        if attr.name == "epsilon":
            attr.f *= 100


def _scale_gamma(node, model):
    for init in model.graph.initializer:
        if init.name == node.input[1]:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(1.01), init.name))


def _shift_groups(node, model):
    """groups halved: each group's statistics over twice the channels."""
    for attr in node.attribute:
        if attr.name == "groups":
            attr.i //= 2


@pytest.mark.parametrize("precise", [False, True], ids=["default", "precise"])
@pytest.mark.parametrize("mutate", [_set_epsilon, _scale_gamma, _shift_groups], ids=["epsilon", "gamma", "groups"])
@pytest.mark.parametrize("build", [large_mean_model, conv_stack_model, deep_model], ids=["large_mean", "conv_stack", "deep"])
def test_a_wrong_fusion_fails(build, mutate, precise):
    """The reference uses the fused node's configuration, so a wrong epsilon, gamma or groups
    is consistent with itself; it must still fail: the outputs differ, where the export also
    looks imprecise the original's subgraph in float64 shows the configuration changed, and
    where the export's own float32 noise is measured, far beyond it. ``default``: the torch
    models' layers keep the export's arithmetic (then a wrong groups attribute changes nothing
    the node computes, and as far off as the export it is excused only if the export's
    subgraph in float64 agrees with the node: it does not)."""
    model = build()
    fused, _ = _fused(model, precise=precise)
    v = verify_module.verify(model, _mutated(fused, mutate))
    assert not v.passed and v.verdict == "FAILED", v.summary_lines()
    # groups: the lowered body may keep its own group count; then (a) catches the node
    assert "outputs differ beyond the tolerance" in v.detail or (mutate is _shift_groups and "from its float64 reference" in v.detail)
    if build is deep_model and mutate is not _shift_groups and precise:  # far above the noise the right fusion is judged by
        (right,) = verify_module.verify(model, fused).outputs
        (out,) = v.outputs
        assert out.max_abs_error > FAR_ABOVE_NOISE * verify_module.NOISE_FACTOR * right.noise_floor, v.summary_lines()


def test_beyond_the_noise_the_verdict_fails():
    """Every fused layer's gamma scaled by 1 +/- GAMMA_NUDGE per channel: too little for any
    layer to fail, or for the original's to become one the "more accurate" verdict would rest on
    (SUSPECT_RATIO), but the outputs drift more than NOISE_FACTOR times the export's own noise:
    FAILED, naming the noise floor."""
    rng = np.random.default_rng(0)

    def nudge_gamma(node, model):
        for init in model.graph.initializer:
            if init.name == node.input[1]:
                gamma = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array((gamma * (1 + rng.choice([-1, 1], gamma.shape) * GAMMA_NUDGE)).astype(np.float32), init.name))

    model = deep_model()
    fused, _ = _fused(model)
    v = verify_module.verify(model, _mutated(fused, nudge_gamma))
    assert v.verdict == "FAILED", v.summary_lines()
    assert all(c.fused_ratio <= 1 and c.original_ratio <= verify_module.SUSPECT_RATIO for c in v.layers)
    (out,) = v.outputs
    assert verify_module.NOISE_FACTOR * out.noise_floor < out.max_abs_error
    assert "float32 noise" in v.detail


#: Relative change of each channel's gamma in every layer: the original's layers stay within
#: 0.4 of the tolerance of the changed configuration, the outputs drift ~4.5x the deep
#: model's noise floor (NOISE_FACTOR is 2).
GAMMA_NUDGE = 2e-5


# -- errors and the CLI ----------------------------------------------------------------------


def _unknown_op(model):
    model.graph.node.insert(0, helper.make_node("NoSuchOp", ["x"], ["unused"], domain="unknown.domain"))
    model.opset_import.append(helper.make_opsetid("unknown.domain", 1))


def _cycle(model):
    model.graph.node.extend([helper.make_node("Relu", ["c2"], ["c1"]), helper.make_node("Relu", ["c1"], ["c2"])])


def _undefined(model):
    model.graph.node.append(helper.make_node("Relu", ["nowhere"], ["dead"]))


def _ir_version_99(model):
    model.ir_version = 99


@pytest.mark.parametrize("break_", [_unknown_op, _cycle, _undefined, _ir_version_99], ids=lambda f: f.__name__.strip("_"))
def test_model_onnxruntime_refuses_is_a_model_file_error(break_):
    model = large_mean_model()
    break_(model)
    with pytest.raises(ModelFileError, match="^m.onnx: (onnxruntime cannot load the model|malformed model)"):
        verify_module.verify(model, model, source="m.onnx")


def test_onnxruntime_missing_is_a_usage_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    model = large_mean_model()
    with pytest.raises(UsageError, match=r"pip install onnx-groupnorm\[ort\]"):
        verify_module.verify(model, model)


def test_verify_takes_paths_and_onnx_ir_models(tmp_path):
    import onnx_ir as ir

    model = conv_stack_model()
    fused, _ = _fused(model)
    onnx.save(model, tmp_path / "in.onnx")
    v = verify_module.verify(tmp_path / "in.onnx", ir.from_proto(fused))
    assert v.verdict == "passed" and len(v.layers) == 1


def test_cli_flags_and_exit_codes(tmp_path, capsys):
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(conv_stack_model(), src)
    assert cli.main(["fuse", str(src), "-o", str(out), "--verify", "--input-shape", "audio=1x1x2500", "--report", str(report)]) == cli.EXIT_OK
    assert json.loads(report.read_text())["verification"]["input_sets"] == [{"audio": [1, 1, 2500]}]
    np.savez(tmp_path / "in.npz", audio=np.ones((1, 1, 1500), np.float32))
    assert cli.main(["fuse", str(src), "-o", str(out), "--verify", "--inputs", str(tmp_path / "in.npz")]) == cli.EXIT_OK
    assert "'audio': [1, 1, 1500]" in capsys.readouterr().out
    assert cli.main(["fuse", str(src), "-o", str(tmp_path / "o2.onnx"), "--verify", "--input-shape", "audio=1x1x64"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input 'audio'" in err and "--input-shape" in err and str(src) in err
    assert not (tmp_path / "o2.onnx").exists()
    assert cli.main(["fuse", str(src), "-o", str(out), "--verify", "--inputs", str(tmp_path / "missing.npz")]) == cli.EXIT_BAD_INPUT


# -- every model of models/ ------------------------------------------------------------------


def _sample(entry, seen=set()) -> bool:
    """One model per exporter route, pattern family, dtype policy and static/dynamic: the
    default run; the rest of models/ is marked slow (run with --run-slow)."""
    key = (entry["route"], entry["pattern_family"], entry["dtype_policy"], "dyn" in entry["name"], entry["negative"])
    if key in seen:
        return False
    seen.add(key)
    return True


CORPUS = [p if _sample(p.values[0]) else pytest.param(*p.values, id=p.id, marks=pytest.mark.slow) for p in entries()]


@pytest.mark.parametrize("entry", CORPUS)
def test_verify_passes_on_every_model(entry):
    # The function target keeps every layer's input and output names, so both sides of every
    # layer are judged; the default target moves channels-last layers onto NCHW tensors that
    # the original does not have, so there only the fused side and the outputs are.
    model = load(entry)
    _, report = fuse(model, verify=True, target="function")
    v = report.verification
    assert v.verdict == "passed" and v.notes == [], v.summary_lines()
    assert len(v.layers) <= entry["expected_group_norms"]
    # A layer whose input the rewrite made (the merged grouping Reshape's plain Reshape in
    # front of our op) has no original twin to judge; every other layer has one.
    original_values = {name for node in model.graph.node for name in node.output} | {i.name for i in model.graph.input}
    assert all(c.fused_ratio <= 1 and (c.original_error is not None or c.input not in original_values) for c in v.layers)
    _, report = fuse(load(entry), verify=True)
    v = report.verification
    assert v.verdict == "passed", v.summary_lines()
    assert all(c.fused_ratio <= 1 for c in v.layers)



@pytest.mark.parametrize("case", ["string", "no_shape"])
def test_inputs_that_cannot_be_made_name_the_input_and_the_flag(case):
    model = large_mean_model()
    extra = helper.make_tensor_value_info("extra", TensorProto.STRING if case == "string" else F32, [2] if case == "string" else None)
    model.graph.input.append(extra)
    model.graph.node.append(helper.make_node("Identity", ["extra"], ["extra_out"]))
    model.graph.output.append(helper.make_tensor_value_info("extra_out", extra.type.tensor_type.elem_type, None))
    flag = "--inputs FILE.npz" if case == "string" else "--input-shape NAME=DxD"
    with pytest.raises(UsageError, match=f"input 'extra'.*{flag}"):
        verify_module.verify(model, model)


def test_external_data_models_are_run_from_files(tmp_path, monkeypatch):
    """A path with external data is given to onnxruntime with its folder (the weights are never
    loaded into a proto); a model whose weights are in memory (above the inline limit, lowered
    here) is written once to a temporary folder with external data: onnxruntime gets the graph
    alone, never the weights serialised, and the folder is removed afterwards."""
    import onnx_ir as ir

    model = conv_stack_model()
    fused, _ = _fused(model)
    onnx.save(conv_stack_model(), tmp_path / "in.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=0)
    before = (tmp_path / "in.onnx.data").read_bytes()
    v = verify_module.verify(tmp_path / "in.onnx", fused)
    assert v.verdict == "passed" and v.layers[0].original_error is not None
    assert (tmp_path / "in.onnx.data").read_bytes() == before
    from onnx_groupnorm.rewriter import io

    monkeypatch.setattr(io, "INLINE_WEIGHTS_BYTES", 0)
    monkeypatch.setattr(io, "INLINE_TENSOR_BYTES", 1024)  # the Conv kernels go external
    import onnxruntime

    loaded, real_session = [], onnxruntime.InferenceSession

    def session(model, options, *args, **kwargs):
        folder = options.get_session_config_entry("session.model_external_initializers_file_folder_path")
        loaded.append((len(model), sorted(p.name for p in pathlib.Path(folder).iterdir())))
        return real_session(model, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    fused_ir = ir.from_proto(fused)
    work = tmp_path / "work"
    work.mkdir()
    v = verify_module.verify(model, fused_ir, workdir=work)
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    assert v.verdict == "passed" and len(loaded) == 2
    for size, files in loaded:  # the graph alone, its weights in the temporary data file
        assert size < weights and files == ["model.onnx", "model.onnx.data"]
    assert not list(work.iterdir())  # the temporary folders are removed
    assert len(fused_ir.graph.outputs) == 1  # the extra outputs are taken off again


def test_large_layers_are_compared_a_few_groups_at_a_time(monkeypatch):
    """Chunking over groups (to bound the float64 temporaries) measures the same errors as the
    whole layer: groups are independent."""
    model = large_mean_model()
    fused, _ = _fused(model)
    whole = verify_module.verify(model, fused)
    monkeypatch.setattr(verify_module, "_CHUNK_ELEMENTS", 64)  # a 2304-value layer: one group at a time
    chunked = verify_module.verify(model, fused)
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        assert b.fused_error == pytest.approx(a.fused_error, rel=1e-9)
        assert b.original_error == pytest.approx(a.original_error, rel=1e-9)
    assert chunked.verdict == whole.verdict == verify_module.MORE_ACCURATE


#: Errors of the same layer found by one run or by runs of parts of the model: onnxruntime
#: fuses nodes differently across a cut, which moves float32 results by a few ulp; the
#: errors compared (~1e-7..1e-5) agree to far better than this.
_PARTS_ERROR_TOLERANCE = 1e-6


@pytest.mark.parametrize("mode", ["parts", "batches"])
def test_layers_fetched_in_batches_are_judged_the_same(mode, monkeypatch):
    """Under a fetch budget of one byte each layer is its own batch: the models cut into one
    part per layer, each run once (``parts``), or, where a model cannot be cut, one run per
    layer of the nodes before it (``batches``). The same verdict, layers and outputs as one
    run fetching every layer."""
    import onnxruntime

    from corpus import manifest

    entry = next(e for e in manifest()["models"] if e["name"] == "keras_torch_export_ts_nhwc_r4_block_c32_g8")
    _, report = fuse(load(entry), verify=True, target="function")
    together = report.verification
    assert together.verdict == "passed" and len(together.layers) == 3
    assert all(c.original_error is not None for c in together.layers)  # each layer fetched from both models
    graphs, real_session = [], onnxruntime.InferenceSession

    def session(model, *args, **kwargs):
        graphs.append(onnx.load_from_string(model))
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(verify_module, "FETCH_BUDGET_BYTES", 1)
    if mode == "batches":
        def uncuttable(self, *args):
            raise verify_module._Unsegmentable("test")

        monkeypatch.setattr(verify_module._Segments, "__init__", uncuttable)
    _, report = fuse(load(entry), verify=True, target="function")
    apart = report.verification
    assert (apart.verdict, apart.input_sets) == (together.verdict, together.input_sets)
    for a, b in zip(apart.layers + apart.outputs, together.layers + together.outputs):
        for field in ("fused_error", "original_error", "max_abs_error"):
            if hasattr(a, field):
                assert getattr(a, field) == pytest.approx(getattr(b, field), abs=_PARTS_ERROR_TOLERANCE), (a, b)
    sessions = 2 * 3 * (len(apart.input_sets) if mode == "parts" else 1)  # per model: a part per layer (per set), or a batch per layer
    assert len(graphs) == sessions
    whole = max(len(g.graph.node) for g in graphs)
    assert sum(len(g.graph.node) < whole for g in graphs) >= 2  # runs of parts of the model


def _corpus_model(name: str) -> onnx.ModelProto:
    from corpus import manifest

    return load(next(e for e in manifest()["models"] if e["name"] == name))


def test_channels_last_layers_are_judged_on_both_sides():
    """The ort target moves a Keras/tf2onnx layer channels first (its output renamed NAME_nchw):
    the original's layer is still found (NAME, channels last) and judged in the same layout."""
    _, report = _fused(_corpus_model("keras_tf_export_nhwc_r4_resblock_g8"), verify=True, target="ort")
    v = report.verification
    assert v.verdict == "passed" and len(v.layers) == 2, v.summary_lines()
    for c in v.layers:
        assert c.output.endswith(verify_module._CHANNELS_FIRST_SUFFIX)
        assert c.original_error is not None and c.original_ratio <= 1


@pytest.mark.parametrize("mutate", [None, _set_epsilon], ids=["right", "epsilon"])
def test_float64_subgraph_is_fed_the_shapes_it_reads(mutate):
    """tf2onnx reshapes a layer back to the batch size of a value before it (Shape of the Conv
    before its Transpose): that shape is fetched and fed to the float64 evaluation, which then
    confirms the right configuration and refutes a wrong one."""
    import onnxruntime

    model = _corpus_model("keras_tf_fromkeras_nhwc_r4_resblock_g8_initial")
    fused, _ = _fused(model, target="ort")
    if mutate is not None:
        fused = _mutated(fused, mutate)
    original = onnx_ir.from_proto(model)
    layer = next(layer for layer in verify_module._layers(onnx_ir.from_proto(fused))
                 if verify_module._outside_shapes(original, layer.x, layer.y.removesuffix(verify_module._CHANNELS_FIRST_SUFFIX)))
    layer.original_y = layer.y.removesuffix(verify_module._CHANNELS_FIRST_SUFFIX)
    layer.channels_last = layer.original_y != layer.y
    layer.shapes = verify_module._outside_shapes(original, layer.x, layer.original_y)
    probe = copy.deepcopy(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in [layer.x, *layer.shapes])
    feeds = {i.name: np.random.default_rng(0).normal(size=[d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    names = [layer.x, *layer.shapes]
    values = dict(zip(names, onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)))
    params = {n: values[n] for n in layer.shapes}
    confirmed, why = verify_module._confirmed(original, layer, values[layer.x], params)
    assert confirmed is (mutate is None), why
    assert (why == "") is (mutate is None) and "depends on more than its input" not in why



def test_float64_subgraph_node_by_node_is_the_whole_graph_evaluation():
    """The float64 subgraph is evaluated one node at a time, each value dropped after its last
    use, the shape computations first (tf2onnx reads the layer input's shape only for the final
    Reshape), Add/Sub/Mul into a dead input's buffer: the result is exactly that of onnx's
    ReferenceEvaluator on the whole graph, and the input fed is left as it was."""
    import onnxruntime
    from onnx.reference import ReferenceEvaluator

    model = _corpus_model("keras_tf_fromkeras_nhwc_r4_resblock_g8_initial")
    original = onnx_ir.from_proto(model)
    fused, _ = _fused(model, target="ort")
    layer = verify_module._layers(onnx_ir.from_proto(fused))[0]
    x_name, y_name = layer.x, layer.y.removesuffix(verify_module._CHANNELS_FIRST_SUFFIX)
    shapes = verify_module._outside_shapes(original, x_name, y_name)
    probe = copy.deepcopy(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in [x_name, *shapes])
    feeds = {i.name: np.random.default_rng(0).normal(size=[d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    x, *shape_values = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run([x_name, *shapes], feeds)
    fed = dict(zip(shapes, shape_values))
    sub = verify_module._subgraph64(original, x_name, y_name, fed)
    ordered = verify_module._shapes_first(list(sub.graph.node))
    assert sorted(n.SerializeToString() for n in ordered) == sorted(n.SerializeToString() for n in sub.graph.node)
    shape_ops = [n for n in sub.graph.node if n.op_type == "Shape" and n.input[0] == x_name]
    assert shape_ops and ordered[0].op_type == "Shape", [n.op_type for n in ordered]  # the layer input's shape, read first
    x64 = x.astype(np.float64)
    (whole,) = ReferenceEvaluator(sub).run(None, {x_name: x64, **fed})
    np.testing.assert_array_equal(verify_module._evaluate(sub, {x_name: x64, **fed}), whole)
    np.testing.assert_array_equal(x64, x.astype(np.float64))  # computed in place, never over what it was fed
