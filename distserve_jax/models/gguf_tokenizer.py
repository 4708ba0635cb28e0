"""The tokenizer and chat template of a GGUF file, rebuilt from its `tokenizer.*` metadata.

GGUF stores a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`: Llama 3, SmolLM,
Qwen2, ...) as its token list, merge list, token types and a pre-tokenizer name
(`tokenizer.ggml.pre`). This module turns that into a Hugging Face `tokenizers.Tokenizer`
(saved as `tokenizer.json`) plus the fields of a `tokenizer_config.json` (chat template,
bos/eos tokens, whether to prepend bos). Control tokens (type 3) become special added tokens
(matched in text, skipped by `decode`), user-defined tokens (type 4) plain added tokens.

The pre-tokenizer names are llama.cpp's (`llama-vocab.cpp`); each maps to the split regex
that llama.cpp and the model's own `tokenizer.json` use. An unknown name, another tokenizer
model (SentencePiece `llama`, ...), or a missing token list raise `GGUFTokenizerError` naming
the metadata key.
"""

from __future__ import annotations

from typing import Any, Mapping

from absl import logging
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# Token types (llama.cpp `llama_token_type`).
CONTROL, USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how text is split before BPE.
#   "gpt2": ByteLevel's own GPT-2 regex; "digits+gpt2": every digit alone, then the GPT-2 regex
#   (StarCoder / SmolLM); a string: that regex, then ByteLevel without its regex.
_PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "phi-2": "gpt2", "olmo": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2", "codeshell": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class GGUFTokenizerError(ValueError):
    """A GGUF file's tokenizer metadata is missing something or uses an unsupported scheme."""


def _pre_tokenizer(pre: str) -> Any:
    kind = _PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise GGUFTokenizerError(f"tokenizer.ggml.pre {pre!r} is not a supported pre-tokenizer; "
                                 f"supported: {sorted(_PRE_TOKENIZERS)}")
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_metadata(meta: Mapping[str, Any]) -> tuple[Tokenizer, dict[str, Any]] | None:
    """(tokenizer, tokenizer_config fields) from GGUF metadata, or None when it has no tokenizer.

    Args:
      meta: GGUF key -> value (strings, numbers, lists), as `gguf_io.read_metadata` returns it.
    Raises:
      GGUFTokenizerError: the metadata names a tokenizer this module cannot rebuild, or is
        missing a key that one needs.
    """
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        raise GGUFTokenizerError(f"tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2', the "
                                 "byte-level BPE of Llama 3, SmolLM and Qwen2 files)")
    if not meta.get("tokenizer.ggml.tokens"):
        raise GGUFTokenizerError("the GGUF tokenizer is 'gpt2' but tokenizer.ggml.tokens is missing or empty")
    if not meta.get("tokenizer.ggml.merges"):  # the gguf writer drops empty arrays
        logging.warning("GGUF tokenizer has no tokenizer.ggml.merges: every token is matched as it is")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or ():
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFTokenizerError(f"tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    # Ids are already in the vocab, so adding keeps them; special ones go through add_special_tokens.
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])

    def token(key: str) -> str | None:
        i = meta.get(key)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise GGUFTokenizerError(f"{key} = {i} is outside the vocab of {len(tokens)} tokens")
        return tokens[int(i)]

    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}
