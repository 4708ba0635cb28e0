"""Workers running concurrently: randomized interleavings of arrivals, aborts and finishes give the
single-device engine's tokens with nothing left behind; a worker whose step raises fails only what
it held; a request that fits a cache is always served (the decode pull boundary), in every mode."""

import time

import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.controller import EngineDeadError
from distserve_jax.engine.factory import build_core
from distserve_jax.engine.placement import InstanceSpec, Placement
from tests.engine.engine_checks import assert_engine_empty, worker
from tests.tolerances import assert_clear_greedy_margins

KW = dict(max_model_len=128, num_blocks=48, max_num_seqs=8, max_num_batched_tokens=96)
N = 160
DEPLOYMENTS = {
    "2xP(tp1)+2xD(tp1)": dict(placement=Placement((InstanceSpec(), InstanceSpec()), (InstanceSpec(), InstanceSpec()))),
    "2xcolocated(tp1)": dict(mode="colocated", replicas=2),
    "2xchunked(tp1)": dict(mode="chunked", replicas=2),
}


@pytest.fixture(scope="module")
def workload(hf_checkpoint):
    """N requests: mixed prompt lengths, greedy and seeded sampling, max_tokens 1..12, a few stop tokens."""
    model = str(hf_checkpoint("llama3"))
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(4, 256, int(rng.integers(1, 60)))] for _ in range(N)]
    params = []
    for i in range(N):
        kw = dict(max_tokens=int(rng.integers(1, 13)), ignore_eos=True)
        if i % 3 == 1:
            kw.update(temperature=0.9, top_p=0.9, seed=int(rng.integers(0, 2**31)))
        else:
            kw.update(temperature=0.0, logprobs=2)  # two logprobs: the reference's margins are checked
        if i % 11 == 5:
            kw["stop_token_ids"] = [int(rng.integers(4, 256))]
        params.append(SamplingParams(**kw))
    ref = LLM(model, **KW)
    expected = ref.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ref.engine.shutdown()
    # Other batch compositions round the logits differently: no greedy step may sit on a near tie.
    assert_clear_greedy_margins([e.logprobs for e, p in zip(expected, params) if p.temperature == 0],
                                what="single-device reference")
    return model, prompts, params, expected


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_random_interleavings_match_single_device(name, workload):
    model, prompts, params, expected = workload
    core = build_core(model, **DEPLOYMENTS[name], **KW)
    rng = np.random.default_rng(sum(map(ord, name)))
    order = [int(i) for i in rng.permutation(N)]
    live, finals, aborted, partial = set(), {}, set(), {}
    deadline = time.monotonic() + 300
    while order or core.has_unfinished_requests():
        assert time.monotonic() < deadline, f"stuck: {sorted(core.requests)}"
        if order and rng.random() < 0.4:
            for _ in range(int(rng.integers(1, 5))):
                if order:
                    i = order.pop()
                    core.add_request(str(i), prompt_token_ids=prompts[i], params=params[i])
                    live.add(i)
        if live and rng.random() < 0.05:
            i = int(rng.choice(sorted(live)))
            out = core.abort_request(str(i))
            assert out is not None and out.finish_reason == "abort"
            live.discard(i)
            aborted.add(i)
            partial[i] = out.token_ids
        for out in core.step():
            if out.finished:
                i = int(out.request_id)
                finals[i] = out
                live.discard(i)
    assert len(finals) + len(aborted) == N and aborted, (len(finals), len(aborted))
    for i, out in finals.items():
        e = expected[i]
        assert (out.token_ids, out.text, out.finish_reason) == (e.token_ids, e.text, e.finish_reason), f"request {i}"
    for i in aborted:  # what an aborted request had produced is the start of its full output
        assert partial[i] == expected[i].token_ids[:len(partial[i])], f"aborted request {i}"
    assert_engine_empty(core)
    info = core.info()
    assert all(inst["num_steps"] > 0 for inst in info["instances"]), info  # every worker served
    core.shutdown()


