"""``python -m onnx_groupnorm`` runs the command-line tool."""

from .cli import entrypoint

entrypoint()
