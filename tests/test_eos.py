"""A tokenizer that appends EOS (any special token after the text) scores the text like one that does not.

Issue 26, item 4: the CE of predicting `</s>` after the text counted in the model's eval bits per
byte, in its MinCE/AvgCE quality (`nll_sum` of extract, `nll_per_byte` of align) and in the span
NLL of the last target token. A prediction counts only when the token predicted is text: the same
weights scored through a tokenizer that appends EOS and one that does not give the same figures.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmfuse import evaluate, extract
from lmfuse.align import (
    AlignContext,
    BlockTokens,
    align_block,
    sequence_quality,
    span_nll,
    unknown_tokens,
)
from lmfuse.artifacts import atomic_write_json, record_hash
from lmfuse.config import CorpusConfig, ExtractConfig, FuseConfig, ModelSpec, VocabMapConfig
from lmfuse.evaluate import block_nll, summarize
from lmfuse.fingerprint import model_fingerprint
from lmfuse.hashing import hash_obj
from lmfuse.models import encode_text
from lmfuse.pipeline import artifact, run_align, run_eval, run_extract, run_prepare, run_vocab_map
from lmfuse.testing import make_tiny_model, write_tiny_corpus
from lmfuse.tokentext import token_table

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "emoji 🙂🚀 and 日本語のテキスト。",
    "x",
    "A text that writes </s> and <s> and <|endoftext|> is still text: every piece of them counts.",
]


def _with_eos(plain, out, kind: str):
    """The same weights as `plain`, with a tokenizer that appends its EOS after the text."""
    from tokenizers import processors

    shutil.copytree(plain, out)
    tok = AutoTokenizer.from_pretrained(out)
    if kind == "spm":  # BOS and EOS: "<s> $A </s>"
        post = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                             special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    else:  # byte-level BPE without BOS: "$A <|endoftext|>"
        eos = tok.eos_token
        post = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                    processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                                  special_tokens=[(eos, tok.eos_token_id)])])
    tok.backend_tokenizer.post_processor = post
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: HF dir}: spm (BOS), spm_eos (BOS + EOS), bpe (none), bpe_eos (EOS); *_eos share the weights."""
    root = tmp_path_factory.mktemp("eos_models")
    out = {"spm": make_tiny_model(root / "spm", "spm", seed=0), "bpe": make_tiny_model(root / "bpe", "bpe", seed=1)}
    for kind in ("spm", "bpe"):
        out[f"{kind}_eos"] = _with_eos(out[kind], root / f"{kind}_eos", kind)
    return out


def _load(path):
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_the_fixture_tokenizers_append_eos_and_nothing_else_differs(models, kind):
    plain, eos = AutoTokenizer.from_pretrained(models[kind]), AutoTokenizer.from_pretrained(models[f"{kind}_eos"])
    a = encode_text(plain, TEXTS, return_offsets_mapping=True, return_special_tokens_mask=True)
    b = encode_text(eos, TEXTS, return_offsets_mapping=True, return_special_tokens_mask=True)
    for i in range(len(TEXTS)):
        assert b["input_ids"][i] == a["input_ids"][i] + [eos.eos_token_id]
        assert b["special_tokens_mask"][i] == a["special_tokens_mask"][i] + [1]
        assert b["offset_mapping"][i][:-1] == a["offset_mapping"][i]


