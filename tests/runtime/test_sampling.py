"""Tests for distserve_jax.runtime.sampling: masks, draws, logprobs, penalties, compilation.

Compilation dominates the runtime on CPU, so the tests share a few shapes: [16, 64] for
per-row behaviour, [10 * 4000, 8] for the sampling distributions.
"""

import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import RepetitionPenaltyLogitsProcessor  # noqa: E402

from distserve_jax.runtime.sampling import (PenaltyInputs, SamplingTensors,  # noqa: E402
                                            apply_penalties, apply_top_k_top_p_min_p,
                                            row_key, sample)
from distserve_jax.sampling_params import SamplingParams  # noqa: E402
from tests.tolerances import assert_close_reordered  # noqa: E402

_sample = jax.jit(sample, static_argnames=("num_top_logprobs",))
_mask = jax.jit(apply_top_k_top_p_min_p)
_penalise = jax.jit(apply_penalties)

B, V, N_TOP = 16, 64, 4

# A hand-made distribution over 8 tokens, placed at shuffled token ids: PERM[i] has P[i].
P = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
PERM = np.array([5, 2, 7, 0, 3, 6, 1, 4])
HAND_LOGITS = np.zeros(8, np.float32)
HAND_LOGITS[PERM] = np.log(P)
# (params, ranks of P that are allowed), worked out by hand from P.
HAND_CASES = [
    (SamplingParams(seed=0), range(8)),
    (SamplingParams(seed=0, top_k=3), [0, 1, 2]),
    (SamplingParams(seed=0, top_p=0.7), [0, 1, 2]),  # mass before: 0, .4, .65 | .8
    (SamplingParams(seed=0, top_p=0.6), [0, 1]),  # 0, .4 | .65
    # top-k first: renormalised [.615, .385], so top_p=.5 keeps one token (alone: two).
    (SamplingParams(seed=0, top_k=2, top_p=0.5), [0]),
    (SamplingParams(seed=0, min_p=0.3), [0, 1, 2]),  # p >= .12
    (SamplingParams(seed=0, min_p=0.45), [0, 1]),  # p >= .18
    # Temperature first: at T=2, p_i/p_0 = sqrt(P_i/P_0) >= .45 iff P_i >= .081.
    (SamplingParams(seed=0, temperature=2.0, min_p=0.45), [0, 1, 2, 3]),
    # T=.5: probs ~ P^2, renormalised .620, .242, .087, .039: mass before .862 < .9 < .949.
    (SamplingParams(seed=0, temperature=0.5, top_p=0.9), [0, 1, 2]),
    # top-k 4 -> top-p .75 keeps 3 (mass before .722) -> min-p .5 keeps P >= .2.
    (SamplingParams(seed=0, top_k=4, top_p=0.75, min_p=0.5), [0, 1]),
]


def _tensors(params, steps=None, *, vocab=V, pad_to=B):
    steps = [0] * len(params) if steps is None else steps
    return SamplingTensors.from_params(params, steps, vocab, pad_to)


def _log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_allowed(logits, temperature, top_k, top_p, min_p):
    """Numpy (float64) reference of the kept set, following the documented semantics."""
    scaled = np.asarray(logits, np.float64) / temperature
    probs = np.exp(_log_softmax64(scaled))
    order = np.argsort(-scaled, kind="stable")
    k = len(scaled) if top_k == -1 else min(top_k, len(scaled))
    top = order[:k]
    renorm = probs[top] / probs[top].sum()
    mass_before = np.concatenate([[0.0], np.cumsum(renorm)[:-1]])
    kept = top[mass_before < top_p] if top_p < 1 else top
    kept = kept[probs[kept] >= min_p * probs.max()]
    return set(kept.tolist()) | {int(order[0])}


def _threshold_gap(logits, temperature, top_k, top_p, min_p):
    """How close (float64) any token of a row comes to a top-p or min-p cut: the kept sets are
    compared exactly, so each must be more than float32 rounding (~1e-6 here) from its cut."""
    scaled = np.asarray(logits, np.float64) / temperature
    probs = np.exp(_log_softmax64(scaled))
    order = np.argsort(-scaled, kind="stable")
    top = order[:len(scaled) if top_k == -1 else min(top_k, len(scaled))]
    renorm = probs[top] / probs[top].sum()
    mass_before = np.concatenate([[0.0], np.cumsum(renorm)[:-1]])
    gaps = [np.abs(mass_before - top_p).min() if top_p < 1 else np.inf]
    if min_p > 0:
        gaps.append(np.abs(probs[top] - min_p * probs.max()).min() / probs.max())
    return min(gaps)


