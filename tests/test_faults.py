"""Fault injection through the command line: bad files, truncation and bit-flip sweeps of a
real export, special files, path collisions (the input's external data included), signals,
external data above the 2 GB threshold (lowered), names too long, malformed models.

Every case asserts the exit code, one ``error:`` line naming the file, no traceback, the
input and its external data byte-identical afterwards, and no temporary file left behind.
In-process (``cli.main``) except for signals, which run in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from corpus import MODELS, data, manifest
from helpers import session_options

from onnx_groupnorm import cli
from onnx_groupnorm.rewriter import io

#: A real export with weights (Conv kernels, gamma, beta as initializers) and 3 layers.
EXPORT = "keras_torch_export_ts_nhwc_r4_block_c32_g8"
#: A smaller real export (one layer) for the sweeps, which fuse and verify every mutant.
SWEPT = "keras_torch_export_ts_nhwc_r4_g4"
#: Mutated copies per sweep: enough to reach the parser, the IR, the rules and onnxruntime
#: (each kind shows up within ~10 draws), few enough to stay near 3 s per seed.
SWEEP = 24
#: A threshold that puts the export's Conv kernels (36 KiB each) in external data.
LOW_THRESHOLD = 4096


def _entry(name: str = EXPORT) -> dict:
    return next(e for e in manifest()["models"] if e["name"] == name)


def _digest(paths) -> dict:
    return {str(p): hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in paths}


def _temps(*folders) -> list[pathlib.Path]:
    return [p for folder in folders for p in pathlib.Path(folder).iterdir() if p.name.startswith(io.TEMP_PREFIX)]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(code: int, err: str, named, *expected: str) -> None:
    """Exit 2, exactly one line on stderr, starting "error: ", naming the file, no traceback."""
    assert code == cli.EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(named) in lines[0], err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], err


def _ort_outputs(path: pathlib.Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})


def _assert_matches_export(path: pathlib.Path, entry: dict) -> None:
    """The written model, loaded by path (external data resolved by onnxruntime), computes
    what the framework computed (the manifest's per-model tolerance)."""
    inputs, expected = data(entry)
    tol = entry["tolerance"]
    for got, want in zip(_ort_outputs(path, inputs), expected):
        np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"])


@pytest.fixture
def export(tmp_path) -> pathlib.Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    shutil.copy(MODELS / _entry()["file"], path)
    return path


@pytest.fixture
def external_export(tmp_path) -> pathlib.Path:
    """The export with its weights in ``weights.bin`` (a name our output would not pick)."""
    path = tmp_path / "in" / "orig.onnx"
    path.parent.mkdir()
    onnx.save(onnx.load(MODELS / _entry()["file"]), path, save_as_external_data=True, location="weights.bin", size_threshold=1024)
    return path


# --- bad files ------------------------------------------------------------------------


def test_fifo_input_is_refused_without_opening_it(tmp_path, capsys):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)  # opening it for reading would block this test forever
    for argv in (["fuse", fifo, "-o", tmp_path / "o.onnx"], ["inspect", fifo]):
        code, _, err = _run(argv, capsys)
        _assert_refused(code, err, fifo, "FIFO")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("seed", range(2))
def test_truncation_and_bit_flip_sweep(tmp_path, capsys, seed):
    """Every mutant is fused (exit 0) or refused with one line (exit 2): never an internal
    error, never a traceback, never a temporary file left."""
    rng = np.random.default_rng(seed)
    export = MODELS / _entry(SWEPT)["file"]
    original = export.read_bytes()
    mutant, out = tmp_path / "mutant.onnx", tmp_path / "out.onnx"
    codes = []
    for i in range(SWEEP):
        blob = bytearray(original)
        if i % 2:
            position = int(rng.integers(len(blob)))
            blob[position] ^= 1 << int(rng.integers(8))
        else:
            blob = blob[: int(rng.integers(1, len(blob)))]
        mutant.write_bytes(bytes(blob))
        code, _, err = _run(["fuse", mutant, "-o", out, "--verify"], capsys)
        codes.append(code)
        if code == cli.EXIT_OK:
            assert "Traceback" not in err and "error" not in err, err
        else:
            _assert_refused(code, err, mutant)
        assert mutant.read_bytes() == bytes(blob)
    assert not _temps(tmp_path)
    assert export.read_bytes() == original
    assert cli.EXIT_BAD_INPUT in codes  # the sweep reached the error paths


# --- special files and path collisions --------------------------------------------------