# -- eval ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_eval_bits_per_byte_count_the_text_predictions_only(models, kind):
    tok, model = _load(models[kind])
    tok_eos = AutoTokenizer.from_pretrained(models[f"{kind}_eos"])
    plain = block_nll(model, tok, TEXTS, batch_size=2, device="cpu")
    with_eos = block_nll(model, tok_eos, TEXTS, batch_size=2, device="cpu")
    for text, (nll, n, nb), (nll_e, n_e, nb_e) in zip(TEXTS, plain, with_eos, strict=True):
        assert nb_e == nb and n_e == n, text  # the tokens counted are the text's: EOS is not one
        assert nll_e == pytest.approx(nll, rel=1e-5, abs=1e-5), text
    # Directly: the text predictions of the EOS tokenization, from one unbatched forward pass.
    enc = encode_text(tok_eos, TEXTS[:1], return_special_tokens_mask=True)
    ids = torch.tensor(enc["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    ce = -lp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    text_pred = torch.tensor(enc["special_tokens_mask"][0][1:]) == 0
    assert not text_pred[-1] and ce[-1] > 0  # the last prediction is the EOS: real NLL, not text
    assert with_eos[0][0] == pytest.approx(float(ce[text_pred].sum()), rel=1e-5)
    s, s_e = summarize(plain, ["a"] * len(TEXTS)), summarize(with_eos, ["a"] * len(TEXTS))
    assert s_e["overall"]["bpb"] == pytest.approx(s["overall"]["bpb"], rel=1e-6)
    assert s_e["overall"]["ppl"] == pytest.approx(s["overall"]["ppl"], rel=1e-6)


def _write_prepare(run, texts):
    import pyarrow as pa

    from lmfuse.artifacts import ArtifactDir

    art = ArtifactDir(run / "prepare", "prepare", "datahash-eos")
    art.begin()
    n = len(texts)
    art.write_shard(0, pa.table({"block_id": pa.array(range(n), pa.int64()), "doc_id": pa.array(range(n), pa.int64()),
                                 "domain": ["prose"] * n, "split": ["validation"] * n, "text": texts}))
    art.finish(rows=n)


def test_an_eval_cache_entry_of_the_old_scoring_rule_is_not_reused(tmp_path, models):
    """Cached figures of a model whose tokenizer appends EOS counted its EOS predictions: the cache
    key names the scoring rule, so an entry keyed as before is never read again."""
    spec = ModelSpec(name="eos", path=str(models["spm_eos"]), dtype="float32")
    cfg = FuseConfig(output_dir=str(tmp_path / "run"), target=spec, corpus=CorpusConfig(path=str(tmp_path / "c.jsonl")))
    _write_prepare(cfg.run_dir, TEXTS)
    blocks, data_hash = evaluate.load_blocks(cfg)
    chosen = evaluate.select_blocks(blocks, cfg.eval.split)
    old_key = hash_obj([[[spec.dtype, model_fingerprint(spec)]], data_hash, cfg.eval.split, cfg.eval.dtype,
                        [b["block_id"] for b in chosen]])
    stale = {"domains": {"prose": {"bpb": 9.0}}, "overall": {"bpb": 9.0, "ppl": 9.0, "nll": 9.0, "tokens": 9,
                                                             "bytes": 9, "blocks": 5},
             "kind": "model", "seconds": 0.0, "path": [spec.path], "per_block": {}}
    stale[evaluate.CACHE_HASH] = record_hash(stale, evaluate.CACHE_HASH)
    atomic_write_json(cfg.run_dir / "eval" / "cache" / f"eos-{old_key}.json", stale)
    lines = []
    doc = run_eval(cfg, models=[("eos", spec), ("plain", ModelSpec(name="plain", path=str(models["spm"]),
                                                                   dtype="float32"))], device="cpu", log=lines.append)
    assert not any(line.endswith("(cached)") for line in lines), lines
    got, ref = doc["models"]["eos"]["overall"], doc["models"]["plain"]["overall"]
    assert got["bpb"] == pytest.approx(ref["bpb"], rel=1e-6) and got["tokens"] == ref["tokens"]
    assert json.loads((cfg.run_dir / "eval" / "results.json").read_text())["models"]["eos"]["overall"]["bpb"] != 9.0


# -- extract ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_extract_nll_sum_and_seq_ce_count_the_text_predictions_only(models, kind):
    tok, model = _load(models[kind])
    tok_eos = AutoTokenizer.from_pretrained(models[f"{kind}_eos"])
    opts = ExtractConfig(top_k=5, batch_size=2)
    ids = list(range(len(TEXTS)))
    a, sa = extract.extract_shard(model, tok, ids, TEXTS, opts, "cpu")
    b, sb = extract.extract_shard(model, tok_eos, ids, TEXTS, opts, "cpu")
    for ra, rb in zip(a.to_pylist(), b.to_pylist(), strict=True):
        assert rb["scored_bytes"] == ra["scored_bytes"]
        assert rb["nll_sum"] == pytest.approx(ra["nll_sum"], rel=1e-5, abs=1e-5)
        assert rb["seq_ce"] == pytest.approx(ra["seq_ce"], rel=1e-5, abs=1e-6)
        # token_ce stays each position's true CE: the EOS prediction's is kept, as the model's.
        assert len(rb["token_ce"]) == len(ra["token_ce"]) + 1 and rb["token_ce"][-1] > 0
        np.testing.assert_allclose(rb["token_ce"][:-1], ra["token_ce"], rtol=1e-5, atol=1e-5)
    assert sb["nll_sum"] == pytest.approx(sa["nll_sum"], rel=1e-6)
    assert sb["scored_bytes"] == sa["scored_bytes"]


def test_only_a_tokenizer_that_appends_a_special_token_changes_the_extraction_key(models, tmp_path):
    """The stored nll_sum/seq_ce change for such a model only: its key says so, every other key stays."""
    from lmfuse.extract import ExtractStage

    corpus = write_tiny_corpus(tmp_path / "c.jsonl", docs_per_domain=1)
    cfg = FuseConfig(output_dir=str(tmp_path / "run"), corpus=CorpusConfig(path=str(corpus)),
                     target=ModelSpec(name="bpe", path=str(models["bpe"])),
                     sources=[ModelSpec(name=n, path=str(models[n])) for n in ("spm", "spm_eos", "bpe_eos")])

    def before(name):  # the extraction key as lmfuse computed it before this rule
        spec = cfg.model(name)
        return hash_obj(["extract", spec.model_dump(exclude={"name"}), model_fingerprint(spec), cfg.extract.model_dump()])

    for name in ("bpe", "spm"):
        assert not extract.appends_special_token(AutoTokenizer.from_pretrained(models[name]))
        assert ExtractStage(cfg, name).config_hash() == before(name)
    for name in ("spm_eos", "bpe_eos"):
        assert extract.appends_special_token(AutoTokenizer.from_pretrained(models[name]))
        assert ExtractStage(cfg, name).config_hash() != before(name)


# -- align -----------------------------------------------------------------------------------------
def test_span_nll_gives_no_nll_to_a_token_the_tokenizer_added():
    # Text "abc defg hi": source "abc" | " defg" | " hi" | </s>; target "abc" | " defg hi".
    tgt_end, src_end = np.array([3, 11]), np.array([3, 8, 11, 11])
    ce = np.array([0.5, 0.25, 4.0], dtype=np.float32)  # the last: predicting </s>
    added = np.array([False, False, False, True])
    assert span_nll(tgt_end, src_end, ce, None, added).tolist() == [pytest.approx(0.75)]
    # Its quality: the NLL of the text after "abc", EOS left out.
    assert sequence_quality("abc defg hi", src_end, ce, None, added) == (pytest.approx(0.75), 8)


def _tokens(tok, text):
    e = extract.encode_blocks(tok, [text])[0]
    return BlockTokens(*(np.asarray(e[c], np.int64) for c in ("input_ids", "offset_start", "offset_end")))


def _ce(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return (-lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)).float().numpy()


def _context(src_tok, tgt_tok):
    src, tgt = token_table(src_tok), token_table(tgt_tok)
    return AlignContext(src_empty=np.array([len(b) == 0 for b in src.bytes]), src_special=src.special,
                        tgt_special=tgt.special)


@pytest.mark.parametrize("text", TEXTS)
def test_a_target_that_appends_eos_gets_no_source_span_for_it(models, text):
    """At the target's EOS position no source scored any text: its span NLL is NaN, not a 0 that
    says the source was sure of it; every other position is as with a target that adds none."""
    src_tok, src_model = _load(models["spm"])
    tgt_tok, tgt_eos = AutoTokenizer.from_pretrained(models["bpe"]), AutoTokenizer.from_pretrained(models["bpe_eos"])
    src = _tokens(src_tok, text)
    ce = _ce(src_model, src.ids.tolist())
    out = {}
    for name, tt in (("plain", tgt_tok), ("eos", tgt_eos)):
        tgt = _tokens(tt, text)
        k = np.zeros((len(src.ids), 1), np.int64)
        out[name] = align_block("offsets", tgt, src, k, np.zeros(k.shape, np.float16), ce,
                                np.arange(len(src_tok), dtype=np.int32), _context(src_tok, tt))
    a, b = out["plain"], out["eos"]
    if len(a["span_nll"]):
        np.testing.assert_allclose(b["span_nll"][:-1], a["span_nll"], rtol=1e-6)
        assert b["span_exact"][:-1].tolist() == a["span_exact"].tolist()
    assert np.isnan(b["span_nll"][-1]) and b["span_exact"][-1] == 0


def test_a_source_that_appends_eos_scores_like_one_that_does_not_through_the_stages(tmp_path, models):
    """Through the stages: a source whose tokenizer appends EOS gets the same quality (extract's
    nll_sum and seq_ce, align's nll_per_byte) and the same span NLL as the same weights without."""
    corpus = write_tiny_corpus(tmp_path / "c.jsonl", docs_per_domain=2)
    specs = [ModelSpec(name=n, path=str(models[n]), dtype="float32") for n in ("spm", "spm_eos")]
    cfg = FuseConfig(output_dir=str(tmp_path / "run"), target=ModelSpec(name="tgt", path=str(models["bpe"]),
                                                                        dtype="float32"),
                     sources=specs, corpus=CorpusConfig(path=str(corpus)),
                     extract=ExtractConfig(top_k=4, shard_size=4), vocab_map=VocabMapConfig(method="mined", workers=1))
    quiet = {"log": lambda *_: None}
    run_prepare(cfg, **quiet)
    for name in ("tgt", "spm", "spm_eos"):
        run_extract(cfg, name, progress=False, **quiet)
    for name in ("spm", "spm_eos"):
        run_vocab_map(cfg, name, **quiet)
        run_align(cfg, name, **quiet)
    ea, eb = artifact(cfg, "extract/spm").load(), artifact(cfg, "extract/spm_eos").load()
    aa, ab = artifact(cfg, "align/spm").load(), artifact(cfg, "align/spm_eos").load()
    assert len(ea) == len(eb) == len(aa) == len(ab) > 0
    for r in range(len(ea)):
        assert eb[r]["input_ids"][-1] == AutoTokenizer.from_pretrained(models["spm_eos"]).eos_token_id
        assert eb[r]["scored_bytes"] == ea[r]["scored_bytes"]
        assert eb[r]["nll_sum"] == pytest.approx(ea[r]["nll_sum"], rel=1e-5)
        assert eb[r]["seq_ce"] == pytest.approx(ea[r]["seq_ce"], rel=1e-5)
        assert ab[r]["nll_per_byte"] == pytest.approx(aa[r]["nll_per_byte"], rel=1e-5)
        assert ab[r]["seq_ce"] == pytest.approx(aa[r]["seq_ce"], rel=1e-5)
        np.testing.assert_allclose(np.array(ab[r]["span_nll"], float), np.array(aa[r]["span_nll"], float),
                                   rtol=1e-5, atol=1e-5)
        assert ab[r]["span_exact"] == aa[r]["span_exact"]
    man_a, man_b = (json.loads((artifact(cfg, f"extract/{n}").path / "manifest.json").read_text())
                    for n in ("spm", "spm_eos"))
    assert man_b["mean_nll_per_byte"] == pytest.approx(man_a["mean_nll_per_byte"], rel=1e-6)
    assert math.isfinite(man_a["mean_nll_per_byte"])


def test_unknown_tokens_are_not_taken_for_added_ones():
    """An [UNK] covers text (the tokenizer did not add it): it keeps its NLL, its charge and its
    NaN spans; only a special id that covers no text is one the tokenizer added."""
    from lmfuse import align

    # "ab αβγ cd</s>": "ab" | [UNK] (" αβγ") | " cd" | </s>; ids 0 ([UNK]) and 2 (</s>) are special.
    src = BlockTokens(np.array([5, 0, 6, 2]), np.array([0, 2, 6, 9]), np.array([2, 6, 9, 9]))
    special = np.array([True, False, True] + [False] * 5)
    added = align.added_special(src, special)
    assert added.tolist() == [False, False, False, True]
    unk = unknown_tokens(src, special)
    assert unk.tolist() == [False, True, False, False]
    ce = np.array([0.7, 0.2, 3.0], dtype=np.float32)
    assert sequence_quality("ab αβγ cd", src.end, ce, unk, added) == (pytest.approx(0.9 + 7 * np.log(256)), 10)
    tgt_end = np.array([2, 6, 9])
    out = span_nll(tgt_end, src.end, ce, unk, added)
    assert np.isnan(out[0]) and out[1] == pytest.approx(0.2)


@pytest.mark.parametrize("pair", [("bpe", "spm"), ("spm", "bpe"), ("spm", "wordpiece")])
def test_a_tokenizer_that_adds_nothing_after_the_text_scores_bit_for_bit_as_before(models, pair, tmp_path):
    """Their extraction keys did not change (SmolLM2, Gemma-3, the demo), so neither may their
    stored figures: with BOS or nothing added, and with [UNK]s, every figure is the old one."""
    from lmfuse import align

    tgt_kind, src_kind = pair
    src_dir = models.get(src_kind) or make_tiny_model(tmp_path / src_kind, src_kind, seed=2)
    tgt_tok = AutoTokenizer.from_pretrained(models[tgt_kind])
    src_tok, src_model = _load(src_dir)
    texts = [*TEXTS, "Привет, мир! Καλημέρα κόσμε."]  # WordPiece writes [UNK]s here
    table, _ = extract.extract_shard(src_model, src_tok, list(range(len(texts))), texts,
                                     ExtractConfig(top_k=3, batch_size=2), "cpu")
    for r, row in enumerate(table.to_pylist()):
        ce = np.asarray(row["token_ce"], np.float32)
        assert row["nll_sum"] == float(ce.astype(np.float64).sum())  # the old sum, exactly
        assert row["seq_ce"] == (float(np.float32(ce.mean())) if len(ce) else 0.0)
        src, tgt = _tokens(src_tok, texts[r]), _tokens(tgt_tok, texts[r])
        k = np.zeros((len(src.ids), 1), np.int64)
        empty = np.array([len(b) == 0 for b in token_table(src_tok).bytes])
        new = align_block("offsets", tgt, src, k, np.zeros(k.shape, np.float16), ce,
                          np.arange(len(src_tok), dtype=np.int32), _context(src_tok, tgt_tok))
        old = align_block("offsets", tgt, src, k, np.zeros(k.shape, np.float16), ce,
                          np.arange(len(src_tok), dtype=np.int32), AlignContext(src_empty=empty))
        for col in ("span_nll", "token_ce", "span_exact", "aligned"):
            assert new[col].tobytes() == old[col].tobytes(), col
        unk = unknown_tokens(src, empty)
        assert sequence_quality(texts[r], src.end, ce, unk, align.added_special(src, token_table(src_tok).special)) \
            == sequence_quality(texts[r], src.end, ce, unk)
