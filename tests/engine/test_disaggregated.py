"""Disaggregated placements and the colocated/chunked baselines give the single-device engine's tokens;
no request or KV block is left behind, also after aborts at every lifecycle stage."""

import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.factory import build_core
from distserve_jax.engine.placement import InstanceSpec, Placement
from tests.engine.engine_checks import assert_engine_empty, held, worker
from tests.tolerances import assert_clear_greedy_margins

KW = dict(max_model_len=160, num_blocks=80, max_num_seqs=8, max_num_batched_tokens=64)
PLACEMENTS = {
    "P(tp2)+D(tp1)": Placement((InstanceSpec(tp=2),), (InstanceSpec(tp=1),)),
    "P(tp4)+D(tp2,pp2)": Placement((InstanceSpec(tp=4),), (InstanceSpec(tp=2, pp=2),)),
    "2xP(tp1)+D(tp2)": Placement((InstanceSpec(tp=1), InstanceSpec(tp=1)), (InstanceSpec(tp=2),)),
}


@pytest.fixture(scope="module")
def workload(hf_checkpoint):
    """50 prompts of mixed lengths (some past the 64-token chunk), some max_tokens=1, some stop strings."""
    model = str(hf_checkpoint("llama3"))
    rng = np.random.default_rng(5)
    lens = list(rng.integers(1, 40, 30)) + list(rng.integers(65, 130, 12)) + list(rng.integers(1, 20, 8))
    prompts = [[int(t) for t in rng.integers(4, 256, int(n))] for n in lens]
    ref_llm = LLM(model, **KW)
    free = ref_llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, logprobs=2), use_tqdm=False)
    # Other tp/pp degrees sum in other orders: the expected tokens (prefixes of these) must not
    # sit on a near tie.
    assert_clear_greedy_margins([o.logprobs for o in free], what="single-device reference")
    params = []
    for i, out in enumerate(free):
        if i % 7 == 3:
            params.append(SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        elif i % 5 == 1 and len(out.text) > 6:
            params.append(SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[out.text[4:6]]))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(2, 17)), ignore_eos=True))
    expected = ref_llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert sum(o.finish_reason == "stop" for o in expected) >= 3
    assert sum(len(o.token_ids) == 1 for o in expected) >= 5
    assert_engine_empty(ref_llm.engine)
    return model, prompts, params, expected


def _check(llm, workload):
    model, prompts, params, expected = workload
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g.token_ids, g.text, g.finish_reason) == (e.token_ids, e.text, e.finish_reason), f"prompt {i}"
    assert_engine_empty(llm.engine)


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_placements_match_single_device(name, workload):
    llm = LLM(workload[0], placement=PLACEMENTS[name], **KW)
    assert llm.engine.info()["placement"] == name
    _check(llm, workload)
    assert llm.engine.migrated_bytes > 0


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_baselines_match_single_device(mode, workload):
    _check(LLM(workload[0], mode=mode, tp=2, **KW), workload)


def _disagg(model, **kw):
    """P(tp2)+D(tp1) whose workers take one turn each per `step()` (deterministic lifecycles)."""
    return build_core(model, placement=PLACEMENTS["P(tp2)+D(tp1)"], start_workers=False, **{**KW, **kw})


def test_abort_at_every_lifecycle_stage(workload):
    core = _disagg(workload[0], max_num_seqs=2)
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = workload[1]
    # Queued on the prefill instance.
    core.add_request("queued", prompt_token_ids=ids[0], params=p)
    assert core.abort_request("queued").finish_reason == "abort"
    # Mid-migration: prefilled in step 1 and a pull asked of the decode worker, which has begun it
    # (its blocks are reserved) but not landed it.
    core.add_request("migrating", prompt_token_ids=ids[1], params=p)
    core.step()
    assert core.requests["migrating"].status.value == "migrating"
    assert held(core, "migrating") == ["prefill-0", "decode-0"]
    core.abort_request("migrating")
    assert held(core, "migrating") == []
    # Decoding, and waiting to migrate while the decode instance is full (max_num_seqs=2).
    for rid, prompt in (("d1", ids[2]), ("d2", ids[3]), ("waiting", ids[4])):
        core.add_request(rid, prompt_token_ids=prompt, params=p)
    for _ in range(4):
        core.step()
    assert core.requests["d1"].status.value == "running" and held(core, "d1") == ["decode-0"]
    assert core.requests["waiting"].status.value == "waiting_migration"
    assert held(core, "waiting") == ["prefill-0"]
    core.abort_request("waiting")
    core.abort_request("d1")
    assert held(core, "waiting") == [] and held(core, "d1") == []
    while core.has_unfinished_requests():
        core.step()
    assert_engine_empty(core)