def _random_logits(seed, shape=(B, V), scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = _random_logits(0, scale=3.0)
    params = ([SamplingParams(temperature=0.0, top_p=0.3, seed=s) for s in range(8)]
              + [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(8)])
    out = _sample(logits, _tensors(params), num_top_logprobs=N_TOP)
    # The argmax of the same float32 values (dividing by a temperature keeps their order): exact.
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))
    # All-greedy batch (the branch that skips the draw).
    out = _sample(logits, _tensors(params[:8]), num_top_logprobs=N_TOP)
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


def test_hand_made_masks_exact():
    params = [p for p, _ in HAND_CASES]
    t = _tensors(params, vocab=8, pad_to=len(params))
    scaled = HAND_LOGITS[None, :] / t.temperature[:, None]
    masked = np.asarray(_mask(scaled, t.top_k, t.top_p, t.min_p))
    for row, (p, ranks) in enumerate(HAND_CASES):
        allowed = set(PERM[list(ranks)].tolist())
        kept = set(np.flatnonzero(np.isfinite(masked[row])).tolist())
        assert kept == allowed, (p, kept, allowed)
        np.testing.assert_array_equal(masked[row, list(kept)], scaled[row, list(kept)])
        assert kept == _reference_allowed(HAND_LOGITS, p.temperature, p.top_k, p.top_p,
                                          p.min_p)


def test_random_masks_match_numpy_reference():
    rng = np.random.default_rng(1)
    rows = 32
    logits = _random_logits(2, (rows, V), scale=2.0)
    params = []
    for i in range(rows):
        params.append(SamplingParams(
            temperature=float(rng.uniform(0.3, 2.0)),
            top_k=int(rng.integers(1, V + 8)) if i % 3 else -1,
            top_p=float(rng.uniform(0.05, 1.0)) if i % 4 else 1.0,
            min_p=float(rng.uniform(0.0, 0.5)) if i % 5 else 0.0, seed=i))
    t = _tensors(params, pad_to=rows)
    scaled = logits / t.temperature[:, None]
    masked = np.asarray(_mask(scaled, t.top_k, t.top_p, t.min_p))
    for row, p in enumerate(params):
        kept = set(np.flatnonzero(np.isfinite(masked[row])).tolist())
        # The device sums probabilities in float32, in an order that depends on the SIMD width:
        # no token may sit within 1e-4 (100x that rounding) of a cut (closest here: 2e-4).
        assert _threshold_gap(logits[row], p.temperature, p.top_k, p.top_p, p.min_p) > 1e-4, p
        assert kept == _reference_allowed(logits[row], p.temperature, p.top_k, p.top_p,
                                          p.min_p), p


def test_sampled_distribution_matches_renormalised_masks():
    n = 4000  # Draws per case, each with its own seed.
    params = [dataclasses.replace(p, seed=case * n + i)
              for case, (p, _) in enumerate(HAND_CASES) for i in range(n)]
    t = SamplingTensors.from_params(params, [0] * len(params), 8, len(params))
    logits = np.broadcast_to(HAND_LOGITS, (len(params), 8))
    out = _sample(logits, t, num_top_logprobs=0)
    assert out.top_ids.shape == (len(params), 0) and out.top_logprobs.shape == (len(params), 0)
    tokens = np.asarray(out.token_ids)
    for case, (p, ranks) in enumerate(HAND_CASES):
        counts = np.bincount(tokens[case * n:(case + 1) * n], minlength=8)
        allowed = PERM[list(ranks)]
        outside = np.setdiff1d(np.arange(8), allowed)
        assert counts[outside].sum() == 0, (p, counts)
        q = P[list(ranks)] ** (1.0 / p.temperature)
        expected = q / q.sum()
        freq = counts[allowed] / n
        # Each frequency is a binomial proportion with std sqrt(q(1-q)/n) (<= .008 here); a
        # 5-sigma bound fails by chance with probability < 1e-6 per token, and the seeds are
        # fixed, so the test is deterministic.
        tolerance = 5 * np.sqrt(expected * (1 - expected) / n)
        assert np.all(np.abs(freq - expected) <= tolerance), (p, freq, expected)


