"""Every target's output is a valid model wherever the input is one: node names unique, it
loads and matches in onnxruntime, including when the export left dead nodes (outputs nobody
reads) on tensors inside a region the layout lifting moves to channels-first (issue #8), and
the ``onnx`` target still lowers after that lifting (ranks known, issue #12)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from corpus import data, entries, load
from helpers import run_ort

from onnx_groupnorm import ops
from onnx_groupnorm.rewriter import TARGETS, fuse
from onnx_groupnorm.rewriter.targets import DEFAULT_TARGET, NOT_ON_CPU

BLOCKS = (
    "keras_torch_export_ts_nhwc_r4_block_c32_g8",
    "keras_torch_export_dynamo_nhwc_r4_block_c32_g8_initial",
    "keras_tf_export_nhwc_r4_resblock_g8",
    "keras_jax_export_resblock_gn3",
)
CPU_TARGETS = [t for t in TARGETS if t not in NOT_ON_CPU]
_DEAD_READ = ("Add", "Mul", "Sigmoid", "Cast", "Conv")


def _entry(name):
    return next(p.values[0] for p in entries() if p.values[0]["name"] == name)


def _with_dead_readers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A dead ``Shape`` on the output of every elementwise node and Conv outside the
    GroupNormalization subgraphs (those the function target keeps by name)."""
    kept = {n.name for n in fuse(model)[0].graph.node}
    model = onnx.ModelProto.FromString(model.SerializeToString())
    added = 0
    for node in list(model.graph.node):
        if node.op_type in _DEAD_READ and node.name in kept:
            model.graph.node.append(onnx.helper.make_node("Shape", [node.output[0]], [f"dead_{added}"], name=f"dead_shape_{added}"))
            added += 1
    return model, added


def _check(fused: onnx.ModelProto, entry) -> None:
    for graph in [fused.graph]:
        names = collections.Counter(n.name for n in graph.node if n.name)
        assert not [n for n, k in names.items() if k > 1], "duplicate node names"
    inputs, expected = data(entry)
    tol = entry["tolerance"]
    for a, e in zip(run_ort(fused, *inputs), expected, strict=True):
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("name", BLOCKS)
def test_dead_readers_inside_moved_regions(name, target):
    entry = _entry(name)
    model, added = _with_dead_readers(load(entry))
    assert added > 0
    run_ort(model, *data(entry)[0])  # the mutant itself loads
    fused, report = fuse(model, target=target)
    assert len(report.fused) == entry["expected_group_norms"]
    assert sum(n.name.startswith("dead_shape_") for n in fused.graph.node) == added  # kept, as the input had them
    _check(fused, entry)


@pytest.mark.parametrize("name", BLOCKS[:2])
def test_onnx_target_lowers_after_layout_lifting(name):
    """Every GroupNormalization of these (static) Keras+torch blocks becomes the standard op:
    the tensors the lifting made carry their (permuted) shapes."""
    entry = _entry(name)
    fused, report = fuse(load(entry), target="onnx")
    assert not any("rank is unknown" in note for note in report.notes), report.notes
    assert not any(n.domain == ops.DOMAIN for n in fused.graph.node)
    assert sum(n.op_type == "GroupNormalization" for n in fused.graph.node) == entry["expected_group_norms"]
    _check(fused, entry)


@pytest.mark.parametrize("name", BLOCKS)
def test_default_target_keeps_one_node_of_our_op_per_layer(name):
    """The default (whatever it is) is the single-op form a reader can follow: one node of our
    op per fused layer, with its function body, running in onnxruntime."""
    entry = _entry(name)
    fused, report = fuse(load(entry), target=DEFAULT_TARGET)
    ours = [n for n in fused.graph.node if n.domain == ops.DOMAIN]
    assert len(ours) == len(report.fused) == entry["expected_group_norms"]
    assert {(f.domain, f.name) for f in fused.functions} == {(ops.DOMAIN, ops.OP_TYPE)}
    _check(fused, entry)
