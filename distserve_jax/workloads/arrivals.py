"""Request arrival processes: Poisson and gamma (bursty) inter-arrival times, seeded.

The first request arrives at `start`; the n - 1 gaps between consecutive requests are
i.i.d. with mean 1 / rate. Gamma gaps take a coefficient of variation `cv`: shape
k = 1 / cv**2, scale = 1 / (rate * k), so cv = 1 is the Poisson process, cv > 1 is
burstier and cv < 1 smoother. (vLLM's `--burstiness` factor is the shape k = 1 / cv**2.)
An infinite rate puts every arrival at `start`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from distserve_jax.workloads.base import WorkloadRequest, check_n, check_rate


def inter_arrival_gaps(n: int, rate: float, *, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` i.i.d. gaps in seconds, mean 1 / rate, coefficient of variation `cv`. [n] float64."""
    check_n(n)
    check_rate(rate)
    if not cv > 0 or not math.isfinite(cv):
        raise ValueError(f"cv must be finite and > 0, got {cv!r}")
    if math.isinf(rate):
        return np.zeros(n, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if cv == 1.0:
        return rng.exponential(1.0 / rate, size=n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def arrival_times(n: int, rate: float, *, cv: float = 1.0, seed: int = 0,
                  start: float = 0.0) -> np.ndarray:
    """Arrival times of `n` requests: start, then cumulative gaps. [n] float64, sorted."""
    check_n(n)
    if not math.isfinite(start) or start < 0:
        raise ValueError(f"start must be finite and >= 0, got {start!r}")
    gaps = inter_arrival_gaps(n, rate, cv=cv, seed=seed)
    times = np.empty(n, dtype=np.float64)
    times[0] = start
    times[1:] = start + np.cumsum(gaps[: n - 1])
    return times


def poisson_arrivals(n: int, rate: float, *, seed: int = 0, start: float = 0.0) -> np.ndarray:
    """Arrival times of a Poisson process at `rate` requests/s. [n] float64."""
    return arrival_times(n, rate, cv=1.0, seed=seed, start=start)


def gamma_arrivals(n: int, rate: float, *, cv: float, seed: int = 0,
                   start: float = 0.0) -> np.ndarray:
    """Arrival times with gamma gaps of mean 1 / rate and coefficient of variation `cv`. [n]"""
    return arrival_times(n, rate, cv=cv, seed=seed, start=start)


def with_arrivals(requests: Sequence[WorkloadRequest], rate: float, *, cv: float = 1.0,
                  seed: int = 0, start: float = 0.0) -> list[WorkloadRequest]:
    """Copies of `requests`, in order, with arrival times stamped for `rate` and `cv`."""
    if len(requests) < 1:
        raise ValueError("requests must not be empty")
    times = arrival_times(len(requests), rate, cv=cv, seed=seed, start=start)
    return [dataclasses.replace(r, arrival_time=float(t)) for r, t in zip(requests, times)]
