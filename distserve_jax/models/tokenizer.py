"""Tokenizer of a model directory (`tokenizer.json` through the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode (it holds a lone surrogate, which JSON's `\\ud800` escapes
    can produce and no tokenizer accepts), or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None


class Tokenizer:
    """Thin wrapper: `encode`, `decode`, special-token ids and the chat template if any."""

    def __init__(self, tok: tokenizers.Tokenizer, *, add_bos: bool = False, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), chat_template: str | None = None):
        self.tok = tok
        self.add_bos = add_bos
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; ValueError (naming the prompt) when it is not a valid Unicode string."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        problem = unicode_problem(text)
        if problem is not None:
            raise ValueError(f"prompt is not valid Unicode: {problem}")
        ids = self.tok.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


def load_tokenizer(model_dir: str | Path, *, bos_token_id: int | None = None,
                   eos_token_ids: tuple[int, ...] = ()) -> Tokenizer | None:
    """The tokenizer in `model_dir`, or None when it has no `tokenizer.json`."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = tokenizers.Tokenizer.from_file(str(path))
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    return Tokenizer(tok, add_bos=bool(cfg.get("add_bos_token", False)), bos_token_id=bos_token_id,
                     eos_token_ids=eos_token_ids, chat_template=template if isinstance(template, str) else None)
