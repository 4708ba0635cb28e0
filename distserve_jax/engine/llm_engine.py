"""The step engine of one model instance on one mesh: requests in, token outputs out.

`LLMEngine` validates requests, keeps them in a scheduler (continuous batching with preemption),
runs each step on its `ModelRunner`, and turns sampled tokens into `RequestOutput`s. It is
single-threaded: `step()` returns one step's outputs. The offline `LLM` API drives it directly;
the disaggregated engine runs several of its parts on separate meshes.

With `async_scheduling` (the default), `step()` schedules and launches step N+1 before it fetches
step N's tokens: the next step reads them on the device, so the devices go from one step to the
next without waiting for the host (dispatch, sampling fetch, detokenizing and stop checks overlap
the next step). A request that step N ends by a stop token or string has already been given a row
in step N+1; that row is computed and discarded. Batches with penalties run one step at a time,
as penalties need every generated token on the host.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np
from absl import logging

from distserve_jax.engine.model_source import ModelSpec
from distserve_jax.engine.output_processor import OutputProcessor, RequestOutput
from distserve_jax.engine.step_launcher import InFlightStep, fetch_step, launch_step, next_to_fetch
from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig, SampleResult
from distserve_jax.runtime.sharding import make_mesh
from distserve_jax.sampling_params import SamplingParams
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.policies import (ChunkedPrefillScheduler, PrefillFirstScheduler, Scheduler,
                                              SchedulerConfig)
from distserve_jax.scheduler.request import Request, RequestStatus

FINISH_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and runtime sizes: every `RunnerConfig` field under the same name and default
    (`max_model_len` may be None: the model's context, capped at 2048), plus the scheduling policy,
    the engine's seed and whether steps are launched ahead (`async_scheduling`). A test keeps the
    two in step."""

    max_model_len: int | None = None  # None: the model's context, capped at 2048
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    dtype: str = "float32"
    attention_backend: str | None = None
    fuse_projections: bool = True
    policy: str = "prefill_first"  # or "chunked"
    seed: int = 0
    async_scheduling: bool = True  # launch step N+1 before fetching step N (LLMEngine; pp=1 decode instances)

    def runner_config(self, model_max_len: int) -> RunnerConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunnerConfig)}
        shared["max_model_len"] = self.max_model_len or min(model_max_len, 2048)
        return RunnerConfig(**shared)


def make_scheduler(policy: str, config: SchedulerConfig, blocks: BlockManager) -> Scheduler:
    if policy == "prefill_first":
        return PrefillFirstScheduler(config, blocks)
    if policy == "chunked":
        return ChunkedPrefillScheduler(config, blocks)
    raise ValueError(f"unknown scheduling policy {policy!r}; expected 'prefill_first' or 'chunked'")


def validate_prompt(spec: ModelSpec, max_model_len: int, prompt: str | None,
                    prompt_token_ids: Sequence[int] | None) -> list[int]:
    """Tokenises and checks a prompt; raises ValueError naming the problem."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("pass exactly one of prompt or prompt_token_ids")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is empty")
        if spec.tokenizer is None:
            raise ValueError(f"model {spec.name!r} has no tokenizer; pass prompt_token_ids instead of text")
        ids = spec.tokenizer.encode(prompt)
    else:
        ids = list(prompt_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in ids):
            raise ValueError("prompt_token_ids must be integers")
        ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("prompt is empty (no tokens)")
    vocab = spec.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_token_ids has token id {bad[0]} outside the vocabulary [0, {vocab})")
    if len(ids) > max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens, longer than the model's context "
                         f"(max_model_len={max_model_len})")
    return ids


def build_request(spec: ModelSpec, max_model_len: int, max_kv_tokens: int, rng: np.random.Generator,
                  request_id: str, prompt: str | None, prompt_token_ids: Sequence[int] | None,
                  params: SamplingParams | None, arrival_time: float | None) -> Request:
    """A validated `Request` (ValueError naming the problem on bad input); assigns a seed if none."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    ids = validate_prompt(spec, max_model_len, prompt, prompt_token_ids)
    longest = min(len(ids) + params.max_tokens, max_model_len)
    if longest > max_kv_tokens:
        raise ValueError(f"request needs up to {longest} tokens of KV cache but an instance holds only "
                         f"{max_kv_tokens}; lower max_tokens or the prompt length")
    seed = params.seed if params.seed is not None else int(rng.integers(0, 2**31 - 1))
    # The output processor ends a request at max_tokens or at the context length, after at least one token.
    max_tokens = max(1, min(params.max_tokens, max_model_len - len(ids)))
    return Request(request_id=request_id, prompt_token_ids=ids, sampling=params, seed=seed,
                   arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
                   max_tokens=max_tokens)


