"""Runs one step of a model instance: packs a ragged batch, runs the jitted stages, samples.

An instance is `pp` stages, each on its own `tp` sub-mesh with its own parameters, KV pages and
jitted forward function (KV pages donated, so the cache is updated in place). Hidden states move
from stage to stage with `device_put`. The sampler runs as a second jitted function on the last
stage's mesh.

The runner knows nothing of requests or queues: the engine hands it `SeqWork` items, each the
tokens to feed for one sequence, where its KV lives, and how to sample its next token.

Warm-up compiles every step bucket without running it (`warmup`): each stage's forward and
the sampler are lowered with a step's input shapes and compiled ahead of time, on a few threads
(XLA's compiler releases the GIL), and the runner keeps the executables and calls them for the
steps of those shapes. A shape that was not compiled ahead (e.g. a prompt-logprobs step) goes
through the jitted function, which compiles it on first use.

Steps can be chained without a round trip to the host: `launch(works, prev=pending)` may feed a
sequence the token that the still-running step `pending` samples for it (`SeqWork.prev_row`).
The first stage's forward picks those tokens out of the previous sampler's on-device output, so
an engine can dispatch step N+1 before it fetches step N's tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from distserve_jax.models.attention import AttentionMetadata, paged_attention
from distserve_jax.models.config import ModelConfig
from distserve_jax.models import fusion
from distserve_jax.models.decoder import DecoderStage, stage_bounds
from distserve_jax.runtime import background_compile, kv_cache, prompt_logprobs
from distserve_jax.runtime.buckets import fine_buckets, geometric_buckets, round_up, rows_for_tokens
from distserve_jax.runtime.sampling import PenaltyInputs, SamplingTensors, sample_with_feed
from distserve_jax.runtime.sharding import TP, replicated
from distserve_jax.runtime.weights import WeightSource
from distserve_jax.step_types import SampleResult, SeqWork  # re-exported: the runner's step contract
from distserve_jax.sampling_params import SamplingParams
from pallas_kernels import dispatch

MAX_TOP_LOGPROBS = 20
WARM_RUN_TOKENS = 64  # step shapes up to this many tokens run once after warm-up, when idle (see `warmup`):
# every decode batch bucket up to 64 sequences and the short prefills (~4.5 s per instance on SmolLM2 at the
# server's default sizes)
_MIN_LOGIT_ROWS = 4
CPU_KV_BUDGET_BYTES = 2 << 30  # default KV cache size per stage when devices do not report memory


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Sizes of one instance's runtime.

    Attributes:
      max_model_len: longest sequence (prompt + output) served.
      block_size: tokens per KV block.
      num_blocks: KV blocks (page 0 included); None sizes the cache from device memory, or on
        devices that do not report memory (CPU), to hold `max_num_seqs` full-length sequences
        within `CPU_KV_BUDGET_BYTES` per stage (and at least one full sequence).
      kv_cache_memory_fraction: share of device memory for weights + KV cache.
      max_num_seqs: most sequences in one step.
      max_num_batched_tokens: most tokens in one prefill step (a longer prompt runs alone).
      dtype: parameter and KV dtype.
      attention_backend: forced attention backend (None: the dispatcher decides).
      fuse_projections: on an unsharded (tp=1) Llama-family instance, run `q|k|v` and
        `gate|up` as one product each, with every kernel stored `[out, in]` (`models/fusion.py`).
    """

    max_model_len: int
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    dtype: str = "float32"
    attention_backend: str | None = None
    fuse_projections: bool = True

    def __post_init__(self):
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {self.num_blocks}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


@dataclasses.dataclass
class PendingStep:
    """A launched step: its work items, the sampler's (not yet fetched) device output, and the
    sampled tokens padded to `[feed_rows]` on the first stage's mesh, for a following step's feed."""

    works: list[SeqWork]
    out: Any
    next_tokens: Any
    prompt_plan: prompt_logprobs.Plan | None = None
    prompt_out: Any = None