def _char_device(path: pathlib.Path) -> pathlib.Path:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    except (PermissionError, OSError):
        pytest.skip("creating a character device needs CAP_MKNOD")
    return path


@pytest.mark.parametrize("special", ["fifo", "char_device", "directory"])
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_special_output_is_refused(special, flag, export, tmp_path, capsys, monkeypatch):
    target = tmp_path / f"special_{special}"
    if special == "fifo":
        os.mkfifo(target)
    elif special == "char_device":
        _char_device(target)
    else:
        target.mkdir()
    kind = stat.S_IFMT(os.lstat(target).st_mode)
    monkeypatch.setattr("onnx_groupnorm.rewriter.fuse", _no_work)
    argv = ["fuse", export, "-o", target] if flag == "-o" else ["fuse", export, "-o", tmp_path / "o.onnx", "--report", target]
    code, _, err = _run(argv, capsys)
    _assert_refused(code, err, target)
    assert stat.S_IFMT(os.lstat(target).st_mode) == kind  # still the special file


def _no_work(*args, **kwargs):
    raise AssertionError("fuse() ran although the paths were refused up front")


def test_report_equal_to_output_is_refused(export, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("onnx_groupnorm.rewriter.fuse", _no_work)
    out = tmp_path / "o.onnx"
    code, _, err = _run(["fuse", export, "-o", out, "--report", tmp_path / "." / "o.onnx"], capsys)
    _assert_refused(code, err, "o.onnx", "report path is the model output path")
    assert not out.exists()


def test_symlinked_output_is_replaced_not_written_through(export, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "o.onnx"
    link.symlink_to(victim)
    code, _, err = _run(["fuse", export, "-o", link], capsys)
    assert code == cli.EXIT_OK, err
    assert victim.read_text() == "keep me\n"
    assert not link.is_symlink() and onnx.load(link).graph.node


def test_names_too_long_are_refused_up_front_and_legal_ones_work(export, tmp_path, capsys, monkeypatch):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    legal = tmp_path / ("a" * (name_max - 5) + ".onnx")
    code, _, err = _run(["fuse", export, "-o", legal], capsys)
    assert code == cli.EXIT_OK and legal.exists(), err
    monkeypatch.setattr("onnx_groupnorm.rewriter.fuse", _no_work)
    too_long = tmp_path / ("b" * (name_max + 1 - 5) + ".onnx")
    code, _, err = _run(["fuse", export, "-o", too_long], capsys)
    _assert_refused(code, err, too_long, f"this file system allows {name_max}")
    assert not _temps(tmp_path)


def test_output_never_replaces_the_inputs_external_data(external_export, tmp_path, capsys, monkeypatch):
    """An output whose data-file name is the input's data file writes its weights to
    another name; an output that *is* the input's data file is refused before any work."""
    folder = external_export.parent
    # the exporter named its data after another model name, then the model was renamed
    data_file = folder / "model.onnx.data"
    (folder / "weights.bin").rename(data_file)
    proto = onnx.load(external_export, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_file.name
    onnx.save(proto, external_export)
    before = _digest([external_export, data_file])
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)

    out = folder / "model.onnx"
    code, _, err = _run(["fuse", external_export, "-o", out], capsys)
    assert code == cli.EXIT_OK, err
    assert f"{data_file.name} is a data file of the input model; writing the weights to model.onnx.1.data" in err
    assert _digest([external_export, data_file]) == before
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.1.data"}
    _assert_matches_export(out, _entry())

    monkeypatch.setattr("onnx_groupnorm.rewriter.fuse", _no_work)
    for argv in (["fuse", external_export, "-o", data_file], ["fuse", external_export, "-o", tmp_path / "x.onnx", "--report", data_file]):
        code, _, err = _run(argv, capsys)
        _assert_refused(code, err, data_file, "is a data file of the input model")
    assert _digest([external_export, data_file]) == before
    assert not _temps(folder)


# --- external data ----------------------------------------------------------------------


def test_over_the_threshold_the_output_gets_external_data(external_export, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)
    before = _digest([external_export, external_export.parent / "weights.bin"])
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    code, _, err = _run(["fuse", external_export, "-o", out], capsys)
    assert code == cli.EXIT_OK, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    assert out.stat().st_size < LOW_THRESHOLD * 4  # the kernels are not inside the model file
    _assert_matches_export(out, _entry())
    assert _digest([external_export, external_export.parent / "weights.bin"]) == before


def _one_file_per_tensor(folder: pathlib.Path) -> pathlib.Path:
    """The export in the layout the TorchScript exporter writes above 2 GB: one file per tensor."""
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(onnx.load(MODELS / _entry()["file"]), path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    return path


@pytest.mark.parametrize("layout", ["one data file", "one file per tensor"])
def test_verify_over_the_threshold_runs_the_weights_in_place(layout, external_export, tmp_path, capsys, monkeypatch):
    """--verify above the (lowered) threshold: onnxruntime reads both models' weights from the
    input's own data files (never copied, never written), the output gets external data, and
    no temporary file is left beside the output or the input."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)
    path = external_export if layout == "one data file" else _one_file_per_tensor(tmp_path / "ts")
    files = sorted(path.parent.iterdir())
    assert len(files) >= 2
    before = _digest(files)
    folders, real_session = [], ort.InferenceSession

    def session(model, options=None, *args, **kwargs):
        if options is not None:
            folders.append(options.get_session_config_entry("session.model_external_initializers_file_folder_path"))
        return real_session(model, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    code, text, err = _run(["fuse", path, "-o", out, "--verify"], capsys)
    monkeypatch.setattr(ort, "InferenceSession", real_session)
    assert code == cli.EXIT_OK, err
    assert "verification passed" in text, text
    assert len(folders) >= 2 and set(folders) == {str(path.parent.resolve())}  # original and fused, in place
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    _assert_matches_export(out, _entry())
    assert sorted(path.parent.iterdir()) == files and _digest(files) == before
    assert not _temps(out.parent, path.parent)


def test_verify_of_inline_weights_runs_them_from_a_temporary_folder(export, tmp_path, capsys, monkeypatch):
    """Weights held in memory (an inline export, the limits lowered) are written once to a
    temporary folder beside the output; onnxruntime reads both models' weights from it; it
    is gone afterwards."""
    monkeypatch.setattr(io, "INLINE_WEIGHTS_BYTES", LOW_THRESHOLD)
    monkeypatch.setattr(io, "INLINE_TENSOR_BYTES", 1024)  # the Conv kernels (36 KiB) move
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    folders, real_session = [], ort.InferenceSession

    def session(model, options=None, *args, **kwargs):
        folder = options.get_session_config_entry("session.model_external_initializers_file_folder_path")
        folders.append((pathlib.Path(folder).parent, pathlib.Path(folder).name))
        return real_session(model, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    before = _digest([export])
    code, text, err = _run(["fuse", export, "-o", out, "--verify"], capsys)
    monkeypatch.setattr(ort, "InferenceSession", real_session)
    assert code == cli.EXIT_OK, err
    assert "verification passed" in text, text
    assert len(folders) >= 2 and len(set(folders)) == 1, folders  # one copy of the weights for both models
    assert folders[0][0] == out.parent.resolve() and folders[0][1].startswith(io.TEMP_PREFIX), folders
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx"]
    assert _digest([export]) == before


def test_one_file_per_tensor_layout_is_read(tmp_path, capsys):
    """The layout the TorchScript exporter writes above 2 GB: one file per tensor."""
    path = _one_file_per_tensor(tmp_path / "ts")
    files = sorted(path.parent.iterdir())
    assert len(files) > 3  # the model and several tensor files
    before = _digest(files)
    out = tmp_path / "fused.onnx"
    code, _, err = _run(["fuse", path, "-o", out], capsys)
    assert code == cli.EXIT_OK, err
    _assert_matches_export(out, _entry())
    assert _digest(files) == before


# --- malformed models ---------------------------------------------------------------------


def _export_proto() -> onnx.ModelProto:
    return onnx.load(MODELS / _entry()["file"])


def _duplicate_output(model, folder):
    model.graph.node[1].output[0] = model.graph.node[0].output[0]


def _short_raw_data(model, folder):
    tensor = model.graph.initializer[0]
    tensor.raw_data = tensor.raw_data[:-1]


def _ir_version_99(model, folder):
    model.ir_version = 99


def _unknown_op(model, folder):
    model.graph.node[0].op_type = "NoSuchOp"


def _no_ir_version(model, folder):
    model.ir_version = 0


def _external(model, folder, damage):
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    damage(folder / "model.onnx.data")
    return True


def _missing_external(model, folder):
    return _external(model, folder, lambda p: p.unlink())


def _truncated_external(model, folder):
    return _external(model, folder, lambda p: p.write_bytes(p.read_bytes()[:100]))


def _external_outside_folder(model, folder):
    def move_away(p):
        elsewhere = folder.parent / "elsewhere.data"
        p.rename(elsewhere)
        p.symlink_to(elsewhere)

    return _external(model, folder, move_away)


def _external_fifo(model, folder):
    def fifo(p):
        p.unlink()
        os.mkfifo(p)  # reading it would block forever

    return _external(model, folder, fifo)


@pytest.mark.parametrize(
    "damage,verify,message",
    [
        (_duplicate_output, False, "malformed model"),
        (_short_raw_data, False, "malformed initializer"),
        (_ir_version_99, True, "Unsupported model IR version: 99"),
        (_unknown_op, True, "onnxruntime cannot load the model"),
        (_no_ir_version, False, "not an ONNX model"),
        (_missing_external, False, "cannot read the external data"),
        (_truncated_external, False, "malformed initializer"),
        (_external_outside_folder, False, "resolves outside the model's folder"),
        (_external_fifo, False, "is a FIFO"),
    ],
)
def test_malformed_model_is_one_line_exit_2(damage, verify, message, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    model = _export_proto()
    path = folder / "model.onnx"
    if not damage(model, folder):
        onnx.save(model, path)
    files = [p for p in folder.iterdir() if stat.S_ISREG(os.lstat(p).st_mode)]
    before = _digest(files)
    out = tmp_path / "o.onnx"
    code, _, err = _run(["fuse", path, "-o", out] + (["--verify"] if verify else []), capsys)
    _assert_refused(code, err, path, message)
    assert _digest(files) == before and not out.exists() and not _temps(tmp_path, folder)


def test_library_tracebacks_are_not_printed(export, tmp_path, capsys, monkeypatch):
    """A model onnx's shape inference rejects (a domain missing from opset_import) fuses
    without a traceback on stderr; a library that logs an exception with exc_info (as onnx-ir's
    ShapeInferencePass does) shows it only with -v."""
    import logging

    import onnx_groupnorm.rewriter as rewriter

    model = onnx.load(export)
    model.graph.node[0].domain = "com.example"
    path = tmp_path / "nodomain.onnx"
    onnx.save(model, path)
    code, _, err = _run(["fuse", path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == cli.EXIT_OK and "Traceback" not in err, err

    real = rewriter.fuse

    def logs_like_onnx_ir(*args, **kwargs):
        try:
            raise ValueError("[ShapeInferenceError] inference failed")
        except ValueError as e:
            logging.getLogger("onnx_ir.passes.common.shape_inference").warning("Shape inference failed: %s. Model is left unchanged", exc_info=e)
        return real(*args, **kwargs)

    monkeypatch.setattr(rewriter, "fuse", logs_like_onnx_ir)
    code, _, err = _run(["fuse", path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == cli.EXIT_OK and "Traceback" not in err and "Shape inference failed" not in err, err
    code, _, err = _run(["fuse", path, "-o", tmp_path / "o.onnx", "-v"], capsys)
    assert code == cli.EXIT_OK and "shape inference failed" in err.lower() and "Traceback" in err, err


def test_verify_ort_gpu_without_a_gpu_is_unsupported(export, tmp_path, capsys, monkeypatch):
    if set(ort.get_available_providers()) - {"CPUExecutionProvider", "AzureExecutionProvider"}:
        pytest.skip("this onnxruntime has a GPU provider")
    monkeypatch.setattr("onnx_groupnorm.rewriter.fuse", _no_work)
    code, _, err = _run(["fuse", export, "-o", tmp_path / "o.onnx", "--verify", "--target", "ort-gpu"], capsys)
    _assert_refused(code, err, "--target ort-gpu", "unsupported on this machine", "--target function --verify")


# --- interruption -------------------------------------------------------------------------

_SIGNAL_AFTER_WRITE = """
import os, signal, sys
from onnx_groupnorm import cli
from onnx_groupnorm.rewriter import io

real_write = io._write_streamed

def write_then_signal(*args, **kwargs):
    real_write(*args, **kwargs)  # a complete model in the temporary folder, not yet renamed
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))

io._write_streamed = write_then_signal
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("name,expected", [("SIGINT", cli.EXIT_INTERRUPTED), ("SIGTERM", cli.EXIT_TERMINATED)])
def test_signal_during_the_write_leaves_nothing_behind(name, expected, export, tmp_path):
    out = tmp_path / "o.onnx"
    before = _digest([export])
    # SIGINT's default disposition in the child, as from a terminal: a shell without job control
    # starts background jobs with SIGINT ignored, and Python then keeps ignoring it.
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_WRITE, name, "fuse", str(export), "-o", str(out)], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == expected, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(export) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and not _temps(tmp_path) and _digest([export]) == before


