"""Hostile input (issue 9): corpus readers, the config loader, block cutting and alignment on
arbitrary Unicode (combining marks, RTL, ZWJ emoji, NUL, lone surrogates, CRLF, line and paragraph
separators, huge single-line and empty documents) and arbitrary bytes.

The properties: a reader gives the documents exactly or a clear `LmfuseError`, never a raw
exception; the config loader gives a config or an `LmfuseError`; blocks join back to their
document and fit every tokenizer; aligned positions end at the same text offset in both
tokenizations and the aligned distributions are finite with mass at most 1. Derandomized, so CI
sees the same examples every run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmfuse.errors import LmfuseError

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Pieces of text that have broken text pipelines elsewhere.
HOSTILE = [
    "a", "Hello", " ", "  ", "\n", "\n\n", "\r\n", "\r", "\t", "\x00", "\x0b", "\x0c", "\x1c", "\x85",
    "\u2028", "\u2029", "\ufeff", "\u200b", "\u200d", "\u200e", "\u200f", "\u202e",
    "e\u0301", "\u0301", "a\u0308\u0304", "\u0915\u094d\u0937",  # combining marks, a Devanagari conjunct
    "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",  # Hebrew, Arabic (RTL)
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308", "\U0001f44d\U0001f3fd",
    "日本語", "Ω", "\U0010ffff", "\ufffd", "<|endoftext|>", "<s>", "[UNK]", "##", "▁", "Ġ",
]
SURROGATES = ["\ud800", "\udfff", "\udc80"]

pieces = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=4).filter(lambda t: not _has_surrogate(t)),
                  max_size=12).map("".join)
pieces_or_surrogates = st.lists(st.sampled_from(HOSTILE + SURROGATES), max_size=10).map("".join)


def _has_surrogate(t: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in t)


# -- corpus readers -----------------------------------------------------------------------------
def _read(path: Path, **kw):
    from lmfuse.prepare import read_corpus

    try:
        return read_corpus(path, **kw)
    except LmfuseError as e:
        assert str(e), "an error with no message"
        return e


domains = st.sampled_from(["", "code", "Ω", "a/b", None, 3, "\u202e"])


@given(docs=st.lists(st.tuples(pieces | pieces_or_surrogates, domains), max_size=5), ascii_only=st.booleans(),
       crlf=st.booleans())
@SETTINGS
def test_jsonl_reader_gives_the_documents_or_a_clear_error(docs, ascii_only, crlf):
    lines = [json.dumps({"text": t, "domain": d}, ensure_ascii=ascii_only) for t, d in docs]
    blob = ("\r\n" if crlf else "\n").join(lines).encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_bytes(blob)
        got = _read(path)
    if any(_has_surrogate(t) for t, _ in docs) or not any(t.strip() for t, _ in docs):
        # A lone surrogate is not text (escaped as \ud800 it is valid JSON, raw it is not UTF-8).
        assert isinstance(got, LmfuseError), got
        return
    assert not isinstance(got, LmfuseError), got
    assert [d["text"] for d in got] == [t for t, _ in docs if t.strip()]
    assert all(isinstance(d["domain"], str) and d["domain"] for d in got)


@given(texts=st.lists(pieces, min_size=1, max_size=4), nested=st.booleans())
@SETTINGS
def test_txt_folder_reader_gives_the_documents_with_newlines_normalised(texts, nested):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        for i, t in enumerate(texts):
            f = root / ("dom" if nested else "") / f"doc{i}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(t.encode("utf-8"))
        got = _read(root)
    want = [t.replace("\r\n", "\n").replace("\r", "\n") for t in texts]  # universal newlines
    if not any(t.strip() for t in want):
        assert isinstance(got, LmfuseError)
        return
    assert not isinstance(got, LmfuseError), got
    assert [d["text"] for d in got] == [t for t in want if t.strip()]


@given(rows=st.lists(st.tuples(st.none() | pieces, domains), max_size=5))
@SETTINGS
def test_parquet_reader_gives_the_documents_or_a_clear_error(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array([t for t, _ in rows], pa.string()),
                      "domain": pa.array([None if d is None else str(d) for _, d in rows], pa.string())})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.parquet"
        pq.write_table(table, path)
        got = _read(path)
    if any(t is None for t, _ in rows) or not any(t.strip() for t, _ in rows):
        assert isinstance(got, LmfuseError), got  # a null text: said with its row
        return
    assert [d["text"] for d in got] == [t for t, _ in rows if t.strip()]


@given(blob=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".txt", ".parquet", ".json"]))
@SETTINGS
def test_arbitrary_bytes_are_read_or_refused_clearly(blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus{suffix}"
        path.write_bytes(blob)
        got = _read(path)
    if not isinstance(got, LmfuseError):
        assert all(isinstance(d["text"], str) and d["text"].strip() for d in got)
        for d in got:
            d["text"].encode("utf-8")  # valid Unicode text, no lone surrogate


def test_a_raw_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw inside strings (`ensure_ascii=False` writes
    them so); `str.splitlines` cut such a record in two and called valid JSONL invalid."""
    path = tmp_path / "c.jsonl"
    docs = ["one\u2028two", "three\u2029four", "five\x85six"]
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs), encoding="utf-8")
    from lmfuse.prepare import read_corpus

    assert [d["text"] for d in read_corpus(path)] == docs


