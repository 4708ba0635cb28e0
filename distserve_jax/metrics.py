"""Request latency metrics, SLO attainment, goodput search and SLO scale.

This module owns the one definition of every serving metric in the project. The engine,
the load generator and the simulator all fill `RequestRecord`s and summarise them here, so
a number reported by the simulator means the same thing as one measured on devices.

Definitions (DistServe, OSDI'24; vLLM `benchmarks/benchmark_serving.py` where it agrees):
- TTFT  = first_token_time - arrival_time.
- TPOT  = (last token time - first token time) / (output tokens - 1). The last token time is
  `token_times[-1]` when per-token times were recorded, else `finish_time`. For a request
  with a single output token TPOT is undefined and reported as `None`: such requests are left
  out of TPOT statistics (as vLLM does) and meet any TPOT target in SLO checks.
- ITL   = the gaps between consecutive token times (`output tokens - 1` values).
- E2E   = finish_time - arrival_time.
- SLO attainment = share of requests meeting BOTH the TTFT and the TPOT target. A request
  that never produced a first token or never finished counts as missing the SLO.
- Goodput = the highest request rate whose attainment stays >= a target (0.9 by default),
  found by `find_goodput` with a binary search over rates. (vLLM's "request goodput", the
  number of requests per second that met the SLO during one run, is reported by `summarize`
  as `request_goodput`.)
- SLO scale = the smallest factor s such that scaling both targets by s keeps attainment
  >= the target; `slo_scale` computes it exactly from records by sorting.

All times are seconds, wall clock (any monotonic clock, as long as one run uses one clock).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
DEFAULT_ATTAINMENT_TARGET = 0.9


def _check_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclasses.dataclass(slots=True)
class RequestRecord:
    """What happened to one request, filled in as the request progresses.

    Attributes:
      request_id: identifier of the request.
      prompt_len: prompt length in tokens.
      output_len: number of output tokens produced (the first token included).
      arrival_time: when the request arrived at the server (or was issued by the client).
      first_token_time: when the first output token was produced (None: not yet / never).
      finish_time: when the request finished (None: not yet / never).
      token_times: wall time of every output token, the first included; either empty
        (not recorded, e.g. by a simulator saving memory) or `output_len` long.
      prefill_start, prefill_end, migration_start, migration_end, decode_start: optional
        phase timestamps for breakdowns (None when not recorded).
      finish_reason: "stop", "length", "abort", ... (None while running).
    """

    request_id: str
    prompt_len: int
    output_len: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    prefill_start: float | None = None
    prefill_end: float | None = None
    migration_start: float | None = None
    migration_end: float | None = None
    decode_start: float | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {self.prompt_len}")
        if self.output_len < 0:
            raise ValueError(f"output_len must be >= 0, got {self.output_len}")
        _check_finite("arrival_time", self.arrival_time)
        _check_finite("first_token_time", self.first_token_time)
        _check_finite("finish_time", self.finish_time)

    # ----------------------------------------------------------------- recording helpers
    def record_token(self, t: float) -> None:
        """Appends one output token produced at time `t` (sets `first_token_time` if unset)."""
        _check_finite("t", t)
        if self.token_times and t < self.token_times[-1]:
            raise ValueError(f"token time {t} is earlier than the previous token time "
                             f"{self.token_times[-1]} of request {self.request_id}")
        if len(self.token_times) != self.output_len:
            raise ValueError(f"request {self.request_id}: record_token needs token_times to "
                             f"cover all {self.output_len} earlier tokens, has "
                             f"{len(self.token_times)}")
        if self.first_token_time is None:
            self.first_token_time = t
        self.token_times.append(t)
        self.output_len += 1

    def finish(self, t: float, reason: str) -> None:
        """Marks the request finished at time `t` for `reason`."""
        _check_finite("t", t)
        self.finish_time = t
        self.finish_reason = reason

    # ------------------------------------------------------------------------ metrics
    @property
    def completed(self) -> bool:
        """True when the request produced a first token and finished."""
        return self.first_token_time is not None and self.finish_time is not None

    @property
    def ttft(self) -> float | None:
        """Time to first token in seconds (None if no token was produced)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def last_token_time(self) -> float | None:
        """Time of the last output token: `token_times[-1]`, else `finish_time`."""
        if self.token_times:
            return self.token_times[-1]
        return self.finish_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for outputs of <= 1 token.

        Raises:
          ValueError: token_times is neither empty nor `output_len` long.
        """
        if self.token_times and len(self.token_times) != self.output_len:
            raise ValueError(f"request {self.request_id}: token_times has "
                             f"{len(self.token_times)} entries, output_len is {self.output_len}")
        if self.output_len <= 1 or self.first_token_time is None:
            return None
        last = self.last_token_time
        if last is None:
            return None
        return (last - self.first_token_time) / (self.output_len - 1)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: gaps between consecutive `token_times` ([] if < 2 tokens)."""
        times = self.token_times
        return [b - a for a, b in zip(times[:-1], times[1:])]

    @property
    def e2e_latency(self) -> float | None:
        """End-to-end latency (finish_time - arrival_time), None if not finished."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time


@dataclasses.dataclass(frozen=True)
class SLO:
    """A latency service-level objective: both targets must be met, in seconds."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not value > 0 or math.isnan(value):
                raise ValueError(f"SLO {name} must be > 0, got {value!r}")

    def scaled(self, scale: float) -> SLO:
        """Both targets multiplied by `scale` (> 0)."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        return SLO(self.ttft_s * scale, self.tpot_s * scale)


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """True when `record` completed with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s.

    A one-token output (TPOT None) meets any TPOT target.
    """
    if not record.completed:
        return False
    ttft = record.ttft
    if ttft is None or ttft > slo.ttft_s:
        return False
    tpot = record.tpot
    return tpot is None or tpot <= slo.tpot_s


def _as_list(records: Iterable[RequestRecord]) -> list[RequestRecord]:
    records = list(records)
    if not records:
        raise ValueError("records must not be empty")
    return records


def attainment(records: Iterable[RequestRecord], slo: SLO) -> float:
    """Share of `records` (in [0, 1]) meeting both targets of `slo`."""
    records = _as_list(records)
    return sum(meets_slo(r, slo) for r in records) / len(records)


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target attainment must be in (0, 1], got {target!r}")


def _min_count(n: int, target: float) -> int:
    """Smallest k in [1, n] with k / n >= target (exact in the float comparison used)."""
    k = min(n, max(1, math.ceil(target * n)))
    while k > 1 and (k - 1) / n >= target:
        k -= 1
    while k < n and k / n < target:
        k += 1
    return k


def required_scale(record: RequestRecord, slo: SLO) -> float:
    """Smallest s for which `record` meets `slo.scaled(s)`; inf if it never can."""
    if not record.completed or record.ttft is None:
        return math.inf
    scale = max(record.ttft, 0.0) / slo.ttft_s
    tpot = record.tpot
    if tpot is not None:
        scale = max(scale, tpot / slo.tpot_s)
    return scale


def slo_scale(records: Iterable[RequestRecord], slo: SLO,
              target: float = DEFAULT_ATTAINMENT_TARGET) -> float:
    """The tightest factor s such that attainment(records, slo.scaled(s)) >= target.

    Exact: each request needs scale r_i = max(ttft_i / ttft_s, tpot_i / tpot_s); the answer
    is the k-th smallest r_i with k the least count reaching `target`. Returns inf when more
    than (1 - target) of the requests never completed, and 0.0 when enough requests need no
    time at all (any positive scale then works).
    """
    _check_target(target)
    records = _as_list(records)
    needs = sorted(required_scale(r, slo) for r in records)
    scale = needs[_min_count(len(records), target) - 1]
    if math.isinf(scale) or scale <= 0.0:
        return max(scale, 0.0)
    # r_i is computed by division, meets_slo compares by multiplication: step up by ulps
    # until the float comparison agrees (at most a few steps).
    for _ in range(8):
        if attainment(records, slo.scaled(scale)) >= target:
            break
        scale = math.nextafter(scale, math.inf)
    return scale


@dataclasses.dataclass(frozen=True)
class GoodputResult:
    """Result of `find_goodput`.

    Attributes:
      rate: highest evaluated rate with attainment >= target (0.0 if even `low` failed;
        `high` if `high` passed).
      points: every (rate, attainment) evaluated, in evaluation order.
      target: the attainment target used.
      status: "ok" (bracketed and bisected), "below_low" (`low` already failed) or
        "above_high" (`high` still passed: goodput is at least `high`).
    """

    rate: float
    points: tuple[tuple[float, float], ...]
    target: float
    status: str

    def to_dict(self) -> dict:
        return {"rate": self.rate, "target": self.target, "status": self.status,
                "points": [list(p) for p in self.points]}


def find_goodput(attainment_at: Callable[[float], float], *, low: float, high: float,
                 target: float = DEFAULT_ATTAINMENT_TARGET, rel_tol: float = 0.01,
                 abs_tol: float = 0.0, max_iters: int = 20) -> GoodputResult:
    """Binary search for the highest request rate keeping attainment >= `target`.

    Assumes attainment does not increase with rate. `attainment_at(rate)` runs the system
    (or the simulator) at `rate` requests/s and returns the attainment in [0, 1].

    Args:
      attainment_at: callable rate -> attainment.
      low, high: search bounds, 0 < low < high.
      target: attainment target in (0, 1].
      rel_tol, abs_tol: stop when high - low <= max(abs_tol, rel_tol * high).
      max_iters: maximum number of bisection steps (besides the two bound evaluations).

    Returns:
      A `GoodputResult`; `rate` is the last passing rate (a lower bound on goodput within
      the tolerance).
    """
    if not low > 0:
        raise ValueError(f"low must be > 0, got {low!r}")
    if not high > low or math.isinf(high):
        raise ValueError(f"high must be finite and > low={low!r}, got {high!r}")
    _check_target(target)
    if rel_tol < 0 or abs_tol < 0 or (rel_tol == 0 and abs_tol == 0):
        raise ValueError(f"rel_tol and abs_tol must be >= 0 and not both 0, got "
                         f"rel_tol={rel_tol!r}, abs_tol={abs_tol!r}")
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters!r}")

    points: list[tuple[float, float]] = []

    def evaluate(rate: float) -> bool:
        value = float(attainment_at(rate))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"attainment_at({rate}) returned {value}, outside [0, 1]")
        points.append((rate, value))
        return value >= target

    if not evaluate(low):
        return GoodputResult(0.0, tuple(points), target, "below_low")
    if evaluate(high):
        return GoodputResult(high, tuple(points), target, "above_high")
    lo, hi = low, high
    for _ in range(max_iters):
        if hi - lo <= max(abs_tol, rel_tol * hi):
            break
        mid = 0.5 * (lo + hi)
        if evaluate(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, tuple(points), target, "ok")


def goodput_from_curve(points: Mapping[float, float], *,
                       target: float = DEFAULT_ATTAINMENT_TARGET) -> GoodputResult:
    """Goodput from a swept attainment curve {rate: attainment}, without assuming monotonicity.

    The goodput is the highest rate where the curve, linear between swept rates, still meets
    `target`: the last swept rate that passes, moved towards the next (failing) swept rate to
    where the line between them crosses the target. Failing rates below that point (a noisy dip
    in a measured curve) do not decide the result; `find_goodput`'s bisection would stop at the
    first of them. Status: "ok", "below_low" (no swept rate passes: rate 0.0) or "above_high"
    (the highest swept rate passes: the goodput is at least that rate). The points are returned
    in rate order.
    """
    _check_target(target)
    if not points:
        raise ValueError("goodput_from_curve needs at least one (rate, attainment) point")
    curve = sorted((float(r), float(a)) for r, a in points.items())
    for r, a in curve:
        if not r > 0 or math.isinf(r):
            raise ValueError(f"rates must be positive and finite, got {r!r}")
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"attainment at rate {r:g} is {a!r}, outside [0, 1]")
    passing = [i for i, (_, a) in enumerate(curve) if a >= target]
    if not passing:
        return GoodputResult(0.0, tuple(curve), target, "below_low")
    i = passing[-1]
    if i == len(curve) - 1:
        return GoodputResult(curve[i][0], tuple(curve), target, "above_high")
    (r0, a0), (r1, a1) = curve[i], curve[i + 1]
    rate = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)  # a0 >= target > a1
    return GoodputResult(rate, tuple(curve), target, "ok")


def dips_below(result: GoodputResult) -> tuple[float, ...]:
    """Swept rates below `result.rate` that miss the target (a non-monotone curve's dips)."""
    return tuple(r for r, a in result.points if r < result.rate and a < result.target)


# ------------------------------------------------------------------------------ summaries
def percentile_summary(values: Iterable[float],
                       percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
    """{"count", "mean", "min", "max", "p50", "p90", "p99", ...} of `values`.

    Percentiles use numpy's linear interpolation (as vLLM's benchmark does). With no values
    the statistics are None (JSON null). Keys are "p" + the percentile, e.g. "p99", "p99.9".
    """
    arr = np.asarray(list(values), dtype=np.float64)
    for p in percentiles:
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentiles must be in [0, 100], got {p!r}")
    keys = [f"p{p:g}" for p in percentiles]
    if arr.size == 0:
        out: dict = {"count": 0, "mean": None, "min": None, "max": None}
        out.update({k: None for k in keys})
        return out
    out = {"count": int(arr.size), "mean": float(arr.mean()), "min": float(arr.min()),
           "max": float(arr.max())}
    values_at = np.percentile(arr, list(percentiles)) if percentiles else []
    out.update({k: float(v) for k, v in zip(keys, values_at)})
    return out


def _normalise_slos(slos: SLO | Sequence[SLO] | Mapping[str, SLO] | None) -> dict[str, SLO]:
    if slos is None:
        return {}
    if isinstance(slos, SLO):
        return {"slo": slos}
    if isinstance(slos, Mapping):
        return dict(slos)
    return {f"slo{i}": s for i, s in enumerate(slos)}


def summarize(records: Iterable[RequestRecord], *,
              slos: SLO | Sequence[SLO] | Mapping[str, SLO] | None = None,
              duration_s: float | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              target: float = DEFAULT_ATTAINMENT_TARGET) -> dict:
    """A JSON-serialisable summary of a run.

    Latency statistics cover completed requests; attainment covers all requests (requests
    that did not complete miss the SLO).

    Args:
      records: the run's requests (at least one).
      slos: SLOs to report attainment for: one, a sequence (named "slo0", ...), or a
        mapping name -> SLO.
      duration_s: the run's duration for throughputs; default: last finish (or arrival)
        minus first arrival.
      percentiles: percentiles reported for each latency.
      target: attainment target for the reported SLO scale.

    Returns:
      {"num_requests", "num_completed", "num_failed", "duration_s", "offered_rate",
       "request_throughput", "input_tokens", "output_tokens", "output_throughput",
       "total_token_throughput", "ttft_s", "tpot_s", "itl_s", "e2e_s",
       "slo": {name: {"ttft_s", "tpot_s", "attainment", "request_goodput", "slo_scale"}}}
      where each latency is a `percentile_summary`. Throughputs are per second of
      duration; `offered_rate` = (n - 1) / (last arrival - first arrival) (None if n < 2
      or all arrivals coincide).
    """
    records = _as_list(records)
    slo_map = _normalise_slos(slos)
    done = [r for r in records if r.completed]
    first_arrival = min(r.arrival_time for r in records)
    last_arrival = max(r.arrival_time for r in records)
    if duration_s is None:
        ends = [r.finish_time for r in records if r.finish_time is not None]
        duration_s = max(ends + [last_arrival]) - first_arrival
    elif not duration_s >= 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s!r}")

    def per_s(x: float) -> float | None:
        return x / duration_s if duration_s > 0 else None

    span = last_arrival - first_arrival
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    out: dict = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": float(duration_s),
        "offered_rate": (len(records) - 1) / span if len(records) > 1 and span > 0 else None,
        "request_throughput": per_s(len(done)),
        "input_tokens": int(input_tokens),
        "output_tokens": int(output_tokens),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_s": percentile_summary((r.ttft for r in done), percentiles),
        "tpot_s": percentile_summary((t for t in (r.tpot for r in done) if t is not None),
                                     percentiles),
        "itl_s": percentile_summary((g for r in done for g in r.itl), percentiles),
        "e2e_s": percentile_summary((r.e2e_latency for r in done), percentiles),
        "slo": {},
    }
    for name, slo in slo_map.items():
        good = sum(meets_slo(r, slo) for r in records)
        scale = slo_scale(records, slo, target)
        out["slo"][name] = {
            "ttft_s": slo.ttft_s,
            "tpot_s": slo.tpot_s,
            "attainment": good / len(records),
            "request_goodput": per_s(good),
            "slo_scale": scale if math.isfinite(scale) else None,
        }
    return out
