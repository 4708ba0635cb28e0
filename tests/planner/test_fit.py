"""The profile fit recovers known coefficients (decode split where the data bends, the mixed square
term chosen by held-out error) and the profiler interleaves its measurements across shapes."""

import numpy as np
import pytest

from distserve_jax.planner import fit
from distserve_jax.planner.latency_model import StepCoefficients
from distserve_jax.planner.profile_cli import grid, measure_grid


def _decode_samples(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        for c in (16, 64, 128, 256, 512):
            sum_ctx = b * (c + 1)
            ms = 2.0 + 0.001 * sum_ctx + 0.05 * b if b < 8 else 1.0 + 0.002 * sum_ctx + 0.3 * b
            out.append(("decode", [(1, c)] * b, ms * (1 + noise * rng.standard_normal())))
    return out


def test_decode_split_lands_where_the_data_bends():
    small, large, thr, es, el = fit.fit_decode_split(_decode_samples())
    assert thr == 8
    assert small == pytest.approx([2.0, 0.001, 0.05], rel=1e-6)
    assert large == pytest.approx([1.0, 0.002, 0.3], rel=1e-6)
    assert es["heldout_mape"] < 1e-9 and el["heldout_mape"] < 1e-9
    # What the latency model evaluates with them is the measured time.
    c = StepCoefficients(prefill=(0, 0, 0), decode_small=tuple(small), decode_large=tuple(large), decode_threshold=thr)
    assert c.decode_ms(6, 6 * 257) == pytest.approx(2.0 + 0.001 * 6 * 257 + 0.05 * 6)
    assert c.decode_ms(16, 16 * 65) == pytest.approx(1.0 + 0.002 * 16 * 65 + 0.3 * 16)


def test_one_decode_line_does_not_fit_a_bend():
    _, one = fit.fit_regime(_decode_samples(), "decode")
    *_, es, el = fit.fit_decode_split(_decode_samples())
    assert one["heldout_mape"] > 0.05 > max(es["heldout_mape"], el["heldout_mape"])


def test_decode_split_with_noise_keeps_the_error_at_the_noise():
    *_, es, el = fit.fit_decode_split(_decode_samples(noise=0.01, seed=1))
    assert max(es["heldout_mape"], el["heldout_mape"]) < 0.03


def test_mixed_total_square_recovered():
    samples = []
    for n, c in ((16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (96, 192), (256, 256)):
        for d in (0, 2, 4, 8):
            works = [(n, c)] + [(1, 256)] * d
            x = n + d
            samples.append(("mixed", works, 3.0 + 0.02 * x + 1e-4 * x * x + 0.001 * d * 257))
    c_total, e_total = fit.fit_regime(samples, "mixed", square="total")
    _, e_sum = fit.fit_regime(samples, "mixed", square="sum")
    assert c_total == pytest.approx([3.0, 0.02, 1e-4, 0.001], rel=1e-6)
    assert e_total["heldout_mape"] < 1e-9 < e_sum["heldout_mape"]
    m = StepCoefficients(prefill=(0, 0, 0), decode_small=(0, 0, 0), decode_large=(0, 0, 0),
                         mixed=tuple(c_total), mixed_square="total")
    assert m.mixed_ms([(64, 128)], 4, 4 * 257) == pytest.approx(3.0 + 0.02 * 68 + 1e-4 * 68 ** 2 + 0.001 * 4 * 257)
    assert StepCoefficients.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="mixed_square"):
        StepCoefficients(prefill=(0, 0, 0), decode_small=(0, 0, 0), decode_large=(0, 0, 0), mixed_square="cube")


class _FakeRunner:
    """Times come from a fake clock: a shape's run takes its base time, plus a burst of other load
    during a fixed window of runs (what a neighbour's job does on a shared host)."""

    class config:
        block_size = 16

    num_blocks = 10_000

    def __init__(self):
        self.now, self.runs, self.order = 0.0, 0, []

    def clock(self):
        return self.now

    def execute(self, works):
        key = (len(works), works[0].context_len, len(works[0].token_ids))
        self.order.append(key)
        self.runs += 1
        self.now += 1e-3 * (1 + key[0]) * (5.0 if 40 <= self.runs < 60 else 1.0)


def test_measurements_interleave_shapes_so_a_burst_misses_the_medians():
    shapes = [w for _, w in grid(8, 512, 512)][:12]
    r = _FakeRunner()
    ms = measure_grid(r, shapes, repeats=5, warmup=1, clock=r.clock)
    assert ms == pytest.approx([1.0 + len(s) for s in shapes])  # the burst hit one round of each, not a median
    timed = r.order[len(shapes):]
    rounds = [timed[i:i + len(shapes)] for i in range(0, len(timed), len(shapes))]
    assert len(rounds) == 5 and all(sorted(x) == sorted(rounds[0]) for x in rounds)
    assert len({tuple(x) for x in rounds}) > 1  # each round in its own order
    with pytest.raises(ValueError, match="repeats"):
        measure_grid(r, shapes, repeats=0, warmup=1)
