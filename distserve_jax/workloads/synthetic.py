"""Synthetic workloads: fixed lengths, uniform lengths, and a LongBench-like length model.

Prompts are random token ids drawn uniformly from [0, vocab_size) (no text). Lengths and
token ids come from separate seeded streams, so the lengths of a seed do not depend on
whether token ids are generated (`with_token_ids=False` saves memory in the simulator).

LongBench-like model. LongBench is not available offline; the DistServe paper reports its
summarisation requests as mean input 1738.3 / mean output 90.7 tokens (inputs truncated to
fit OPT's 2048-token context). Both lengths are drawn from lognormal distributions with
fixed log-space standard deviations (input sigma 0.5, output sigma 0.7: an assumption, the
paper gives only means) whose location parameters are calibrated so that the means AFTER
clipping hit the targets:
  output = clip(round(X_out), 1, max_model_len - 1),  X_out ~ LogNormal(mu_out, 0.7)
  input  = clip(round(X_in), 1, max_model_len - output), X_in ~ LogNormal(mu_in, 0.5)
Calibration uses the closed form E[min(X, c)] = exp(mu + s^2/2) Phi((ln c - mu - s^2)/s)
+ c (1 - Phi((ln c - mu)/s)), averaged over quantiles of the output length for the input's
cap. With max_model_len = 2048 a large share of inputs sits at the cap, much like
DistServe's truncated LongBench prompts.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np

from distserve_jax.workloads.base import WorkloadRequest, check_n, check_positive_int

LONGBENCH_MEAN_INPUT = 1738.3
LONGBENCH_MEAN_OUTPUT = 90.7
LONGBENCH_INPUT_SIGMA = 0.5
LONGBENCH_OUTPUT_SIGMA = 0.7

_STD_NORMAL = NormalDist()
_QUADRATURE_NODES = 256


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    lengths, ids = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(lengths), np.random.default_rng(ids)


def _build(prompt_lens: np.ndarray, output_lens: np.ndarray, *, vocab_size: int | None,
           with_token_ids: bool, ids_rng: np.random.Generator) -> list[WorkloadRequest]:
    if with_token_ids:
        if vocab_size is None:
            raise ValueError("vocab_size is required when with_token_ids=True")
        check_positive_int("vocab_size", vocab_size)
    out = []
    for p, o in zip(prompt_lens.tolist(), output_lens.tolist()):
        ids = ids_rng.integers(0, vocab_size, size=p).tolist() if with_token_ids else None
        out.append(WorkloadRequest(prompt=None, prompt_token_ids=ids, prompt_len=int(p),
                                   max_tokens=int(o)))
    return out


def fixed_workload(n: int, *, prompt_len: int, output_len: int, max_model_len: int,
                   vocab_size: int | None = None, seed: int = 0,
                   with_token_ids: bool = True) -> list[WorkloadRequest]:
    """`n` requests of exactly `prompt_len` prompt tokens and `output_len` output tokens."""
    check_n(n)
    check_positive_int("prompt_len", prompt_len)
    check_positive_int("output_len", output_len)
    check_positive_int("max_model_len", max_model_len)
    if prompt_len + output_len > max_model_len:
        raise ValueError(f"prompt_len {prompt_len} + output_len {output_len} exceeds "
                         f"max_model_len {max_model_len}")
    _, ids_rng = _streams(seed)
    return _build(np.full(n, prompt_len), np.full(n, output_len), vocab_size=vocab_size,
                  with_token_ids=with_token_ids, ids_rng=ids_rng)


def _check_range(name: str, rng_: tuple[int, int]) -> tuple[int, int]:
    if len(rng_) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {rng_!r}")
    lo, hi = rng_
    check_positive_int(f"{name}[0]", lo)
    check_positive_int(f"{name}[1]", hi)
    if hi < lo:
        raise ValueError(f"{name} must have low <= high, got {rng_!r}")
    return lo, hi


def uniform_workload(n: int, *, prompt_len_range: tuple[int, int],
                     output_len_range: tuple[int, int], max_model_len: int,
                     vocab_size: int | None = None, seed: int = 0,
                     with_token_ids: bool = True) -> list[WorkloadRequest]:
    """`n` requests with lengths uniform on the inclusive ranges (low, high).

    Raises ValueError if the two highs together exceed `max_model_len`.
    """
    check_n(n)
    check_positive_int("max_model_len", max_model_len)
    p_lo, p_hi = _check_range("prompt_len_range", prompt_len_range)
    o_lo, o_hi = _check_range("output_len_range", output_len_range)
    if p_hi + o_hi > max_model_len:
        raise ValueError(f"prompt_len_range high {p_hi} + output_len_range high {o_hi} "
                         f"exceeds max_model_len {max_model_len}")
    len_rng, ids_rng = _streams(seed)
    prompt_lens = len_rng.integers(p_lo, p_hi + 1, size=n)
    output_lens = len_rng.integers(o_lo, o_hi + 1, size=n)
    return _build(prompt_lens, output_lens, vocab_size=vocab_size,
                  with_token_ids=with_token_ids, ids_rng=ids_rng)


# ---------------------------------------------------------------------- LongBench-like
def clipped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma)."""
    log_cap = math.log(cap)
    body = math.exp(mu + 0.5 * sigma * sigma) * _STD_NORMAL.cdf((log_cap - mu - sigma * sigma)
                                                                / sigma)
    return body + cap * (1.0 - _STD_NORMAL.cdf((log_cap - mu) / sigma))


