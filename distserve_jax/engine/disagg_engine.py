"""The disaggregated engine: prefill and decode instances on disjoint meshes, KV moved by a pull.

One thread drives every instance. A step:
  1. completes the pulls started last step (frees the prefill copy, the request joins decoding);
  2. launches a prefill batch on every prefill instance and a decode batch on every decode
     instance (asynchronously: instances on disjoint devices run concurrently; a decode instance
     with pp stages splits its batch into pp micro-batches so the stages overlap);
  3. starts pulls for prefilled requests (FCFS) into decode instances that have room;
  4. collects the sampled tokens: a request's first token streams out as soon as its prefill
     ends; its KV stays on the prefill instance until a decode instance pulls it.
A request that a full decode cache preempts goes back to prefill to be recomputed.

With `async_scheduling` (the default), a decode instance with one pipeline stage launches its next
decode step before its current one is fetched (`step_launcher`): the current step is collected in
this call and the next one in the following call, so the instance runs step after step while the
host handles pulls and outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import jax
from absl import logging

from distserve_jax.engine.llm_engine import FINISH_STATUS, EngineConfig, EngineCoreBase, apply_token
from distserve_jax.engine.step_launcher import InFlightStep, fetch_step, launch_step, next_to_fetch, seq_work
from distserve_jax.engine.model_source import ModelSpec
from distserve_jax.engine.output_processor import RequestOutput
from distserve_jax.engine.placement import Placement
from distserve_jax.runtime.kv_transfer import KVMigrator, Transfer
from distserve_jax.runtime.model_runner import ModelRunner
from distserve_jax.runtime.sharding import make_mesh
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.disagg import DecodeScheduler, PrefillScheduler, pick_decode, pick_prefill
from distserve_jax.scheduler.policies import SchedulerConfig
from distserve_jax.scheduler.request import Request, RequestStatus


@dataclasses.dataclass
class Instance:
    name: str
    role: str
    runner: ModelRunner
    blocks: BlockManager
    scheduler: Any
    tp: int
    pp: int
    inflight: InFlightStep | None = None  # a decode step launched ahead, fetched next engine step

    def info(self) -> dict[str, Any]:
        s = self.scheduler
        d = {"name": self.name, "role": self.role, "tp": self.tp, "pp": self.pp,
             "num_waiting": s.num_waiting, "num_running": s.num_running,
             "free_blocks": self.blocks.num_free, "total_blocks": self.blocks.num_total}
        if self.role == "prefill":
            d["num_waiting_migration"] = len(s.prefilled)
        else:
            d["num_incoming"] = len(s.incoming)
        return d


@dataclasses.dataclass
class _Pull:
    request: Request
    src: Instance
    dst: Instance
    transfer: Transfer


class DisaggEngine(EngineCoreBase):
    """Engine core for disaggregated serving (same interface as `LLMEngine`)."""

    def __init__(self, spec: ModelSpec, *, placement: Placement | str | Path | None = None,
                 devices: Sequence[jax.Device] | None = None, config: EngineConfig = EngineConfig()):
        devices = list(devices if devices is not None else jax.devices())
        if placement is None or placement == "auto":
            placement = Placement.auto(len(devices), spec.config)
        elif isinstance(placement, (str, Path)):
            placement = Placement.from_yaml(placement)
        assigned = placement.assign(devices, spec.config)  # validates before anything is built
        self.config, self.placement = config, placement
        rc = config.runner_config(spec.config.max_position_embeddings)
        self._init_front(spec, rc.max_model_len, config.seed)
        sc = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens)
        self.prefill: list[Instance] = []
        self.decode: list[Instance] = []
        for a in assigned:
            runner = ModelRunner(spec.config, [make_mesh(list(stage)) for stage in a.stages], spec.weights, rc)
            blocks = BlockManager(runner.num_blocks, rc.block_size)
            sched = PrefillScheduler(sc, blocks) if a.role == "prefill" else DecodeScheduler(sc, blocks)
            inst = Instance(a.name, a.role, runner, blocks, sched, a.spec.tp, a.spec.pp)
            (self.prefill if a.role == "prefill" else self.decode).append(inst)
            logging.info("%s: tp=%d pp=%d on %s, %d KV blocks", a.name, a.spec.tp, a.spec.pp,
                         [d.id for s in a.stages for d in s], blocks.num_total)
        self._migrators: dict[tuple[str, str], KVMigrator] = {}
        self.migration_queue: collections.deque[tuple[Request, Instance]] = collections.deque()
        self.pulls: list[_Pull] = []
        self.migrated_bytes = 0
        self.migration_seconds: list[float] = []
        self.num_discarded_rows = 0  # decode rows computed for requests that had ended meanwhile

    @property
    def instances(self) -> list[Instance]:
        return self.prefill + self.decode

    # ---------------------------------------------------------------- requests
    def _max_kv_tokens(self) -> int:
        return min(i.blocks.max_tokens_per_request() for i in self.instances)

    def _enqueue(self, req: Request) -> None:
        """Queues on the prefill instance with the fewest queued tokens."""
        i = pick_prefill([p.scheduler for p in self.prefill])
        self.prefill[i].scheduler.add(req)

    def _drop(self, req: Request, status: RequestStatus) -> None:
        """Removes a request from every instance and queue, freeing its blocks."""
        self.migration_queue = collections.deque((r, p) for r, p in self.migration_queue if r is not req)
        for pull in [p for p in self.pulls if p.request is req]:
            self.pulls.remove(pull)
        for inst in self.instances:
            if inst.scheduler.find(req.request_id) is req or inst.blocks.has(req.request_id):
                inst.scheduler.remove(req, status)
        req.status = status

    def info(self) -> dict[str, Any]:
        return {"mode": "disaggregated", "placement": self.placement.describe(), "max_model_len": self.max_model_len,
                "instances": [i.info() for i in self.instances],
                "num_waiting_migration": len(self.migration_queue), "num_migrating": len(self.pulls),
                "migrated_bytes": self.migrated_bytes}

    # ---------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        now = time.perf_counter()
        self._finish_pulls()
        launched = []
        for inst in self.prefill:
            out = inst.scheduler.schedule()
            if out:
                works = [seq_work(s, inst.blocks, now) for s in out.seqs]
                launched.append((inst, out, [inst.runner.launch(works)]))
        ahead = []
        for inst in self.decode:
            if self.config.async_scheduling and inst.pp == 1:
                current, inst.inflight, dropped = next_to_fetch(
                    inst.inflight, lambda prev, inst=inst: self._launch_decode(inst, prev), ahead=True)
                self.num_discarded_rows += dropped
                if current is not None:
                    ahead.append((inst, current))
                continue
            out = inst.scheduler.schedule()
            self._requeue(inst, out.preempted)
            if out:
                works = [seq_work(s, inst.blocks, now) for s in out.seqs]
                launched.append((inst, out, [inst.runner.launch(mb) for mb in _split(works, inst.pp)]))
        self._start_pulls()
        outputs = []
        for inst, out, pendings in launched:
            results = [r for p in pendings for r in inst.runner.collect(p)]
            inst.scheduler.after_step(out)
            t = time.perf_counter()
            for s, res in zip(out.seqs, results):
                r = s.request
                if res is None:
                    continue
                ro, reason = apply_token(r, res, t, self.outputs)
                outputs.append(ro)
                if reason is not None:
                    inst.scheduler.remove(r, FINISH_STATUS[reason])
                    self.requests.pop(r.request_id, None)
                elif inst.role == "prefill":
                    inst.scheduler.mark_prefilled(r)
                    self.migration_queue.append((r, inst))
        for inst, current in ahead:
            live, dropped = fetch_step(inst.runner, current)
            self.num_discarded_rows += dropped
            t = time.perf_counter()
            for r, res in live:
                ro, reason = apply_token(r, res, t, self.outputs)
                outputs.append(ro)
                if reason is not None:  # wherever it is now (a preempted one waits on a prefill instance)
                    self._drop(r, FINISH_STATUS[reason])
                    self.requests.pop(r.request_id, None)
        return outputs

    def _launch_decode(self, inst: Instance, prev: InFlightStep | None) -> InFlightStep | None:
        out, step = launch_step(inst.scheduler, inst.blocks, inst.runner, prev)
        self._requeue(inst, out.preempted)
        return step

    def _requeue(self, inst: Instance, preempted: list[Request]) -> None:
        for r in preempted:
            logging.info("%s preempted %s (KV cache full); recomputing it", inst.name, r.request_id)
            self._enqueue(r)

    def _migrator(self, src: Instance, dst: Instance) -> KVMigrator:
        key = (src.name, dst.name)
        if key not in self._migrators:
            self._migrators[key] = KVMigrator(src.runner, dst.runner)
        return self._migrators[key]

    def _start_pulls(self) -> None:
        """FCFS: each prefilled request goes to the least loaded decode instance with room."""
        while self.migration_queue:
            req, src = self.migration_queue[0]
            i = pick_decode([d.scheduler for d in self.decode], req)
            if i is None:
                return
            dst = self.decode[i]
            self.migration_queue.popleft()
            req.migration_start = time.perf_counter()
            dst_blocks = dst.scheduler.begin_pull(req)
            transfer = self._migrator(src, dst).pull(src.blocks.block_table(req.request_id), dst_blocks)
            self.pulls.append(_Pull(req, src, dst, transfer))

    def _finish_pulls(self) -> None:
        for pull in self.pulls:
            pull.transfer.wait()
            req = pull.request
            pull.src.scheduler.release(req)
            pull.dst.scheduler.end_pull(req)
            req.migration_end = time.perf_counter()
            if req.decode_start is None:
                req.decode_start = req.migration_end
            self.migrated_bytes += pull.transfer.num_bytes
            req.migration_bytes += pull.transfer.num_bytes
            self.migration_seconds.append(req.migration_end - req.migration_start)
        self.pulls.clear()

    def warmup(self) -> int:
        """Compiles every step bucket of every instance and every pull size of every instance pair."""
        n = sum(p.runner.warmup(("prefill",)) for p in self.prefill)
        n += sum(d.runner.warmup(("decode",)) for d in self.decode)
        return n + sum(self._migrator(p, d).warmup() for p in self.prefill for d in self.decode)


def _split(works: list, parts: int) -> list[list]:
    """Splits a decode batch into up to `parts` micro-batches (one per pipeline stage)."""
    if parts <= 1 or len(works) < 2:
        return [works]
    size = -(-len(works) // parts)
    return [works[i:i + size] for i in range(0, len(works), size)]
