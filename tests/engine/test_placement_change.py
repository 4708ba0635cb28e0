"""Live placement changes (`Controller.apply_placement`) on the threads executor, under load.

Requests arrive before, during and after the change; every one completes with the offline
single-device engine's tokens, none is recomputed, the leaving instances are removed only once
empty, and no KV block is left on any worker. Bad targets and a second change while one runs are
refused before anything changes.
"""

import time

import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.factory import build_core
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.engine.placement_change import PlacementChangeInProgress
from tests.engine.engine_checks import assert_engine_empty
from tests.tolerances import assert_clear_greedy_margins

KW = dict(max_model_len=128, num_blocks=40, max_num_seqs=4, max_num_batched_tokens=96)
N = 16
P1 = InstanceSpec(tp=1)


def _p(prefill, decode) -> Placement:
    return Placement(tuple(prefill), tuple(decode))


@pytest.fixture(scope="module")
def workload(hf_checkpoint):
    model = str(hf_checkpoint("llama3"))
    rng = np.random.default_rng(16)
    prompts = [[int(t) for t in rng.integers(4, 256, int(rng.integers(3, 40)))] for _ in range(N)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(4, 12)), ignore_eos=True, logprobs=2)
              if i % 2 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=300 + i, max_tokens=int(rng.integers(4, 12)),
                             ignore_eos=True) for i in range(N)]
    ref = LLM(model, **KW)
    expected = ref.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ref.engine.shutdown()
    # Other batch layouts and tp degrees round differently: no greedy step may sit on a near tie.
    assert_clear_greedy_margins([e.logprobs for e, p in zip(expected, params) if p.temperature == 0],
                                what="single-device reference")
    return model, prompts, params, expected


