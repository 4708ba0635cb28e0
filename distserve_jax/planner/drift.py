"""Drift detection: is the recent window's workload still the one the placement was planned for?

Owns the comparison of a `WorkloadWindow` (engine/workload_monitor.py) with a `PlannedWorkload`
(the rate and the (prompt, output) lengths a placement was planned for):
  - the rate ratio max(r / r0, r0 / r) (symmetric: a drop counts as much as a rise);
  - the two-sample Kolmogorov-Smirnov distance (0..1) between the window's prompt lengths and
    the planned ones, and between output lengths (these only once enough requests completed);
and the verdict against `DriftThresholds`. A window with fewer than `min_requests` arrivals is
no evidence (`detect` returns None): missing or vanished metrics never move a placement.
Pure Python + numpy; no clock.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from distserve_jax.engine.workload_monitor import WorkloadWindow


@dataclasses.dataclass(frozen=True)
class PlannedWorkload:
    """What a placement was planned for: a rate (req/s) and (prompt_len, output_len) samples."""

    rate: float
    lens: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"a planned workload's rate must be > 0 req/s, got {self.rate!r}")
        if not self.lens:
            raise ValueError("a planned workload needs at least one (prompt_len, output_len) sample")
        object.__setattr__(self, "lens", tuple((int(p), int(o)) for p, o in self.lens))

    @classmethod
    def from_window(cls, window: WorkloadWindow, rate: float | None = None) -> "PlannedWorkload":
        return cls(window.rate if rate is None else rate, window.completed)


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
    """When a window has drifted: rate ratio >= `rate_ratio`, or a length distance >= `distance`."""

    rate_ratio: float = 1.5
    distance: float = 0.25
    min_requests: int = 20

    def __post_init__(self):
        if not (math.isfinite(self.rate_ratio) and self.rate_ratio > 1):
            raise ValueError(f"rate_ratio must be > 1, got {self.rate_ratio!r}")
        if not 0 < self.distance < 1:
            raise ValueError(f"distance must be in (0, 1), got {self.distance!r}")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise ValueError(f"min_requests must be a positive integer, got {self.min_requests!r}")


@dataclasses.dataclass(frozen=True)
class Drift:
    """One comparison: the measures and the verdict (`reason` names what crossed its threshold)."""

    rate: float
    rate_ratio: float
    prompt_distance: float
    output_distance: float | None  # None: too few completions to compare
    drifted: bool
    reason: str


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs (0..1)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ks_distance needs two non-empty samples")
    xa, xb = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([xa, xb])
    fa = np.searchsorted(xa, grid, side="right") / len(xa)
    fb = np.searchsorted(xb, grid, side="right") / len(xb)
    return float(np.max(np.abs(fa - fb)))


def detect(planned: PlannedWorkload, window: WorkloadWindow, th: DriftThresholds = DriftThresholds()) -> Drift | None:
    """`window` against `planned` (see the module docstring); None when the window is no evidence."""
    if window.num_arrivals < th.min_requests or window.span_s <= 0:
        return None
    r = window.rate
    ratio = max(r / planned.rate, planned.rate / r)
    d_prompt = ks_distance(window.prompt_lens, [p for p, _ in planned.lens])
    d_out = (ks_distance(window.output_lens, [o for _, o in planned.lens])
             if window.num_completions >= th.min_requests else None)
    why = []
    if ratio >= th.rate_ratio:
        why.append(f"rate {r:.3g}/s vs {planned.rate:.3g}/s planned (x{ratio:.2f})")
    if d_prompt >= th.distance:
        why.append(f"prompt lengths moved (KS {d_prompt:.2f})")
    if d_out is not None and d_out >= th.distance:
        why.append(f"output lengths moved (KS {d_out:.2f})")
    return Drift(r, ratio, d_prompt, d_out, bool(why), "; ".join(why))
