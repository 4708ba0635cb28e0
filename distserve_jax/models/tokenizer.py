"""Tokenizer of a model directory (`tokenizer.json` through the `tokenizers` library) and its chat template.

The chat template is looked up where the versions of transformers save it: `chat_template.jinja`
(transformers 5, the raw template), then `chat_template.json` (`{"chat_template": ...}`), then
the `chat_template` entry of `tokenizer_config.json`. A template given as a list of named
templates (`[{"name": "default", "template": ...}, ...]`) yields the one named `default`.
"""

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


class TokenizerFilesError(ValueError):
    """A tokenizer or chat-template file of a model directory is unreadable or malformed."""


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFilesError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerFilesError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _pick_template(value, where: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerFilesError(f"{where}: chat_template is a list of named templates without a 'default' "
                                  f"one (names: {sorted(str(n) for n in named)})")
    raise TokenizerFilesError(f"{where}: chat_template must be a string or a list of named templates, "
                              f"got {type(value).__name__}")


def load_chat_template(model_dir: str | Path, tokenizer_config: dict | None = None) -> str | None:
    """The chat template of `model_dir` (see the module docstring), or None when it has none."""
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text() or None
    as_json = d / "chat_template.json"
    if as_json.is_file():
        return _pick_template(_json_file(as_json).get("chat_template"), as_json)
    cfg = tokenizer_config if tokenizer_config is not None else (
        _json_file(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {})
    return _pick_template(cfg.get("chat_template"), d / "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path, *, bos_token_id: int | None = None,
                   eos_token_ids: tuple[int, ...] = ()) -> Tokenizer | None:
    """The tokenizer in `model_dir`, or None when it has no `tokenizer.json`."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = tokenizers.Tokenizer.from_file(str(path))
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    cfg = _json_file(cfg_path) if cfg_path.is_file() else {}
    return Tokenizer(tok, add_bos=bool(cfg.get("add_bos_token", False)), bos_token_id=bos_token_id,
                     eos_token_ids=eos_token_ids, chat_template=load_chat_template(model_dir, cfg))
