"""The engine gives the same greedy tokens with the Pallas kernels (interpret mode on CPU) as with the reference."""

import numpy as np

from distserve_jax import SamplingParams


def _count_calls(monkeypatch, targets) -> dict[str, int]:
    """Wraps each `(module, function name, key)` so the returned dict counts its calls (traces)."""
    calls = {key: 0 for _, _, key in targets}
    for mod, name, key in targets:
        real = getattr(mod, name)

        def spy(*a, real=real, key=key, **k):
            calls[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    return calls


def test_pallas_interpret_matches_reference(make_llm, monkeypatch):
    from pallas_kernels import paged_decode, ragged_prefill
    calls = _count_calls(monkeypatch, ((ragged_prefill, "ragged_prefill_attention", "prefill"),
                                       (paged_decode, "paged_decode_attention", "decode")))
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (5, 16, 23)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
    ref = make_llm("mistral", attention_backend="reference", **kw)
    pallas = make_llm("mistral", attention_backend="pallas_interpret", **kw)
    want = [o.token_ids for o in ref.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    got = [o.token_ids for o in pallas.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    assert got == want
    assert calls["prefill"] > 0 and calls["decode"] > 0, f"the Pallas kernels were not traced: {calls}"


def test_native_and_xla_backends_match_reference(make_llm, monkeypatch):
    """The CPU default (C++ kernels, one-row decode batches) and its XLA fallback give the reference's tokens."""
    from pallas_kernels import cpu_native
    calls = _count_calls(monkeypatch, ((cpu_native, "paged_decode_attention", "decode"),
                                       (cpu_native, "write_kv_pages", "write")))
    rng = np.random.default_rng(12)
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (7, 19)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    kw = dict(max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
    outs = {}
    for backend in ("reference", "xla", "native"):
        llm = make_llm("llama3", attention_backend=backend, **kw)
        # one prompt alone runs one-row decode steps on `native`, two rows on the others
        outs[backend] = [o.token_ids for p in prompts
                         for o in llm.generate(prompt_token_ids=[p], sampling_params=params, use_tqdm=False)]
    assert outs["native"] == outs["reference"] and outs["xla"] == outs["reference"]
    assert calls["decode"] > 0 and calls["write"] > 0, f"the native kernels were not traced: {calls}"
