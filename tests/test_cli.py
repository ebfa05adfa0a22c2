"""The command line, in-process: exit codes, messages that name the file, the report."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import stat

import onnx
import pytest
from helpers import keras_dynamo_group_norm, single_model

from onnx_groupnorm import __version__, cli
from onnx_groupnorm.ops.builder import VARIANT_KEY
from onnx_groupnorm.rewriter import TARGETS

SHAPE = (2, 6, 6, 16)


@pytest.fixture
def model_path(tmp_path) -> pathlib.Path:
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    path = tmp_path / "in.onnx"
    onnx.save(single_model(nodes, SHAPE), path)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnx-groupnorm {__version__}"


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: onnx-groupnorm" in out and "fuse" in out and "inspect" in out


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == cli.EXIT_BAD_INPUT


def test_fuse_verify_report(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = model_path.read_bytes()
    code = cli.main(["fuse", str(model_path), "-o", str(out), "--verify", "--report", str(report)])
    text = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert "fused 1 GroupNormalization layer(s) (1 by KerasTorchDynamoGroupNormFusion)" in text
    assert "verification passed" in text
    assert model_path.read_bytes() == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    (layer,) = data["fused"]
    assert {k: layer[k] for k in ("rule", "groups", "axis", "center", "scale", "channels")} == {
        "rule": "KerasTorchDynamoGroupNormFusion", "groups": 4, "axis": -1, "center": True, "scale": True, "channels": 16,
    }
    assert layer["epsilon"] == pytest.approx(1e-3)
    assert data["skipped"] == [] and data["verification"]["passed"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_nothing_to_fuse_is_success(tmp_path, capsys):
    path = tmp_path / "relu.onnx"
    onnx.save(single_model([onnx.helper.make_node("Relu", ["x"], ["y"])], SHAPE), path)
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "o.onnx")]) == cli.EXIT_OK
    assert "fused no GroupNormalization layer" in capsys.readouterr().out


def test_skipped_reason_in_report(tmp_path, capsys):
    nodes, _ = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    eps = next(n for n in nodes if n.output[0] == "gn_eps")
    eps.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(__import__("numpy").full(2, 1e-3, "float32"), "gn_eps"))
    path = tmp_path / "in.onnx"
    onnx.save(single_model(nodes, SHAPE), path)
    report = tmp_path / "r.json"
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "o.onnx"), "--report", str(report)]) == cli.EXIT_OK
    (skip,) = json.loads(report.read_text())["skipped"]
    assert skip["node"] == "gn_out_reshape" and skip["reason"] == "epsilon is not a non-negative scalar constant"
    assert "skipped gn_out_reshape" in capsys.readouterr().out


@pytest.mark.parametrize("precise", [False, True], ids=["default", "precise"])
def test_precise_keeps_the_shift_in_torch_layers(precise, tmp_path, capsys):
    """A torch InstanceNormalization-form export: by default its layers keep the export's
    arithmetic (said on the summary line and in the report); ``--precise`` keeps our shift."""
    src = pathlib.Path(__file__).resolve().parents[1] / "models" / "torch" / "torch_gn_ts_r4_g4_opset17_dynbatchhw.onnx"
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["fuse", str(src), "-o", str(out), "--report", str(report)] + (["--precise"] if precise else [])
    assert cli.main(args) == cli.EXIT_OK
    data = json.loads(report.read_text())
    unshifted = [e for e in data["lowered"] if "unshifted" in e["form"]]
    assert data["precise"] is precise and len(unshifted) == (0 if precise else 1)
    said = "keep the export's InstanceNormalization arithmetic" in capsys.readouterr().out
    assert said is not precise
    # the variant of each body (the default one has overload "" and says its variant in metadata)
    variants = [p.value for f in onnx.load(out).functions for p in f.metadata_props if p.key == VARIANT_KEY]
    assert variants and any(v.endswith("_unshifted") for v in variants) is not precise


def test_inspect(model_path, capsys):
    assert cli.main(["inspect", str(model_path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "1 GroupNormalization candidate(s) would fuse" in out and "groups=4" in out
    assert cli.main(["inspect", str(model_path), "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["would_fuse"][0]["groups"] == 4


def test_verification_failure_exits_1_and_writes_nothing(model_path, tmp_path, monkeypatch, capsys):
    from onnx_groupnorm.rewriter import verify as verify_module

    real_verify = verify_module.verify

    def wrong_fusion(original, fused, **kwargs):  # the fusion got epsilon wrong
        import onnx_ir as ir

        fused = ir.to_proto(fused) if isinstance(fused, ir.Model) else copy.deepcopy(fused)
        for attr in (a for n in fused.graph.node for a in n.attribute if a.name == "epsilon"):
            attr.f *= 100
        return real_verify(original, fused, **kwargs)

    monkeypatch.setattr(verify_module, "verify", wrong_fusion)
    out = tmp_path / "out.onnx"
    assert cli.main(["fuse", str(model_path), "-o", str(out), "--verify"]) == cli.EXIT_VERIFY_FAILED
    assert not out.exists()
    assert "differs from the original" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no such file"),
        ("not_onnx", "not an ONNX model"),
        ("truncated", "not an ONNX model"),
        ("empty", "not an ONNX model"),
        ("directory", "is a directory"),
        ("same_path", "the output path is the input file"),
        ("missing_dir", "does not exist"),
        ("output_is_dir", "is a directory"),
    ],
)
def test_bad_input_exits_2_naming_the_file(case, message, model_path, tmp_path, capsys):
    src, out = model_path, tmp_path / "out.onnx"
    if case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "not_onnx":
        src = tmp_path / "notes.onnx"
        src.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        src = tmp_path / "truncated.onnx"
        src.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    elif case == "empty":
        src = tmp_path / "empty.onnx"
        src.write_bytes(b"")
    elif case == "directory":
        src = tmp_path
    elif case == "same_path":
        out = model_path
    elif case == "missing_dir":
        out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    elif case == "output_is_dir":
        out = tmp_path
    before = model_path.read_bytes()
    code = cli.main(["fuse", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert message in err
    named = out if case in ("same_path", "missing_dir", "output_is_dir") else src
    assert str(named) in err
    assert model_path.read_bytes() == before


def test_unwritable_directory(model_path, tmp_path, capsys):
    if os.geteuid() == 0:
        # root writes anywhere; a path through a regular file is unwritable for everyone
        out = model_path / "out.onnx"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out.onnx"
    assert cli.main(["fuse", str(model_path), "-o", str(out)]) == cli.EXIT_BAD_INPUT
    assert str(out) in capsys.readouterr().err


def test_external_data_is_read_and_written(tmp_path, capsys):
    nodes, params = keras_dynamo_group_norm("x", "y", SHAPE, 4)
    model = single_model(nodes + [onnx.helper.make_node("Add", ["y", "big"], ["z"])], SHAPE, y="z")
    model.graph.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").ones(SHAPE, "float32"), "big"))
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=16)
    out = tmp_path / "fused.onnx"
    assert cli.main(["fuse", str(path), "-o", str(out), "--verify"]) == cli.EXIT_OK
    fused = onnx.load(out)
    assert onnx.numpy_helper.to_array(next(i for i in fused.graph.initializer if i.name == "big")).sum() == 2 * 6 * 6 * 16


def test_unknown_target(model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx"), "--target", "tpu"])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "invalid choice: 'tpu'" in err and all(name in err for name in TARGETS)


def test_internal_error_exits_3_naming_the_file(model_path, tmp_path, monkeypatch, capsys):
    import onnx_groupnorm.rewriter as rewriter

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rewriter, "fuse", broken)
    before = model_path.read_bytes()
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx")]) == cli.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert str(model_path) in err and "RuntimeError: boom" in err
    assert model_path.read_bytes() == before and not (tmp_path / "o.onnx").exists()


# --- reading well (issue #11) -------------------------------------------------------------


@pytest.fixture
def two_layer_path(tmp_path) -> pathlib.Path:
    """Two layers whose names sort the other way round from the order they run in."""
    first, _ = keras_dynamo_group_norm("x", "mid", SHAPE, 4, prefix="z_first")
    second, _ = keras_dynamo_group_norm("mid", "y", SHAPE, 2, prefix="a_second", seed=1)
    path = tmp_path / "two.onnx"
    onnx.save(single_model(first + second, SHAPE), path)
    return path


def test_one_summary_line_then_layers_in_graph_order(two_layer_path, tmp_path, capsys):
    before = len(onnx.load(two_layer_path).graph.node)
    assert cli.main(["fuse", str(two_layer_path), "-o", str(tmp_path / "o.onnx")]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"{two_layer_path}: fused 2 GroupNormalization layer(s) (2 by KerasTorchDynamoGroupNormFusion); nodes {before} -> 2"
    )
    layers = [line.split(":")[0].strip() for line in lines[1:3]]
    assert layers[0].startswith("z_first") and layers[1].startswith("a_second")
    assert cli.main(["inspect", str(two_layer_path)]) == cli.EXIT_OK
    listed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if "would fuse " in line]
    assert [name[:7] for name in listed] == ["z_first", "a_secon"]


def test_quiet_prints_nothing_on_success(model_path, tmp_path, capsys):
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx"), "-q"]) == cli.EXIT_OK
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("target", ["function", "ort-gpu"])
def test_inspect_says_when_the_model_is_already_fused(target, model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert cli.main(["fuse", str(model_path), "-o", str(out), "--target", target]) == cli.EXIT_OK
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == cli.EXIT_OK
    assert f"{out}: already fused: 1 GroupNormalization node(s) of ours" in capsys.readouterr().out
    assert cli.main(["inspect", str(model_path)]) == cli.EXIT_OK
    assert "already fused" not in capsys.readouterr().out


def test_report_has_the_permissions_of_a_new_file(model_path, tmp_path):
    old = os.umask(0o022)
    try:
        report, out = tmp_path / "r.json", tmp_path / "o.onnx"
        assert cli.main(["fuse", str(model_path), "-o", str(out), "--report", str(report)]) == cli.EXIT_OK
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.stat().st_mode) == 0o644 == stat.S_IMODE(out.stat().st_mode)


def test_seed_reaches_fuse(model_path, tmp_path, monkeypatch):
    import onnx_groupnorm.rewriter as rewriter

    seen = {}
    real = rewriter.fuse

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(rewriter, "fuse", recording)
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx"), "--verify", "--seed", "7"]) == cli.EXIT_OK
    assert seen["seed"] == 7


def test_onnx_target_warns_once_about_large_means(model_path, tmp_path, capsys):
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx"), "--target", "onnx"]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert err.count("GroupNormalization-21 loses precision on inputs with a large mean") == 1
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx"), "--target", "function"]) == cli.EXIT_OK
    assert "loses precision" not in capsys.readouterr().err


def test_internal_error_traceback_only_with_verbose(model_path, tmp_path, monkeypatch, capsys):
    import onnx_groupnorm.rewriter as rewriter

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rewriter, "fuse", broken)
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx")]) == cli.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx"), "-v"]) == cli.EXIT_INTERNAL_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_warnings_are_shown_on_success_and_dropped_on_a_refusal(model_path, tmp_path, monkeypatch, capsys):
    import logging

    import onnx_groupnorm.rewriter as rewriter
    from onnx_groupnorm.rewriter.errors import ModelFileError

    real = rewriter.fuse

    def warns(*args, **kwargs):
        logging.getLogger("onnx_groupnorm.rewriter.pipeline").warning("shape inference failed: something")
        return real(*args, **kwargs)

    def warns_then_refuses(*args, **kwargs):
        logging.getLogger("onnx_groupnorm.rewriter.pipeline").warning("shape inference failed: something")
        raise ModelFileError(f"{model_path}: malformed model")

    monkeypatch.setattr(rewriter, "fuse", warns)
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx")]) == cli.EXIT_OK
    assert "shape inference failed: something" in capsys.readouterr().err
    monkeypatch.setattr(rewriter, "fuse", warns_then_refuses)
    assert cli.main(["fuse", str(model_path), "-o", str(tmp_path / "o.onnx")]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {model_path}: malformed model\n"
