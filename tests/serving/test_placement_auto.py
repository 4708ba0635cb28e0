"""`--placement=auto` picks a placement the model can be sharded by (9 heads: not tp=2 or tp=4); the server
builds its engine with `serving.startup`."""

import jax
import pytest
import torch
import transformers

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.sampling_params import SamplingParams
from serving import startup
from tests.hf_checkpoints import _byte_tokenizer


@pytest.fixture(scope="module")
def nine_heads(tmp_path_factory):
    """A one-layer Llama with 9 query / 3 kv heads (SmolLM2's head counts), saved by transformers."""
    d = tmp_path_factory.mktemp("nine-heads")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=144, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    _byte_tokenizer(320, "llama").save(str(d / "tokenizer.json"))
    return d


def test_auto_placement_follows_the_model(nine_heads):
    cfg9 = resolve_model(nine_heads).config
    assert startup.resolve_placement("auto", 8, cfg9).describe() == "P(tp1)+D(tp1)"
    assert startup.resolve_placement("auto", 8, resolve_model("demo").config).describe() == "P(tp4)+D(tp4)"
    with pytest.raises(ValueError, match="neither `auto` nor an existing file"):
        startup.resolve_placement("no-such.yaml", 8, cfg9)


def test_server_serves_a_nine_head_model_with_auto_placement(nine_heads):
    assert len(jax.devices()) == 8  # where auto without the model chose tp=4, which 9 heads refuse
    core, placement = startup.build_core("disaggregated", str(nine_heads), "auto", False,
                                        {"max_model_len": 64, "num_blocks": 8, "max_num_seqs": 2})
    try:
        assert placement.describe() == "P(tp1)+D(tp1)"
        core.add_request("r", prompt="Hello", params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        outs = []
        while not outs or not outs[-1].finished:
            outs += [o for o in core.step() if o.request_id == "r"]
        assert len(outs[-1].token_ids) == 3
    finally:
        core.shutdown()