def test_a_lone_surrogate_is_refused_with_its_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    from lmfuse.prepare import read_corpus

    with pytest.raises(LmfuseError, match="lone surrogate") as e:
        read_corpus(path)
    assert "line 2" in str(e.value)


# -- the config loader ------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(["~", "~/x", "a\x00b", "hub:", "pull:", "../..", "/", ".", "*", "-1", "1e999"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8) | st.integers(),
                                                                                   c, max_size=3), max_leaves=8)
FIELDS = ["output_dir", "target", "target.name", "target.path", "target.dtype", "sources", "sources.0",
          "corpus", "corpus.path", "corpus.text_field", "prepare", "prepare.block_size", "prepare.validation_fraction",
          "extract.top_k", "extract.distribution", "vocab_map.method", "align.method", "align.token_rule",
          "train.fusion", "train.clm_weight", "train.max_steps", "train.precision", "eval.split",
          "baselines.merge", "baselines.ensemble", "unknown_section", "train.unknown_option"]


def _load(path: Path):
    from lmfuse.config import load_config, validate_config

    try:
        problems = validate_config(path)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    except LmfuseError:
        pass
    try:
        return load_config(path)
    except LmfuseError as e:
        return e


@pytest.fixture(scope="module")
def base_config(tmp_path_factory, tiny_models):
    from lmfuse.testing import write_tiny_corpus

    root = tmp_path_factory.mktemp("hostile_config")
    corpus = write_tiny_corpus(root / "corpus.jsonl")
    return root, {"output_dir": str(root / "run"),
                  "target": {"name": "tgt", "path": str(tiny_models["bpe"])},
                  "sources": [{"name": "src", "path": str(tiny_models["spm"])}],
                  "corpus": {"path": str(corpus)}}


def _set(data: dict, key: str, value) -> dict:
    node = data
    *parents, last = key.split(".")
    for p in parents:
        nxt = node[int(p)] if isinstance(node, list) else node.get(p)
        if not isinstance(nxt, dict | list):
            nxt = {}
            node[p] = nxt
        node = nxt
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@given(overrides=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=4))
@SETTINGS
def test_config_fields_with_any_value_give_a_config_or_a_clear_error(base_config, overrides):
    root, base = base_config
    data = json.loads(json.dumps(base))
    for k, v in overrides.items():
        _set(data, k, v)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    _load(path)  # raises anything but LmfuseError: the test fails


@given(doc=values)
@SETTINGS
def test_any_yaml_document_gives_a_config_or_a_clear_error(doc):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        got = _load(path)
    assert isinstance(got, LmfuseError)  # nothing here names a model and a corpus that exist


@given(text=st.text(max_size=80).filter(lambda t: not _has_surrogate(t)))
@SETTINGS
def test_any_text_file_gives_a_clear_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_bytes(text.encode("utf-8"))
        assert isinstance(_load(path), LmfuseError)


