"""Engine test fixtures: cached `LLM`s, and a check after every test that no KV block is held."""

import pytest

from distserve_jax import LLM
from tests.engine.engine_checks import assert_engine_empty

_LIVE: list[LLM] = []


@pytest.fixture(scope="module")
def make_llm(hf_checkpoint):
    cache = {}

    def make(variant: str, **kw) -> LLM:
        kw.setdefault("max_model_len", 256)
        kw.setdefault("num_blocks", 96)
        kw.setdefault("max_num_seqs", 8)
        kw.setdefault("max_num_batched_tokens", 256)
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(str(hf_checkpoint(variant)), **kw)
            _LIVE.append(cache[key])
        return cache[key]

    yield make
    for llm in cache.values():
        llm.engine.shutdown()
    _LIVE.clear()


@pytest.fixture(autouse=True)
def no_kv_blocks_held_after_test():
    yield
    for llm in _LIVE:
        assert_engine_empty(llm.engine)
