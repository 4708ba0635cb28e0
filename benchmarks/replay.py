"""In-process trace replay: feeds a workload to an engine core on the wall clock and records latencies.

`replay(core, requests)` adds each request when the wall clock (relative to the start of the
replay) reaches its `arrival_time`, stamping the request's arrival as that scheduled instant,
so time spent waiting for the engine thread (a long step in progress) counts toward TTFT as it
would for a client. Between arrivals it calls `core.step()` while the core has work, and turns
every finished output's `metrics` into a `metrics.RequestRecord`. The run is bounded: at
`max_duration_s` it aborts whatever is still running; those requests, and any that had not yet
arrived, are recorded as never completing (they miss every SLO).

A core is anything with the engine-core interface (the `Controller`): `add_request`,
`step`, `abort_request`, `has_unfinished_requests`, `requests`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from distserve_jax.metrics import RequestRecord
from distserve_jax.sampling_params import SamplingParams
from distserve_jax.workloads import WorkloadRequest


@dataclasses.dataclass
class ReplayResult:
    """Records of one replay, in request order, and how it ended.

    Attributes:
      records: one `RequestRecord` per workload request (times on the `time.perf_counter` clock).
      duration_s: wall time from the start until the last request finished or the run was cut.
      timed_out: True when `max_duration_s` cut the run short.
      num_steps: `core.step()` calls made.
    """

    records: list[RequestRecord]
    duration_s: float
    timed_out: bool
    num_steps: int


def default_params(req: WorkloadRequest) -> SamplingParams:
    """Greedy, exactly `max_tokens` tokens (EOS ignored), as serving benchmarks replay traces."""
    return SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)


def record_from_metrics(request_id: str, prompt_len: int, m: dict[str, Any], finish_reason: str | None
                        ) -> RequestRecord:
    """A `RequestRecord` from a finished `RequestOutput.metrics` dict."""
    times = list(m.get("token_times") or [])
    return RequestRecord(
        request_id=request_id, prompt_len=prompt_len, output_len=len(times), arrival_time=m["arrival_time"],
        first_token_time=m.get("first_token_time"), finish_time=m.get("finish_time"), token_times=times,
        prefill_start=m.get("prefill_start"), prefill_end=m.get("prefill_end"),
        migration_start=m.get("migration_start"), migration_end=m.get("migration_end"),
        decode_start=m.get("decode_start"), finish_reason=finish_reason)


def replay(core: Any, requests: Sequence[WorkloadRequest], *, max_duration_s: float = 120.0,
           params_fn: Callable[[WorkloadRequest], SamplingParams] = default_params, id_prefix: str = "r",
           clock: Callable[[], float] | None = None) -> ReplayResult:
    """Replays `requests` (sorted by `arrival_time`, seconds from the start) against `core`.

    Args:
      core: an engine core (see the module docstring); it must have no unfinished requests.
      requests: the trace; each needs `prompt_token_ids`.
      max_duration_s: wall-clock bound of the run (> 0).
      params_fn: sampling parameters of each request.
      id_prefix: request ids are `f"{id_prefix}{index}"`.
      clock: the time source; must be the engine's clock (default: the core's `clock`, else
        `time.perf_counter`).

    Raises:
      ValueError: empty or unsorted trace, a request without token ids, a bad bound, or a busy core.
    """
    if not requests:
        raise ValueError("requests must not be empty")
    if not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be > 0, got {max_duration_s!r}")
    arrivals = [r.arrival_time for r in requests]
    if any(b < a for a, b in zip(arrivals, arrivals[1:])):
        raise ValueError("requests must be sorted by arrival_time")
    if any(r.prompt_token_ids is None for r in requests):
        raise ValueError("every request needs prompt_token_ids (tokenise the workload first)")
    if core.has_unfinished_requests():
        raise ValueError("the core still has unfinished requests; replay needs an idle core")
    clock = clock or getattr(core, "clock", time.perf_counter)

    ids = [f"{id_prefix}{i}" for i in range(len(requests))]
    index = {rid: i for i, rid in enumerate(ids)}
    records: list[RequestRecord | None] = [None] * len(requests)
    start = clock()
    deadline = start + max_duration_s
    nxt, steps, timed_out = 0, 0, False
    while True:
        now = clock()
        if now >= deadline:
            timed_out = nxt < len(requests) or core.has_unfinished_requests()
            break
        while nxt < len(requests) and start + requests[nxt].arrival_time <= now:
            r = requests[nxt]
            core.add_request(ids[nxt], prompt_token_ids=r.prompt_token_ids, params=params_fn(r),
                             arrival_time=start + r.arrival_time)
            nxt += 1
        if core.has_unfinished_requests():
            for out in core.step():
                if out.finished and out.metrics is not None:
                    i = index[out.request_id]
                    records[i] = record_from_metrics(out.request_id, requests[i].prompt_len, out.metrics,
                                                     out.finish_reason)
            steps += 1
        elif nxt < len(requests):
            time.sleep(max(0.0, min(start + requests[nxt].arrival_time, deadline) - clock()))
        else:
            break
    end = clock()
    for rid in list(getattr(core, "requests", {})):
        core.abort_request(rid)
    out_records = []
    for i, (rid, r) in enumerate(zip(ids, requests)):
        rec = records[i]
        if rec is None:  # cut off: never finished (or never arrived)
            rec = RequestRecord(request_id=rid, prompt_len=r.prompt_len, arrival_time=start + r.arrival_time,
                                finish_reason="timeout")
        out_records.append(rec)
    return ReplayResult(out_records, end - start, timed_out, steps)
