"""The op contract: the one place that says what our GroupNormalization op is.

Domain, op type, version, attribute names and defaults, and how a configuration is
validated and resolved against a concrete input shape. Everything else (the onnxscript
function bodies, the NumPy reference, the builders, the rewriter rules and targets)
reads these names from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = [
    "DOMAIN",
    "VERSION",
    "OP_TYPE",
    "MIN_OPSET",
    "DEFAULT_GROUPS",
    "DEFAULT_AXIS",
    "DEFAULT_EPSILON",
    "ACTIVATION_NONE",
    "ACTIVATION_SILU",
    "ACTIVATIONS",
    "GroupNormConfig",
]

#: Our custom operator domain (reverse-DNS, owned by this project) and its version.
DOMAIN = "io.github.onnx_groupnorm"
VERSION = 1
OP_TYPE = "GroupNormalization"

#: The lowest default-domain opset our function bodies are written for. ONNX runtimes inline
#: a function with the *model's* opset, so every body op must keep its signature from here on
#: (ReduceSum takes axes as an input from opset 13).
MIN_OPSET = 13

# Keras 3 keras.layers.GroupNormalization defaults.
DEFAULT_GROUPS = 32
DEFAULT_AXIS = -1
DEFAULT_EPSILON = 1e-3

#: The ``activation`` attribute (an extension over Keras, as in onnxruntime's contrib
#: GroupNorm): 0 none, 1 SiLU/swish ``y * sigmoid(y)`` applied to the normalised output.
ACTIVATION_NONE = 0
ACTIVATION_SILU = 1
ACTIVATIONS = frozenset({ACTIVATION_NONE, ACTIVATION_SILU})


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """A GroupNormalization layer as Keras defines it.

    ``groups`` may be -1 (one group per channel); ``axis`` may be negative. ``center`` and
    ``scale`` say whether beta and gamma are present.
    """

    groups: int = DEFAULT_GROUPS
    axis: int = DEFAULT_AXIS
    epsilon: float = DEFAULT_EPSILON
    center: bool = True
    scale: bool = True

    def normalized_axis(self, rank: int) -> int:
        """The channel axis as a non-negative index; ValueError when out of range."""
        if rank < 2:
            raise ValueError(f"GroupNormalization needs an input of rank >= 2, got rank {rank}")
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis={self.axis} is out of range for an input of rank {rank}")
        axis = self.axis % rank
        if axis == 0:
            raise ValueError("axis=0 is the batch axis; the channel axis must be another one")
        return axis

    def resolved_groups(self, channels: int) -> int:
        """Number of groups for ``channels`` channels (-1 means one per channel)."""
        if self.groups == -1:
            return channels
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1 or -1, got {self.groups}")
        if self.groups > channels:
            raise ValueError(
                f"groups={self.groups} is larger than the number of channels C={channels}"
            )
        if channels % self.groups:
            raise ValueError(f"C={channels} is not divisible by groups={self.groups}")
        return self.groups

    def validate(self, shape: Sequence[int | str | None]) -> tuple[int, int, int]:
        """Check the configuration against an input shape.

        Returns ``(axis, channels, groups)`` with the axis non-negative and groups resolved.
        Every dimension may be symbolic (str or None) except the channel axis.
        """
        if not self.epsilon >= 0:  # also rejects NaN
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        axis = self.normalized_axis(len(shape))
        channels = shape[axis]
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(
                f"the channel dimension (axis {self.axis}) must be a static positive int, "
                f"got {channels!r}"
            )
        return axis, channels, self.resolved_groups(channels)
