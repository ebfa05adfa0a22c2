"""Fuse exported GroupNormalization subgraphs into our op and lower it for a target.

``fuse(model)`` does the whole job; :class:`GroupNormFusionPass` is the same job as an onnx-ir
pass, for a ``PassManager``. ``rule_set()`` gives the onnxscript rules to compose with your
own: call :func:`prepare_for_rules` before them and :func:`attach_functions` after.
"""

from .fusion_pass import GroupNormFusionPass, attach_functions, prepare_for_rules
from .pipeline import TARGETS, fuse
from .report import FusedLayer, FuseReport, Skipped, Verification
from .rules import all_rules, rule_set
from .targets import DEFAULT_TARGET

__all__ = [
    "fuse",
    "GroupNormFusionPass",
    "rule_set",
    "all_rules",
    "prepare_for_rules",
    "attach_functions",
    "TARGETS",
    "DEFAULT_TARGET",
    "FuseReport",
    "FusedLayer",
    "Skipped",
    "Verification",
]
