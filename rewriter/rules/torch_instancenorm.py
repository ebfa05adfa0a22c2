"""torch.nn.GroupNorm: Reshape -> InstanceNormalization -> Reshape -> Mul -> Add. (Not implemented yet.)"""

from __future__ import annotations

__all__ = ["rules"]


def rules() -> list:
    return []