class _Stage:
    """One pipeline stage: sub-mesh, parameters, KV pages and the jitted forward."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, start: int, end: int, params: Any, pages: Any,
                 backend: str | None, fuse: bool):
        self.mesh = mesh
        if fuse:
            params = fusion.fuse_llama_projections(params)
        self.params = params
        self.pages = pages
        self.replicated = replicated(mesh)
        attn = functools.partial(paged_attention, scale=cfg.head_dim ** -0.5,
                                 sliding_window=cfg.sliding_window, backend=backend)
        heads = P(None, TP, None)
        page_spec = (P(TP), P(TP))
        sharded_attn = jax.shard_map(attn, mesh=mesh, in_specs=(heads, heads, heads, page_spec, P()),
                                     out_specs=(heads, page_spec), check_vma=False)
        self.module = DecoderStage(cfg, start, end, sharded_attn, jnp.dtype(params_dtype(params)),
                                   fused_projections=fuse)
        self.forward = jax.jit(self._forward, donate_argnums=(1,))
        self.executables: dict[tuple, Any] = {}  # compiled ahead by `compile`, by `step_key`
        # What `compile` lowers with: the pages' shapes and shardings (never the donated arrays).
        self.page_specs = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), pages)

    def _forward(self, params, pages, x, meta, feed):
        if feed is not None:  # first stage: tokens sampled by the previous step, still on device
            prev_tokens, rows = feed
            x = jnp.where(rows >= 0, prev_tokens[jnp.maximum(rows, 0)], x)
        return self.module.apply({"params": params}, x, meta, pages)

    def run(self, x: jax.Array, meta: AttentionMetadata, feed: tuple[Any, Any] | None = None) -> jax.Array:
        fn = self.executables.get(step_key(x, meta, feed), self.forward)
        out, self.pages = fn(self.params, self.pages, x, meta, feed)
        return out

    def compile(self, x: Any, meta: AttentionMetadata, feed: tuple[Any, Any] | None) -> jax.ShapeDtypeStruct:
        """Compiles the forward for the shapes of `(x, meta, feed)` without running it (x may be a
        `ShapeDtypeStruct`); returns the shape, dtype and sharding of the output."""
        exe = self.forward.lower(self.params, self.page_specs, x, meta, feed).compile()
        self.executables[step_key(x, meta, feed)] = exe
        return exe.out_info[0]


def _null_works() -> list[SeqWork]:
    """One greedy sequence on the null page: what warm-up runs steps and compiles samplers with."""
    return [SeqWork([0], 0, [0], SamplingParams(temperature=0.0))]


def step_key(x: Any, meta: AttentionMetadata, feed: Any) -> tuple:
    """What decides a stage's compiled forward: the input shapes (`[T]` or `[T, hidden]`, the block
    table `[S, W]`, the logits rows `[R]`), the mode and whether the tokens are fed."""
    return tuple(x.shape), meta.block_tables.shape, meta.logits_indices.shape, meta.mode, feed is None


def params_dtype(params: Any) -> Any:
    return jax.tree_util.tree_leaves(params)[0].dtype


class ModelRunner:
    """Executes steps for one model instance (pp stages x tp devices each)."""

    def __init__(self, cfg: ModelConfig, stage_meshes: Sequence[Mesh], weights: WeightSource,
                 config: RunnerConfig):
        tp = stage_meshes[0].shape[TP]
        if any(m.shape[TP] != tp for m in stage_meshes):
            raise ValueError("all pipeline stages of an instance must have the same tp degree")
        if config.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context "
                             f"({cfg.max_position_embeddings} positions)")
        self.cfg = cfg.for_tp(tp)
        self.config = config
        self.tp, self.pp = tp, len(stage_meshes)
        bounds = stage_bounds(cfg.num_layers, self.pp)
        params = [weights.load(self.cfg, m, layer_start=s, layer_end=e, dtype=config.dtype)
                  for m, (s, e) in zip(stage_meshes, bounds)]
        self.num_blocks = config.num_blocks or self._size_cache(stage_meshes, params, bounds)
        self.stages = []
        for m, (s, e), p in zip(stage_meshes, bounds, params):
            pages = kv_cache.allocate(self.cfg, m, num_blocks=self.num_blocks, block_size=config.block_size,
                                      dtype=config.dtype, num_layers=e - s)
            fuse = config.fuse_projections and tp == 1 and self.cfg.family != "opt"
            self.stages.append(_Stage(self.cfg, m, s, e, p, pages, config.attention_backend, fuse))
        self.last_mesh = stage_meshes[-1]
        c = config
        # With XLA's scatter writing the KV, decode batches start at 2 rows: a one-token step makes
        # XLA turn the page scatter into a select + dynamic-update-slice that copies every page
        # array (a padding row writes page 0). The native CPU kernel writes in place at any size.
        first = 1 if dispatch.writes_kv_in_place(config.attention_backend, config.dtype) else 2
        self.seq_buckets = geometric_buckets(first, max(first, c.max_num_seqs))
        # Logits rows (and so the sampler's shapes) come in fewer sizes than the steps: one row (a
        # one-row decode step keeps its matrix-vector LM head), else at least `_MIN_LOGIT_ROWS` (the
        # LM head reads its whole matrix for two rows or four), so a compiled sampler serves
        # several step shapes.
        lo = min(_MIN_LOGIT_ROWS, c.max_num_seqs)
        rows = geometric_buckets(lo, max(lo, c.max_num_seqs, first))
        self.logit_row_buckets = (1,) + rows if first == 1 and rows[0] > 1 else rows
        self.prefill_seq_buckets = geometric_buckets(lo, c.max_num_seqs, 4)
        self.token_buckets = geometric_buckets(16, max(c.max_num_batched_tokens, c.max_model_len))
        # A long prefill step pads its few sequences to one row bucket: the LM head's padded rows
        # cost at most 1/16 of the step (2048 tokens: one bucket of 64 rows instead of three).
        self.prefill_rows = {t: rows_for_tokens(self.prefill_seq_buckets, t) for t in self.token_buckets}
        self.width_buckets = fine_buckets(min(8, c.max_blocks_per_seq), c.max_blocks_per_seq)
        # The native decode kernel reads each sequence's pages up to its length, whatever the block
        # table's width: decode steps then need no width buckets (one compiled shape per batch size).
        self.decode_width_buckets = ((c.max_blocks_per_seq,) if dispatch.writes_kv_in_place(
            config.attention_backend, config.dtype) else self.width_buckets)
        # Every step's sampled tokens, padded to the most rows a step has, feed the next step.
        self.feed_rows = self.logit_row_buckets[-1]
        self._feed_sharding = self.stages[0].replicated
        self._no_feed = jax.device_put(np.zeros(self.feed_rows, np.int32), self._feed_sharding)
        self._sample = jax.jit(functools.partial(sample_with_feed, feed_rows=self.feed_rows),
                               static_argnames=("num_top_logprobs",))
        # Compiled ahead, by (rows, top-n, penalties): (executable, the logits' sharding it takes).
        self._samplers: dict[tuple[int, int, bool], tuple[Any, Any]] = {}
        self._sampler_jobs: dict[tuple[int, int, bool], concurrent.futures.Future] = {}  # compiling in the background
        self._warm_runs: collections.deque = collections.deque()  # step shapes to run once when idle (`warmup`)
        self._warm_run_seconds = 0.0
        self._prompt_logprobs = prompt_logprobs.PromptLogprobs(max_partial=4 * c.max_num_seqs)

    def _size_cache(self, meshes, params, bounds) -> int:
        c = self.config
        weight_bytes = max(sum(x.nbytes for x in jax.tree_util.tree_leaves(p)) for p in params)
        per_stage = [kv_cache.blocks_from_memory(self.cfg, m, block_size=c.block_size, dtype=c.dtype,
                                                 fraction=c.kv_cache_memory_fraction, weight_bytes=weight_bytes,
                                                 num_layers=e - s) for m, (s, e) in zip(meshes, bounds)]
        if any(n is None for n in per_stage):
            # No memory stats (CPU): room for max_num_seqs full sequences, within a host budget.
            per_block = max(kv_cache.block_bytes(self.cfg, c.block_size, c.dtype, e - s) for s, e in bounds)
            n = min(1 + c.max_num_seqs * c.max_blocks_per_seq, 1 + CPU_KV_BUDGET_BYTES // per_block)
            logging.info("KV cache: %d blocks (devices report no memory; host budget %.1f GiB)", n,
                         CPU_KV_BUDGET_BYTES / 2**30)
            return max(n, 1 + c.max_blocks_per_seq)
        return min(per_stage)

    # ----------------------------------------------------------------- inputs
    def _mode(self, works: Sequence[SeqWork]) -> str:
        if all(w.context_len == 0 for w in works):
            return "prefill"
        if all(len(w.token_ids) == 1 for w in works):
            return "decode"
        return "mixed"

    def build_inputs(self, works: Sequence[SeqWork]) -> tuple[np.ndarray, AttentionMetadata]:
        """Host arrays for one step: token ids `[T]` and the padded `AttentionMetadata`."""
        if not works:
            raise ValueError("a step needs at least one sequence")
        if len(works) > self.config.max_num_seqs:
            raise ValueError(f"{len(works)} sequences exceed max_num_seqs={self.config.max_num_seqs}")
        mode = self._mode(works)
        bs = self.config.block_size
        total = sum(len(w.token_ids) for w in works)
        if mode == "decode":
            s = t = round_up(len(works), self.seq_buckets)
        else:
            t = round_up(total, self.token_buckets)
            s = round_up(len(works), self.prefill_rows[t] if mode == "prefill" else self.seq_buckets)
        longest = max(-(-(w.context_len + len(w.token_ids)) // bs) for w in works)
        width = 1 if mode == "prefill" else round_up(
            longest, self.decode_width_buckets if mode == "decode" else self.width_buckets)

        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.zeros(t, np.int32)
        qsl = np.full(s + 1, total, np.int32)
        ctx = np.zeros(s, np.int32)
        seq_lens = np.zeros(s, np.int32)
        tables = np.zeros((s, width), np.int32)
        logits_idx = np.zeros(round_up(s, self.logit_row_buckets), np.int32)
        off = 0
        for i, w in enumerate(works):
            n = len(w.token_ids)
            end = w.context_len + n
            table = np.asarray(w.block_table, np.int32)
            if len(table) * bs < end:
                raise ValueError(f"sequence {i}: block table holds {len(table) * bs} tokens, needs {end}")
            pos = np.arange(w.context_len, end, dtype=np.int32)
            tokens[off:off + n] = w.token_ids
            positions[off:off + n] = pos
            slots[off:off + n] = table[pos // bs] * bs + pos % bs
            qsl[i] = off
            ctx[i] = w.context_len
            seq_lens[i] = end
            if mode != "prefill":
                used = -(-end // bs)
                tables[i, :used] = table[:used]
            off += n
            logits_idx[i] = off - 1
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, query_start_loc=qsl, context_lens=ctx,
                                 seq_lens=seq_lens, block_tables=tables, logits_indices=logits_idx, mode=mode)
        return tokens, meta

    # ----------------------------------------------------------------- steps
    def forward(self, tokens: np.ndarray, meta: AttentionMetadata,
                feed: tuple[jax.Array, np.ndarray] | None = None) -> jax.Array:
        """Runs all stages; returns float32 logits `[logit_rows_bucket, vocab]` on the last mesh.

        `feed` is `(prev_tokens [feed_rows], rows [T])`: token i is replaced by
        `prev_tokens[rows[i]]` where `rows[i] >= 0` (None: no token is replaced).
        """
        # Host arrays go to the jitted stage as they are: its C++ dispatch moves them onto the
        # stage's devices in one go, a fraction of the cost of a Python-side `device_put` each.
        if feed is None:
            feed = (self._no_feed, np.full(tokens.shape[0], -1, np.int32))
        x = tokens
        for i, st in enumerate(self.stages):
            if i:
                x = jax.device_put(x, st.replicated)
            x = st.run(x, meta, None if i else feed)
        return x

    def execute(self, works: Sequence[SeqWork]) -> list[SampleResult | None]:
        """One step for `works`; returns the sampled token of each item with `sample=True`."""
        return self.collect(self.launch(works))

    def launch(self, works: Sequence[SeqWork], prev: PendingStep | None = None) -> PendingStep:
        """Dispatches a step without waiting for it (JAX runs it asynchronously).

        Items with `prev_row` set are fed the token `prev` samples for that row, without `prev`
        being fetched: the two steps run back to back on the devices.
        """
        tokens, meta = self.build_inputs(works)
        feed = self._feed(works, meta, prev)
        plan = prompt_logprobs.plan(works, meta.query_start_loc, len(tokens))
        if plan is None:
            logits = self.forward(tokens, meta, feed)
            out, next_tokens = self._launch_sample(logits, works)
            return PendingStep(list(works), out, next_tokens)
        # A request asks for prompt logprobs: the last stage returns the logits of every token.
        every = dataclasses.replace(meta, logits_indices=np.arange(len(tokens), dtype=np.int32))
        all_logits = self.forward(tokens, every, feed)
        out, next_tokens = self._launch_sample(all_logits[meta.logits_indices], works)
        return PendingStep(list(works), out, next_tokens, plan, prompt_logprobs.compute(all_logits, plan.targets))

    def _feed(self, works: Sequence[SeqWork], meta: AttentionMetadata, prev: PendingStep | None):
        """`(prev_tokens, rows [T])` for `forward`, or None when no item reads `prev`."""
        fed = [(i, w.prev_row) for i, w in enumerate(works) if w.prev_row is not None]
        if not fed:
            return None
        if prev is None:
            raise ValueError("a SeqWork has prev_row set but launch() got no previous step")
        rows = np.full(meta.positions.shape[0], -1, np.int32)
        for i, row in fed:
            if not 0 <= row < len(prev.works) or not prev.works[row].sample:
                raise ValueError(f"sequence {i}: prev_row={row} is not a sampled row of the previous step "
                                 f"({len(prev.works)} rows)")
            if len(works[i].token_ids) != 1:
                raise ValueError(f"sequence {i}: a fed item takes one placeholder token, got {len(works[i].token_ids)}")
            rows[meta.query_start_loc[i]] = row
        prev_tokens = prev.next_tokens
        if prev_tokens.sharding != self._feed_sharding:
            prev_tokens = jax.device_put(prev_tokens, self._feed_sharding)
        return prev_tokens, rows

    def collect(self, pending: "PendingStep") -> list[SampleResult | None]:
        """Waits for a launched step and returns its sampled tokens."""
        out = jax.device_get(pending.out)
        prompt = {}
        if any(w.sampling.prompt_logprobs is not None for w in pending.works):
            fetched = jax.device_get(pending.prompt_out) if pending.prompt_out is not None else None
            prompt = self._prompt_logprobs.results(pending.works, pending.prompt_plan, fetched)
        results: list[SampleResult | None] = []
        for i, w in enumerate(pending.works):
            if not w.sample:
                results.append(None)
                continue
            k = w.sampling.logprobs or 0
            top = {int(t): float(l) for t, l in zip(out.top_ids[i, :k], out.top_logprobs[i, :k])}
            results.append(SampleResult(int(out.token_ids[i]), float(out.logprobs[i]), top, prompt.get(i)))
        return results

    def _sampler_inputs(self, rows: int, works: Sequence[SeqWork], n_top: int | None, force_penalties: bool):
        params = [w.sampling for w in works]
        tensors = SamplingTensors.from_params(params, [w.num_generated for w in works], self.cfg.vocab_size,
                                              pad_to=rows, seeds=[w.seed for w in works])
        if n_top is None:
            n_top = MAX_TOP_LOGPROBS if any(p.logprobs for p in params) else 0
        penalties = None
        if force_penalties or any(p.uses_penalties for p in params):
            penalties = PenaltyInputs.from_token_lists([w.prompt_ids for w in works], [w.output_ids for w in works],
                                                       self.cfg.vocab_size, pad_to=rows)
        return tensors, n_top, penalties

    def _launch_sample(self, logits: jax.Array, works: Sequence[SeqWork], *, n_top: int | None = None,
                       force_penalties: bool = False):
        tensors, n_top, penalties = self._sampler_inputs(logits.shape[0], works, n_top, force_penalties)
        # Host arrays straight into the jit (see `forward`): a Python-side device_put of the ten
        # sampling arrays costs more than the greedy sampler itself.
        key = (logits.shape[0], n_top, penalties is not None)
        job = self._sampler_jobs.get(key)
        if key not in self._samplers and job is not None:
            job.result()  # a step that needs a sampler still compiling in the background waits for it
        exe, sharding = self._samplers.get(key, (None, None))
        if exe is not None and logits.sharding == sharding:  # (a prompt-logprobs step's rows may lie elsewhere)
            return exe(logits, tensors, penalties=penalties)
        return self._sample(logits, tensors, num_top_logprobs=n_top, penalties=penalties)

    # ----------------------------------------------------------------- warm-up
    def warmup(self, modes: Sequence[str] = ("prefill", "decode"), *, threads: int | None = None,
               background: bool = True, run_tokens: int = WARM_RUN_TOKENS) -> int:
        """Compiles every bucket of the given modes, and the sampler variants for each logits row
        count, without running them. The step shapes of at most `run_tokens` tokens are queued to
        run once later (`run_pending_warm_run`, from the worker's idle turns): a compiled CPU
        executable's first run is slower than the next ones, and those shapes are cheap to run.

        Before it returns: every step shape and the plain sampler (any temperature and filters, no
        top logprobs, no penalties). The variants with top logprobs and/or penalties compile after it
        returns, on a background thread (unless `background` is False); a step that needs one before
        it is ready waits for it. `threads` compile at once (default: the CPUs this process may use,
        at most 4); a step of a compiled shape then calls the executable compiled here. The queued
        runs write only the null page 0. Returns the number of step shapes compiled.
        """
        shapes = [(mode, t, s, w) for mode in modes for t, s, w in self._bucket_shapes(mode)]
        if threads is None:
            threads = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        if threads < 1:
            raise ValueError(f"warm-up threads must be >= 1, got {threads}")
        lock = threading.Lock()
        logits_specs: dict[int, jax.ShapeDtypeStruct] = {}

        def one(shape) -> None:
            logits = self._compile_step(*shape)
            with lock:  # the sampler's shapes depend on the row count only
                todo = logits.shape[0] not in logits_specs
                logits_specs.setdefault(logits.shape[0], logits)
            if todo:
                self._compile_sampler(logits, 0, False)

        # Largest shapes first: they compile longest, so the pool ends with the short ones.
        shapes.sort(key=lambda sh: -sh[1] * sh[2])
        start = time.perf_counter()
        with background_compile.COMPILE_PHASES.active(), concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="warmup") as pool:
            for f in [pool.submit(one, sh) for sh in shapes]:
                f.result()
        # A compiled CPU executable's first run costs more than the next ones: on this XLA, mostly
        # its YNNPACK fusions building their loop pipelines (measured: ~50 ms per shape on the demo
        # model, ~0.4-0.7 s on SmolLM2). Steps of up to `run_tokens` tokens are cheap to run: each
        # is queued to run once (on zero inputs, writing only the null page 0) in the worker's idle
        # turns after start-up, so the first requests do not pay it and start-up does not wait for it;
        # the long prefill buckets stay compile-only (their first run is dominated by their compute).
        self._warm_runs = collections.deque(sh for sh in sorted(shapes, key=lambda sh: sh[1] * sh[2])
                                            if sh[1] <= run_tokens)
        self._warm_run_seconds = 0.0
        later = [(logits, n_top, pen) for logits in logits_specs.values()
                 for n_top, pen in ((0, True), (MAX_TOP_LOGPROBS, False), (MAX_TOP_LOGPROBS, True))]
        logging.info("warm-up compiled %d step shapes and %d plain samplers on %d threads in %.1f s (%d shapes "
                     "run once when idle); %d sampler variants %s", len(shapes), len(logits_specs), threads,
                     time.perf_counter() - start, len(self._warm_runs), len(later),
                     "follow in the background" if background else "next")
        jobs = []
        for logits, n_top, pen in later:
            job: concurrent.futures.Future = concurrent.futures.Future()
            self._sampler_jobs[(logits.shape[0], n_top, pen)] = job
            jobs.append((job, functools.partial(self._compile_sampler, logits, n_top, pen)))
        if background:
            background_compile.start(jobs)
        else:
            background_compile.run_jobs(jobs, threading.Event())
        return len(shapes)

    def _bucket_meta(self, mode: str, t: int, s: int, w: int) -> AttentionMetadata:
        """All-zero metadata of one bucket shape (slots map to the null page 0)."""
        return AttentionMetadata(
            positions=np.zeros(t, np.int32), slot_mapping=np.zeros(t, np.int32),
            query_start_loc=np.zeros(s + 1, np.int32), context_lens=np.zeros(s, np.int32),
            seq_lens=np.zeros(s, np.int32), block_tables=np.zeros((s, w), np.int32),
            logits_indices=np.zeros(round_up(s, self.logit_row_buckets), np.int32), mode=mode)

    def has_background_work(self) -> bool:
        """Whether work `warmup` left for later is not done yet: sampler variants compiling in the
        background, or short step shapes not run once (either takes the host's cores meanwhile)."""
        return bool(self._warm_runs) or any(not j.done() for j in self._sampler_jobs.values())

    def has_pending_warm_runs(self) -> bool:
        """Whether step shapes queued by `warmup` have not run once yet."""
        return bool(self._warm_runs)

    def warm_runs_ready(self) -> bool:
        """Whether a queued run may go now: no runner of this process is compiling its shapes."""
        return bool(self._warm_runs) and background_compile.COMPILE_PHASES.idle()

    def run_pending_warm_run(self) -> bool:
        """Runs the next queued step shape once on zero inputs (KV writes go to the null page 0) with
        the plain sampler, and waits for it. The caller holds the pages (no step of its own in
        flight). False when none is left."""
        if not self._warm_runs:
            return False
        t0 = time.perf_counter()
        mode, t, s, w = self._warm_runs.popleft()
        meta = self._bucket_meta(mode, t, s, w)
        logits = self.forward(np.zeros(t, np.int32), meta)
        jax.block_until_ready(self._launch_sample(logits, _null_works(), n_top=0))
        self._warm_run_seconds += time.perf_counter() - t0
        if not self._warm_runs:
            logging.info("warm-up: the short step shapes ran once in %.1f s", self._warm_run_seconds)
        return True

    def wait_for_background_warmup(self, timeout: float | None = None) -> None:
        """Waits until the compilations `warmup` left in the background are done (tests, tools)."""
        concurrent.futures.wait(list(self._sampler_jobs.values()), timeout=timeout)

    def _compile_step(self, mode: str, t: int, s: int, w: int) -> jax.ShapeDtypeStruct:
        """Compiles every stage for one bucket; returns the logits' shape, dtype and sharding."""
        meta = self._bucket_meta(mode, t, s, w)
        x: Any = np.zeros(t, np.int32)
        for i, st in enumerate(self.stages):
            if i:  # what `forward`'s device_put hands the next stage
                x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=st.replicated)
            # The feed `forward` passes when no token is fed: the same shapes as a fed step.
            x = st.compile(x, meta, None if i else (self._no_feed, np.full(t, -1, np.int32)))
        return x

    def _compile_sampler(self, logits: jax.ShapeDtypeStruct, n_top: int, penalties: bool) -> None:
        rows = logits.shape[0]
        tensors, _, pen = self._sampler_inputs(rows, _null_works(), n_top, penalties)
        exe = self._sample.lower(logits, tensors, num_top_logprobs=n_top, penalties=pen).compile()
        self._samplers[(rows, n_top, penalties)] = (exe, logits.sharding)

    def _bucket_shapes(self, mode: str):
        if mode == "decode":
            return [(s, s, w) for s in self.seq_buckets for w in self.decode_width_buckets]
        if mode == "prefill":
            return [(t, s, 1) for t in self.token_buckets for s in self.prefill_rows[t]]
        return [(t, s, w) for t in self.token_buckets for s in self.seq_buckets if s <= t
                for w in self.width_buckets]
