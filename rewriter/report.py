"""What a fuse run did: fused layers, skipped candidates with reasons, verification."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

__all__ = ["FusedLayer", "Skipped", "Verification", "FuseReport"]


@dataclasses.dataclass
class FusedLayer:
    rule: str
    node: str
    groups: int
    axis: int
    epsilon: float
    center: bool
    scale: bool
    channels: int
    overload: str
    activation: int = 0  # 1 = a following SiLU was absorbed


@dataclasses.dataclass
class Skipped:
    rule: str
    node: str
    reason: str


@dataclasses.dataclass
class Verification:
    passed: bool
    max_abs_error: float
    worst_ratio: float  # max |a-b| / (atol + rtol |b|); <= 1 passes
    rtol: float
    atol: float
    inputs: dict  # input name -> shape used
    detail: str = ""


@dataclasses.dataclass
class FuseReport:
    source: str = ""
    target: str = "function"
    fused: list[FusedLayer] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    verification: Verification | None = None
    lowered: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary(self, nodes: tuple[int, int] | None = None) -> str:
        """The run in one line (layers by rule, what the target did, ``nodes`` before and
        after when given), then one line per layer, skip, note and the verification."""
        lines = []
        name = f"{self.source}: " if self.source else ""
        by_rule = Counter(f.rule for f in self.fused)
        if by_rule:
            rules = ", ".join(f"{n} by {r}" for r, n in sorted(by_rule.items()))
            head = f"{name}fused {len(self.fused)} GroupNormalization layer(s) ({rules})"
        else:
            head = f"{name}fused no GroupNormalization layer"
        removed = sum(entry.get("transposes_removed", 0) for entry in self.lowered)
        inserted = sum(entry.get("transposes_inserted", 0) for entry in self.lowered)
        if removed or inserted:
            head += f"; target {self.target}: {removed} Transpose(s) removed, {inserted} inserted"
        if nodes is not None:
            head += f"; nodes {nodes[0]} -> {nodes[1]}"
        lines.append(head)
        for f in self.fused:
            lines.append(
                f"  {f.node}: groups={f.groups} axis={f.axis} epsilon={f.epsilon:g} channels={f.channels}"
                f" center={f.center} scale={f.scale}"
            )
        for s in self.skipped:
            lines.append(f"  skipped {s.node} ({s.rule}): {s.reason}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        v = self.verification
        if v is not None:
            state = "passed" if v.passed else "FAILED"
            lines.append(
                f"verification {state}: max |error| {v.max_abs_error:.3g}, "
                f"{v.worst_ratio:.3g} of the tolerance (rtol={v.rtol:g}, atol={v.atol:g}), inputs {v.inputs}"
                + (f"; {v.detail}" if v.detail else "")
            )
        return "\n".join(lines)
