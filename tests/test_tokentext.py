"""Token bytes derived from each tokenizer's own decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmfuse.testing import build_tokenizer
from lmfuse.tokentext import BYTE, SPECIAL, token_bytes, token_table, token_texts
from texts import HARD_TEXTS

TEXTS = HARD_TEXTS


@pytest.fixture(scope="module")
def toks():
    return {k: build_tokenizer(k) for k in ("bpe", "spm", "wordpiece")}


def _concat(tok, text):
    b = token_bytes(tok)
    return b"".join(b[i] for i in tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_concatenates_to_the_text(toks, text):
    assert _concat(toks["bpe"], text) == text.encode()


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_concatenates_to_the_text_after_the_dummy_prefix(toks, text):
    # The tokenizer prepends "▁" to every string: that is a space the text does not hold.
    assert _concat(toks["spm"], text) == b" " + text.encode()


@given(st.text(alphabet=st.sampled_from(list("ab c\n\t1🙂日本Ωé")), max_size=30))
@settings(max_examples=60, deadline=None)
def test_concatenation_property(text):
    bpe, spm = build_tokenizer_cached("bpe"), build_tokenizer_cached("spm")
    assert _concat(bpe, text) == text.encode()
    assert _concat(spm, text) == (b" " + text.encode() if text else b"")


_CACHE = {}


def build_tokenizer_cached(kind):
    if kind not in _CACHE:
        _CACHE[kind] = build_tokenizer(kind)
    return _CACHE[kind]


def test_partial_utf8_tokens_keep_their_bytes(toks):
    tok = toks["bpe"]
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    pieces = [token_bytes(tok)[i] for i in ids]
    assert len(pieces) > 1 and b"".join(pieces) == "🙂".encode()
    # Texts are one-to-one with bytes: stray bytes become distinct surrogate escapes.
    texts = [token_texts(tok)[i] for i in ids]
    assert all(t.encode("utf-8", "surrogateescape") == p for t, p in zip(texts, pieces, strict=True))


def test_byte_fallback_tokens_are_single_bytes(toks):
    tok = toks["spm"]
    table = token_table(tok)
    i = tok.convert_tokens_to_ids("<0x0A>")
    assert table.bytes[i] == b"\n" and table.kind[i] == BYTE
    ids = tok("Ω", add_special_tokens=False)["input_ids"]
    assert b"".join(table.bytes[i] for i in ids) == " Ω".encode()


def test_sentencepiece_space_marker(toks):
    tok = toks["spm"]
    word = next(t for t in tok.get_vocab() if t.startswith("▁") and t[1:].isalpha() and len(t) > 3)
    assert token_bytes(tok)[tok.convert_tokens_to_ids(word)] == b" " + word[1:].encode()


def test_wordpiece_continuations_and_word_starts(toks):
    tok = toks["wordpiece"]
    vocab = tok.get_vocab()
    cont = next(t for t in vocab if t.startswith("##") and len(t) > 3)
    word = next(t for t in vocab if t.isalpha() and len(t) > 3)
    assert token_bytes(tok)[vocab[cont]] == cont[2:].encode()
    # Decision: a word token implies the space before it, as it has in running text.
    assert token_bytes(tok)[vocab[word]] == b" " + word.encode()


@pytest.mark.parametrize("kind", ["bpe", "spm", "wordpiece"])
def test_special_tokens_are_empty_and_flagged(toks, kind):
    tok = toks[kind]
    table = token_table(tok)
    for i in tok.all_special_ids:
        assert table.bytes[i] == b"" and table.kind[i] == SPECIAL
    assert len(table) == len(tok)


def test_cached_per_vocabulary(toks):
    a = token_table(toks["bpe"])
    assert token_table(build_tokenizer("bpe")) is a
    assert token_table(toks["spm"]).fingerprint != a.fingerprint


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_tokenizers_concatenate_to_the_text(name):
    from transformers import AutoTokenizer

    from lmfuse.models import pull

    tok = AutoTokenizer.from_pretrained(str(pull(name)))
    for text in TEXTS:
        assert _concat(tok, text) == text.encode()
