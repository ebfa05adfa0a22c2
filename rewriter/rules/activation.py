"""Absorb a SiLU/swish that follows our op into its ``activation`` attribute.

``y * sigmoid(y)`` (Keras' ``swish``, torch's ``SiLU``; either operand order) and
onnxruntime's ``com.microsoft.QuickGelu`` with ``alpha=1`` (its fusion of the same) become
``GroupNormalization(..., activation=1)``. Applies only when ``y`` feeds nothing else.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from ...ops import contract
from ...ops.builder import VARIANT_KEY
from ...ops.functions import Variant

__all__ = ["AbsorbSiLU", "rules"]


class AbsorbSiLU(pattern.RewriteRuleClassBase):
    """Our op (no activation yet) followed by ``y * sigmoid(y)`` or QuickGelu(alpha=1)."""

    def __init__(self, form: str):
        self.form = form
        super().__init__({"mul": "AbsorbSiLU", "mul_swapped": "AbsorbSiLUSwapped", "quickgelu": "AbsorbSiLUQuickGelu"}[form])

    def pattern(self, op, x):
        y = op.GroupNormalization(x, _allow_other_inputs=True, _domain=contract.DOMAIN, _outputs=["y"])
        if self.form == "quickgelu":
            return op.QuickGelu(y, _domain="com.microsoft", _outputs=["out"])
        if self.form == "mul_swapped":
            return op.Mul(op.Sigmoid(y), y)
        return op.Mul(y, op.Sigmoid(y))

    def check(self, context, x, y, out=None, **_):
        result = pattern.MatchResult()
        node = y.producer()
        activation = node.attributes.get("activation")
        if activation is not None and activation.as_int() != contract.ACTIVATION_NONE:
            return result.fail("the GroupNormalization already has an activation", node)
        if out is not None:
            alpha = out.producer().attributes.get("alpha")
            if alpha is not None and abs(alpha.as_float() - 1.0) > 0:
                return result.fail(f"QuickGelu alpha={alpha.as_float()} is not SiLU (alpha=1)", out)
        overload = node.overload
        if not overload:  # the model's default body: its variant is in the function's metadata
            default = context.model.functions.get((contract.DOMAIN, contract.OP_TYPE, ""))
            overload = default.metadata_props.get(VARIANT_KEY, "") if default is not None else ""
        if not overload:
            return result.fail("cannot tell which body variant the GroupNormalization uses", node)
        self._variant = Variant.from_overload(overload)._replace(silu=True)
        return result

    def rewrite(self, op, x, y, **_):
        node = y.producer()
        attrs = {k: v.value for k, v in node.attributes.items()}
        attrs["activation"] = contract.ACTIVATION_SILU
        result = getattr(op, contract.OP_TYPE)(
            *node.inputs, _domain=contract.DOMAIN, _version=contract.VERSION, _name=node.name, **attrs
        )
        result.producer().overload = self._variant.overload
        return result


def rules() -> list[pattern.RewriteRule]:
    return [AbsorbSiLU.rule(form) for form in ("mul", "mul_swapped", "quickgelu")]
