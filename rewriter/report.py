"""What a fuse run did: fused layers, skipped candidates with reasons, verification."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

__all__ = ["FusedLayer", "Skipped", "Verification", "LayerCheck", "OutputCheck", "FuseReport", "UNSHIFTED_FORM"]

#: ``FuseReport.lowered`` form of a layer computed with its export's own InstanceNormalization
#: arithmetic (no precision shift; ``targets.ort_cpu.keep_export_arithmetic``).
UNSHIFTED_FORM = "our op, channels-first, unshifted: the export's InstanceNormalization arithmetic"


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
class LayerCheck:
    """One fused layer against its float64 reference, computed from each model's own input
    of the layer (errors are max |y - reference|; ratios are of the verify tolerance)."""

    node: str
    input: str  # the layer's input value (the same name in both models)
    output: str
    fused_error: float
    fused_ratio: float
    original_error: float | None = None  # None: the original has no value of these names
    original_ratio: float | None = None
    confirmed: bool | None = None  # the original subgraph in float64 computes the fused configuration


@dataclasses.dataclass
class OutputCheck:
    """One model output, fused against original, worst over the input sets."""

    name: str
    max_abs_error: float
    worst_ratio: float
    nonfinite: int  # values that are NaN/Inf in the original (compared as positions)
    passed: bool
    noise_floor: float | None = None  # max |original - original without graph optimisations|; None: not measured


@dataclasses.dataclass
class Verification:
    passed: bool
    max_abs_error: float  # model outputs, fused against original
    worst_ratio: float  # max |a-b| / (atol + rtol |b|); <= 1 passes
    rtol: float
    atol: float
    inputs: dict  # input name -> shape used (the first input set)
    detail: str = ""  # why it failed
    verdict: str = ""  # "passed", "passed: more accurate than the export", "passed: within the export's own float32 noise" or "FAILED"
    layers: list[LayerCheck] = dataclasses.field(default_factory=list)
    outputs: list[OutputCheck] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    input_sets: list[dict] = dataclasses.field(default_factory=list)  # every input set's shapes

    def summary_lines(self) -> list[str]:
        state = self.verdict or ("passed" if self.passed else "FAILED")
        lines = [
            f"verification {state}: max |error| {self.max_abs_error:.3g}, "
            f"{self.worst_ratio:.3g} of the tolerance (rtol={self.rtol:g}, atol={self.atol:g}), inputs {self.inputs}"
            + (f" and {len(self.input_sets) - 1} more set(s)" if len(self.input_sets) > 1 else "")
            + (f"; {self.detail}" if self.detail else "")
        ]
        if self.layers:
            worst = max(self.layers, key=lambda c: c.fused_ratio)
            original = [c.original_error for c in self.layers if c.original_error is not None]
            lines.append(
                f"  {len(self.layers)} layer(s) against their float64 reference: worst fused {worst.fused_error:.3g} ({worst.node})"
                + (f", worst original {max(original):.3g}" if original else "")
            )
        lines.extend(f"  note: {n}" for n in self.notes)
        return lines


@dataclasses.dataclass
class FuseReport:
    source: str = ""
    target: str = "function"
    precise: bool = False  # the caller asked for our precision shift in every layer
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
        unshifted = sum(1 for entry in self.lowered if entry.get("form") == UNSHIFTED_FORM)
        if unshifted:
            head += f"; {unshifted} layer(s) keep the export's InstanceNormalization arithmetic (--precise: our shift)"
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
        if self.verification is not None:
            lines.extend(self.verification.summary_lines())
        return "\n".join(lines)
