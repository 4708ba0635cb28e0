"""The simulator makes the real engine's scheduling decisions: a deterministic real run
(`start_workers=False`, one turn of each worker per step) and its simulated replay (the same
workers, controller and schedulers on `SimExecutor(lockstep=True)`, each step taking the real
step's measured time) launch the same batches on every instance, step by step."""

import time

import numpy as np

from distserve_jax import SamplingParams
from distserve_jax.engine.factory import build_core
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.planner import simulator as sim
from distserve_jax.planner.deployment import Deployment, SimInstance
from distserve_jax.planner.sim_runner import ReplayTimes
from tests.planner.toy import toy_profile

KW = dict(max_model_len=160, num_blocks=20, max_num_seqs=4, max_num_batched_tokens=64)


class _Recorder:
    """Wraps a real runner: logs each launched batch's composition and each step's launch-to-fetch time."""

    def __init__(self, runner):
        self.runner, self.log, self.times, self._t = runner, [], [], {}

    def launch(self, works, prev=None):
        t = time.perf_counter()
        p = self.runner.launch(works, prev)
        self._t[id(p)] = t
        self.log.append(tuple((len(w.token_ids), w.context_len, w.sample) for w in works))
        return p

    def collect(self, p):
        out = self.runner.collect(p)
        self.times.append(time.perf_counter() - self._t.pop(id(p)))
        return out

    def __getattr__(self, name):
        return getattr(self.runner, name)


def _drive(core, reqs, waves):
    """Adds wave i of `reqs` after i * 3 controller steps; runs to the end; the finished outputs by id."""
    done, step = {}, 0
    while True:
        for i, wave in enumerate(waves):
            if step == 3 * i:
                for k in wave:
                    prompt, n = reqs[k]
                    core.add_request(str(k), prompt_token_ids=prompt,
                                     params=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        if step > 3 * (len(waves) - 1) and not core.has_unfinished_requests():
            return done
        for out in core.step():
            if out.finished:
                done[out.request_id] = (len(out.token_ids), out.finish_reason, out.metrics["num_preemptions"])
        step += 1


def test_simulated_replay_makes_the_real_decisions(hf_checkpoint):
    rng = np.random.default_rng(3)
    reqs = [([int(t) for t in rng.integers(4, 200, int(p))], int(o))
            for p, o in zip(rng.integers(5, 100, 14), rng.integers(1, 50, 14))]
    waves = [range(0, 5), range(5, 10), range(10, 14)]
    core = build_core(str(hf_checkpoint("llama3")), placement=Placement((InstanceSpec(tp=1),), (InstanceSpec(tp=1),)),
                      start_workers=False, **KW)
    recorders = {}
    for name, w in core.executor.workers.items():
        recorders[name] = w.runner = _Recorder(w.runner)
        # Landing pulls as they finish depends on transfer timing, which a step-by-step replay
        # cannot reproduce; both sides wait for every pull at the next step instead.
        w.land_ready_pulls = False
    real = _drive(core, reqs, waves)
    core.shutdown()
    assert sum(p for _, _, p in real.values()) > 0, "the trace should make the decode cache preempt"

    dep = Deployment("disaggregated", (SimInstance("prefill-0", "prefill", 1, 1, (0,), KW["num_blocks"]),
                                       SimInstance("decode-0", "decode", 1, 1, (1,), KW["num_blocks"])),
                     block_size=16, max_num_seqs=KW["max_num_seqs"], max_num_batched_tokens=KW["max_num_batched_tokens"],
                     max_model_len=KW["max_model_len"])
    ex = sim.SimExecutor(dep, toy_profile(), lockstep=True, record_steps=True,
                         step_models={n: ReplayTimes(r.times) for n, r in recorders.items()})
    for w in ex.workers.values():
        w.land_ready_pulls = False
    simulated = _drive(sim.make_controller(ex), [([0] * len(p), n) for p, n in reqs], waves)
    assert simulated == real
    for name, r in recorders.items():
        got = [c for _, _, c in ex.step_logs[name]]
        assert len(got) == len(r.log) > 10
        assert got == r.log, f"{name}: first differing step {next(i for i, (a, b) in enumerate(zip(got, r.log)) if a != b)}"
    # The simulated clock advanced by the replayed step times: the last token is no earlier than
    # the sum of one instance's step times would allow.
    assert ex.now >= max(sum(r.times) for r in recorders.values()) * 0.99
