"""The errors the library raises for problems that are not bugs: each message names the file
(or the input) and what is wrong, and the CLI turns them into exit code 2 with one line.

:func:`model_file_error` is the one place that decides whether an exception raised while
reading, serialising or loading a model in onnxruntime is the model's fault.
"""

from __future__ import annotations

import os
import re

__all__ = ["ModelFileError", "UsageError", "model_file_error", "one_line"]


class ModelFileError(ValueError):
    """A model file that cannot be read, run or written: bad path, not ONNX, malformed graph,
    a model onnxruntime refuses to load. The message starts with the file's path."""


class UsageError(ValueError):
    """A request this installation cannot carry out on this model: an unsupported option
    combination, a missing optional runtime, verification inputs that cannot be made
    (the message names the input and the flag that provides it)."""


#: Longest message we quote from a library: enough to say what is wrong, short enough for one line.
_QUOTE = 300


def one_line(error: BaseException | str, limit: int = _QUOTE) -> str:
    """The first non-empty line of ``error``'s message, cut to ``limit`` characters."""
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(error).__name__ if isinstance(error, BaseException) else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _onnxruntime_reason(text: str) -> str:
    """onnxruntime's message without its code prefix and C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text.strip())
    text = re.sub(r"^Load model from .*? failed:\s*", "", text)
    if re.search(r"\.(cc|h|cpp):\d+ ", text):
        text = text.rsplit(") ", 1)[-1]  # after "file.cc:256 onnxruntime::Fn(args...) "
    return text


def _root_cause(error: BaseException) -> BaseException:
    # onnx-ir wraps the real reason in SerdeError("Error calling deserialize_graph with: <repr>").
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error


def _kind(error: BaseException) -> str | None:
    """What kind of model problem ``error`` is, by where it comes from; None: not a model problem."""
    module = type(error).__module__ or ""
    name = type(error).__name__
    if name == "DecodeError" and module.startswith("google.protobuf"):
        return "not an ONNX model (the file is truncated or not ONNX; protobuf says)"
    if name == "SerdeError" and module.startswith("onnx_ir"):
        return "malformed model"
    if name == "ValidationError" and module.startswith("onnx"):
        return "fails onnx.checker"
    if name in ("InferenceError", "ShapeInferenceError") and module.startswith("onnx"):
        return "fails onnx shape inference"
    if module.startswith("onnxruntime"):
        return "onnxruntime cannot load the model"
    if isinstance(error, OSError):
        return "cannot read the model or its external data"
    return None


def model_file_error(error: BaseException, path: str | os.PathLike) -> ModelFileError | None:
    """Map an exception raised while reading, serialising or loading the model at ``path``
    into a one-line :class:`ModelFileError` naming the file, or None when it is not one of
    the known model problems (then it is a bug of ours)."""
    if isinstance(error, ModelFileError):
        return error
    kind = _kind(error)
    if kind is None:
        return None
    cause = _root_cause(error)
    detail = one_line(_onnxruntime_reason(str(cause)) if kind.startswith("onnxruntime") else cause)
    if isinstance(error, OSError) and error.strerror:
        detail = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return ModelFileError(f"{os.fspath(path)}: {kind}" + (f": {detail}" if detail else ""))
