"""The fusion rules, one module per exporter family, and the rule set in matching order.

Order matters where two rules can match the same subgraph: the first that matches a node
wins. Every Keras family anchors on the final Reshape and differs in the moments, so no two
families match the same nodes; within a family, variants with gamma/beta come before
those without (a rule without the beta Add would otherwise claim ``shift + beta`` as a
bare shift and fail its check instead of letting the full rule match).
"""

from __future__ import annotations

import functools

from onnxscript.rewriter import pattern

from . import (
    jax2onnx,
    keras36_fp16,
    keras_torch_dynamo,
    keras_torch_torchscript,
    standard_op,
    tf2onnx,
    tf_keras,
    torch_instancenorm,
)

__all__ = ["FAMILIES", "all_rules", "rule_set", "family_of"]

#: Exporter families in matching order (module, the ``pattern_family`` it fuses).
FAMILIES = (
    (keras36_fp16, "tf2onnx-moments-fp16clip"),
    (tf2onnx, "tf2onnx-moments"),
    (tf_keras, "tf_keras-weighted-moments"),
    (keras_torch_torchscript, "keras-torch-torchscript"),
    (keras_torch_dynamo, "keras-torch-dynamo"),
    (jax2onnx, "jax2onnx-moments-var"),
    (torch_instancenorm, "torch-instancenorm"),
    (standard_op, "onnx-GroupNormalization-op"),
)


def all_rules(*, keep_standard: bool = False) -> list[pattern.RewriteRule]:
    """Every rule, in matching order; ``keep_standard`` leaves standard GroupNormalization ops."""
    rules: list[pattern.RewriteRule] = []
    for module, _ in FAMILIES:
        if keep_standard and module is standard_op:
            continue
        rules.extend(module.rules())
    return rules


def rule_set(*, keep_standard: bool = False) -> pattern.RewriteRuleSet:
    """The rules as one ``RewriteRuleSet``, to compose with other onnxscript rules."""
    return pattern.RewriteRuleSet(all_rules(keep_standard=keep_standard))


def family_of(rule_name: str) -> str | None:
    """The ``pattern_family`` of the rule named ``rule_name`` (a fused node's rule tag), or None."""
    return _families().get(rule_name)


@functools.cache
def _families() -> dict[str, str]:
    return {rule.name: family for module, family in FAMILIES for rule in module.rules()}