def test_same_seed_and_step_same_token_anywhere_in_any_batch():
    rng = np.random.default_rng(3)
    requests = [(SamplingParams(seed=1234, top_p=0.95), 5),
                (SamplingParams(seed=7, temperature=0.8, top_k=20), 0),
                (SamplingParams(seed=99, min_p=0.05, temperature=1.3), 17),
                (SamplingParams(seed=2**32 - 1), 3)]
    request_logits = _random_logits(4, (len(requests), V))
    results = []
    for trial in range(3):
        rows = rng.permutation(B)[:len(requests)]
        logits = _random_logits(10 + trial, scale=2.0)
        params = [SamplingParams(seed=int(s), temperature=float(rng.uniform(0, 2)))
                  for s in rng.integers(0, 2**32, B)]
        steps = list(rng.integers(0, 100, B))
        for (p, step), row, row_logits in zip(requests, rows, request_logits):
            params[row], steps[row], logits[row] = p, step, row_logits
        out = _sample(logits, _tensors(params, steps), num_top_logprobs=N_TOP)
        results.append(np.asarray(out.token_ids)[rows])
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)  # a row's math never reads other rows: exact


def test_draw_is_gumbel_max_with_row_key():
    logits = _random_logits(5, scale=2.0)
    params = [SamplingParams(seed=100 + i, temperature=0.7, top_k=10) for i in range(B)]
    steps = list(range(3, 3 + B))
    t = _tensors(params, steps)
    out = _sample(logits, t, num_top_logprobs=N_TOP)
    masked = np.asarray(_mask(logits / t.temperature[:, None], t.top_k, t.top_p, t.min_p))
    for i in range(B):
        gumbel = np.asarray(jax.random.gumbel(row_key(jnp.uint32(100 + i), jnp.int32(3 + i)),
                                              (V,)))
        assert out.token_ids[i] == np.argmax(masked[i] + gumbel)  # the same float32 ops on both sides


def test_different_steps_and_seeds_give_different_draws():
    logits = np.zeros((B, V), np.float32)  # Uniform over 64 tokens.
    same_seed = _sample(logits, _tensors([SamplingParams(seed=5)] * B, list(range(B))),
                        num_top_logprobs=N_TOP).token_ids
    same_step = _sample(logits, _tensors([SamplingParams(seed=s) for s in range(B)]),
                        num_top_logprobs=N_TOP).token_ids
    repeated = _sample(logits, _tensors([SamplingParams(seed=5)] * B, [2] * B),
                       num_top_logprobs=N_TOP).token_ids
    # 16 uniform draws from 64 tokens have < 8 distinct values with probability < 1e-6.
    assert len(set(np.asarray(same_seed).tolist())) >= 8
    assert len(set(np.asarray(same_step).tolist())) >= 8
    assert len(set(np.asarray(repeated).tolist())) == 1
    assert repeated[0] == same_seed[2]


def test_logprobs_are_raw_log_softmax():
    logits = _random_logits(6)
    params = [SamplingParams(seed=i, temperature=0.5 + 0.1 * i, top_k=3) for i in range(B)]
    out = _sample(logits, _tensors(params), num_top_logprobs=N_TOP)
    ref = _log_softmax64(logits)
    tokens = np.asarray(out.token_ids)
    # float32 log-softmax against float64: a V-term sum inside the log, whose order depends on
    # the SIMD width (observed 3.2e-7, 0.02x the bound; logprobs of the tempered logits are O(1) off).
    scale = np.abs(ref).max()
    assert_close_reordered(out.logprobs, ref[np.arange(B), tokens], reduction_len=V, scale=scale,
                           what="sampled logprobs")
    top_logprobs = np.asarray(out.top_logprobs)
    assert out.top_ids.shape == (B, N_TOP) and out.top_ids.dtype == jnp.int32
    assert np.all(np.diff(top_logprobs, axis=-1) <= 0)
    # The ranks of the float32 values: their gaps (~1e-2 for 64 normal draws) dwarf the rounding.
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.argsort(-ref, axis=-1)[:, :N_TOP])
    assert_close_reordered(top_logprobs, np.sort(ref, axis=-1)[:, ::-1][:, :N_TOP], reduction_len=V, scale=scale,
                           what="top logprobs")


