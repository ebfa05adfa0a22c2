"""Reading and writing model files: clear errors that name the file, atomic writes, and
external data (models over 2 GB) read and written with the model."""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import tempfile

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelFileError

__all__ = ["ModelFileError", "load_model", "save_model", "save_text", "check_output_path", "EXTERNAL_DATA_THRESHOLD"]

#: Protobuf cannot serialise a message over 2 GiB: above this we write tensors as external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load ``path`` with its external data, or raise ModelFileError saying what is wrong."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not an ONNX model file")
    try:
        model = onnx.load(os.fspath(path), load_external_data=True)
    except DecodeError as e:
        raise ModelFileError(f"{path}: not an ONNX model (protobuf parse failed: the file is truncated or not ONNX: {e})") from e
    except (FileNotFoundError, OSError) as e:  # a missing external data file
        raise ModelFileError(f"{path}: cannot read the model or its external data: {e}") from e
    except Exception as e:  # onnx raises plain exceptions for some malformed files
        raise ModelFileError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from e
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelFileError(f"{path}: not an ONNX model (no IR version or no graph)")
    return model


def check_output_path(output: str | os.PathLike, input: str | os.PathLike | None = None) -> pathlib.Path:
    """Refuse to overwrite the input and fail early on an unwritable directory."""
    output = pathlib.Path(output)
    if input is not None:
        input = pathlib.Path(input)
        if output.resolve() == input.resolve() or (output.exists() and input.exists() and os.path.samefile(output, input)):
            raise ModelFileError(f"{output}: the output path is the input file; choose another path (the input is never overwritten)")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise ModelFileError(f"{output}: the output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelFileError(f"{output}: the output directory {parent} is not writable")
    if output.is_dir():
        raise ModelFileError(f"{output}: is a directory")
    return output


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically: a reader sees the old file or the new one.

    Models over 2 GB get their tensors in ``<name>.data`` beside the model; both files are
    written in a temporary directory next to the target and moved into place, data first.
    """
    path = pathlib.Path(path)
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    tmpdir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        tmp_model = pathlib.Path(tmpdir) / path.name
        try:
            if external:
                model = copy.deepcopy(model)  # onnx.save_model rewrites tensors to external refs in place
                location = path.name + ".data"
                onnx.save_model(model, os.fspath(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
                os.replace(pathlib.Path(tmpdir) / location, path.parent / location)
            else:
                onnx.save_model(model, os.fspath(tmp_model))
            os.replace(tmp_model, path)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot write the model: {e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise ModelFileError(f"{path}: cannot write: {e}") from e