@pytest.mark.parametrize("blob", [b"\x80", b"output_dir: \xff\xfe", "target: \ud800".encode("utf-8", "surrogatepass")])
def test_a_config_file_that_is_not_utf8_gives_a_clear_error(tmp_path, blob):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(blob)
    err = _load(path)
    assert isinstance(err, LmfuseError) and "not UTF-8" in err.what and err.where == str(path) and err.fix


@pytest.mark.parametrize("field", ["corpus.path", "target.path", "output_dir"])
def test_a_path_under_an_unknown_users_home_gives_a_clear_error(base_config, field):
    root, base = base_config
    path = root / "home.yaml"
    path.write_text(yaml.safe_dump(_set(json.loads(json.dumps(base)), field, "~nobody_here/x")))
    err = _load(path)
    assert isinstance(err, LmfuseError) and f"{field}: '~nobody_here/x': cannot expand" in err.what, err


@pytest.mark.parametrize("name", ["run\x00dir", "run\ud800dir"])
def test_an_output_dir_no_file_system_can_hold_is_a_clear_error(tmp_path, name):
    from lmfuse.lock import run_lock

    with pytest.raises(LmfuseError, match="not a valid path"), run_lock(str(tmp_path / name)):
        pass


# -- prepare: blocks round-trip and fit ---------------------------------------------------------
_TOKS: dict = {}


def _tok(kind: str):
    from lmfuse.testing import build_tokenizer

    if kind not in _TOKS:
        _TOKS[kind] = build_tokenizer(kind)
    return _TOKS[kind]


@given(text=pieces.filter(lambda t: t.strip()), block_size=st.integers(8, 40))
@SETTINGS
def test_blocks_join_back_to_the_document_and_fit_every_tokenizer(text, block_size):
    from lmfuse.prepare import count_tokens, split_document

    toks = [_tok(k) for k in ("bpe", "spm", "wordpiece")]
    blocks = split_document(text, toks, block_size)
    assert "".join(blocks) == text
    assert (count_tokens(toks, blocks) <= block_size).all() if blocks else True


def test_a_huge_single_line_document_is_cut_into_blocks_that_join_back():
    from lmfuse.prepare import count_tokens, split_document

    toks = [_tok(k) for k in ("bpe", "spm")]
    text = ("x\u0301日本🙂" * 2500) + "".join(HOSTILE)  # no whitespace for 10k characters
    blocks = split_document(text, toks, 64)
    assert "".join(blocks) == text and len(blocks) > 10
    assert (count_tokens(toks, blocks) <= 64).all()


def test_prepare_stores_hostile_documents_whole(tmp_path, tiny_models):
    """End to end: every non-blank character of every document is in its blocks, in order, and
    the stored text is what was cut (NUL, CRLF, RTL, ZWJ, a 6k-character line, empty documents)."""
    import re

    from lmfuse.config import load_config
    from lmfuse.pipeline import run_prepare
    from lmfuse.prepare import load_blocks

    docs = ["".join(HOSTILE), "line one\r\nline two\r\n\r\nthird\x00end", "", "   \n\t ",
            "\u05e9\u05dc\u05d5\u05dd \U0001f468\u200d\U0001f469\u200d\U0001f467 e\u0301" * 40,
            "y\u0301" * 3000, "\u2028\u2029\x85 separators \u2028 inside"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t, "domain": f"d{i % 2}"}, ensure_ascii=False)
                                for i, t in enumerate(docs)), encoding="utf-8")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "corpus": {"path": str(corpus)},
        "target": {"name": "tgt", "path": str(tiny_models["bpe"])},
        "sources": [{"name": "s1", "path": str(tiny_models["spm"])}, {"name": "s2", "path": str(tiny_models["wordpiece"])}],
        "prepare": {"block_size": 32, "min_block_chars": 1, "min_validation_blocks": 0}}))
    cfg = load_config(cfg_path)
    run_prepare(cfg, log=lambda *a: None)
    blocks = load_blocks(cfg)
    kept = [t for t in docs if t.strip()]
    for doc_id, text in enumerate(kept):
        mine = [b["text"] for b in blocks if b["doc_id"] == doc_id]
        assert mine and re.sub(r"\s", "", "".join(mine)) == re.sub(r"\s", "", text), doc_id
        pos = 0
        for b in mine:  # each block is the document's text from where the last one ended
            pos = text.index(b, pos) + len(b)


