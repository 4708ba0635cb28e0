"""Chat templates load from every file transformers writes them to, and render as transformers does."""

import json

import pytest
import transformers

from distserve_jax.models.tokenizer import TokenizerFilesError, load_chat_template, load_tokenizer
from serving.chat import render_chat
from tests.hf_checkpoints import _byte_tokenizer

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _saved_by_transformers(directory):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(384, "llama"), bos_token="<s>",
                                               eos_token="</s>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(directory)
    return tok


def test_directory_saved_by_transformers_5_uses_its_template(tmp_path):
    hf_tok = _saved_by_transformers(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok = load_tokenizer(tmp_path, bos_token_id=1, eos_token_ids=(2,))
    assert tok.chat_template == TEMPLATE
    want = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_chat(MESSAGES, tok) == want == "[system] Be brief.\n[user] Hi there\n[assistant] "


def test_template_files_in_order_of_precedence(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from-config"}))
    assert load_chat_template(tmp_path) == "from-config"
    (tmp_path / "chat_template.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "from-json"}]}))
    assert load_chat_template(tmp_path) == "from-json"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    assert load_chat_template(tmp_path) == "from-jinja"


def test_no_template_falls_back_to_the_plain_format(tmp_path):
    _byte_tokenizer(384, "llama").save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    assert render_chat(MESSAGES, tok) == "system: Be brief.\nuser: Hi there\nassistant:"


@pytest.mark.parametrize("name, content, match", [
    ("chat_template.json", "{not json", "not valid JSON"),
    ("chat_template.json", json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}),
     "without a 'default' one"),
    ("tokenizer_config.json", json.dumps({"chat_template": 3}), "must be a string or a list"),
    ("tokenizer_config.json", "[1, 2]", "must hold a JSON object"),
])
def test_malformed_template_files_are_refused(tmp_path, name, content, match):
    _byte_tokenizer(384, "llama").save(str(tmp_path / "tokenizer.json"))
    (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerFilesError, match=match):
        load_tokenizer(tmp_path)
