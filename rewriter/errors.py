"""The errors the library raises for problems that are not bugs: each message names the file
(or the input) and what is wrong, and the CLI turns them into exit code 2 with one line."""

from __future__ import annotations

__all__ = ["ModelFileError", "UsageError"]


class ModelFileError(ValueError):
    """A model file that cannot be read, run or written: bad path, not ONNX, malformed graph,
    a model onnxruntime refuses to load. The message starts with the file's path."""


class UsageError(ValueError):
    """A request this installation cannot carry out on this model: an unsupported option
    combination, a missing optional runtime, verification inputs that cannot be made
    (the message names the input and the flag that provides it)."""