def test_keyboard_interrupt_in_process_exits_130(export, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("onnx_groupnorm.rewriter.fuse", interrupted)
    code, _, err = _run(["fuse", export, "-o", tmp_path / "o.onnx"], capsys)
    assert code == cli.EXIT_INTERRUPTED and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_stale_temp_folders_of_dead_processes_are_removed(export, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"{io.TEMP_PREFIX}{dead}-abcd1234"
    stale.mkdir()
    (stale / "o.onnx").write_bytes(b"partial")
    alive = tmp_path / f"{io.TEMP_PREFIX}1-abcd1234"  # pid 1 always runs: in use, kept
    alive.mkdir()
    code, _, err = _run(["fuse", export, "-o", tmp_path / "o.onnx"], capsys)
    assert code == cli.EXIT_OK, err
    assert not stale.exists() and alive.exists()


@pytest.mark.slow
@pytest.mark.parametrize("verify", [False, True], ids=["fuse", "verify"])
def test_a_real_file_over_2_gb(verify, tmp_path, capsys):
    """Above the real threshold: a 2.1 GB initializer in a sparse external data file (no
    disk used for the input), fused (and verified: onnxruntime reads the input's data file in
    place) and written with its own data file beside the output."""
    from helpers import keras_dynamo_group_norm, single_model

    shape = (2, 6, 6, 16)
    nodes, _ = keras_dynamo_group_norm("x", "y", shape, 4)
    nodes += [onnx.helper.make_node("Gather", ["big", "first"], ["picked"]), onnx.helper.make_node("Add", ["y", "picked"], ["z"])]
    model = single_model(nodes, shape, y="z")
    # 2-D: onnx's shape inference with data propagation (the pipeline runs it) expands a
    # 1-D operand of Gather element by element, ~6x its size in RAM (13 GB here).
    count = (io.EXTERNAL_DATA_THRESHOLD + 2**26) // 4 // 16 * 16
    big = onnx.TensorProto(name="big", data_type=onnx.TensorProto.FLOAT, dims=[count // 16, 16])
    big.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(4 * count))):
        big.external_data.add(key=key, value=value)
    model.graph.initializer.extend([big, onnx.numpy_helper.from_array(np.array([0], np.int64), "first")])
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "model.onnx.data", "wb") as f:
        f.truncate(4 * count)  # sparse: reads as zeros
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    before = _digest([folder / "model.onnx"])
    out = tmp_path / "fused.onnx"
    code, text, err = _run(["fuse", folder / "model.onnx", "-o", out] + (["--verify"] if verify else []), capsys)
    assert code == cli.EXIT_OK, err
    assert "fused 1 GroupNormalization layer" in text
    assert ("verification passed" in text) == verify, text
    fused = onnx.load(out, load_external_data=False)
    (written,) = [t for t in fused.graph.initializer if t.name == "big"]
    assert {e.key: e.value for e in written.external_data}["location"] == "fused.onnx.data"
    assert (tmp_path / "fused.onnx.data").stat().st_size >= 4 * count
    assert _digest([folder / "model.onnx"]) == before and (folder / "model.onnx.data").stat().st_size == 4 * count
    assert not _temps(tmp_path, folder)


def test_save_model_takes_a_model_proto_and_refuses_the_inputs_files(external_export, tmp_path, monkeypatch):
    """The library API: a ModelProto is written like an ir.Model (external data above the
    threshold), and input_path protects the input and its data files."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)
    proto = onnx.load(external_export)  # weights loaded into the proto
    out = tmp_path / "api.onnx"
    io.save_model(proto, out, input_path=external_export)
    assert (tmp_path / "api.onnx.data").exists()
    _assert_matches_export(out, _entry())
    for target in (external_export, external_export.parent / "weights.bin"):
        with pytest.raises(io.ModelFileError, match="is the input model or one of its data files"):
            io.save_model(proto, target, input_path=external_export)
    assert not _temps(tmp_path, external_export.parent)


def test_streamed_write_is_the_model_onnx_ir_serialises(tmp_path):
    """save_model writes initializers one at a time (peak memory: one tensor, not the model
    twice): what it writes parses to exactly the ModelProto onnx-ir would serialise, for
    every model of models/."""
    import onnx_ir as ir

    out = tmp_path / "o.onnx"
    for entry in manifest()["models"]:
        model = io.load_model(MODELS / entry["file"])
        io.save_model(model, out)
        assert onnx.load(out) == ir.serde.serialize_model(model), entry["name"]
