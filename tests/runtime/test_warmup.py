"""Compile-only warm-up: it runs no step (the KV pages stay untouched), steps of the shapes it
compiled call its executables (no jit dispatch, no compilation), and their tokens and logprobs
equal those of a runner that compiles each shape on first use, also for a shape it did not
compile (a prompt-logprobs step)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.runtime import compile_counter
from distserve_jax.runtime.buckets import rows_for_tokens
from distserve_jax.runtime.background_compile import COMPILE_PHASES
from distserve_jax.runtime.model_runner import WARM_RUN_TOKENS, ModelRunner, RunnerConfig, SeqWork
from distserve_jax.runtime.sharding import make_mesh
from distserve_jax.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0)
TOP = SamplingParams(temperature=0.0, logprobs=3)
PENALISED = SamplingParams(temperature=0.7, presence_penalty=0.5, seed=5)


def _runner(spec, pp: int, tp: int) -> ModelRunner:
    meshes = [make_mesh(jax.devices()[i * tp:(i + 1) * tp]) for i in range(pp)]
    return ModelRunner(spec.config, meshes, spec.weights,
                       RunnerConfig(max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64))


def _steps(runner: ModelRunner, prompt_logprobs: bool = False) -> list:
    """A prefill of three prompts (greedy, top logprobs, penalties), then three decode steps."""
    prompts = [[5, 9, 11, 40, 7], list(range(3, 23)), [17, 4, 4, 60]]
    tables = [[1, 2], [3, 4], [5, 6]]
    kinds = [GREEDY, TOP, PENALISED]
    if prompt_logprobs:
        kinds[0] = SamplingParams(temperature=0.0, prompt_logprobs=2)
    works = [SeqWork(p, 0, t, k, seed=i, prompt_ids=p) for i, (p, t, k) in enumerate(zip(prompts, tables, kinds))]
    out = [runner.execute(works)]
    outputs = [[r.token_id] for r in out[0]]
    for step in range(3):
        works = [SeqWork([o[-1]], len(p) + step, t, k, seed=i, num_generated=step + 1, prompt_ids=p,
                         output_ids=o) for i, (p, t, k, o) in enumerate(zip(prompts, tables, kinds, outputs))]
        out.append(runner.execute(works))
        for o, r in zip(outputs, out[-1]):
            o.append(r.token_id)
    return [[(r.token_id, r.logprob, r.top_logprobs, r.prompt_logprobs) for r in step] for step in out]


@pytest.mark.parametrize("pp,tp,background", [(1, 1, False), (2, 2, True)],
                         ids=["single-device", "pp2-tp2-background"])
def test_warmup_compiles_without_running_and_steps_use_its_executables(hf_checkpoint, pp, tp, background):
    spec = resolve_model(str(hf_checkpoint("llama3")))
    warm, cold = _runner(spec, pp, tp), _runner(spec, pp, tp)
    n = warm.warmup(("prefill", "decode"), threads=2, background=background)
    assert n == len(warm._bucket_shapes("prefill")) + len(warm._bucket_shapes("decode"))
    # The short shapes are queued to run once (a worker runs them in its idle turns): run them here.
    queued = list(warm._warm_runs)
    assert queued and all(t <= WARM_RUN_TOKENS for _, t, _, _ in queued)
    assert {sh for sh in queued} == {(m, t, s, w) for m in ("prefill", "decode") for t, s, w in warm._bucket_shapes(m)
                                     if t <= WARM_RUN_TOKENS}
    with COMPILE_PHASES.active():  # another runner of this process compiling: the runs wait for it
        assert warm.has_pending_warm_runs() and not warm.warm_runs_ready()
    assert warm.has_background_work()  # what a worker reports as `warming`
    assert warm.warm_runs_ready()
    runs = 0
    while warm.run_pending_warm_run():
        runs += 1
    assert runs == len(queued) and not warm.has_pending_warm_runs()
    for st in warm.stages:
        # Only the null page 0 (axis 1 of `[H, pages, PS, D]`) may be written by those runs.
        assert all(not np.asarray(p)[:, 1:].any() for p in jax.tree_util.tree_leaves(st.pages)), "warm-up wrote KV"
        assert st.forward._cache_size() == 0, "warm-up went through the jitted forward"
    before = compile_counter.count()
    # With background=True the steps start while the top-logprobs and penalty samplers may still be
    # compiling: a step that needs one waits for it.
    got = _steps(warm)
    warm.wait_for_background_warmup()
    assert not warm.has_background_work()
    if not background:
        assert compile_counter.count() == before, f"{compile_counter.count() - before} compilations after warm-up"
    assert all(st.forward._cache_size() == 0 for st in warm.stages), "a warmed step shape went through jit"
    assert warm._sample._cache_size() == 0, "a warmed sampler went through jit"
    assert len(warm._samplers) == 4 * len({r for r, _, _ in warm._samplers})
    assert got == _steps(cold)
    assert any(st.forward._cache_size() for st in cold.stages)  # the reference did compile on first use


def test_a_shape_not_compiled_ahead_is_compiled_on_first_use(hf_checkpoint):
    spec = resolve_model(str(hf_checkpoint("llama3")))
    warm, cold = _runner(spec, 1, 1), _runner(spec, 1, 1)
    warm.warmup(("decode",), threads=1, background=False)  # no prefill bucket, and prompt logprobs need every row's logits
    got = _steps(warm, prompt_logprobs=True)
    assert got[0][0][3] is not None and len(got[0][0][3]) == 5
    assert warm.stages[0].forward._cache_size() > 0
    assert got == _steps(cold, prompt_logprobs=True)


def test_warmup_threads_must_be_positive(hf_checkpoint):
    runner = _runner(resolve_model(str(hf_checkpoint("llama3"))), 1, 1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        runner.warmup(("decode",), threads=0)


def test_long_prefill_steps_have_fewer_row_buckets(hf_checkpoint):
    spec = resolve_model(str(hf_checkpoint("llama3")))
    runner = ModelRunner(spec.config, [make_mesh(jax.devices()[:1])], spec.weights,
                         RunnerConfig(max_model_len=64, num_blocks=16, max_num_seqs=64, max_num_batched_tokens=256))
    assert runner.prefill_rows == {16: (4, 16), 32: (4, 16, 64), 64: (4, 16, 64), 128: (4, 16, 64), 256: (16, 64)}
    assert len(runner._bucket_shapes("prefill")) == 13
    two_long = [SeqWork([3] * 100, 0, [1] * 7, GREEDY), SeqWork([4] * 100, 0, [2] * 7, GREEDY)]
    tokens, meta = runner.build_inputs(two_long)
    assert (len(tokens), meta.block_tables.shape[0], len(meta.logits_indices)) == (256, 16, 16)
    many_short = [SeqWork([5], 0, [1], GREEDY)] * 20  # 20 rows in a 32-token step
    tokens, meta = runner.build_inputs(many_short)
    assert (len(tokens), meta.block_tables.shape[0], len(meta.logits_indices)) == (32, 64, 64)


def test_rows_for_tokens():
    assert rows_for_tokens((4, 16, 64), 2048) == (64,)
    assert rows_for_tokens((4, 16, 64), 512) == (16, 64)
    assert rows_for_tokens((4, 16, 64), 128) == (4, 16, 64)
    assert rows_for_tokens((4, 16, 64), 16) == (4, 16)
    assert rows_for_tokens((4, 16, 64), 3) == (4,)
    assert rows_for_tokens((4, 16, 64), 512, ratio=64) == (4, 16, 64)
    with pytest.raises(ValueError, match="must be positive"):
        rows_for_tokens((4, 16), 0)


def test_exit_while_compiling_in_the_background_is_clean(hf_checkpoint):
    """The interpreter exits right after warm-up returns, samplers still compiling: exit code 0 (a
    compilation running while the interpreter finalises aborts the process)."""
    code = (f"import jax; from tests.runtime.test_warmup import _runner; from distserve_jax.engine.model_source "
            f"import resolve_model; r = _runner(resolve_model({str(hf_checkpoint('llama3'))!r}), 1, 1); "
            f"r.warmup(('decode',), threads=1); "
            f"assert not all(j.done() for j in r._sampler_jobs.values()), 'nothing left in the background'")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