def test_abort_mid_chunked_prefill(workload):
    eng = build_core(workload[0], mode="chunked", start_workers=False, **KW)
    long_prompt = [5] * 150  # three 64-token chunks
    eng.add_request("long", prompt_token_ids=long_prompt, params=SamplingParams(max_tokens=4))
    eng.step()
    (r,) = worker(eng).requests.values()
    assert 0 < r.num_computed_tokens < len(long_prompt)
    eng.abort_request("long")
    assert_engine_empty(eng)


def test_decode_preemption_recomputes_on_prefill(workload):
    model, prompts, _, _ = workload
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    batch = prompts[:6]
    ref = LLM(model, **KW).generate(prompt_token_ids=batch, sampling_params=SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, logprobs=2), use_tqdm=False)
    # Recomputed KV and other batches round differently: no near tie in the reference.
    assert_clear_greedy_margins([r.logprobs for r in ref], what="single-device reference")
    llm = LLM(model, placement=PLACEMENTS["P(tp2)+D(tp1)"], **{**KW, "num_blocks": 9})  # 8 usable blocks:
    core = llm.engine  # decoding preempts
    got = llm.generate(prompt_token_ids=batch, sampling_params=p, use_tqdm=False)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert sum(g.metrics["num_preemptions"] for g in got) > 0
    assert_engine_empty(core)


def test_timestamps_are_ordered(workload):
    core = _disagg(workload[0])
    core.add_request("t", prompt_token_ids=workload[1][0], params=SamplingParams(max_tokens=5, ignore_eos=True))
    final = None
    while core.has_unfinished_requests():
        for o in core.step():
            final = o
    m = final.metrics
    order = ["arrival_time", "prefill_start", "prefill_end", "migration_start", "migration_end", "finish_time"]
    vals = [m[k] for k in order]
    assert all(v is not None for v in vals) and vals == sorted(vals), m
    assert m["token_times"][0] == m["first_token_time"] == m["prefill_end"]
    assert len(m["token_times"]) == 5


@pytest.mark.parametrize("placement,msg", [
    (Placement((InstanceSpec(tp=2, devices=(0, 1)),), (InstanceSpec(tp=2, devices=(1, 2)),)),
     "device sets overlap: device 1 is in both prefill-0 and decode-0"),
    (Placement((InstanceSpec(tp=4),), (InstanceSpec(tp=4, pp=2),)), "needs 12 devices, only 8 available"),
    (Placement((InstanceSpec(tp=3),), (InstanceSpec(tp=1),)),
     "prefill instance 0: tp=3 does not divide the number of attention heads"),
    (Placement((InstanceSpec(tp=1),), (InstanceSpec(tp=1, pp=4),)),
     "decode instance 0: pp=4 does not divide the number of layers"),
    (Placement((InstanceSpec(tp=1, devices=(9,)),), (InstanceSpec(tp=1),)), "device id 9 does not exist"),
])
def test_impossible_placements_are_refused(placement, msg, workload):
    with pytest.raises(ValueError, match=msg.replace("(", "\\(").replace(")", "\\)").replace("+", "\\+")):
        build_core(workload[0], placement=placement, **KW)


def test_placement_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill:\n  - {tp: 2, devices: [0]}\ndecode:\n  - {tp: 1}\n")
    with pytest.raises(ValueError, match="tp=2, pp=1 needs 2 devices, got 1"):
        Placement.from_yaml(bad)
    bad.write_text("prefill: []\ndecode:\n  - {tp: 1}\n")
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        Placement.from_yaml(bad)
    bad.write_text("prefill:\n  - {tp: 0}\ndecode:\n  - {tp: 1}\n")
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        Placement.from_yaml(bad)
    for f in sorted((__import__("pathlib").Path(__file__).parents[2] / "configs" / "placements").glob("*.yaml")):
        assert Placement.from_yaml(f).num_devices <= 8, f.name
