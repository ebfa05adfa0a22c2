"""Fuse exported GroupNormalization subgraphs into our op and lower it for a target.

``fuse(model)`` does the whole job; ``rule_set()`` gives the onnxscript rules to compose
with your own (``onnxscript.rewriter.RewritePass(rule_set())`` in an onnx-ir PassManager).
"""

from .pipeline import TARGETS, fuse
from .report import FusedLayer, FuseReport, Skipped, Verification
from .rules import all_rules, rule_set

__all__ = ["fuse", "rule_set", "all_rules", "TARGETS", "FuseReport", "FusedLayer", "Skipped", "Verification"]