def _numpy_penalties(logits, counts, prompt_mask, presence, frequency, repetition):
    logits = logits.astype(np.float64)
    seen = prompt_mask | (counts > 0)
    rep = repetition[:, None]
    logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * (counts > 0)


def _penalty_batch(seed):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, V, rng.integers(0, 12))) for _ in range(B - 2)]
    outputs = [list(rng.integers(0, V, rng.integers(0, 20))) for _ in range(B - 2)]
    # Penalties exactly representable in float32, so references in float64 or torch see
    # the same values as the device.
    f32 = lambda low, high: float(np.float32(rng.uniform(low, high)))  # noqa: E731
    params = [SamplingParams(temperature=0.0, presence_penalty=f32(-2, 2),
                             frequency_penalty=f32(-2, 2), repetition_penalty=f32(0.5, 2.0))
              for _ in range(B - 2)]
    return prompts, outputs, params


def test_penalty_inputs_from_token_lists():
    pen = PenaltyInputs.from_token_lists([[1, 1, 5], []], [[2, 2, 2, 63], [0]], V, 4)
    assert pen.output_counts.shape == (4, V) and pen.output_counts.dtype == np.int32
    assert pen.output_counts[0, 2] == 3 and pen.output_counts[0, 63] == 1
    assert pen.output_counts[1, 0] == 1 and pen.output_counts.sum() == 5
    assert set(np.flatnonzero(pen.prompt_mask[0]).tolist()) == {1, 5}
    assert not pen.prompt_mask[1:].any()
    with pytest.raises(ValueError, match="outside"):
        PenaltyInputs.from_token_lists([[V]], [[]], V, 1)
    with pytest.raises(ValueError, match="output_ids_list"):
        PenaltyInputs.from_token_lists([[1]], [], V, 1)
    with pytest.raises(ValueError, match="pad_to"):
        PenaltyInputs.from_token_lists([[1], [2]], [[], []], V, 1)


def test_penalties_match_numpy():
    prompts, outputs, params = _penalty_batch(7)
    logits = _random_logits(8, scale=3.0)
    t = _tensors(params)
    pen = PenaltyInputs.from_token_lists(prompts, outputs, V, B)
    got = np.asarray(_penalise(logits, t, pen))
    want = _numpy_penalties(logits, pen.output_counts, pen.prompt_mask, t.presence_penalty,
                            t.frequency_penalty, t.repetition_penalty)
    # Elementwise, no sums: about three float32 roundings (one maybe fused) of values up to ~17,
    # <= ~6e-6; observed 9.2e-7 (a penalty applied twice or to the wrong token is O(1) off).
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[B - 2:], logits[B - 2:])  # Padding rows untouched.


def test_repetition_penalty_matches_transformers():
    prompts, outputs, params = _penalty_batch(9)
    params = [dataclasses.replace(p, presence_penalty=0.0, frequency_penalty=0.0)
              for p in params]
    logits = _random_logits(10, scale=3.0)
    t = _tensors(params)
    got = np.asarray(_penalise(logits, t, PenaltyInputs.from_token_lists(prompts, outputs, V,
                                                                         B)))
    for i, p in enumerate(params):
        processor = RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty)
        ids = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        want = processor(ids, torch.from_numpy(logits[i:i + 1].copy()))[0].numpy()
        # One IEEE float32 multiply or divide by the same penalty per element on both sides: exact.
        np.testing.assert_array_equal(got[i], want)


def test_sample_with_penalties_uses_penalised_logits_and_raw_logprobs():
    logits = _random_logits(11)
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0)] * B
    outputs = [[int(top[i])] * 5 for i in range(B)]  # The argmax was generated 5 times.
    pen = PenaltyInputs.from_token_lists([[]] * B, outputs, V, B)
    out = _sample(logits, _tensors(params), num_top_logprobs=N_TOP, penalties=pen)
    penalised = logits - 2.0 * pen.output_counts
    # logits - 10 at the old winner: one rounding per element, far below the random logits' gaps.
    np.testing.assert_array_equal(np.asarray(out.token_ids), penalised.argmax(-1))
    assert np.all(np.asarray(out.token_ids) != top)
    ref = _log_softmax64(logits)
    # Raw logprobs, as in test_logprobs_are_raw_log_softmax (the penalised ones are off by O(1)).
    assert_close_reordered(out.logprobs, ref[np.arange(B), out.token_ids], reduction_len=V,
                           scale=np.abs(ref).max(), what="raw logprobs with penalties")


