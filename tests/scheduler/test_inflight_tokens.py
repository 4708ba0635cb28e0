"""Scheduling while a step runs: tokens in flight count in a request's length, a request ended by
length with its token in flight gets no further row, and a preempted request waits for its token
before being recomputed."""

from __future__ import annotations

from distserve_jax.scheduler.block_manager import BlockManager, assert_all_free
from distserve_jax.scheduler.policies import ChunkedPrefillScheduler, PrefillFirstScheduler, SchedulerConfig
from distserve_jax.scheduler.request import Request, RequestStatus


def _request(rid: str, prompt_len: int, max_tokens: int = 10) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(range(3, 3 + prompt_len)), sampling=None, seed=0,
                   arrival_time=0.0, max_tokens=max_tokens)


def _launch(sched, out) -> None:
    """What an engine that launches ahead does after launching a step: KV counted, tokens in flight."""
    sampled = [s.request for s in out.seqs if s.completes_prompt]
    sched.after_step(out)
    for r in sampled:
        r.num_inflight_tokens += 1


def _land(r: Request, token: int = 7) -> None:
    r.num_inflight_tokens -= 1
    r.output_token_ids.append(token)


def test_a_token_in_flight_counts_in_the_length_and_feeds_the_next_decode():
    blocks = BlockManager(num_blocks=9, block_size=4)
    sched = PrefillFirstScheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    r = _request("a", 4)
    sched.add(r)
    prefill = sched.schedule()
    assert [s.num_new_tokens for s in prefill.seqs] == [4]
    _launch(sched, prefill)
    assert r.num_tokens == 5 and r.num_pending_tokens == 1 and not r.is_prefill
    decode = sched.schedule()  # scheduled before the prefill's token is known
    assert [(s.request, s.num_new_tokens) for s in decode.seqs] == [(r, 1)]
    assert blocks.num_tokens("a") == 5  # the slot of the token in flight: a second block
    assert len(blocks.block_table("a")) == 2
    _launch(sched, decode)
    assert r.num_inflight_tokens == 2
    _land(r)
    _land(r)
    assert r.num_tokens == 6 and r.num_computed_tokens == 5
    sched.remove(r, RequestStatus.FINISHED_STOPPED)
    assert_all_free(blocks)


def test_a_request_ended_by_length_in_flight_gets_no_further_row():
    blocks = BlockManager(num_blocks=9, block_size=4)
    sched = ChunkedPrefillScheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    one, two = _request("one", 3, max_tokens=1), _request("two", 3, max_tokens=2)
    sched.add(one)
    sched.add(two)
    _launch(sched, sched.schedule())
    assert one.reaches_max_tokens and not two.reaches_max_tokens
    nxt = sched.schedule()
    assert [s.request for s in nxt.seqs] == [two]
    _launch(sched, nxt)
    assert two.reaches_max_tokens
    assert not sched.schedule()  # both end with their tokens in flight
    for r in (one, two):
        sched.remove(r, RequestStatus.FINISHED_LENGTH)
    assert_all_free(blocks)


def test_a_preempted_request_waits_for_its_token_in_flight():
    # 3 usable blocks of 4 tokens: two 4-token prompts, then one more block for the first decode.
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = PrefillFirstScheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    a, b = _request("a", 4), _request("b", 4)
    sched.add(a)
    sched.add(b)
    _launch(sched, sched.schedule())
    assert a.num_inflight_tokens == b.num_inflight_tokens == 1
    # a's next slot takes the last free block; b's finds none, so b (the newest) is preempted.
    out = sched.schedule()
    assert [s.request for s in out.seqs] == [a] and out.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_inflight_tokens == 1
    _launch(sched, out)
    sched.remove(a, RequestStatus.FINISHED_STOPPED)  # room again, but b's token is not known yet
    assert not sched.schedule()
    assert b in sched.waiting
    _land(b)
    readmit = sched.schedule()
    assert [(s.request, s.num_new_tokens) for s in readmit.seqs] == [(b, 5)]  # prompt + its token
    sched.remove(b, RequestStatus.FINISHED_STOPPED)
    assert_all_free(blocks)
