"""Chat prompts: OpenAI `messages` -> one prompt string.

With a chat template (the tokenizer's `chat_template`: a Hugging Face Jinja template, read from
`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`), the messages are rendered by it in a sandbox with
`add_generation_prompt=True`, `bos_token` and `eos_token`. Without one, the plain format is
one line per message, `"<role>: <content>"`, followed by a final `"assistant:"` line, e.g.

    system: You are terse.
    user: Hello
    assistant:

Message content may be a string or a list of `{"type": "text", "text": ...}` parts (joined).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from serving.convert import InvalidRequest

_ROLES = ("system", "user", "assistant", "tool", "developer")


def normalise_messages(messages: Any) -> list[dict[str, str]]:
    """Checks OpenAI chat messages and returns [{"role", "content"}] with text content."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {_ROLES}, got {role!r}", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"messages[{i}].content parts must be {{type: text, text: str}}",
                                         param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts",
                                 param="messages")
        out.append({"role": role, "content": content})
    return out


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"chat template: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def plain_chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The documented plain format (see the module docstring)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def render_chat(messages: Any, tokenizer: Any) -> str:
    """The prompt for `messages` under `tokenizer`'s chat template, or the plain format without one."""
    msgs = normalise_messages(messages)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return plain_chat_prompt(msgs)
    special = {}
    for name, tid in (("bos_token", getattr(tokenizer, "bos_token_id", None)),
                      ("eos_token", (getattr(tokenizer, "eos_token_ids", None) or (None,))[0])):
        special[name] = (tokenizer.id_to_token(tid) or "") if tid is not None else ""
    try:
        return _compile(template).render(messages=msgs, add_generation_prompt=True, **special)
    except InvalidRequest:
        raise
    except Exception as e:  # noqa: BLE001 - a template error is the request's (or model's) problem
        raise InvalidRequest(f"chat template failed on these messages: {e}", param="messages") from None
