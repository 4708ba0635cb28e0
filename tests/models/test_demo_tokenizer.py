"""Tests for distserve_jax.models.demo_tokenizer: training, caching, ids, round trips."""

import time

import pytest

from distserve_jax.models import demo_tokenizer as dt

_VOCAB = 512
_TEXT_BYTES = 2 * 2**20  # ~300 conversations: trains in well under a second.

_SAMPLES = [
    "Hello, world! Can you summarise this article for me?",
    "def f(x):\n    return x ** 2  # tabs\tand  double  spaces\n",
    "Unicode: héllo, naïve café, 你好, emoji \U0001F600, math ∑ ∫.",
    "  leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    tok = dt.build_demo_tokenizer(cache, _VOCAB, max_text_bytes=_TEXT_BYTES)
    return cache, tok, time.perf_counter() - start


def test_vocab_and_special_ids(built):
    _, tok, _ = built
    assert tok.get_vocab_size() == _VOCAB
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (dt.UNK_ID, dt.BOS_ID, dt.EOS_ID, dt.PAD_ID) == (0, 1, 2, 3)
    # Every byte has a token, so <unk> is never produced; merges were learned.
    ids = tok.encode("\x00\x7f\u00ff the the the").ids
    assert dt.UNK_ID not in ids
    assert any(len(tok.id_to_token(i)) > 1 for i in ids[1:])


@pytest.mark.parametrize("text", _SAMPLES)
def test_round_trip(built, text):
    _, tok, _ = built
    enc = tok.encode(text)
    assert enc.ids[0] == dt.BOS_ID
    assert enc.ids[1:] == tok.encode(text, add_special_tokens=False).ids
    assert all(0 <= i < _VOCAB for i in enc.ids)
    assert tok.decode(enc.ids) == text
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<s>" + text


def test_compresses_english(built):
    _, tok, _ = built
    text = "The quick brown fox jumps over the lazy dog, and then it writes some code."
    # 252 merges already beat one token per byte clearly.
    assert len(tok.encode(text, add_special_tokens=False).ids) < 0.7 * len(text.encode())


def test_second_call_loads_from_cache(built):
    cache, tok, build_s = built
    path = dt.demo_tokenizer_path(cache, _VOCAB, max_text_bytes=_TEXT_BYTES)
    assert path.is_file()
    assert path.parent.name == "tokenizers" and f"v{_VOCAB}" in path.name and dt.VERSION in path.name
    mtime = path.stat().st_mtime_ns
    start = time.perf_counter()
    again = dt.build_demo_tokenizer(cache, _VOCAB, max_text_bytes=_TEXT_BYTES)
    load_s = time.perf_counter() - start
    assert load_s < 0.5 and load_s < build_s
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    assert again.get_vocab() == tok.get_vocab()
    assert again.to_str() == tok.to_str()
    assert not list(path.parent.glob("*.tmp"))  # no leftovers from the atomic write


def test_training_is_deterministic_and_keyed(built, tmp_path):
    cache, tok, _ = built
    other = dt.build_demo_tokenizer(tmp_path, _VOCAB, max_text_bytes=_TEXT_BYTES)
    assert (dt.demo_tokenizer_path(tmp_path, _VOCAB, max_text_bytes=_TEXT_BYTES).read_bytes()
            == dt.demo_tokenizer_path(cache, _VOCAB, max_text_bytes=_TEXT_BYTES).read_bytes())
    assert other.to_str() == tok.to_str()
    smaller = dt.build_demo_tokenizer(tmp_path, 300, max_text_bytes=_TEXT_BYTES)
    assert smaller.get_vocab_size() == 300
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2
    # Different text budgets and vocab sizes never share a cache file; the default budget
    # leaves the name unsuffixed.
    paths = {dt.demo_tokenizer_path(tmp_path, v, max_text_bytes=b)
             for v in (300, 512) for b in (_TEXT_BYTES, dt.DEFAULT_TEXT_BYTES)}
    assert len(paths) == 4
    assert dt.demo_tokenizer_path(tmp_path).name == f"demo_bpe_{dt.VERSION}_v8192.json"


def test_corrupt_cache_is_rebuilt(built, tmp_path):
    _, tok, _ = built
    path = dt.demo_tokenizer_path(tmp_path, _VOCAB, max_text_bytes=_TEXT_BYTES)
    path.parent.mkdir(parents=True)
    path.write_text('{"version": "1.0", "trunc')
    rebuilt = dt.build_demo_tokenizer(tmp_path, _VOCAB, max_text_bytes=_TEXT_BYTES)
    assert rebuilt.to_str() == tok.to_str()
    assert path.read_text() == tok.to_str()


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTSERVE_CACHE", str(tmp_path))
    assert dt.default_cache_dir() == tmp_path
    assert dt.demo_tokenizer_path().parent == tmp_path / "tokenizers"
    monkeypatch.delenv("DISTSERVE_CACHE")
    assert dt.default_cache_dir().parts[-2:] == (".cache", "distserve_jax")


def test_sharegpt_texts_are_bounded():
    texts = list(dt.sharegpt_texts(64 * 1024))
    assert texts and all(isinstance(t, str) and t for t in texts)
    assert sum(len(t.encode()) for t in texts) < 64 * 1024


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 100}, "vocab_size"),
    ({"vocab_size": 10**6}, "vocab_size"),
    ({"vocab_size": 512.0}, "vocab_size"),
    ({"vocab_size": 512, "max_text_bytes": 10}, "max_text_bytes"),
])
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dt.build_demo_tokenizer(tmp_path, **kwargs)
    assert not (tmp_path / "tokenizers").exists()
