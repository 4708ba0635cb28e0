"""Prefill-decode interference (benchmark CLI): a decode stream's token gaps while long prompts prefill.

One request decodes on the decode instance of P(tp1)+D(tp1) (`--stream_tokens` new tokens). After
`--unloaded_tokens` of its tokens, long prompts (`--prompt_len` random tokens, max_tokens=1) are
prefilled one after another on the prefill instance, each queued when the one before has produced
its token, `--num_prefills` of them. The stream's gaps (time between consecutive tokens, from the
engine's token timestamps) are split into the unloaded ones and those that overlap a prefill
(from its prefill_start to its first token). It prints the median and p95 of each, the median
prefill time, and the two ratios the design is judged on: p95 overlapping gap / prefill time, and
median overlapping gap / median unloaded gap.

The same script runs against any engine core with the `add_request` / `step` / `requests` interface,
so the coupled engine of an older commit can be measured with it too.

Example:
  python -m benchmarks.interference --model=demo --prompt_len=1500 --num_prefills=6
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=2"])

import json
import platform
import time

import numpy as np
from absl import app, flags

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.placement import InstanceSpec, Placement

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "demo", "Named config in configs/models/ or a checkpoint directory.")
flags.DEFINE_integer("prompt_len", 1500, "Tokens of each long prompt.")
flags.DEFINE_integer("num_prefills", 6, "Long prompts prefilled one after another.")
flags.DEFINE_integer("unloaded_tokens", 150, "Stream tokens before the first long prompt (the unloaded gaps).")
flags.DEFINE_integer("stream_tokens", 1500, "Tokens of each stream request (a new one starts when one ends).")
flags.DEFINE_integer("seed", 0, "Seed for the prompts.")
flags.DEFINE_string("out", None, "Write the gaps and the summary as JSON here.")
flags.DEFINE_enum("executor", "threads", ["threads", "ray"], "threads: both instances in this process; ray: one "
                  "process per instance, each pinned to its own core.")


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


class _Stream:
    """The decode stream: one request at a time, a new one started when the last ends (its context
    is finite); keeps every request's token times."""

    def __init__(self, core, vocab: int, rng):
        self.core, self.vocab, self.rng = core, vocab, rng
        self.segments: list[list[float]] = []
        self.n = 0
        self.num_tokens = 0
        self._start()

    def _start(self):
        self.rid = f"stream-{self.n}"
        self.n += 1
        params = SamplingParams(temperature=0.0, max_tokens=FLAGS.stream_tokens, ignore_eos=True)
        self.core.add_request(self.rid, prompt_token_ids=[int(t) for t in self.rng.integers(3, self.vocab, 16)],
                              params=params)

    def step(self, keep_going: bool = True) -> list:
        outs = self.core.step()
        for o in outs:
            if o.request_id == self.rid:
                self.num_tokens += len(o.new_token_ids)
                if o.finished:
                    self.segments.append(list(o.metrics["token_times"]))
                    if keep_going:
                        self._start()
        return outs

    def stop(self) -> list[list[float]]:
        req = self.core.requests.get(self.rid)
        if req is not None:
            self.segments.append(list(req.token_times))
            self.core.abort_request(self.rid)
        return self.segments


