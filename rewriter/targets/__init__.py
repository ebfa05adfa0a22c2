"""Deployment targets: each lowers our op (after fusion) to the form that runs best where
the model will run. A target is a function ``lower(model: onnx_ir.Model, report) -> None``
that rewrites the model in place and records what it did (``report.lowered``) and what it
left as our op and why (``report.notes``).

* ``function`` (default): our op with its function body attached; nothing to lower.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from ..report import FuseReport

__all__ = ["TARGETS", "lower", "absorbs_activation_by_default"]


def _function(model: ir.Model, report: FuseReport) -> None:
    """Our op stays; the pipeline attaches its function bodies."""


#: target name -> lowering; targets that cannot hold our op's activation get it unfused first.
TARGETS: dict[str, Callable[[ir.Model, FuseReport], None]] = {"function": _function}

#: Targets whose deployment form benefits from a SiLU absorbed into the op.
_ABSORB_BY_DEFAULT: set[str] = set()


def absorbs_activation_by_default(target: str) -> bool:
    return target in _ABSORB_BY_DEFAULT


def lower(model: ir.Model, target: str, report: FuseReport) -> None:
    try:
        lowering = TARGETS[target]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}") from None
    lowering(model, report)
