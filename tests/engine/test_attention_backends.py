"""The engine gives the same greedy tokens with the Pallas kernels (interpret mode on CPU) as with the reference.

The backends sum attention in different orders, so each reference run is first checked to have no
near-tie greedy step (`tests.tolerances.assert_clear_greedy_margins`). The native test's id names
the SIMD path the host's native kernels compiled (e.g. ``native-avx512``).
"""

import numpy as np
import pytest

from distserve_jax import SamplingParams
from pallas_kernels import cpu_native
from tests.tolerances import assert_clear_greedy_margins

NATIVE_PATH = cpu_native.simd_path() if cpu_native.available() else "unbuilt"  # unbuilt: the test fails


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
    ref_outs = ref.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2), use_tqdm=False)
    assert_clear_greedy_margins([o.logprobs for o in ref_outs], what="reference backend")
    want = [o.token_ids for o in ref_outs]
    got = [o.token_ids for o in pallas.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    assert got == want
    assert calls["prefill"] > 0 and calls["decode"] > 0, f"the Pallas kernels were not traced: {calls}"


@pytest.mark.parametrize("build", [cpu_native.NATIVE], ids=[f"native-{NATIVE_PATH}"])
def test_native_and_xla_backends_match_reference(make_llm, monkeypatch, build):
    """The CPU default (C++ kernels, one-row decode batches) and its XLA fallback give the reference's tokens."""
    from pallas_kernels import cpu_native
    calls = _count_calls(monkeypatch, ((cpu_native, "paged_decode_attention", "decode"),
                                       (cpu_native, "write_kv_pages", "write")))
    rng = np.random.default_rng(12)
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (7, 19)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    kw = dict(max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
    outs = {}
    for backend in ("reference", "xla", "native"):
        llm = make_llm("llama3", attention_backend=backend, **kw)
        # one prompt alone runs one-row decode steps on `native`, two rows on the others
        got = [o for p in prompts for o in llm.generate(prompt_token_ids=[p], sampling_params=params, use_tqdm=False)]
        outs[backend] = [o.token_ids for o in got]
        if backend == "reference":
            assert_clear_greedy_margins([o.logprobs for o in got], what="reference backend")
    assert cpu_native.simd_path(build) == NATIVE_PATH
    assert outs["native"] == outs["reference"] and outs["xla"] == outs["reference"]
    assert calls["decode"] > 0 and calls["write"] > 0, f"the native kernels were not traced: {calls}"
