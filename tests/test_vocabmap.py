"""Vocabulary mapping: exact, mined (MinED) against a brute-force reference, retokenize."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmfuse.config import CorpusConfig, FuseConfig, ModelSpec, VocabMapConfig
from lmfuse.errors import LmfuseError
from lmfuse.models import load_tokenizer
from lmfuse.pipeline import run_vocab_map
from lmfuse.testing import build_tokenizer, make_tiny_model, write_tiny_corpus
from lmfuse.tokentext import token_table
from lmfuse.vocabmap import (
    EXACT,
    MINED,
    RETOKENIZE,
    SPECIAL_HOW,
    UNMAPPED,
    candidate_order,
    load_vocab_map,
    map_vocab,
    min_edit_distance,
)
from naive import brute_min_ed, lev


@pytest.fixture(scope="module")
def toks():
    return {k: build_tokenizer(k) for k in ("bpe", "spm", "wordpiece")}


@given(st.lists(st.text("abc ", min_size=1, max_size=6), min_size=1, max_size=12),
       st.lists(st.text("abcd ", min_size=1, max_size=7), min_size=1, max_size=25))
@settings(max_examples=150, deadline=None)
def test_min_edit_distance_equals_brute_force(queries, choices):
    idx, dist = min_edit_distance(queries, choices, workers=1, max_cells=7)  # tiny chunks too
    ref = brute_min_ed(queries, choices)
    assert idx.tolist() == ref.tolist()
    assert dist.tolist() == [lev(q, choices[i]) for q, i in zip(queries, ref, strict=True)]


@pytest.mark.parametrize("kind", ["bpe", "spm", "wordpiece"])
@pytest.mark.parametrize("method", ["exact", "mined", "retokenize"])
def test_identical_tokenizers_give_the_identity(toks, kind, method):
    tok = toks[kind]
    tgt_id, how = map_vocab(tok, tok, method, workers=1)
    assert tgt_id.tolist() == list(range(len(tok)))
    assert set(how.tolist()) <= {EXACT, SPECIAL_HOW}


def test_mined_matches_brute_force_on_real_vocabularies(toks):
    src, tgt = toks["wordpiece"], toks["spm"]
    tgt_id, how = map_vocab(src, tgt, "mined", workers=1)
    S, T = token_table(src), token_table(tgt)
    cands = candidate_order(T)
    mined = np.flatnonzero(how == MINED)
    assert len(mined) > 50
    ref = brute_min_ed([S.texts[i] for i in mined], [T.texts[j] for j in cands])
    assert tgt_id[mined].tolist() == cands[ref].tolist()
    # Everything not special maps with `mined`.
    assert not np.any((how == UNMAPPED) & (S.kind != 1) & np.array([bool(b) for b in S.bytes]))


def test_exact_maps_same_bytes_across_families(toks):
    src, tgt = toks["bpe"], toks["spm"]
    tgt_id, how = map_vocab(src, tgt, "exact", workers=1)
    S, T = token_table(src), token_table(tgt)
    for i in np.flatnonzero(how == EXACT):
        assert S.bytes[i] == T.bytes[tgt_id[i]]
    # " the"-like tokens: Ġx in byte-level BPE == ▁x in SentencePiece.
    gi = next(i for i, b in enumerate(S.bytes) if b.startswith(b" ") and len(b) > 3 and how[i] == EXACT)
    assert tgt.convert_ids_to_tokens(int(tgt_id[gi])).startswith("▁")
    # Stray UTF-8 bytes of the byte-level source map to SentencePiece byte-fallback tokens.
    b = "🙂".encode()[:1]
    i = S.bytes.index(b)
    assert how[i] == EXACT and T.bytes[tgt_id[i]] == b


def test_specials_map_by_role(toks):
    tgt_id, how = map_vocab(toks["spm"], toks["wordpiece"], "exact", workers=1)
    eos = toks["spm"].eos_token_id
    assert how[eos] == SPECIAL_HOW and tgt_id[eos] == toks["wordpiece"].eos_token_id


def test_retokenize_uses_mid_text_encoding(toks):
    src, tgt = toks["bpe"], toks["spm"]
    tgt_id, how = map_vocab(src, tgt, "retokenize", workers=1)
    S, T = token_table(src), token_table(tgt)
    retok = np.flatnonzero(how == RETOKENIZE)
    assert len(retok)
    for i in retok:
        tb, sb = T.bytes[tgt_id[i]], S.bytes[i]
        # The first target token starts the source token's text (no dummy-prefix space).
        assert sb.startswith(tb), (sb, tb)


# -- the stage ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: str(make_tiny_model(root / k, k)) for k in ("bpe", "spm", "wordpiece")}


def _cfg(tmp_path, model_dirs, src_kind, method="mined"):
    corpus = write_tiny_corpus(tmp_path / "corpus.jsonl")
    return FuseConfig(output_dir=str(tmp_path / "run"), target=ModelSpec(name="tgt", path=model_dirs["bpe"]),
                      sources=[ModelSpec(name="src", path=model_dirs[src_kind])], corpus=CorpusConfig(path=str(corpus)),
                      vocab_map=VocabMapConfig(method=method, workers=1))


def test_run_vocab_map_writes_and_loads(tmp_path, model_dirs):
    cfg = _cfg(tmp_path, model_dirs, "spm")
    logs = []
    m = run_vocab_map(cfg, "src", log=logs.append)
    assert (tmp_path / "run" / "vocab_map" / "src" / "map.npz").exists()
    assert abs(sum(m["coverage"].values()) - 1) < 1e-4 and m["coverage"]["mined"] > 0
    assert logs and "vocab-map src" in logs[0]
    tgt_id, how, _ = load_vocab_map(cfg, "src")
    ref_id, ref_how = map_vocab(load_tokenizer(cfg.sources[0]), load_tokenizer(cfg.target), "mined", 1)
    assert np.array_equal(tgt_id, ref_id) and np.array_equal(how, ref_how)
    # A second run is a no-op (complete artifact).
    assert run_vocab_map(cfg, "src", log=logs.append)["created"] == m["created"]


def test_vocab_map_for_other_tokenizers_is_refused(tmp_path, model_dirs):
    cfg = _cfg(tmp_path, model_dirs, "spm")
    run_vocab_map(cfg, "src", log=lambda *_: None)
    other = _cfg(tmp_path, model_dirs, "wordpiece")  # same directory, another source tokenizer
    with pytest.raises(LmfuseError, match="another source tokenizer"):
        load_vocab_map(other, "src")
    with pytest.raises(LmfuseError, match="different config"):
        run_vocab_map(other, "src")


def test_unknown_method_is_a_clear_error(toks):
    with pytest.raises(LmfuseError, match="unknown vocab-map method"):
        map_vocab(toks["bpe"], toks["spm"], "nearest")