def measure(core, vocab: int) -> dict:
    rng = np.random.default_rng(FLAGS.seed)
    stream = _Stream(core, vocab, rng)
    while stream.num_tokens < FLAGS.unloaded_tokens:
        stream.step()
    prefills = []
    for i in range(FLAGS.num_prefills):
        rid = f"long-{i}"
        core.add_request(rid, prompt_token_ids=[int(t) for t in rng.integers(3, vocab, FLAGS.prompt_len)],
                         params=SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        done = None
        while done is None:
            for o in stream.step():
                if o.request_id == rid and o.finished:
                    done = o
        m = done.metrics
        prefills.append((m["prefill_start"], m["first_token_time"]))
    # A few more stream tokens after the last prefill, then stop it.
    deadline = time.perf_counter() + 0.2
    while time.perf_counter() < deadline:
        stream.step()
    segments = stream.stop()
    first_prefill = prefills[0][0]
    gaps = [(a, b) for times in segments for a, b in zip(times, times[1:])]
    unloaded = [b - a for a, b in gaps if b < first_prefill]
    overlap = [b - a for a, b in gaps if any(a < e and b > s for s, e in prefills)]
    prefill_s = [e - s for s, e in prefills]
    return {"unloaded_gap_median_ms": 1e3 * _pct(unloaded, 50), "unloaded_gap_p95_ms": 1e3 * _pct(unloaded, 95),
            "overlap_gap_median_ms": 1e3 * _pct(overlap, 50), "overlap_gap_p95_ms": 1e3 * _pct(overlap, 95),
            "overlap_gap_max_ms": 1e3 * max(overlap, default=float("nan")),
            "num_unloaded_gaps": len(unloaded), "num_overlap_gaps": len(overlap),
            "prefill_median_ms": 1e3 * _pct(prefill_s, 50),
            "p95_overlap_over_prefill": _pct(overlap, 95) / _pct(prefill_s, 50),
            "median_overlap_over_unloaded": _pct(overlap, 50) / _pct(unloaded, 50),
            "gaps_ms": [1e3 * (b - a) for a, b in gaps], "prefills": prefills}


def main(argv):
    del argv
    placement = Placement((InstanceSpec(tp=1),), (InstanceSpec(tp=1),))
    kw = dict(max_model_len=max(2048, FLAGS.prompt_len + 64), max_num_batched_tokens=max(2048, FLAGS.prompt_len),
              max_num_seqs=8)
    if FLAGS.executor == "ray":
        from distserve_jax.engine.factory import build_core
        core = build_core(FLAGS.model, placement=placement, executor="ray", **kw)
        vocab = core.spec.config.vocab_size
        print("instances:", [(i["name"], i["pid"], i["cores"]) for i in core.info()["instances"]])
    else:
        llm = LLM(FLAGS.model, placement=placement, **kw)
        core = llm.engine
        vocab = llm.spec.config.vocab_size
    core.warmup(wait_background=True)  # measure steady state: not the deferred warm-up work
    res = measure(core, vocab)
    info = core.info()
    res["controller_host_ms_per_event"] = (1e3 * info.get("controller_host_seconds", float("nan"))
                                           / max(info.get("controller_events", 1), 1))
    res["worker_step_ms"] = {i["name"]: 1e3 * i.get("step_time_sum", float("nan")) / max(i.get("num_steps", 1), 1)
                             for i in info["instances"]}
    if hasattr(core, "shutdown"):
        core.shutdown()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; executor {FLAGS.executor}; model {FLAGS.model}, P(tp1)+D(tp1), "
          f"{FLAGS.num_prefills} prefills of {FLAGS.prompt_len} tokens")
    print(f"prefill time (median):           {res['prefill_median_ms']:8.1f} ms")
    print(f"unloaded gap   median / p95:     {res['unloaded_gap_median_ms']:8.2f} / {res['unloaded_gap_p95_ms']:.2f} ms"
          f"  ({res['num_unloaded_gaps']} gaps)")
    print(f"overlapping gap median / p95:    {res['overlap_gap_median_ms']:8.2f} / {res['overlap_gap_p95_ms']:.2f} ms"
          f"  (max {res['overlap_gap_max_ms']:.1f} ms, {res['num_overlap_gaps']} gaps)")
    print(f"p95 overlapping gap / prefill:   {res['p95_overlap_over_prefill']:8.3f}  (target <= 0.3)")
    print(f"median overlapping / unloaded:   {res['median_overlap_over_unloaded']:8.2f}  (target <= 2)")
    print(f"host time: controller {res['controller_host_ms_per_event']:.3f} ms per event; mean worker step "
          + ", ".join(f"{n} {v:.2f} ms" for n, v in res["worker_step_ms"].items()))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    app.run(main)
