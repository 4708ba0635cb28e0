"""Tiny random Hugging Face checkpoints and transformers reference outputs for parity tests.

This helper module owns the test fixtures that stand in for real model weights: it builds tiny
random `transformers` models of every architecture variant the project serves, saves them in
Hugging Face layout (`config.json`, `*.safetensors`, `tokenizer.json`), and computes the
reference outputs (prefill logits, greedy generations) that the JAX models are compared with.
PyTorch on CPU in float32 with eager attention is the reference.

Variants (`VARIANTS`, name -> config builder):
  llama2             LlamaForCausalLM, MHA (8 q / 8 kv heads), rope_theta 1e4, no rope scaling.
  llama3             LlamaForCausalLM, GQA (4 q / 2 kv heads), rope_theta 5e5, llama3 rope scaling
                     (factor 8, low 1, high 4, original_max_position_embeddings 64).
  llama_tied         LlamaForCausalLM, MQA (4 q / 1 kv head), tie_word_embeddings=True, so the
                     checkpoint has no `lm_head.weight` tensor.
  llama_hd80         LlamaForCausalLM, head_dim 80 given explicitly (hidden 128 / 4 heads = 32).
  mistral            MistralForCausalLM, GQA (8 q / 2 kv heads), sliding_window 16.
  qwen2              Qwen2ForCausalLM, q/k/v biases, GQA (4 q / 2 kv heads), sliding window off.
  opt_prelayernorm   OPTForCausalLM, do_layer_norm_before=True (OPT-125m style), tied lm_head.
  opt_postlayernorm  OPTForCausalLM, do_layer_norm_before=False (OPT-350m style): no final
                     decoder layer norm.
  opt_project        OPTForCausalLM shaped like OPT-350m: do_layer_norm_before=False and
                     word_embed_proj_dim (32) != hidden_size (64), so `project_in` and
                     `project_out` exist.
Every variant has 2 layers, max_position_embeddings 256, a vocab of 320-512 (a multiple of 8
and >= 260 so the byte tokenizer fits), and a query head count divisible by tp = 1, 2, 4.

Config file style (`make_checkpoint(config_style=...)`):
  transformers 5 writes the RoPE settings as one `rope_parameters` dict (with `rope_theta` and
  `rope_type` inside), always writes `head_dim`, writes `dtype`, and writes Qwen2's
  `sliding_window` as null when `use_sliding_window` is false. Published checkpoints instead
  have top-level `rope_theta` and `rope_scaling` (null, or a dict with `rope_type`), no
  `head_dim` unless it differs from hidden_size // num_attention_heads, `torch_dtype`, and for
  Qwen2 a real `sliding_window` number next to `use_sliding_window: false`. `config_style="hub"`
  (the default) rewrites config.json into the published form (Qwen2's dormant window is 16 with
  max_window_layers 1, so a loader that wrongly honours it fails parity on prompts > 16 tokens);
  `config_style="transformers5"` keeps what `save_pretrained` wrote. transformers loads both to
  the same model.

Semantics transformers 5.23 implements (read from the installed sources):
  * Mistral sliding window (`masking_utils.sliding_window_overlay`, on top of the causal mask):
    a query at position p attends to key k iff `k <= p and k > p - sliding_window`, i.e.
    `0 <= p - k < sliding_window`: exactly `sliding_window` keys including itself. The decode
    cache (`cache_utils.DynamicSlidingWindowLayer`) keeps the last `sliding_window - 1` keys
    plus the new one, which is the same window. It applies to every layer.
  * Llama 3 RoPE scaling: `modeling_rope_utils._compute_llama3_parameters`. With
    inv_freq = 1 / theta**(arange(0, d, 2) / d), wavelen = 2*pi / inv_freq,
    low_wl = orig_max_pos / low_freq_factor, high_wl = orig_max_pos / high_freq_factor:
    wavelen < high_wl keeps inv_freq; wavelen > low_wl uses inv_freq / factor; otherwise
    smooth = (orig_max_pos / wavelen - low) / (high - low) and
    inv_freq' = (1 - smooth) * inv_freq / factor + smooth * inv_freq.
    The attention scaling factor is 1.0 (cos/sin are not rescaled). RoPE is the rotate-half
    form on the full head_dim (`apply_rotary_pos_emb`, `rotate_half`).
  * OPT positions (`OPTDecoder.forward`, `OPTLearnedPositionalEmbedding`): position_ids =
    cumsum(attention_mask, 1) * attention_mask - 1 (so left padding gets -1 and the first real
    token 0), cut to the new tokens when a cache is present, and the embedding row used is
    position_id + 2 (the table has max_position_embeddings + 2 rows). Without padding the
    token at index i uses row i + 2. OPT scales q by head_dim**-0.5 after q_proj (bias
    included), before q.k.
  * Qwen2 with `use_sliding_window=False`: `Qwen2Config.__post_init__` sets `sliding_window`
    to None, so every layer is "full_attention" whatever `sliding_window` the file holds. With
    `use_sliding_window=True`, only layers with index >= `max_window_layers` slide.
  * Llama/Mistral/Qwen2 RMSNorm computes in float32 and multiplies the weight after casting
    back; OPT LayerNorm eps is 1e-5; `rms_norm_eps` is in config.json.

Token ids: Llama-family variants use <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3; OPT uses
<s>=0, <pad>=1, </s>=2 (bos and eos, as published OPT), <unk>=3. Ids 4..259 are the 256
byte-level byte tokens; the rest of the vocab is `<extra_i>` filler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import transformers
from absl import logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_STYLES = ("hub", "transformers5")
_QWEN2_DORMANT_WINDOW = 16
_NUM_SPECIAL = 4
_LM_HEAD_GAIN = 2.0

# Shared tiny sizes.
_MAX_POS = 256
_LAYERS = 2


def _llama2() -> transformers.PreTrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=_LAYERS,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=_MAX_POS,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def _llama3() -> transformers.PreTrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=_MAX_POS,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2)


def _llama_tied() -> transformers.PreTrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=_MAX_POS,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)


def _llama_hd80() -> transformers.PreTrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=80,
        max_position_embeddings=_MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2)


def _mistral() -> transformers.PreTrainedConfig:
    return transformers.MistralConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=_LAYERS,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=_MAX_POS,
        sliding_window=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2)


def _qwen2() -> transformers.PreTrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=448, hidden_size=64, intermediate_size=160, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=_MAX_POS,
        use_sliding_window=False, sliding_window=_QWEN2_DORMANT_WINDOW, max_window_layers=1,
        rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2)


def _opt(*, pre_layernorm: bool, word_embed_proj_dim: int | None) -> transformers.PreTrainedConfig:
    return transformers.OPTConfig(
        vocab_size=320, hidden_size=64, ffn_dim=256, num_hidden_layers=_LAYERS,
        num_attention_heads=4, max_position_embeddings=_MAX_POS,
        do_layer_norm_before=pre_layernorm, word_embed_proj_dim=word_embed_proj_dim,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)


VARIANTS: dict[str, Callable[[], transformers.PreTrainedConfig]] = {
    "llama2": _llama2,
    "llama3": _llama3,
    "llama_tied": _llama_tied,
    "llama_hd80": _llama_hd80,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "opt_prelayernorm": lambda: _opt(pre_layernorm=True, word_embed_proj_dim=None),
    "opt_postlayernorm": lambda: _opt(pre_layernorm=False, word_embed_proj_dim=None),
    "opt_project": lambda: _opt(pre_layernorm=False, word_embed_proj_dim=32),
}


def _reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Draws every parameter so that each one matters to the logits.

    Matrices (linear [out, in], embeddings [rows, dim]) get normal(0, 1/sqrt(shape[1])), so
    activations and attention scores stay O(1) and attention is far from uniform; the output
    embedding (tied or not) gets twice that, so logits have std ~2 and greedy argmaxes are
    rarely near-ties; 1-D weights
    (RMSNorm/LayerNorm scales) get 1 + normal(0, 0.2); biases get normal(0, 0.1).
    Tied parameters are drawn once.
    """
    generator = torch.Generator().manual_seed(seed)
    lm_head = model.get_output_embeddings().weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                gain = _LM_HEAD_GAIN if param is lm_head else 1.0
                std = gain / math.sqrt(param.shape[1])
                values = torch.randn(param.shape, generator=generator) * std
            elif param.ndim == 1 and name.endswith("bias"):
                values = torch.randn(param.shape, generator=generator) * 0.1
            elif param.ndim == 1:
                values = 1.0 + torch.randn(param.shape, generator=generator) * 0.2
            else:
                raise ValueError(f"unexpected parameter {name} with shape {tuple(param.shape)}")
            param.copy_(values.to(param.dtype))


