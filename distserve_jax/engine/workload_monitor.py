"""The workload monitor: what the controller has been asked to serve, over sliding windows.

Owns the record of arrivals (time, prompt length) and completions (time, prompt and output
length) the controller feeds it, and the window statistics read from them: arrival rate, prompt
and output length distributions (mean, quantiles, the raw samples for a drift test or a trace
to plan on). Times are the controller's clock (virtual in the simulator); the monitor never
reads a clock itself, imports no JAX and keeps at most `history_s` seconds (and `max_events`
entries) of history.

    controller.add_request --on_arrival(t, prompt_len)--> WorkloadMonitor
    controller (request finished) --on_finish(t, prompt_len, output_len)--> WorkloadMonitor
    replanner / info() --window(now, span_s)--> WorkloadWindow
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from typing import Any

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)


@dataclasses.dataclass(frozen=True)
class WorkloadWindow:
    """The requests seen in [start, end): arrivals (prompt lengths) and completions (length pairs).

    Attributes:
      start, end: the window's bounds (controller clock, seconds); `end - start` may be shorter
        than asked while the monitor is younger than the window.
      arrival_times: [num_arrivals] arrival times, ascending.
      prompt_lens: [num_arrivals] prompt lengths of those arrivals.
      completed: [num_completions] (prompt_len, output_len) of the requests that finished in it.
    """

    start: float
    end: float
    arrival_times: tuple[float, ...]
    prompt_lens: tuple[int, ...]
    completed: tuple[tuple[int, int], ...]

    @property
    def span_s(self) -> float:
        return self.end - self.start

    @property
    def num_arrivals(self) -> int:
        return len(self.arrival_times)

    @property
    def num_completions(self) -> int:
        return len(self.completed)

    @property
    def rate(self) -> float:
        """Arrivals per second over the window (0 for an empty or zero-length window)."""
        return self.num_arrivals / self.span_s if self.span_s > 0 else 0.0

    @property
    def completion_rate(self) -> float:
        return self.num_completions / self.span_s if self.span_s > 0 else 0.0

    @property
    def output_lens(self) -> tuple[int, ...]:
        return tuple(o for _, o in self.completed)

    def rate_since(self, t: float) -> float:
        """Arrivals per second in [max(t, start), end)."""
        t = max(t, self.start)
        if self.end <= t:
            return 0.0
        n = len(self.arrival_times) - bisect.bisect_left(self.arrival_times, t)
        return n / (self.end - t)

    def sample_lengths(self, n: int, seed: int = 0) -> list[tuple[int, int]]:
        """`n` (prompt_len, output_len) pairs drawn with replacement from the completions."""
        if not self.completed:
            raise ValueError("the window has no completed request to sample lengths from")
        idx = np.random.default_rng(seed).integers(0, len(self.completed), size=n)
        return [self.completed[i] for i in idx]

    def summary(self) -> dict[str, Any]:
        """Rate, counts, and mean / quantiles of prompt and output lengths (None when no sample)."""
        out: dict[str, Any] = {"window_s": self.span_s, "arrival_rate": self.rate, "num_arrivals": self.num_arrivals,
                               "num_completions": self.num_completions}
        for name, xs in (("prompt_len", self.prompt_lens), ("output_len", self.output_lens)):
            out[f"{name}_mean"] = float(np.mean(xs)) if xs else None
            for q in QUANTILES:
                out[f"{name}_p{round(q * 100)}"] = float(np.quantile(xs, q)) if xs else None
        return out


class WorkloadMonitor:
    """Arrivals and completions over sliding windows (see the module docstring).

    Args:
      start: the clock's value when monitoring began (a window never reaches before it).
      history_s: how much history is kept, seconds (the longest window that can be asked for).
      max_events: most arrivals (and, separately, completions) kept, however recent.
    """

    def __init__(self, start: float = 0.0, *, history_s: float = 600.0, max_events: int = 200_000):
        if not (math.isfinite(history_s) and history_s > 0):
            raise ValueError(f"history_s must be a positive number of seconds, got {history_s!r}")
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"max_events must be a positive integer, got {max_events!r}")
        self.start, self.history_s = float(start), float(history_s)
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque(maxlen=max_events)
        self._completions: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=max_events)
        self.num_arrivals = 0  # totals since start (counters)
        self.num_completions = 0

    def on_arrival(self, t: float, prompt_len: int) -> None:
        self._arrivals.append((float(t), int(prompt_len)))
        self.num_arrivals += 1
        self._trim(self._arrivals, t)

    def on_finish(self, t: float, prompt_len: int, output_len: int) -> None:
        self._completions.append((float(t), int(prompt_len), int(output_len)))
        self.num_completions += 1
        self._trim(self._completions, t)

    def _trim(self, q: collections.deque, now: float) -> None:
        while q and q[0][0] < now - self.history_s:
            q.popleft()

    def window(self, now: float, span_s: float) -> WorkloadWindow:
        """What arrived and finished in the last `span_s` seconds before `now` (not before `start`)."""
        if not (math.isfinite(span_s) and span_s > 0):
            raise ValueError(f"span_s must be a positive number of seconds, got {span_s!r}")
        if span_s > self.history_s:
            raise ValueError(f"span_s {span_s} is longer than the history kept ({self.history_s} s)")
        lo = max(now - span_s, self.start)
        arr = sorted((t, p) for t, p in self._arrivals if lo <= t <= now)  # arrival times may come out of order
        done = [(p, o) for t, p, o in self._completions if lo <= t <= now]
        return WorkloadWindow(lo, now, tuple(t for t, _ in arr), tuple(p for _, p in arr), tuple(done))

