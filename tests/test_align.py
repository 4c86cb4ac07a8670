"""Alignment: offsets and DTW (against the paper's naive DTW), top-k mapping, the align stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmfuse import extract
from lmfuse.align import (
    DROPPED_PREFIX,
    AlignContext,
    BlockTokens,
    TextContext,
    align_block,
    align_dtw,
    align_offsets,
    boundary_ends,
    char_byte_offsets,
    check_extractions,
    flat_bytes,
    map_topk,
    sequence_quality,
    span_exact,
    span_nll,
    unknown_tokens,
)
from lmfuse.artifacts import read_manifest
from lmfuse.config import (
    AlignConfig,
    CorpusConfig,
    ExtractConfig,
    FuseConfig,
    ModelSpec,
    VocabMapConfig,
)
from lmfuse.errors import LmfuseError
from lmfuse.models import load_tokenizer, tokenizer_fingerprint
from lmfuse.pipeline import artifact, run_align, run_vocab_map
from lmfuse.testing import build_tokenizer, make_tiny_model, write_tiny_corpus
from lmfuse.tokentext import token_table
from naive import naive_dtw  # noqa: E402
from texts import HARD_TEXTS  # noqa: E402

TEXTS = HARD_TEXTS


tokens = st.lists(st.text("ab ", max_size=3), min_size=1, max_size=14)


@given(tokens, tokens)
@settings(max_examples=200, deadline=None)
def test_dtw_equals_the_naive_reference(tgt, src):
    ref = naive_dtw(tgt, src)
    assert align_dtw(tgt, src, band=0).tolist() == ref.tolist()
    assert align_dtw(tgt, src, band=max(len(tgt), len(src))).tolist() == ref.tolist()


@given(tokens, tokens, st.integers(1, 4))
@settings(max_examples=100, deadline=None)
def test_banded_dtw_is_a_valid_alignment(tgt, src, band):
    out = align_dtw(tgt, src, band=band)
    assert out.shape == (len(tgt),)
    hit = out[out >= 0]
    assert np.all(np.diff(hit) >= 0) and np.all(hit < len(src))


# -- offsets ----------------------------------------------------------------------------------------
def test_worked_example_from_the_design():
    # Target: Hello (0,5) Ġworld (5,11); source: ▁Hello (0,5) ▁wor (5,9) ld (9,11).
    tgt = align_offsets(boundary_ends([0, 5], [5, 11]), boundary_ends([0, 5, 9], [5, 9, 11]))
    assert tgt.tolist() == [0, 2]


def test_multi_byte_splits_align_only_at_the_character_end():
    # Byte-level: an emoji in three tokens sharing (1,2), then "x" (2,3).
    ends = boundary_ends([0, 1, 1, 1, 2], [1, 2, 2, 2, 3])
    assert ends.tolist() == [1, -1, -1, 2, 3]
    src = boundary_ends([0, 1, 2], [1, 2, 3])
    assert align_offsets(ends, src).tolist() == [0, -1, -1, 1, 2]


def test_bos_aligns_with_bos_only():
    with_bos = boundary_ends([0, 0, 5], [0, 5, 11])
    without = boundary_ends([0, 5], [5, 11])
    assert align_offsets(with_bos, with_bos).tolist() == [0, 1, 2]
    assert align_offsets(with_bos, without).tolist() == [-1, 0, 1]
    assert align_offsets(without, with_bos).tolist() == [1, 2]


@pytest.fixture(scope="module")
def toks():
    return {k: build_tokenizer(k) for k in ("bpe", "spm", "wordpiece")}


def _block(tok, text):
    e = extract.encode_blocks(tok, [text])[0]
    return BlockTokens(np.array(e["input_ids"]), np.array(e["offset_start"]), np.array(e["offset_end"]))


def _prefix_bytes(tok, blk, upto):
    b = token_table(tok).bytes
    return b"".join(b[i] for i in blk.ids[: upto + 1])


def _check_pair(toks, tkind, skind, text):
    """Aligned positions are followed by the same text; the tokens really end there."""
    tt, ts = toks[tkind], toks[skind]
    tb, sb = _block(tt, text), _block(ts, text)
    idx = align_offsets(boundary_ends(tb.start, tb.end), boundary_ends(sb.start, sb.end))
    for i, j in enumerate(idx):
        if j < 0:
            continue
        e = tb.end[i]
        assert sb.end[j] == e
        for kind, tok, blk, p in ((tkind, tt, tb, i), (skind, ts, sb, j)):
            if kind != "wordpiece":  # WordPiece drops whitespace; its bytes are not the text
                got = _prefix_bytes(tok, blk, p)
                want = text[:e].encode()
                assert got in (want, b" " + want), (kind, got, want)
    return idx


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("pair", [("bpe", "spm"), ("spm", "bpe"), ("bpe", "wordpiece"), ("wordpiece", "spm")])
def test_offsets_on_real_tokenizers(toks, pair, text):
    idx = _check_pair(toks, *pair, text)
    assert (idx >= 0).any() and idx[-1] >= 0  # the block's end always aligns


@given(st.text(alphabet=st.sampled_from(list("ab c\n\t19🙂日本Ωé")), min_size=1, max_size=40))
@settings(max_examples=80, deadline=None)
def test_offsets_property_bpe_vs_spm(text):
    toks = {k: _tok(k) for k in ("bpe", "spm")}
    _check_pair(toks, "bpe", "spm", text)
    _check_pair(toks, "spm", "bpe", text)


_TOKS: dict = {}


def _tok(kind):
    if kind not in _TOKS:
        _TOKS[kind] = build_tokenizer(kind)
    return _TOKS[kind]


@pytest.mark.parametrize("kind", ["bpe", "spm", "wordpiece"])
def test_identical_tokenizers_align_everything(toks, kind):
    tok = toks[kind]
    text = " ".join(TEXTS)
    b = _block(tok, text)
    T = len(b.ids)
    assert align_offsets(boundary_ends(b.start, b.end), boundary_ends(b.start, b.end))[
        boundary_ends(b.start, b.end) >= 0].tolist() == np.flatnonzero(boundary_ends(b.start, b.end) >= 0).tolist()
    texts = [token_table(tok).texts[i] for i in b.ids]
    assert align_dtw(texts, texts, band=8).tolist() == list(range(T))


def test_bos_in_one_tokenizer_only(toks):
    text = "Hello world"
    tb, sb = _block(toks["bpe"], text), _block(toks["spm"], text)  # spm adds <s>
    assert sb.end[0] == 0 and tb.end[0] > 0
    idx = align_offsets(boundary_ends(tb.start, tb.end), boundary_ends(sb.start, sb.end))
    assert 0 not in idx.tolist()  # nothing in the target ends where the source's BOS does
    back = align_offsets(boundary_ends(sb.start, sb.end), boundary_ends(tb.start, tb.end))
    assert back[0] == -1


# -- top-k mapping and per-position quality ---------------------------------------------------------
def test_map_topk_merges_drops_and_pads():
    vmap = np.array([10, 11, 10, -1, 12], dtype=np.int32)
    ids = np.array([[0, 2, 3, 1], [4, 3, 0, -1]], dtype=np.int32)
    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.1, 1.0]])).astype(np.float16)
    lp[1, 3] = -np.inf
    out_ids, out_lp, _ = map_topk(ids, lp, np.array([0, -1, 1]), vmap)
    assert out_ids.dtype == np.int32 and out_lp.dtype == np.float16
    assert out_ids.tolist() == [[10, 11, -1, -1], [-1, -1, -1, -1], [12, 10, -1, -1]]
    p = np.exp(out_lp.astype(np.float64))
    assert np.allclose(p[0, :2], [0.7, 0.1], atol=2e-3) and np.allclose(p[2, :2], [0.5, 0.1], atol=2e-3)
    assert np.all(np.isneginf(out_lp[1])) and np.all(np.isneginf(out_lp[0, 2:]))


def test_span_nll_sums_the_source_tokens_of_each_target_token():
    # Target ends 5, 11; source ends 5, 9, 11 with CE of tokens 1 and 2 = 0.5, 0.25.
    out = span_nll(np.array([5, 11]), np.array([5, 9, 11]), np.array([0.5, 0.25]))
    assert out.tolist() == [0.75]
    # Target BOS (end 0): its span holds the source's unscored first token -> NaN.
    out = span_nll(np.array([0, 5, 11]), np.array([5, 9, 11]), np.array([0.5, 0.25]))
    assert np.isnan(out[0]) and out[1] == 0.75


# -- the token rule (docs/alignment.md, "Tokenizer-correct targets") --------------------------------
# Target vocabulary: bytes of each id; source vocabulary and its map into the target's.
TGT_VOCAB = [b"", b" Lic", b" Licensed", b" under", b" L", b" License", b"A"]
SRC_VOCAB = [b"", b" Lic", b" Licensed", b" Lichen", b" License", b" under", b" L", b" under the"]
SRC_TO_TGT = np.array([-1, 1, 2, 1, 5, 3, 4, 3], dtype=np.int32)  # " Lichen" -> " Lic", " under the" -> " under"


def _rule_case():
    """Text "A Licensed under": target tokens "A" | " Licensed" | " under" (ids 6, 2, 3).

    The source's distribution at target position 0 (after "A") and at position 1 (after "A Licensed").
    """
    text = "A Licensed under"
    tgt_ids = np.array([6, 2, 3])
    tgt_end = np.array([1, 10, 16])
    src_ids = np.array([[1, 2, 3, 4, 5, 6, 0, -1], [7, 5, 1, -1, -1, -1, -1, -1]])
    p = np.array([[0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.0], [0.5, 0.3, 0.1, 0, 0, 0, 0, 0]])
    lp = np.where(src_ids >= 0, np.log(np.where(p > 0, p, 1.0)), -np.inf)
    ctx = TextContext(*flat_bytes(SRC_VOCAB), *flat_bytes(TGT_VOCAB), np.frombuffer(text.encode(), np.uint8),
                      char_byte_offsets(text)[tgt_end], np.append(tgt_ids[1:], -1))
    return src_ids, lp, ctx


def _dense_row(ids, lps):
    return {int(i): round(float(np.exp(np.float64(v))), 3) for i, v in zip(ids, lps) if i >= 0}


def test_map_rule_puts_mass_on_tokens_the_target_would_not_write_and_counts_it():
    src_ids, lp, ctx = _rule_case()
    ids, lps, st = map_topk(src_ids, lp, np.array([0, 1, -1]), SRC_TO_TGT, "map", ctx)
    # " Lic" and " Lichen" both land on " Lic" (.5), a token the target never writes before "ensed".
    assert _dense_row(ids[0], lps[0]) == {1: 0.5, 2: 0.2, 5: 0.1, 3: 0.05, 4: 0.05}
    assert st[0, 0] == pytest.approx(0.95) and st[0, 1] == pytest.approx(0.9)  # [UNK] is unmapped
    # Not-target-token mass: " Lic" .5 + " License" .1 + " L" .05 (proper prefixes of " Licensed").
    assert st[0, 2] == pytest.approx(0.65)
    assert st[0, 3] == 0 and st[0, 4] == 0


def test_consistent_rule_each_branch():
    src_ids, lp, ctx = _rule_case()
    ids, lps, st = map_topk(src_ids, lp, np.array([0, 1, -1]), SRC_TO_TGT, "consistent", ctx)
    # Position 0, text after it " Licensed under", gold " Licensed" (id 2):
    #  " Lic", " License", " L": shorter and agree with the text -> gold;   .4 + .1 + .05 moved
    #  " Licensed": is the gold token -> gold;                              .2
    #  " Lichen": disagrees, maps to " Lic" (a prefix of the gold) -> dropped  .1
    #  " under": disagrees, maps to a token the target may write -> kept      .05
    #  [UNK]: dropped.
    assert _dense_row(ids[0], lps[0]) == {2: 0.75, 3: 0.05}
    assert st[0, 3] == pytest.approx(0.55) and st[0, 4] == pytest.approx(0.1)
    # Position 1, text after it " under" (the block ends), gold " under" (id 3):
    #  " under the" runs past the block but agrees as far as it goes -> gold; " Lic" disagrees and is
    #  no prefix of " under" -> kept.
    assert _dense_row(ids[1], lps[1]) == {3: 0.8, 1: 0.1}
    # Unaligned position: padding.
    assert np.all(ids[2] == -1)


def test_consistent_rule_needs_the_text():
    src_ids, lp, _ = _rule_case()
    with pytest.raises(LmfuseError, match="consistent"):
        map_topk(src_ids, lp, np.array([0, 1, -1]), SRC_TO_TGT, "consistent", None)
    assert DROPPED_PREFIX == 2


def test_span_exact_needs_both_boundaries():
    # Target ends 1, 10, 16; source ends 1, 4, 10, 16: the spans (1, 10] and (10, 16] are both exact.
    assert span_exact(np.array([1, 10, 16]), np.array([1, 4, 10, 16])).tolist() == [1, 1]
    # Source ends 1, 12, 16: no source boundary at 10, so neither span is exact.
    assert span_exact(np.array([1, 10, 16]), np.array([1, 12, 16])).tolist() == [0, 0]


def test_unknown_tokens_are_neither_aligned_nor_scored():
    # Text "ab αβγ cd": source "ab" | [UNK] (" αβγ") | " cd"; target "ab" | " αβγ" | " cd".
    text = "ab αβγ cd"
    src = BlockTokens(np.array([5, 0, 6]), np.array([0, 2, 6]), np.array([2, 6, 9]))
    tgt = BlockTokens(np.array([1, 2, 3]), np.array([0, 2, 6]), np.array([2, 6, 9]))
    empty = np.array([True] + [False] * 7)  # source id 0 stands for no text: [UNK]
    unk = unknown_tokens(src, empty)
    assert unk.tolist() == [False, True, False]
    ce = np.array([0.7, 0.2], dtype=np.float32)  # NLL of [UNK] (token 1) and " cd" (token 2)
    res = align_block("offsets", tgt, src, np.zeros((3, 1), int), np.zeros((3, 1), np.float16), ce,
                      np.arange(8, dtype=np.int32), AlignContext(src_empty=empty))
    # Position 0 would predict the [UNK]: not aligned. Position 1 (after the [UNK]) predicts " cd".
    assert res["aligned"].tolist() == [0, 1, 1]
    assert np.isnan(res["span_nll"][0]) and res["span_nll"][1] == pytest.approx(0.2)
    assert res["span_exact"].tolist() == [0, 1]
    # Quality over the 10 bytes after "ab": the [UNK]'s 7 bytes (" αβγ") cost 8 bits each on top of
    # its NLL; without the charge the model that spells nothing would look best.
    assert sequence_quality(text, src.end, ce, unk) == (pytest.approx(0.9 + 7 * np.log(256)), 10)
    assert sequence_quality(text, src.end, ce, None) == (pytest.approx(0.9), 10)


# -- the stage --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: str(make_tiny_model(root / k, k)) for k in ("bpe", "spm")}


def _cfg(tmp_path, model_dirs, method="offsets", shard_size=3, k=4):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_tiny_corpus(corpus, docs_per_domain=2)
    return FuseConfig(output_dir=str(tmp_path / "run"), target=ModelSpec(name="tgt", path=model_dirs["bpe"]),
                      sources=[ModelSpec(name="src", path=model_dirs["spm"])], corpus=CorpusConfig(path=str(corpus)),
                      extract=ExtractConfig(top_k=k, shard_size=shard_size),
                      vocab_map=VocabMapConfig(method="mined", workers=1), align=AlignConfig(method=method, dtw_band=8))


def _blocks(cfg):
    with open(cfg.corpus.path) as f:
        rows = [json.loads(x) for x in f]
    return [r["domain"] for r in rows], [r["text"] for r in rows]


def _write_prepare(cfg, domains, texts):
    art = artifact(cfg, "prepare")
    art.begin()
    art.write_shard(0, pa.table({"block_id": pa.array(range(len(texts)), pa.int64()), "doc_id": list(range(len(texts))),
                                 "domain": domains, "split": ["train"] * len(texts), "text": texts}))
    art.finish(n_blocks=len(texts))


def _write_extract(cfg, name, texts, seed=0, block_ids=None):
    """A synthetic extraction in the format of ARCHITECTURE.md (random distributions)."""
    rng = np.random.default_rng(seed)
    tok = load_tokenizer(cfg.model(name))
    k, S = cfg.extract.top_k, cfg.extract.shard_size
    block_ids = list(range(len(texts))) if block_ids is None else block_ids
    art = artifact(cfg, f"extract/{name}")
    art.begin()
    encs = extract.encode_blocks(tok, texts)
    n_shards = -(-len(texts) // S)
    for s in range(n_shards):
        rows = range(s * S, min((s + 1) * S, len(texts)))
        cols = {c: [] for c in extract.SCHEMA.names}
        for r in rows:
            T = len(encs[r]["input_ids"])
            p = np.sort(rng.dirichlet(np.ones(k + 3), T)[:, :k], axis=1)[:, ::-1]
            ce = rng.random(T - 1).astype(np.float32)
            cols["block_id"].append(block_ids[r])
            for c in ("input_ids", "offset_start", "offset_end"):
                cols[c].append(encs[r][c])
            cols["dist_len"].append([k] * T)
            cols["dist_ids"].append(rng.integers(0, len(tok), T * k).tolist())
            cols["dist_logprobs"].append(np.log(p).astype(np.float16).reshape(-1).tolist())
            cols["token_ce"].append(ce.tolist())
            cols["seq_ce"].append(float(ce.mean()))
            cols["nll_sum"].append(float(ce.astype(np.float64).sum()))
            cols["scored_bytes"].append(len(texts[r][encs[r]["offset_end"][0]:].encode()))
        art.write_shard(s, pa.table(cols, schema=extract.SCHEMA))
    art.finish(top_k=k, shard_size=S, n_shards=n_shards, n_blocks=len(texts),
               tokenizer_fingerprint=tokenizer_fingerprint(tok))


def _setup(tmp_path, model_dirs, method="offsets", src_texts=None):
    cfg = _cfg(tmp_path, model_dirs, method)
    domains, texts = _blocks(cfg)
    _write_prepare(cfg, domains, texts)
    _write_extract(cfg, "tgt", texts, seed=1)
    _write_extract(cfg, "src", src_texts(texts) if src_texts else texts, seed=2)
    run_vocab_map(cfg, "src", log=lambda *_: None)
    return cfg, texts


@pytest.mark.parametrize("method", ["offsets", "dtw"])
def test_run_align_end_to_end(tmp_path, model_dirs, method):
    cfg, texts = _setup(tmp_path, model_dirs, method)
    logs = []
    m = run_align(cfg, "src", log=logs.append)
    assert 0.1 < m["aligned_fraction"] <= 1 and 0 < m["mapped_mass_fraction"] <= 1.0001
    assert 0 < m["exact_mass_fraction"] <= m["mapped_mass_fraction"] + 1e-9
    assert set(m["aligned_fraction_per_domain"]) == {"code", "legal", "prose"}
    assert any("aligned" in line for line in logs)
    art = artifact(cfg, "align/src")
    tgt_shards = artifact(cfg, "extract/tgt").shard_paths()
    assert [p.name for p in art.shard_paths()] == [p.name for p in tgt_shards]
    ds = art.load()
    tgt = artifact(cfg, "extract/tgt").load()
    assert ds["block_id"] == list(range(len(texts)))
    for r in range(len(texts)):
        T = len(tgt[r]["input_ids"])
        assert len(ds[r]["aligned"]) == T and len(ds[r]["topk_ids"]) == T * 4
        assert len(ds[r]["token_ce"]) == T - 1 and len(ds[r]["span_nll"]) == T - 1
        ids = np.array(ds[r]["topk_ids"]).reshape(T, 4)
        al = np.array(ds[r]["aligned"], bool)
        assert np.all(ids[~al] == -1)
        assert np.all(np.isnan(np.array(ds[r]["token_ce"], dtype=float)[~al[:-1]]))


def test_run_align_resumes_to_the_same_bytes(tmp_path, model_dirs):
    cfg, _ = _setup(tmp_path, model_dirs)
    run_align(cfg, "src", log=lambda *_: None)
    art = artifact(cfg, "align/src")
    first = {p.name: p.read_bytes() for p in art.shard_paths()}
    (art.path / "manifest.json").unlink()
    art.shard_paths()[1].unlink()
    run_align(cfg, "src", log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in art.shard_paths()} == first
    assert read_manifest(art.path) is not None


def test_block_with_different_text_is_refused(tmp_path, model_dirs):
    def change(texts):
        texts = list(texts)
        texts[4] = texts[4] + " and more text"
        return texts

    cfg, _ = _setup(tmp_path, model_dirs, src_texts=change)
    with pytest.raises(LmfuseError, match="does not match the block's text") as e:
        run_align(cfg, "src", log=lambda *_: None)
    assert "block 4" in str(e.value)


def test_extractions_of_different_block_sets_are_refused(tmp_path, model_dirs):
    cfg, texts = _setup(tmp_path, model_dirs)
    # Rewrite the source extraction over a subset of the blocks.
    import shutil

    shutil.rmtree(artifact(cfg, "extract/src").path)
    _write_extract(cfg, "src", texts[:-2], seed=2)
    with pytest.raises(LmfuseError, match="do not cover the same blocks"):
        run_align(cfg, "src", log=lambda *_: None)
    with pytest.raises(LmfuseError, match="different prepared blocks"):
        check_extractions({"inputs": {"prepare": "a"}}, {"inputs": {"prepare": "b"}}, "t", "s")


def test_missing_extraction_is_a_clear_error(tmp_path, model_dirs):
    cfg = _cfg(tmp_path, model_dirs)
    domains, texts = _blocks(cfg)
    _write_prepare(cfg, domains, texts)
    with pytest.raises(LmfuseError, match="build it first: `lmfuse extract CONFIG --model"):
        run_align(cfg, "src", log=lambda *_: None)


def test_dtw_context_is_required():
    from lmfuse.align import METHODS

    b = BlockTokens(np.array([1]), np.array([0]), np.array([1]))
    with pytest.raises(LmfuseError):
        METHODS.get("dtw")(b, b, AlignContext())


def test_a_source_that_spells_unknown_text_as_unk_no_longer_wins_minCE(tmp_path):
    """A random WordPiece source writes most of a Unicode text as [UNK]; per byte it looked far
    better than a random byte-level target (its [UNK]s cost one token NLL for many bytes)."""
    from lmfuse.fusion import min_ce
    from lmfuse.pipeline import run_extract, run_prepare

    models = {k: str(make_tiny_model(tmp_path / k, k, seed=i)) for i, k in enumerate(("bpe", "wordpiece"))}
    texts = ["Привет, мир! Καλημέρα; κόσμε. Съешь же ещё этих мягких булок, да выпей чаю.",
             "Ξεσκεπάζω τὴν ψυχοφθόρα βδελυγμία. Текст: данные, слова; λέξεις!"]
    corpus = tmp_path / "uni.jsonl"
    corpus.write_text("".join(json.dumps({"domain": "uni", "text": texts[i % 2] + " " + texts[(i + 1) % 2]}) + "\n"
                              for i in range(4)))
    cfg = FuseConfig(output_dir=str(tmp_path / "run"), target=ModelSpec(name="tgt", path=models["bpe"], dtype="float32"),
                     sources=[ModelSpec(name="wp", path=models["wordpiece"], dtype="float32")],
                     corpus=CorpusConfig(path=str(corpus)), extract=ExtractConfig(top_k=5, shard_size=4))
    quiet = {"log": lambda *_: None}
    run_prepare(cfg, **quiet)
    for name in ("tgt", "wp"):
        run_extract(cfg, name, progress=False, **quiet)
    run_vocab_map(cfg, "wp", **quiet)
    run_align(cfg, "wp", **quiet)
    tgt, src, al = (artifact(cfg, "extract/tgt").load(), artifact(cfg, "extract/wp").load(),
                    artifact(cfg, "align/wp").load())
    for r in range(len(al)):
        assert sum(np.array(src[r]["input_ids"]) == 0) >= 8  # [UNK] is id 0: UNK-heavy indeed
        target_q = tgt[r]["nll_sum"] / tgt[r]["scored_bytes"]
        naive_q = src[r]["nll_sum"] / src[r]["scored_bytes"]  # what the quality was before
        assert naive_q < target_q / 3  # the artefact: the source that cannot spell looked 3x better
        assert al[r]["nll_per_byte"] > target_q  # charged for what it hid, it no longer wins
        w = min_ce(np.array([[target_q], [al[r]["nll_per_byte"]]]), np.ones((2, 1), bool), None)
        assert w[:, 0].tolist() == [1.0, 0.0]