def _fail_launches(w, after: int) -> None:
    """Makes the worker's runner raise from its `after`-th launch on."""
    launch, calls = w.runner.launch, [0]

    def failing(works, prev=None):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("injected device fault")
        return launch(works, prev)

    w.runner.launch = failing


def test_a_failed_worker_fails_what_it_held_and_the_rest_is_served(workload):
    model, prompts, params, expected = workload
    placement = Placement((InstanceSpec(), InstanceSpec()), (InstanceSpec(),))
    core = build_core(model, placement=placement, **KW)
    _fail_launches(worker(core, "prefill-1"), after=1)
    greedy = [i for i in range(N) if params[i].temperature == 0][:24]
    outs = {}
    for i in greedy:
        core.add_request(str(i), prompt_token_ids=prompts[i], params=params[i])
    deadline = time.monotonic() + 120
    while core.has_unfinished_requests():
        assert time.monotonic() < deadline
        for o in core.step():
            if o.finished:
                outs[int(o.request_id)] = o
    failed = [i for i, o in outs.items() if o.finish_reason == "error"]
    assert failed and len(failed) < len(greedy), [o.finish_reason for o in outs.values()]
    for i in failed:
        assert "prefill-1 failed" in outs[i].error and "injected device fault" in outs[i].error
    for i, o in outs.items():
        if i not in failed:
            assert o.token_ids == expected[i].token_ids, f"request {i}"
    info = core.info()
    assert info["num_worker_failures"] == 1
    assert [inst["alive"] for inst in info["instances"]] == [True, False, True]
    # The engine keeps serving on prefill-0 and the decode worker; nothing leaks on them.
    again = LLM.__new__(LLM)
    again.engine, again.spec, again._counter = core, core.spec, 1000
    got = again.generate(prompt_token_ids=[prompts[i] for i in greedy], sampling_params=[params[i] for i in greedy],
                         use_tqdm=False)
    assert [g.token_ids for g in got] == [expected[i].token_ids for i in greedy]
    assert_engine_empty(core)
    # Without a decode worker nothing can be served: the engine stops with EngineDeadError.
    _fail_launches(worker(core, "decode-0"), after=0)
    core.add_request("last", prompt_token_ids=prompts[0], params=SamplingParams(temperature=0, max_tokens=8))
    with pytest.raises(EngineDeadError, match="no decode worker is left"):
        for _ in range(1000):
            core.step()
    with pytest.raises(EngineDeadError):
        core.add_request("after", prompt_token_ids=prompts[0])
    core.shutdown()


@pytest.mark.parametrize("deploy", [
    dict(placement=Placement((InstanceSpec(),), (InstanceSpec(),))), dict(mode="colocated"), dict(mode="chunked")])
def test_a_request_that_fills_the_cache_exactly_is_served(deploy, workload):
    model = workload[0]
    # 4 usable blocks of 16 tokens: 64 tokens of KV per instance.
    core = build_core(model, **deploy, max_model_len=128, num_blocks=5, max_num_seqs=4, max_num_batched_tokens=64)
    p = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    prompt = workload[1][0][:1] * 50  # 50 + 14 = 64 tokens: within one block of the whole cache
    core.add_request("edge", prompt_token_ids=prompt, params=p)
    deadline, final = time.monotonic() + 60, None
    while core.has_unfinished_requests():
        assert time.monotonic() < deadline, f"the request was never served: {core.info()}"
        for o in core.step():
            final = o if o.finished else final
    assert final.finish_reason == "length" and len(final.token_ids) == 14
    with pytest.raises(ValueError, match="needs up to 65 tokens of KV cache but an instance holds only 64"):
        core.add_request("over", prompt_token_ids=prompt, params=SamplingParams(max_tokens=15))
    assert_engine_empty(core)
    core.shutdown()
