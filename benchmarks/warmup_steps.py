"""Steady-state steps after the compile-only warm-up vs the previous way (benchmark CLI), side by side.

Two `ModelRunner`s over the same model, sizes and device. "ours" is warmed as the server warms
it (`warmup()`: every bucket compiled ahead, steps call the kept executables; long prefill steps
pad to fewer row buckets). "before" compiles each shape through the jitted functions on first use
(what the warm-up that ran every bucket left behind) and pads prefill rows to the full bucket list
(4/16/64 at every length). For each case (a prefill of one prompt of `--prefill_lens` tokens, a
decode step of batch `--batch_sizes` at `--context` tokens) both are run once untimed, then
`--repeats` times each, alternating so both see the same background load; it prints the median
step time of each and before/ours, and checks that the sampled tokens are identical.

Example:
  python -m benchmarks.warmup_steps --model=smollm2-135m --prefill_lens=100,900,2000 --batch_sizes=1,8,32
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=1"])

import statistics
import sys
import time

from absl import app, flags
import jax
import numpy as np

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig, SeqWork
from distserve_jax.runtime.sharding import make_mesh
from distserve_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Named model, checkpoint directory or .gguf file.")
flags.DEFINE_list("prefill_lens", ["100", "900", "2000"], "Prompt lengths of the timed one-prompt prefills.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_integer("context", 512, "Tokens in the cache of every decoded sequence.")
flags.DEFINE_integer("repeats", 5, "Timed steps per runner and case.")
flags.DEFINE_integer("max_model_len", 2048, "The runners' max_model_len (the server's default).")
flags.DEFINE_integer("max_num_seqs", 64, "The runners' max_num_seqs (the server's default).")

GREEDY = SamplingParams(temperature=0.0)


def _cases(bs: int) -> list[tuple[str, list[SeqWork]]]:
    rng = np.random.default_rng(0)
    cases = []
    for n in sorted({int(x) for x in FLAGS.prefill_lens}):
        ids = [int(t) for t in rng.integers(3, 1000, n)]
        cases.append((f"prefill {n}", [SeqWork(ids, 0, list(range(1, 1 + -(-n // bs))), GREEDY)]))
    blocks = -(-(FLAGS.context + 1) // bs)
    for b in sorted({int(x) for x in FLAGS.batch_sizes}):
        works = [SeqWork([7 + i], FLAGS.context, list(range(1 + i * blocks, 1 + (i + 1) * blocks)), GREEDY)
                 for i in range(b)]
        cases.append((f"decode batch {b}", works))
    return cases


def _time(runner: ModelRunner, works: list[SeqWork]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = runner.execute(works)
    return time.perf_counter() - start, [r.token_id for r in out]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.repeats < 1 or FLAGS.context < 1 or max(int(x) for x in FLAGS.prefill_lens) > FLAGS.max_model_len:
        raise app.UsageError("--repeats and --context must be positive, --prefill_lens at most --max_model_len")
    spec = resolve_model(FLAGS.model)
    longest = max(int(b) for b in FLAGS.batch_sizes) * -(-(FLAGS.context + 1) // 16)
    rc = RunnerConfig(max_model_len=FLAGS.max_model_len, max_num_seqs=FLAGS.max_num_seqs,
                      num_blocks=1 + max(longest, -(-FLAGS.max_model_len // 16)))
    mesh = [make_mesh(jax.devices()[:1])]
    ours, before = ModelRunner(spec.config, mesh, spec.weights, rc), ModelRunner(spec.config, mesh, spec.weights, rc)
    before.prefill_rows = {t: before.prefill_seq_buckets for t in before.token_buckets}
    start = time.perf_counter()
    ours.warmup(("prefill", "decode"), background=False)
    sys.stdout.write(f"model {FLAGS.model}, max_model_len {FLAGS.max_model_len}, max_num_seqs {FLAGS.max_num_seqs}; "
                     f"ours warmed in {time.perf_counter() - start:.1f} s; {FLAGS.repeats} timed steps each, "
                     f"alternating; JAX {jax.__version__} on 1 CPU device, {len(os.sched_getaffinity(0))} cores\n")
    sys.stdout.write(f"{'case':<18}{'rows ours':>10}{'rows before':>12}{'ours ms':>10}{'before ms':>11}"
                     f"{'before/ours':>13}  tokens\n")
    for name, works in _cases(rc.block_size):
        rows = [len(r.build_inputs(works)[1].logits_indices) for r in (ours, before)]
        _, want = _time(before, works)  # the first call compiles "before"'s shape
        _, got = _time(ours, works)
        times: dict[str, list[float]] = {"ours": [], "before": []}
        for i in range(FLAGS.repeats):
            for label, r in ((("ours", ours), ("before", before)) if i % 2 == 0 else (("before", before), ("ours", ours))):
                dt, _ = _time(r, works)
                times[label].append(dt)
        o, b = statistics.median(times["ours"]), statistics.median(times["before"])
        sys.stdout.write(f"{name:<18}{rows[0]:>10}{rows[1]:>12}{1e3 * o:>10.1f}{1e3 * b:>11.1f}{b / o:>12.2f}x  "
                         f"{'identical' if got == want else 'DIFFER'}\n")


if __name__ == "__main__":
    app.run(main)
