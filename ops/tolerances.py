"""How close two GroupNormalization outputs must be, per dtype: one table for tests and --verify.

``close`` means ``|a - b| <= atol + rtol * |b|`` elementwise. The output of a group
normalization is O(1) times |gamma| plus beta, so the bounds are set from the dtype's
machine epsilon, not from what a particular run happened to produce:

* float32: both sides compute in float32 with different summation orders over up to ~1e6
  elements; the statistics then carry a relative error of a few 1e-7 * log2(n), and the
  output ~10 ulp. rtol = atol = 1e-5 (~80 ulp) leaves room for 1e6-element groups.
* float16: statistics in float32 on both sides, so the outputs differ by at most one
  rounding of the final float16 cast (eps 9.8e-4) plus a float16 gamma/beta rounding:
  rtol = atol = 2e-3 (2 ulp).
* bfloat16: the same argument with eps 7.8e-3: rtol = atol = 1.6e-2 (2 ulp).
* float64: rtol = atol = 1e-9, far above float64's 2.2e-16 but small enough to catch a
  silent computation in float32 (which errs by ~1e-7).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "tolerance_for"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def check(self, actual: np.ndarray, expected: np.ndarray) -> tuple[bool, float]:
        """(within tolerance, worst ratio of |a-b| to atol + rtol*|b|); NaN anywhere fails."""
        a = np.asarray(actual, dtype=np.float64)
        b = np.asarray(expected, dtype=np.float64)
        if a.shape != b.shape:
            return False, float("inf")
        if a.size == 0:
            return True, 0.0
        ratio = np.abs(a - b) / (self.atol + self.rtol * np.abs(b))
        worst = float(np.nanmax(ratio)) if not np.isnan(ratio).all() else float("nan")
        ok = bool(np.all(np.isfinite(ratio)) and worst <= 1.0)
        return ok, worst


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(rtol=1e-5, atol=1e-5),
    "float16": Tolerance(rtol=2e-3, atol=2e-3),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1.6e-2),
    "float64": Tolerance(rtol=1e-9, atol=1e-9),
}


def tolerance_for(dtype) -> Tolerance:
    """The tolerance for outputs of ``dtype`` (a NumPy dtype or its name)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    try:
        return TOLERANCES[name]
    except KeyError:
        raise ValueError(f"no GroupNormalization tolerance for dtype {name}") from None
