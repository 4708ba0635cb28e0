"""Least-squares fits of the latency forms to measured step times, with held-out error per regime.

Owns the features of each regime (the same quantities `latency_model` evaluates) and the fit:
coefficients minimise the sum of squared *relative* errors (as the DistServe authors' fitting
script does), on every third point held out first to report the held-out error (mean and max
absolute percentage error), then on all points for the coefficients kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from distserve_jax.planner.latency_model import round_up

# A sample: (regime, works as [(new tokens, context)], measured ms).
Sample = tuple[str, list[tuple[int, int]], float]


def features(regime: str, works: Sequence[tuple[int, int]], *, token_buckets: tuple[int, ...] = (),
             seq_buckets: tuple[int, ...] = (), square: str = "sum") -> list[float]:
    if regime == "prefill":
        x = round_up(sum(n for n, _ in works), token_buckets)
        y = x * x if square == "total" else sum(n * n for n, _ in works)
        return [1.0, float(x), float(y)]
    if regime == "decode":
        return [1.0, float(sum(c + 1 for _, c in works)), float(round_up(len(works), seq_buckets))]
    if regime == "mixed":
        chunks = [(n, c) for n, c in works if not (n == 1 and c)]
        dec = [c for n, c in works if n == 1 and c]
        x = round_up(sum(n for n, _ in works), token_buckets)
        q = sum((c + n) ** 2 - c * c for n, c in chunks)
        return [1.0, float(x), float(q), float(sum(c + 1 for c in dec))]
    raise ValueError(f"unknown regime {regime!r}")


def lstsq_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients minimising sum(((x @ c) - y) / y)^2."""
    w = 1.0 / np.maximum(y, 1e-9)
    c, *_ = np.linalg.lstsq(x * w[:, None], np.ones_like(y), rcond=None)
    return c


def fit_regime(samples: Sequence[Sample], regime: str, **kw) -> tuple[list[float], dict]:
    """(coefficients, {"n", "heldout_mape", "heldout_max_ape", "train_mape"}) for one regime."""
    pts = [(features(regime, w, **kw), ms) for r, w, ms in samples if r == regime]
    if len(pts) < 4:
        raise ValueError(f"regime {regime!r} needs at least 4 measured points, got {len(pts)}")
    x = np.array([p for p, _ in pts])
    y = np.array([ms for _, ms in pts])
    held = np.arange(len(y)) % 3 == 2
    c = lstsq_relative(x[~held], y[~held])
    err = np.abs(x[held] @ c - y[held]) / y[held]
    full = lstsq_relative(x, y)
    train = np.abs(x @ full - y) / y
    return [float(v) for v in full], {"n": int(len(y)), "heldout_n": int(held.sum()),
                                      "heldout_mape": float(err.mean()), "heldout_max_ape": float(err.max()),
                                      "train_mape": float(train.mean())}