def _solve_mu(mean_fn, target: float, sigma: float, sup: float, what: str) -> float:
    """mu with mean_fn(mu) == target for an increasing mean_fn bounded above by sup."""
    if not target < sup * (1.0 - 1e-6):
        raise ValueError(f"{what} {target} is not reachable: lengths are capped so that the "
                         f"mean cannot exceed {sup:.1f}; raise max_model_len")
    lo = math.log(target) - 10.0 * sigma - 5.0
    hi = math.log(sup) + 10.0 * sigma + 5.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mean_fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=32)
def longbench_params(max_model_len: int, mean_input: float = LONGBENCH_MEAN_INPUT,
                     mean_output: float = LONGBENCH_MEAN_OUTPUT,
                     input_sigma: float = LONGBENCH_INPUT_SIGMA,
                     output_sigma: float = LONGBENCH_OUTPUT_SIGMA) -> tuple[float, float]:
    """Calibrated (mu_input, mu_output) of the LongBench-like model (see module docstring)."""
    check_positive_int("max_model_len", max_model_len)
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    for name, value in (("mean_input", mean_input), ("mean_output", mean_output),
                        ("input_sigma", input_sigma), ("output_sigma", output_sigma)):
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    out_cap = max_model_len - 1
    mu_out = _solve_mu(lambda mu: clipped_lognormal_mean(mu, output_sigma, out_cap),
                       mean_output, output_sigma, out_cap, "mean_output")
    quantiles = [(j + 0.5) / _QUADRATURE_NODES for j in range(_QUADRATURE_NODES)]
    outs = [min(max(round(math.exp(mu_out + output_sigma * _STD_NORMAL.inv_cdf(q))), 1),
                out_cap) for q in quantiles]
    caps = [max_model_len - o for o in outs]

    def input_mean(mu: float) -> float:
        return sum(clipped_lognormal_mean(mu, input_sigma, c) for c in caps) / len(caps)

    mu_in = _solve_mu(input_mean, mean_input, input_sigma, sum(caps) / len(caps),
                      "mean_input")
    return mu_in, mu_out


def longbench_workload(n: int, *, max_model_len: int, vocab_size: int | None = None,
                       seed: int = 0, with_token_ids: bool = True,
                       mean_input: float = LONGBENCH_MEAN_INPUT,
                       mean_output: float = LONGBENCH_MEAN_OUTPUT,
                       input_sigma: float = LONGBENCH_INPUT_SIGMA,
                       output_sigma: float = LONGBENCH_OUTPUT_SIGMA) -> list[WorkloadRequest]:
    """`n` LongBench-like requests (lognormal lengths, see module docstring).

    Raises ValueError when `max_model_len` is too small for the requested mean input.
    """
    check_n(n)
    mu_in, mu_out = longbench_params(max_model_len, float(mean_input), float(mean_output),
                                     float(input_sigma), float(output_sigma))
    len_rng, ids_rng = _streams(seed)
    raw_out = np.rint(len_rng.lognormal(mu_out, output_sigma, size=n))
    output_lens = np.clip(raw_out, 1, max_model_len - 1).astype(np.int64)
    raw_in = np.rint(len_rng.lognormal(mu_in, input_sigma, size=n))
    prompt_lens = np.clip(raw_in, 1, max_model_len - output_lens).astype(np.int64)
    return _build(prompt_lens, output_lens, vocab_size=vocab_size,
                  with_token_ids=with_token_ids, ids_rng=ids_rng)