class EngineCoreBase:
    """What every engine core shares: the request table, ids and seeds, validation, output processing.

    Subclasses say how big a request may be (`_max_kv_tokens`), where a new request goes
    (`_enqueue`) and how to take one out everywhere (`_drop`).
    """

    def _init_front(self, spec: ModelSpec, max_model_len: int, seed: int) -> None:
        self.spec = spec
        self.max_model_len = max_model_len
        tok = spec.tokenizer
        eos = tok.eos_token_ids if tok is not None and tok.eos_token_ids else spec.config.eos_token_ids
        self.outputs = OutputProcessor(tok, tuple(eos), max_model_len)
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(seed)
        self._next_id = 0

    def _max_kv_tokens(self) -> int:
        raise NotImplementedError

    def _enqueue(self, req: Request) -> None:
        raise NotImplementedError

    def _drop(self, req: Request, status: RequestStatus) -> None:
        raise NotImplementedError

    def add_request(self, request_id: str | None = None, prompt: str | None = None,
                    prompt_token_ids: Sequence[int] | None = None, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        """Validates and queues a request; raises ValueError (naming the problem) and queues nothing on bad input."""
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = build_request(self.spec, self.max_model_len, self._max_kv_tokens(), self._rng,
                            request_id, prompt, prompt_token_ids, params, arrival_time)
        self.requests[request_id] = req
        self.outputs.add(request_id, req.prompt_token_ids, req.sampling)
        self._enqueue(req)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request wherever it is and frees everything it holds; None if unknown or finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._drop(req, RequestStatus.FINISHED_ABORTED)
        req.finish_time = time.perf_counter()
        return self.outputs.final_abort(request_id, req.prompt_token_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)


class LLMEngine(EngineCoreBase):
    """Continuous-batching engine for one instance (tp devices, one mesh)."""

    def __init__(self, spec: ModelSpec, *, tp: int = 1, devices: Sequence[jax.Device] | None = None,
                 config: EngineConfig = EngineConfig()):
        devices = list(devices if devices is not None else jax.devices())
        if len(devices) < tp:
            raise ValueError(f"tp={tp} needs {tp} devices, only {len(devices)} available")
        spec.config.validate_tp(tp)
        self.config = config
        rc = config.runner_config(spec.config.max_position_embeddings)
        self._init_front(spec, rc.max_model_len, config.seed)
        self.runner = ModelRunner(spec.config, [make_mesh(devices[:tp])], spec.weights, rc)
        self.blocks = BlockManager(self.runner.num_blocks, rc.block_size)
        self.scheduler = make_scheduler(config.policy, SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens), self.blocks)
        self._inflight: InFlightStep | None = None
        self.num_discarded_rows = 0  # rows computed for requests that had ended meanwhile (launching ahead)

    # ---------------------------------------------------------------- requests
    def _max_kv_tokens(self) -> int:
        return self.blocks.max_tokens_per_request()

    def _enqueue(self, req: Request) -> None:
        self.scheduler.add(req)

    def _drop(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.remove(req, status)

    def info(self) -> dict:
        """Live state: one instance that runs both phases."""
        return {"mode": "colocated" if self.config.policy == "prefill_first" else "chunked",
                "max_model_len": self.max_model_len,
                "instances": [{"name": "colocated-0", "role": "both", "tp": self.runner.tp, "pp": self.runner.pp,
                               "num_waiting": self.scheduler.num_waiting, "num_running": self.scheduler.num_running,
                               "free_blocks": self.blocks.num_free, "total_blocks": self.blocks.num_total}]}

    # ---------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns an output for every request that produced a token.

        Launches the next step (with `async_scheduling`) before fetching the current one's tokens.
        """
        current, self._inflight, dropped = next_to_fetch(self._inflight, self._launch, self.config.async_scheduling)
        self.num_discarded_rows += dropped
        if current is None:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no request can be scheduled although the cache is empty")
            return []
        live, dropped = fetch_step(self.runner, current)
        self.num_discarded_rows += dropped
        now = time.perf_counter()
        return [self._on_token(r, res, now) for r, res in live]

    def _launch(self, prev: InFlightStep | None) -> InFlightStep | None:
        out, step = launch_step(self.scheduler, self.blocks, self.runner, prev)
        for r in out.preempted:
            logging.info("preempted %s (KV cache full); it will be recomputed", r.request_id)
        return step

    def _on_token(self, r: Request, res, now: float) -> RequestOutput:
        if r.decode_start is None:
            r.decode_start = now
        ro, reason = apply_token(r, res, now, self.outputs)
        if reason is not None:
            self.scheduler.remove(r, FINISH_STATUS[reason])
            self.requests.pop(r.request_id, None)
        return ro

    def warmup(self) -> int:
        modes = ("prefill", "decode") if self.config.policy == "prefill_first" else ("prefill", "decode", "mixed")
        return self.runner.warmup(modes)


def apply_token(r: Request, res: SampleResult, now: float, outputs: OutputProcessor
                ) -> tuple[RequestOutput, str | None]:
    """Appends a sampled token to the request; returns its output and finish reason (None: running)."""
    r.output_token_ids.append(res.token_id)
    r.token_times.append(now)
    if r.prefill_end is None:
        r.prefill_end = now
    ro, reason = outputs.process(r.request_id, res.token_id, res.logprob, res.top_logprobs,
                                 prompt_logprobs=res.prompt_logprobs)
    if reason is not None:
        r.finish_time = now
        ro.metrics = request_metrics(r)
    return ro, reason


def request_metrics(r: Request) -> dict[str, float | None]:
    """A finished request's timestamps and derived latencies (seconds)."""
    first = r.token_times[0] if r.token_times else None
    n = len(r.token_times)
    return {
        "arrival_time": r.arrival_time, "prefill_start": r.prefill_start, "prefill_end": r.prefill_end,
        "migration_start": r.migration_start, "migration_end": r.migration_end, "decode_start": r.decode_start,
        "migration_bytes": r.migration_bytes,
        "finish_time": r.finish_time, "first_token_time": first,
        "ttft": None if first is None else first - r.arrival_time,
        "tpot": (r.token_times[-1] - first) / (n - 1) if n > 1 else None,
        "num_preemptions": r.num_preemptions, "token_times": list(r.token_times),
    }
