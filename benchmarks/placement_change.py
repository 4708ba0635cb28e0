"""Live placement change (benchmark CLI): how long a decode scale-down takes, with and without hand-off.

Serves `--num_requests` requests of `--max_tokens` greedy tokens each on P(tp1)+2xD(tp1) (threads
executor, warmed up), and once `--change_after` tokens were streamed, applies P(tp1)+D(tp1): the
second decode instance leaves. It runs twice on the same requests:
  - `handoff`: the leaving instance hands its requests to the one that stays (KV pulled from it);
  - `drain` (the reference): it decodes its requests to the end, then goes.
It prints, per run, the time from `apply_placement` to the change being done, the time from it to
the last request's end, the median TPOT, and the ratio of the two change times; both runs must
give the same tokens (it checks).

Example:
  python -m benchmarks.placement_change --model=demo --num_requests=12 --max_tokens=200
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=3"])

import json
import platform
import time

import numpy as np
from absl import app, flags

from distserve_jax import SamplingParams
from distserve_jax.engine.factory import build_core
from distserve_jax.engine.placement import InstanceSpec, Placement

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "demo", "Named config in configs/models/ or a checkpoint directory.")
flags.DEFINE_integer("num_requests", 12, "Requests, all queued at the start.")
flags.DEFINE_integer("prompt_len", 64, "Tokens of each (random) prompt.")
flags.DEFINE_integer("max_tokens", 200, "Greedy tokens each request generates (ignore_eos).")
flags.DEFINE_integer("change_after", 200, "Tokens streamed (all requests together) before the change.")
flags.DEFINE_integer("max_num_seqs", 8, "Batch slots per instance.")
flags.DEFINE_integer("seed", 0, "Seed for the prompts.")
flags.DEFINE_string("out", None, "Write the summary as JSON here.")


def _run(prompts: list[list[int]], handoff: bool) -> dict:
    core = build_core(FLAGS.model, placement=Placement((InstanceSpec(),), (InstanceSpec(), InstanceSpec())),
                      max_model_len=FLAGS.prompt_len + FLAGS.max_tokens + 16, max_num_seqs=FLAGS.max_num_seqs)
    try:
        core.warmup(wait_background=True)  # measure steady state: not the deferred warm-up work
        params = SamplingParams(temperature=0.0, max_tokens=FLAGS.max_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            core.add_request(str(i), prompt_token_ids=p, params=params)
        outs, change, held = {}, None, {}
        while len(outs) < len(prompts) or core.changing_placement:
            if change is None and sum(len(r.output_token_ids) for r in core.requests.values()) >= FLAGS.change_after:
                held = {n: ld.num_running for n, ld in core.loads.items() if ld.role == "decode"}
                change = core.apply_placement(Placement((InstanceSpec(),), (InstanceSpec(),)), handoff=handoff)
            for o in core.step():
                if o.finished:
                    outs[int(o.request_id)] = o
        c = core.placement_change
        if change is None or c.state != "done":
            raise RuntimeError(f"the change did not complete: {c}")
        last = max(o.metrics["finish_time"] for o in outs.values())
        tpots = [o.metrics["tpot"] for o in outs.values() if o.metrics["tpot"] is not None]
        return {"handoff": handoff, "change_s": c.finished_at - c.started_at, "to_last_finish_s": last - c.started_at,
                "median_tpot_ms": 1e3 * float(np.median(tpots)), "num_handoffs": core.num_handoffs,
                "running_at_change": held, "tokens": [outs[i].token_ids for i in range(len(prompts))]}
    finally:
        core.shutdown()


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    prompts = [[int(t) for t in rng.integers(4, 250, FLAGS.prompt_len)] for _ in range(FLAGS.num_requests)]
    t0 = time.perf_counter()
    runs = [_run(prompts, handoff=True), _run(prompts, handoff=False)]
    same = runs[0]["tokens"] == runs[1]["tokens"]
    for r in runs:
        print(f"{'handoff' if r['handoff'] else 'drain  '}: change done in {r['change_s']:.3f} s, last request "
              f"{r['to_last_finish_s']:.3f} s after the change began, median TPOT {r['median_tpot_ms']:.2f} ms, "
              f"{r['num_handoffs']} hand-offs, decode requests running at the change {r['running_at_change']}")
    ratio = runs[0]["change_s"] / runs[1]["change_s"]
    print(f"change time, handoff / drain: {ratio:.3f}x; outputs identical: {same}; "
          f"total {time.perf_counter() - t0:.1f} s on {platform.processor() or platform.machine()}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs], "ratio": ratio,
                       "identical": same}, f, indent=1)
    if not same:
        raise SystemExit("outputs differ between the two runs")


if __name__ == "__main__":
    app.run(main)
