"""Least-squares fits of the latency forms to measured step times, with held-out error per regime.

Owns the features of each regime (the same quantities `latency_model` evaluates) and the fit:
coefficients minimise the sum of squared *relative* errors (as the DistServe authors' fitting
script does), on every third point held out first to report the held-out error (mean and max
absolute percentage error), then on all points for the coefficients kept. Decode is fitted in two
pieces (small and large batches) split where the training points say (`fit_decode_split`).
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
        q = x * x if square == "total" else sum((c + n) ** 2 - c * c for n, c in chunks)
        return [1.0, float(x), float(q), float(sum(c + 1 for c in dec))]
    raise ValueError(f"unknown regime {regime!r}")


def lstsq_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients minimising sum(((x @ c) - y) / y)^2."""
    w = 1.0 / np.maximum(y, 1e-9)
    c, *_ = np.linalg.lstsq(x * w[:, None], np.ones_like(y), rcond=None)
    return c


def fit_regime(samples: Sequence[Sample], regime: str, **kw) -> tuple[list[float], dict]:
    """(coefficients, {"n", "heldout_n", "heldout_mape", "heldout_max_ape", "fit_mape", "train_mape"}) for one
    regime: held-out errors of the fit on the other points (`fit_mape` its error on those), the
    coefficients and `train_mape` of the fit on all points."""
    pts = [(features(regime, w, **kw), ms) for r, w, ms in samples if r == regime]
    if len(pts) < 4:
        raise ValueError(f"regime {regime!r} needs at least 4 measured points, got {len(pts)}")
    x = np.array([p for p, _ in pts])
    y = np.array([ms for _, ms in pts])
    held = np.arange(len(y)) % 3 == 2
    c = lstsq_relative(x[~held], y[~held])
    err = np.abs(x[held] @ c - y[held]) / y[held]
    fit_err = np.abs(x[~held] @ c - y[~held]) / y[~held]
    full = lstsq_relative(x, y)
    train = np.abs(x @ full - y) / y
    return [float(v) for v in full], {"n": int(len(y)), "heldout_n": int(held.sum()),
                                      "heldout_mape": float(err.mean()), "heldout_max_ape": float(err.max()),
                                      "fit_mape": float(fit_err.mean()), "train_mape": float(train.mean())}


def fit_decode_split(samples: Sequence[Sample], **kw) -> tuple[list[float], list[float], int, dict, dict]:
    """Decode fitted in two pieces, batches < threshold and >= threshold, the threshold (a measured
    batch size) chosen by the pieces' error on their training points (every third point of each
    piece is held out for the reported error, as in `fit_regime`). Returns (small coefficients,
    large coefficients, threshold, small report, large report). Falls back to one piece for both
    when no split leaves 6 points on each side (at 2+ batch sizes below the split)."""
    pts = [s for s in samples if s[0] == "decode"]
    best = None
    for thr in sorted({len(w) for _, w, _ in pts})[1:]:
        small = [s for s in pts if len(s[1]) < thr]
        large = [s for s in pts if len(s[1]) >= thr]
        if min(len(small), len(large)) < 6 or len({len(w) for _, w, _ in small}) < 2:
            continue  # each piece needs points at 2+ batch sizes to tell its per-row cost
        cs, es = fit_regime(small, "decode", **kw)
        cl, el = fit_regime(large, "decode", **kw)
        n_s, n_l = es["n"] - es["heldout_n"], el["n"] - el["heldout_n"]
        train = (es["fit_mape"] * n_s + el["fit_mape"] * n_l) / (n_s + n_l)
        if best is None or train < best[0]:
            best = (train, cs, cl, thr, es, el)
    if best is None:
        c, e = fit_regime(pts, "decode", **kw)
        return c, c, 1 << 30, e, e
    return best[1], best[2], best[3], best[4], best[5]