# -- alignment ----------------------------------------------------------------------------------
def _blocks(kind: str, text: str):
    from lmfuse.align import BlockTokens
    from lmfuse.extract import encode_blocks

    e = encode_blocks(_tok(kind), [text])[0]
    return BlockTokens(np.array(e["input_ids"]), np.array(e["offset_start"]), np.array(e["offset_end"]))


def _context(src: str, tgt: str, rule: str):
    from lmfuse.align import AlignContext, flat_bytes
    from lmfuse.tokentext import token_table

    key = ("ctx", src, tgt, rule)
    if key not in _TOKS:
        s, t = token_table(_tok(src)), token_table(_tok(tgt))
        _TOKS[key] = AlignContext(None, None, 64, rule, flat_bytes(s.bytes), flat_bytes(t.bytes),
                                  np.array([len(b) == 0 for b in s.bytes], dtype=bool))
    return _TOKS[key]


def _vocab_map(src: str, tgt: str):
    from lmfuse.vocabmap import map_vocab

    key = ("map", src, tgt)
    if key not in _TOKS:
        _TOKS[key] = map_vocab(_tok(src), _tok(tgt), "retokenize", workers=1)
    return _TOKS[key]


@given(text=pieces.filter(lambda t: t.strip()), src=st.sampled_from(["spm", "wordpiece"]),
       rule=st.sampled_from(["map", "consistent"]), seed=st.integers(0, 2**16))
@SETTINGS
def test_alignment_invariants_hold_on_any_text(text, src, rule, seed):
    from lmfuse.align import align_block, boundary_ends, char_byte_offsets

    tgt_b, src_b = _blocks("bpe", text), _blocks(src, text)
    T, S = len(tgt_b.ids), len(src_b.ids)
    assume(T >= 1 and S >= 1)
    tgt_id, how = _vocab_map(src, "bpe")
    V = len(tgt_id)
    rng = np.random.default_rng(seed)
    k = 4
    logits = rng.normal(size=(S, V)) * 3  # a real distribution per source position
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.sort(np.argsort(-lp, axis=1)[:, :k], axis=1)
    top_lp = np.take_along_axis(lp, top, axis=1).astype(np.float16)
    ce = rng.uniform(0, 5, size=max(S - 1, 0)).astype(np.float32)
    out = align_block("offsets", tgt_b, src_b, top, top_lp, ce, tgt_id, _context(src, "bpe", rule),
                      exact=how == 1, text=text)

    idx = out["src_index"]
    byte_at = char_byte_offsets(text)
    te, se = boundary_ends(tgt_b.start, tgt_b.end), boundary_ends(src_b.start, src_b.end)
    pairs = [(i, int(j)) for i, j in enumerate(idx) if j >= 0]
    for i, j in pairs:  # aligned positions end at the same real boundary, so the same bytes precede them
        assert te[i] >= 0 and te[i] == se[j] and byte_at[te[i]] == byte_at[se[j]]
    assert [j for _, j in pairs] == sorted({j for _, j in pairs})  # monotone, one-to-one
    assert (out["aligned"] == (idx >= 0)).all()

    ids, lps = out["topk_ids"], out["topk_logprobs"].astype(np.float64)
    n_tgt_vocab = len(_tok("bpe"))
    real = ids >= 0
    assert (ids[real] < n_tgt_vocab).all()
    assert np.isfinite(lps[real]).all() and not np.isnan(lps).any()
    assert (np.exp(np.where(real, lps, -np.inf)).sum(-1) <= 1 + 1e-2).all()  # float16 storage
    assert not real[idx < 0].any()  # unaligned rows are empty
    scored = (idx[:-1] >= 0) & (idx[:-1] < S - 1)  # the source's last token has no CE of its own
    assert np.isfinite(out["token_ce"][scored]).all()
