"""Keras + torch through torch.onnx's dynamo exporter (``model.export`` with a static
input signature, or ``torch.onnx.export(dynamo=True)``): Keras' torch ``moments`` is
``var = mean(x^2) - mean(x)^2`` with squares as ``Pow(., 2.0)``; Reshapes carry
``allowzero=1``; no Casts in float32.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from ._keras import KerasGroupNormFusionBase

__all__ = ["KerasTorchDynamoGroupNormFusion", "rules"]


class KerasTorchDynamoGroupNormFusion(KerasGroupNormFusionBase):
    """E[x^2] - E[x]^2 with ``Pow(., 2)``, as torch's dynamo exporter writes it."""

    def moments(self, op, xs):
        mean = op.ReduceMean(xs, _allow_other_inputs=True)
        mean_sq = op.ReduceMean(op.Pow(xs, 2.0), _allow_other_inputs=True)
        return mean, op.Sub(mean_sq, op.Pow(mean, 2.0))


def rules() -> list[pattern.RewriteRule]:
    return [KerasTorchDynamoGroupNormFusion.rule(scale=s, center=c) for s in (True, False) for c in (True, False)]
