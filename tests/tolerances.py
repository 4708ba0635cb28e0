"""Float tolerances for tests that compare two computations of the same values.

This helper module owns the suite's rule for how far apart two float32 results may be when they
compute the same mathematical value by different roads: another tp degree (the partial sums of a
sharded matmul are added in another order), fused vs separate projections, a native kernel vs
the XLA reference, a batch vs one sequence, the Pallas interpreter vs the jnp reference, another
host (another SIMD width, other XLA:CPU GEMM blocking). Such results differ by rounding alone.

The bound (`reorder_bound`): |a - b| <= K * eps32 * sqrt(n) * scale, where
  * eps32 = 2**-23 is float32's machine epsilon (the unit roundoff u is eps32 / 2);
  * n is the number of roundings along the longest chain of sums that feeds one output: for one
    dot product its length; for a model the reduction lengths of its layers added up
    (`decoder_reduction_len`); for attention the head dimension plus the keys attended
    (`attention_reduction_len`);
  * scale is the magnitude of the values (by default the larger max |.| of the two arrays).
Why: each addition rounds with an error of at most u times its partial sum, and those errors are
independent and of random sign, so over n of them they grow like a random walk: standard
deviation <= u * S * sqrt(n / 3) for partial sums of magnitude <= S, and the difference of two
orders has at most sqrt(2) times that, eps32 * S * sqrt(n / 6). K = 2 is five of those standard
deviations when S is the output scale (in these tests partial sums are mostly well below the
largest output, so what is observed stays several times under the bound). The worst case, which
no real summation approaches, is linear: n * eps32 * sum |terms|. The same bound covers a float32
result against a float64 one (one rounded side only, so with margin to spare).

What it must still catch: a wrong head, a dropped layer, a swapped projection or a stale cache
entry moves values by O(scale), at least a thousand times more than the bound for the sizes here
(sqrt(n) * eps32 <= ~1e-5 for n up to a few thousand).

Greedy tokens: two computations whose logits differ by at most d pick the same argmax whenever
the reference's top-two gap exceeds 2 d. `assert_clear_greedy_margins` checks that a reference
run never came that close, so a token-identity test across reduction orders cannot flip on a
near tie on another host; by induction over the steps, equal tokens so far mean equal contexts,
so checking the reference alone suffices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from distserve_jax.models.config import ModelConfig

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
K = 2.0  # five standard deviations of the random-walk model (module docstring)
# The project's parity bound against transformers on float32 logits (tests/models/test_parity.py).
LOGIT_PARITY_ATOL = 1e-4
# Two logits that each move by at most d keep their order if they were more than 2 d apart. d is
# at most the parity bound against transformers, and `reorder_bound` between two JAX layouts:
# 7e-5 to 1.1e-4 for the test models (logit scale <= 10, chains of 1200-2600 roundings with up
# to 160 keys); so 2 * 1.5e-4. Reference runs here have smallest gaps of 4e-4 and up.
GREEDY_MIN_MARGIN = 3e-4


def reorder_bound(reduction_len: int, scale: float, k: float = K) -> float:
    """`k * eps32 * sqrt(reduction_len) * scale`: how far two float32 orders of a sum may drift."""
    if reduction_len < 1:
        raise ValueError(f"reduction_len must be >= 1, got {reduction_len}")
    return k * EPS32 * math.sqrt(reduction_len) * float(scale)


def assert_close_reordered(a: ArrayLike, b: ArrayLike, *, reduction_len: int, what: str,
                           scale: float | None = None, k: float = K) -> float:
    """Asserts max |a - b| <= `reorder_bound(reduction_len, scale, k)`; returns the error.

    Args:
      a, b: arrays of the same shape (any float dtype; compared in float64). NaNs fail.
      reduction_len: roundings along the longest chain of sums feeding one output (see above).
      what: names the comparison in the failure message.
      scale: the values' magnitude; default the larger max |.| of `a` and `b`.
      k: standard-deviation multiple (keep the default unless the test says why).
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        raise AssertionError(f"{what}: shapes differ, {a64.shape} vs {b64.shape}")
    if scale is None:
        scale = max(float(np.max(np.abs(a64), initial=0.0)), float(np.max(np.abs(b64), initial=0.0)))
    bound = reorder_bound(reduction_len, scale, k)
    err = float(np.max(np.abs(a64 - b64), initial=0.0))
    assert err <= bound and not np.isnan(a64 - b64).any(), (
        f"{what}: max |a - b| = {err:.3g} > {bound:.3g} = {k} * eps32 * sqrt({reduction_len}) * {scale:.3g} "
        f"({err / max(bound, 1e-300):.1f}x the float32 reordering bound): more than rounding")
    return err


def decoder_reduction_len(cfg: ModelConfig, context_len: int) -> int:
    """Roundings along the longest chain of sums from the embeddings to one logit of a decoder.

    Per layer: the norm's mean of squares and the q/k/v projection (hidden_size each), q.k
    (head_dim), softmax and p.V (context_len keys, at most the sliding window), o_proj
    (num_heads * head_dim), the second norm and the gate/up (or fc1) projection (hidden_size
    each), down (or fc2) (intermediate_size). Then the final norm and the lm_head (hidden_size
    each).
    """
    h = cfg.hidden_size
    keys = min(context_len, cfg.sliding_window or context_len)
    per_layer = (2 * h + cfg.head_dim + keys + cfg.num_heads * cfg.head_dim + 2 * h
                 + cfg.intermediate_size)
    return cfg.num_layers * per_layer + 2 * h


def attention_reduction_len(head_dim: int, max_keys: int) -> int:
    """Roundings along one attention output: q.k over head_dim, then the softmax sum and p.V over
    the keys attended (the two run side by side and are divided, so one chain of max_keys)."""
    return head_dim + max_keys


def greedy_margins(top_logprobs: Iterable[dict[int, float]]) -> list[float]:
    """Top-one minus top-two logprob (= logit gap) of each step, from per-step top-2+ dicts."""
    out = []
    for step in top_logprobs:
        best = sorted(step.values(), reverse=True)
        if len(best) < 2:
            raise ValueError("each step needs the top two logprobs (ask for logprobs >= 2)")
        out.append(best[0] - best[1])
    return out


def assert_clear_greedy_margins(runs: Sequence[Sequence[dict[int, float]] | Sequence[float]], *, what: str,
                                min_margin: float = GREEDY_MIN_MARGIN) -> float:
    """Asserts that every greedy step of the reference `runs` had a top-two gap > `min_margin`.

    Each run is either the per-step logprob dicts of an engine output asked for `logprobs >= 2`,
    or a list of gaps already computed (e.g. from transformers). Returns the smallest gap. A
    failure means the prompts or seed of the test put a near tie in the reference: pick others.
    """
    smallest, where = math.inf, None
    for i, run in enumerate(runs):
        gaps = list(run) if run and not isinstance(run[0], dict) else greedy_margins(run)
        for step, g in enumerate(gaps):
            if g < smallest:
                smallest, where = g, (i, step)
    assert smallest > min_margin, (
        f"{what}: run {where[0]} step {where[1]} has a top-two logit gap of {smallest:.3g} <= {min_margin:.3g}: "
        "a near tie that another reduction order could flip, so the token comparison is not portable")
    return smallest