def _to_hub_style(config: dict, model_type: str) -> dict:
    """Rewrites a transformers-5 config dict into the form published checkpoints have."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        out["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") == "default" and set(rope) <= {"rope_type"}:
            out["rope_scaling"] = None
        else:
            out["rope_scaling"] = rope
    if model_type in ("llama", "mistral", "qwen2") and "head_dim" in out:
        if out["head_dim"] == out["hidden_size"] // out["num_attention_heads"]:
            del out["head_dim"]
    if model_type == "qwen2" and not out.get("use_sliding_window", False):
        out["sliding_window"] = _QWEN2_DORMANT_WINDOW
        out.pop("layer_types", None)
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return out


def _byte_tokenizer(vocab_size: int, model_type: str) -> Tokenizer:
    """A byte-level tokenizer with one token per byte, sized to the checkpoint's vocab."""
    if model_type == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        bos = "</s>"
    else:
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        bos = "<s>"
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    if vocab_size < _NUM_SPECIAL + len(byte_chars):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte tokenizer")
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return tokenizer


def make_checkpoint(
    variant: str,
    directory: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    sharded: bool = False,
    config_style: Literal["hub", "transformers5"] = "hub",
    write_tokenizer: bool = True,
) -> Path:
    """Builds a tiny random checkpoint of `variant` and saves it in Hugging Face layout.

    Args:
      variant: a key of `VARIANTS`.
      directory: where to write; created if missing. Files already there are overwritten.
      dtype: "float32", "bfloat16" or "float16": the dtype of the stored tensors. The weights
        are drawn in float32 and then cast, so the same seed gives the same (rounded) weights.
      seed: seeds both the model construction and the re-initialisation.
      sharded: write several `model-0000k-of-0000n.safetensors` shards plus
        `model.safetensors.index.json` instead of one `model.safetensors`.
      config_style: "hub" (published-checkpoint form, see the module docstring) or
        "transformers5" (what `save_pretrained` writes).
      write_tokenizer: also write a byte-level `tokenizer.json` (ids in the module docstring).

    Returns:
      The checkpoint directory as a Path.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPES)}")
    if config_style not in _CONFIG_STYLES:
        raise ValueError(f"unknown config_style {config_style!r}; known: {_CONFIG_STYLES}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    config = VARIANTS[variant]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinitialise(model, seed)
    model = model.to(_DTYPES[dtype]).eval()

    save_kwargs = {}
    if sharded:
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kwargs["max_shard_size"] = max(total_bytes // 4, 1)
    # transformers 5 always writes safetensors (the `safe_serialization` flag is gone).
    model.save_pretrained(directory, **save_kwargs)

    config_path = directory / "config.json"
    if config_style == "hub":
        written = json.loads(config_path.read_text())
        config_path.write_text(json.dumps(_to_hub_style(written, config.model_type), indent=2,
                                          sort_keys=True) + "\n")
    if write_tokenizer:
        _byte_tokenizer(config.vocab_size, config.model_type).save(str(directory / "tokenizer.json"))
    logging.info("wrote %s checkpoint (%s, sharded=%s) to %s", variant, dtype, sharded, directory)
    return directory


def _load_reference(directory: str | Path) -> transformers.PreTrainedModel:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is not a checkpoint directory (no config.json)")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _check_ids(model: transformers.PreTrainedModel, input_ids: list[int], extra: int = 0) -> None:
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be a non-empty list of ints")
    vocab = model.config.vocab_size
    bad = [t for t in input_ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"input_ids must be ints in [0, {vocab}); bad values {bad[:5]}")
    limit = model.config.max_position_embeddings
    if len(input_ids) + extra > limit:
        raise ValueError(
            f"{len(input_ids)} prompt tokens + {extra} new tokens exceed "
            f"max_position_embeddings {limit}")


def hf_prefill_logits(directory: str | Path, input_ids: list[int]) -> np.ndarray:
    """Logits of one unpadded sequence from transformers, float32, eager attention.

    Returns:
      float32 array [len(input_ids), vocab_size]; row i predicts the token after input_ids[i].
    """
    model = _load_reference(directory)
    _check_ids(model, input_ids)
    ids = torch.tensor([list(map(int, input_ids))], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits[0].float().numpy()


def hf_greedy_generate(
    directory: str | Path, input_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[float], list[float]]:
    """Greedy continuation of one prompt with `model.generate` (KV cache on), no EOS stop.

    Returns:
      (token_ids, logprobs, margins): `max_new_tokens` generated ids; for each, log_softmax of
      the raw (unprocessed) logits at that step taken at the chosen id; and the gap between the
      step's largest and second-largest raw logit (how far from a tie the greedy choice was).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    model = _load_reference(directory)
    _check_ids(model, input_ids, extra=max_new_tokens)
    ids = torch.tensor([list(map(int, input_ids))], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    new_ids = out.sequences[0, len(input_ids):].tolist()
    if len(new_ids) != max_new_tokens or len(out.logits) != max_new_tokens:
        raise RuntimeError(f"generate returned {len(new_ids)} tokens, wanted {max_new_tokens}")
    token_ids, logprobs, margins = [], [], []
    for step, (token, step_logits) in enumerate(zip(new_ids, out.logits)):
        raw = step_logits[0].float()
        if int(torch.argmax(raw)) != token:
            raise RuntimeError(f"step {step}: generate picked {token}, not the raw-logit argmax; "
                               "a logits processor is active")
        token_ids.append(int(token))
        logprobs.append(float(torch.log_softmax(raw, dim=-1)[token]))
        top2 = torch.topk(raw, 2).values
        margins.append(float(top2[0] - top2[1]))
    return token_ids, logprobs, margins