def _serve_through_change(core, workload, target, *, change_at: int, when=None, **change_kw):
    """Adds half the requests, applies `target` once `change_at` tokens were streamed, adds the
    rest while the change runs, and serves until everything finished and the change ended."""
    _, prompts, params, expected = workload
    order = list(range(N))
    for i in order[:N // 2]:
        core.add_request(str(i), prompt_token_ids=prompts[i], params=params[i])
    rest = order[N // 2:]
    outs, change, held_at_change = {}, None, {}
    deadline = time.monotonic() + 300
    while len(outs) < N or core.changing_placement:
        assert time.monotonic() < deadline, f"stuck: {core.info()}"
        if change is None and sum(len(r.output_token_ids) for r in core.requests.values()) >= change_at and (
                when is None or when(core)):
            held_at_change = {n: ld.num_running + ld.num_waiting + ld.num_waiting_migration
                              for n, ld in core.loads.items()}
            change = core.apply_placement(target, **change_kw)
            assert change.state in ("starting", "draining")
            with pytest.raises(PlacementChangeInProgress, match="still"):
                core.apply_placement(target)
        if change is not None and rest:
            i = rest.pop()
            core.add_request(str(i), prompt_token_ids=prompts[i], params=params[i])
        for o in core.step():
            if o.finished:
                outs[int(o.request_id)] = o
    assert change is not None
    for i, e in enumerate(expected):
        o = outs[i]
        assert (o.token_ids, o.finish_reason) == (e.token_ids, e.finish_reason), f"request {i}"
        assert o.metrics["num_preemptions"] == 0, f"request {i} was recomputed"
    assert not core.failures
    core.last_finish = max(o.metrics["finish_time"] for o in outs.values())
    return change, held_at_change


def _check_done(core, change, target, removed, added):
    c = core.placement_change
    assert c.state == "done" and c.error is None, c
    assert c.finished_at >= c.started_at == change.started_at
    assert set(c.removed) == set(removed) and len(c.added) == added, c
    assert set(core.roles).isdisjoint(removed)
    assert set(core.executor.workers).isdisjoint(removed)  # stopped and dropped by the executor
    assert core.current_placement().describe() == target.describe()
    info = core.info()
    assert info["placement"] == target.describe()
    assert info["placement_change"]["state"] == "done" and info["placement_changes"] == {"done": 1}
    assert {i["name"] for i in info["instances"]} == set(core.roles)
    devices = [d for i in info["instances"] for d in i["devices"]]
    assert len(devices) == len(set(devices))  # no device in two instances
    assert_engine_empty(core)


@pytest.mark.parametrize("threads", [False, True], ids=["driver", "threads"])
def test_scale_up_decode_under_load(threads, workload):
    core = build_core(workload[0], placement=_p([P1], [P1]), start_workers=threads, **KW)
    try:
        target = _p([P1], [P1, P1])
        change, _ = _serve_through_change(core, workload, target, change_at=6)
        _check_done(core, change, target, removed=(), added=1)
        new = change.added[0]
        assert core.roles[new] == "decode" and core.executor.workers[new].num_steps > 0  # it took requests
    finally:
        core.shutdown()


@pytest.mark.parametrize("threads", [False, True], ids=["driver", "threads"])
def test_scale_down_prefill_under_load(threads, workload):
    core = build_core(workload[0], placement=_p([P1, P1], [P1]), start_workers=threads, **KW)
    try:
        target = _p([P1], [P1])
        change, held = _serve_through_change(core, workload, target, change_at=4)
        assert held["prefill-1"] > 0  # the leaving instance had requests to finish
        _check_done(core, change, target, removed=("prefill-1",), added=0)
    finally:
        core.shutdown()


@pytest.mark.parametrize("handoff", [True, False], ids=["handoff", "decode-to-the-end"])
@pytest.mark.parametrize("threads", [False, True], ids=["driver", "threads"])
def test_scale_down_decode_under_load(threads, handoff, workload):
    """1P+2D -> 1P+1D: the leaving decode instance hands its requests to the one that stays (each
    pulled from it mid-generation, tokens unchanged), or decodes them to the end."""
    core = build_core(workload[0], placement=_p([P1], [P1, P1]), start_workers=threads, **KW)
    try:
        target = _p([P1], [P1])
        change, held = _serve_through_change(core, workload, target, change_at=10, handoff=handoff,
                                             when=lambda c: c.loads["decode-1"].num_running > 0)
        assert held["decode-1"] > 0
        _check_done(core, change, target, removed=("decode-1",), added=0)
        if handoff:
            assert core.num_handoffs > 0 and core.info()["num_handoffs"] == core.num_handoffs
            if not threads:  # deterministic: the leaving instance was gone before the last request ended
                assert core.placement_change.finished_at < core.last_finish
        else:
            assert core.num_handoffs == 0
    finally:
        core.shutdown()


def test_new_instance_on_a_leaving_instances_devices(workload):
    """On 3 devices, D(tp1) -> D(tp2) needs the old decode instance's device: the old one stops
    taking pulls at once, drains, is removed, then the new one starts on its device."""
    import jax

    core = build_core(workload[0], placement=_p([P1], [P1]), devices=jax.devices()[:3], start_workers=False, **KW)
    try:
        target = _p([P1], [InstanceSpec(tp=2)])
        change, held = _serve_through_change(core, workload, target, change_at=6)
        assert held["decode-0"] > 0
        _check_done(core, change, target, removed=("decode-0",), added=1)
        assert sorted(core.info()["instances"][1]["devices"]) == [1, 2]
    finally:
        core.shutdown()


def test_bad_targets_are_refused_before_anything_changes(workload):
    import jax

    core = build_core(workload[0], placement=_p([P1], [P1]), devices=jax.devices()[:4], start_workers=False, **KW)
    try:
        before = (dict(core.roles), core.current_placement())
        bad = [
            (_p([P1] * 3, [P1] * 2), "needs 5 devices, the executor has 4"),
            (_p([P1], [InstanceSpec(tp=3)]), "decode instance 0"),
            (_p([P1], [InstanceSpec(tp=1, pp=3)]), "pp=3 does not divide"),
            (_p([InstanceSpec(devices=(0,))], [P1, InstanceSpec(devices=(0,))]), "device 0 belongs to prefill-0"),
            (_p([P1], [InstanceSpec(devices=(7,))]), "device id 7 does not exist"),
            ({"prefill": [], "decode": [{"tp": 1}]}, "at least one prefill and one decode"),
            ("p1-d1.yaml", "needs a Placement"),
        ]
        for target, msg in bad:
            with pytest.raises(ValueError, match=msg):
                core.apply_placement(target)
        assert (dict(core.roles), core.current_placement()) == before and core.placement_change is None
        # The same placement again is a change with nothing to do.
        c = core.apply_placement(before[1])
        assert c.state == "done" and c.added == c.removed == () and dict(core.roles) == before[0]
    finally:
        core.shutdown()
    colocated = build_core(workload[0], mode="colocated", start_workers=False, **KW)
    try:
        assert colocated.current_placement() is None
        with pytest.raises(ValueError, match="colocated replicas"):
            colocated.apply_placement(_p([P1], [P1]))
    finally:
        colocated.shutdown()


def test_a_new_instance_that_fails_to_start_fails_the_change(workload, monkeypatch):
    """Building the new instance raises: the change ends "failed" naming it, nothing else changes,
    the requests in flight complete, and a later change is accepted."""
    from distserve_jax.engine.threads_executor import ThreadsExecutor

    _, prompts, params, expected = workload
    core = build_core(workload[0], placement=_p([P1], [P1]), start_workers=False, **KW)
    try:
        build = ThreadsExecutor._build

        def failing(self, name, *a, **kw):
            if name == "decode-1":
                raise RuntimeError("out of device memory")
            return build(self, name, *a, **kw)

        monkeypatch.setattr(ThreadsExecutor, "_build", failing)
        for i in range(4):
            core.add_request(str(i), prompt_token_ids=prompts[i], params=params[i])
        change = core.apply_placement(_p([P1], [P1, P1]))
        outs = {}
        while len(outs) < 4:
            outs.update({int(o.request_id): o for o in core.step() if o.finished})
        c = core.placement_change
        assert c.state == "failed" and "decode-1" in c.error and "out of device memory" in c.error, c
        assert c.started_at == change.started_at and c.finished_at is not None
        assert not core.changing_placement and core.placement_changes == {"failed": 1}
        assert list(core.roles) == ["prefill-0", "decode-0"] and core.current_placement().describe() == "P(tp1)+D(tp1)"
        assert [outs[i].token_ids for i in range(4)] == [e.token_ids for e in expected[:4]]
        monkeypatch.undo()
        assert core.apply_placement(_p([P1], [P1, P1])).state == "starting"  # no longer in progress
        while core.changing_placement:
            core.step()
        assert core.placement_change.state == "done" and core.placement_change.added == ("decode-2",)
        assert_engine_empty(core)
    finally:
        core.shutdown()
