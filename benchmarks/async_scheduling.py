"""Launching ahead (benchmark CLI): the single-mesh engine's decode steps with `async_scheduling`
on and off, side by side in one process.

Two `LLM`s over the same model and sizes, one launching each step before fetching the previous
one's tokens (the default), one running a step at a time. For each batch size, rounds alternate
between them (the order flips every round, so both see the same background load); a round adds
`B` requests of `--prompt_len` random tokens (greedy, `ignore_eos`, `--max_tokens` new tokens),
runs the prefill step, then times every remaining `step()` call until all requests finish. It
prints the median decode time per step of each and their ratio; the outputs of the two are
compared token for token.

Example:
  python -m benchmarks.async_scheduling --batch_sizes=1,8,32 --prompt_len=200 --max_tokens=40 --rounds=8
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=1"])

import statistics
import time

from absl import app, flags
import jax
import numpy as np

from distserve_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Requests decoded together.")
flags.DEFINE_string("model", "llama-130m", "Named config in configs/models/ or a checkpoint directory.")
flags.DEFINE_integer("prompt_len", 200, "Random prompt tokens per request.")
flags.DEFINE_integer("max_tokens", 40, "Tokens generated per request.")
flags.DEFINE_integer("rounds", 8, "Timed rounds per engine and batch size (after one warm-up round each).")
flags.DEFINE_integer("seed", 0, "Seed for the prompts.")


def decode_round(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Seconds per decode step of one round, and the generated tokens of each request."""
    eng = llm.engine
    ids = [eng.add_request(prompt_token_ids=p, params=params).request_id for p in prompts]
    tokens = {i: [] for i in ids}
    for out in eng.step():  # the prefill
        tokens[out.request_id] += out.new_token_ids
    start, steps = time.perf_counter(), 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
        steps += 1
    return (time.perf_counter() - start) / max(steps, 1), [tokens[i] for i in ids]


def main(argv):
    del argv
    batches = sorted({int(b) for b in FLAGS.batch_sizes})
    if not batches or batches[0] < 1 or FLAGS.prompt_len < 1 or FLAGS.max_tokens < 2 or FLAGS.rounds < 1:
        raise ValueError("--batch_sizes, --prompt_len and --rounds must be >= 1 and --max_tokens >= 2")
    sizes = dict(max_model_len=FLAGS.prompt_len + FLAGS.max_tokens + 16, max_num_seqs=batches[-1],
                 max_num_batched_tokens=max(2048, FLAGS.prompt_len * batches[-1]))
    engines = {"ahead": LLM(FLAGS.model, async_scheduling=True, **sizes),
               "sync": LLM(FLAGS.model, async_scheduling=False, **sizes)}
    vocab = engines["ahead"].spec.config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=FLAGS.max_tokens, ignore_eos=True)
    rng = np.random.default_rng(FLAGS.seed)
    print(f"\n== launching ahead: {FLAGS.model}, prompts of {FLAGS.prompt_len} tokens, {FLAGS.max_tokens} new tokens "
          f"each, median of {FLAGS.rounds} rounds; JAX {jax.__version__} on {jax.devices()[0].platform}, "
          f"{len(os.sched_getaffinity(0))} cores in affinity")
    print(f"{'batch':>5} {'ahead ms/step':>13} {'sync ms/step':>12} {'sync/ahead':>10} {'same tokens':>11}")
    for b in batches:
        prompts = [[int(t) for t in rng.integers(3, vocab, FLAGS.prompt_len)] for _ in range(b)]
        times = {name: [] for name in engines}
        outputs = {}
        for name, llm in engines.items():
            _, outputs[name] = decode_round(llm, prompts, params)  # warm-up (compiles this batch's buckets)
        for r in range(FLAGS.rounds):
            for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                t, _ = decode_round(engines[name], prompts, params)
                times[name].append(t)
        ahead, sync = statistics.median(times["ahead"]), statistics.median(times["sync"])
        same = outputs["ahead"] == outputs["sync"]
        print(f"{b:>5} {ahead * 1e3:>13.2f} {sync * 1e3:>12.2f} {sync / ahead:>10.3f} {str(same):>11}")


if __name__ == "__main__":
    app.run(main)