def test_sample_compiles_once_per_shape_and_variant():
    # Counts XLA compilations with a jax.monitoring listener. Other tests may have compiled
    # this shape already, so: at most one compilation per variant (with/without penalties),
    # and none for batches that differ only in their contents.
    logits = _random_logits(12)
    device_logits = jnp.asarray(logits * 2)
    batches = [
        _tensors([SamplingParams(temperature=0.0)] * 3),
        _tensors([SamplingParams(seed=i, top_p=0.5, top_k=4, min_p=0.1) for i in range(B)],
                 list(range(B))),
        _tensors([SamplingParams(seed=1), SamplingParams(temperature=0.0)], [9, 0]),
    ]
    prompts, outputs, params = _penalty_batch(13)
    pen = PenaltyInputs.from_token_lists(prompts, outputs, V, B)
    other_pen = PenaltyInputs.from_token_lists(outputs, prompts, V, B)
    compiles = []

    def listener(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(_sample(logits, batches[0], num_top_logprobs=N_TOP))
        first = len(compiles)
        assert first <= 1
        for t in batches[1:]:
            jax.block_until_ready(_sample(device_logits, t, num_top_logprobs=N_TOP))
        assert len(compiles) == first
        jax.block_until_ready(
            _sample(logits, _tensors(params), num_top_logprobs=N_TOP, penalties=pen))
        with_penalties = len(compiles)
        assert with_penalties - first <= 1
        jax.block_until_ready(
            _sample(device_logits, batches[1], num_top_logprobs=N_TOP, penalties=other_pen))
        assert len(compiles) == with_penalties
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_from_params_pads_with_greedy_rows_and_fills_seeds():
    params = [SamplingParams(top_k=-1), SamplingParams(top_k=1000, seed=3, temperature=0.5),
              SamplingParams(temperature=0.0)]
    t = SamplingTensors.from_params(params, [4, 0, 2], V, 5, seeds=[11, 12, None])
    np.testing.assert_array_equal(t.temperature, [1.0, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(t.top_k, [V, V, V, V, V])
    np.testing.assert_array_equal(t.seeds, [11, 3, 0, 0, 0])  # The params' seed wins.
    np.testing.assert_array_equal(t.step, [4, 0, 2, 0, 0])
    np.testing.assert_array_equal(t.repetition_penalty, np.ones(5))
    assert t.seeds.dtype == np.uint32 and t.top_k.dtype == np.int32 and t.batch_size == 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(params_list=[SamplingParams()], steps=[0]), "no seed"),
    (dict(params_list=[SamplingParams(seed=1)], steps=[0, 1]), "steps"),
    (dict(params_list=[SamplingParams(seed=1)], steps=[-1]), "steps"),
    (dict(params_list=[SamplingParams(seed=1)], steps=[0], pad_to=0), "pad_to"),
    (dict(params_list=[SamplingParams()], steps=[0], seeds=[2**32]), "seed"),
    (dict(params_list=[SamplingParams()], steps=[0], seeds=[1, 2]), "seeds"),
    (dict(params_list=[{"temperature": 1.0}], steps=[0]), "SamplingParams"),
    (dict(params_list=[SamplingParams(seed=1)], steps=[0], vocab_size=0), "vocab_size"),
])
def test_from_params_errors(kwargs, match):
    kwargs = {"vocab_size": V, "pad_to": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        SamplingTensors.from_params(**kwargs)


def test_sample_shape_errors():
    logits = _random_logits(14)
    t = _tensors([SamplingParams(seed=0)])
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], t)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits[:8], t)
    with pytest.raises(ValueError, match="num_top_logprobs"):
        sample(logits, t, num_top_logprobs=V + 1)
    pen = PenaltyInputs.from_token_lists([[1]], [[2]], V - 1, B)
    with pytest.raises(ValueError, match="output_counts"):
        sample(logits, t, penalties=pen)
