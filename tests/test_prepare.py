import json
from pathlib import Path

import pytest

from lmfuse.config import load_config
from lmfuse.errors import LmfuseError
from lmfuse.models import load_tokenizer
from lmfuse.pipeline import run_prepare
from lmfuse.prepare import read_corpus, split_document, split_train_validation


@pytest.fixture()
def tokenizers(tiny_models):
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(p) for p in tiny_models.values()]


LONG = ("First paragraph of text, with words.\n\nSecond one: def f(x):\n    return x * 2\n" * 6
        + "x" * 300 + " tail 🙂 日本語。\n")


@pytest.mark.parametrize("block_size", [8, 20, 64])
def test_blocks_fit_every_tokenizer_and_rebuild_the_document(tokenizers, block_size):
    blocks = split_document(LONG, tokenizers, block_size)
    assert "".join(blocks) == LONG
    assert len(blocks) > 1
    for tok in tokenizers:
        lengths = [len(tok(b)["input_ids"]) for b in blocks]
        assert max(lengths) <= block_size


def test_blocks_prefer_paragraph_boundaries(tokenizers):
    blocks = split_document(LONG, tokenizers, 64)
    prose = [b for b in blocks if "xxx" not in b]
    assert len(prose) >= 3
    assert all(b.endswith("\n") for b in prose)


def test_block_size_smaller_than_one_token(tokenizers):
    # The spm tokenizer adds a BOS: a block of one token cannot hold any text.
    with pytest.raises(LmfuseError, match="block_size 1 leaves no room"):
        split_document("hello", tokenizers, 1)


def test_split_is_by_document_per_domain_and_deterministic():
    domains = ["a"] * 10 + ["b"] * 3 + ["c"]
    blocks = [2] * 13 + [5]
    v1 = split_train_validation(domains, blocks, 0.2, 1, seed=0)
    v2 = split_train_validation(domains, blocks, 0.2, 1, seed=0)
    assert all((x == y).all() for x, y in zip(v1, v2))
    whole = [bool(f.all()) for f in v1[:10]]
    assert sum(whole) == 2 and all(f.all() or not f.any() for f in v1[:10])  # 20% of 20 blocks = 2 whole docs
    # b: 6 blocks want 1: no whole document fits, so one document gives its last block.
    assert sum(int(f.sum()) for f in v1[10:13]) == 1
    assert any(f.tolist() == [False, True] for f in v1[10:13])
    # c: one document of 5 blocks is split inside: its last block goes to validation.
    assert v1[13].tolist() == [False, False, False, False, True]
    v3 = split_train_validation(domains, blocks, 0.2, 1, seed=1)
    assert any((x != y).any() for x, y in zip(v1, v3))
    # A domain of one block stays in training (prepare then refuses it, see below).
    assert not split_train_validation(["a"], [1], 0.5, 1, seed=0)[0].any()
    # Empty documents (every block dropped) do not count.
    v = split_train_validation(["a", "a"], [0, 4], 0.5, 1, seed=0)
    assert v[1].tolist() == [False, False, True, True]


def test_prepare_end_to_end(make_config):
    cfg = load_config(make_config())
    manifest = run_prepare(cfg, log=lambda *a: None)
    from lmfuse.prepare import load_blocks

    ds = load_blocks(cfg)
    assert manifest["n_blocks"] == len(ds) > 10
    assert ds["block_id"] == list(range(len(ds)))
    assert set(ds["domain"]) == {"code", "legal", "prose"}
    for dom, s in manifest["blocks_per_domain"].items():
        assert s["validation"] >= 1 and s["train"] >= 1, dom
    for spec in cfg.models:
        tok = load_tokenizer(spec)
        assert max(len(tok(t)["input_ids"]) for t in ds["text"]) <= 48
    # Idempotent: a second run does nothing and returns the same manifest.
    assert run_prepare(cfg, log=lambda *a: None) == manifest


def test_reads_txt_folder_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c" / "poems").mkdir(parents=True)
    (tmp_path / "c" / "poems" / "a.txt").write_text("roses are red")
    (tmp_path / "c" / "top.txt").write_text("plain text")
    docs = read_corpus(tmp_path / "c")
    assert sorted(d["domain"] for d in docs) == ["poems", "top"]
    pq.write_table(pa.table({"text": ["x y", "z"], "domain": ["d1", None]}), tmp_path / "t.parquet")
    assert [d["domain"] for d in read_corpus(tmp_path / "t.parquet")] == ["d1", "t"]


def test_empty_corpus(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(LmfuseError, match="corpus is empty"):
        read_corpus(p)


def test_missing_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(LmfuseError, match="no 'text' field") as e:
        read_corpus(p)
    assert "line 2" in str(e.value) and "corpus.text_field" in str(e.value)


def test_unreadable_files(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(LmfuseError, match="not valid UTF-8") as e:
        read_corpus(p)
    assert str(p) in str(e.value)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(LmfuseError, match="invalid JSON") as e:
        read_corpus(j)
    assert "line 2" in str(e.value)


def test_output_dir_from_a_different_config_is_refused(make_config):
    cfg = load_config(make_config())
    run_prepare(cfg, log=lambda *a: None)
    before = sorted(p.name for p in (cfg.run_dir / "prepare" / "shards").iterdir())
    other = load_config(make_config({"prepare.block_size": 40}, name="other.yaml"))
    with pytest.raises(LmfuseError, match="different config") as e:
        run_prepare(other, log=lambda *a: None)
    assert "--overwrite" in str(e.value)
    # Nothing was touched.
    assert sorted(p.name for p in (cfg.run_dir / "prepare" / "shards").iterdir()) == before
    assert run_prepare(other, overwrite=True, log=lambda *a: None)["block_size"] == 40


def test_single_document_domain_is_split_inside_the_document(make_config, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "book.txt").write_text("A sentence of the book, with words.\n" * 40)
    cfg = load_config(make_config({"corpus.path": str(tmp_path / "one")}))
    manifest = run_prepare(cfg, log=lambda *a: None)
    assert manifest["blocks_per_domain"]["book"]["validation"] >= 1
    from lmfuse.prepare import load_blocks

    splits = load_blocks(cfg)["split"]
    assert splits[-1] == "validation" and splits[0] == "train"


def test_domain_without_validation_blocks_is_refused_before_any_work(make_config, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"domain": "big", "text": "Long text here. " * 60}) + "\n"
                 + json.dumps({"domain": "big", "text": "More text there. " * 60}) + "\n"
                 + json.dumps({"domain": "tiny", "text": "Just one short block of text."}) + "\n")
    cfg = load_config(make_config({"corpus.path": str(p)}))
    with pytest.raises(LmfuseError, match="tiny") as e:
        run_prepare(cfg, log=lambda *a: None)
    assert not (cfg.run_dir / "prepare" / "manifest.json").exists()
    # The advice is one that works: `min_validation_blocks: 0` would only move the failure to eval.
    assert "min_validation_blocks: 0" not in str(e.value) and "corpus.split_field" in str(e.value)

    # Following it (each document's split chosen in the corpus) gives blocks that eval can score.
    from lmfuse.evaluate import select_blocks
    from lmfuse.prepare import load_blocks

    rows = [json.loads(line) for line in p.read_text().splitlines()]
    for r, split in zip(rows, ["train", "validation", "validation"], strict=True):
        r["split"] = split
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(make_config({"corpus.path": str(p), "corpus.split_field": "split"}, name="split.yaml"))
    run_prepare(cfg, log=lambda *a: None)  # the failed run's stage.json (another config) is replaced
    ds = load_blocks(cfg)
    blocks = [{"domain": d, "split": s} for d, s in zip(ds["domain"], ds["split"], strict=True)]
    assert {b["domain"] for b in select_blocks(blocks, "validation")} == {"big", "tiny"}


def test_split_field_gives_each_documents_split(make_config, tmp_path):
    corpus = tmp_path / "split.jsonl"
    rows = [{"domain": d, "split": s, "text": f"{d} {s} document {i}. " * 12}
            for d in ("a", "b") for i, s in enumerate(["train", "train", "validation", "train", "validation"])]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(make_config({"corpus.path": str(corpus), "corpus.split_field": "split",
                                   "prepare.validation_fraction": 0.5}))
    run_prepare(cfg, log=lambda *_: None)
    from lmfuse.prepare import load_blocks

    blocks = load_blocks(cfg)
    for text, split in zip(blocks["text"], blocks["split"], strict=True):
        assert f" {split} document" in text  # every block keeps its document's split
    assert sorted(set(blocks["split"])) == ["train", "validation"]


def test_split_field_with_a_bad_value_names_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a", "split": "train"}\n{"text": "b", "split": "test"}\n')
    with pytest.raises(LmfuseError, match="'test'; it must be 'train' or 'validation'") as e:
        read_corpus(p, split_field="split")
    assert "line 2" in str(e.value)
    t = tmp_path / "c.txt"
    t.write_text("hello")
    with pytest.raises(LmfuseError, match="has no fields"):
        read_corpus(t, split_field="split")


def test_corpus_domains_reads_only_those_domains(make_config):
    """`corpus.domains` keeps the named domains (a domain expert's corpus out of a mixed file); a
    name the corpus lacks is refused with the domains it has. Unset, the key is as before."""
    from lmfuse.graph import Graph

    everything = load_config(make_config())
    code = load_config(make_config({"corpus.domains": ["code"]}, name="code.yaml"))
    man = run_prepare(code)
    assert set(man["blocks_per_domain"]) == {"code"}
    assert Graph(code)["prepare"].key != Graph(everything)["prepare"].key
    typo = load_config(make_config({"corpus.domains": ["cdoe"], "output_dir": str(code.run_dir) + "-typo"},
                                   name="typo.yaml"))
    with pytest.raises(LmfuseError, match="(?s)'cdoe'.*choose from its domains: code, legal, prose"):
        run_prepare(typo)


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_rerun_beside_the_corpus_skips_every_stage(make_config, tmp_path, tiny_models, layout):
    """Issue 26.3: a run directory next to a single-file corpus (or next to a folder corpus) leaves
    the corpus's fingerprint alone, so a second `lmfuse run` (a new process: no remembered
    fingerprint) skips every stage. One inside a folder corpus is refused (test_config)."""
    from lmfuse import prepare
    from lmfuse.pipeline import run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    if layout == "file":
        corpus = data / "corpus.jsonl"
        corpus.write_text((tmp_path / "corpus.jsonl").read_text())
    else:
        corpus = data / "texts"
        for row in map(json.loads, (tmp_path / "corpus.jsonl").read_text().splitlines()):
            (corpus / row["domain"]).mkdir(parents=True, exist_ok=True)
            n = len(list((corpus / row["domain"]).iterdir()))
            (corpus / row["domain"] / f"{n}.txt").write_text(row["text"])
    cfg = load_config(make_config({
        "corpus.path": str(corpus), "output_dir": str(data / "run"), "train.max_steps": 1, "train.control": False,
        "sources": [{"name": "src_spm", "path": str(tiny_models["spm"]), "dtype": "float32"}]}))
    first = run_pipeline(cfg, log=lambda *a: None, report=False)
    assert set(first.values()) == {"ran"} and len(first) == 6, first
    prepare._FP_CACHE.clear()  # as in a new process
    again = run_pipeline(load_config(tmp_path / "config.yaml"), log=lambda *a: None, report=False)
    assert again == dict.fromkeys(first, "skipped")


def _nonblank(text: str) -> int:
    return sum(map(len, text.split()))


def test_text_dropped_by_min_block_chars_is_counted_per_domain(make_config, tiny_corpus):
    """Issue 26.5: pieces shorter than `prepare.min_block_chars` were dropped without a count. The
    manifest now says, per domain, how many non-blank characters were read and dropped (kept +
    dropped = read), and the log says it. Here the toy corpus loses a short CJK sentence at the end
    of two prose documents (1.2% of the domain): counted, under the limit, accepted."""
    cfg = load_config(make_config({"prepare.block_size": 40}))
    lines: list[str] = []
    manifest = run_prepare(cfg, log=lines.append)
    from lmfuse.prepare import load_blocks

    ds = load_blocks(cfg)
    docs = [json.loads(line) for line in tiny_corpus.read_text().splitlines()]
    dropped = manifest["dropped_per_domain"]
    assert set(dropped) == {"code", "legal", "prose"}
    for dom, d in dropped.items():
        read = sum(_nonblank(r["text"]) for r in docs if r["domain"] == dom)
        kept = sum(_nonblank(t) for t, dd in zip(ds["text"], ds["domain"], strict=True) if dd == dom)
        assert d["chars"] == read and d["dropped_chars"] == read - kept, dom
        assert d["dropped_fraction"] == pytest.approx(d["dropped_chars"] / read, abs=1e-6)
    assert dropped["prose"]["dropped_chars"] > 0 and dropped["prose"]["dropped_blocks"] >= 1
    assert dropped["prose"]["dropped_fraction"] < 0.02 and dropped["code"]["dropped_chars"] == 0
    log = "\n".join(lines)
    assert f"{dropped['prose']['dropped_chars']:,} of {dropped['prose']['chars']:,} characters dropped" in log, log


LONG_WORDS = "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic. " * 8


def test_a_block_size_too_small_for_the_words_is_refused_with_the_loss(make_config, tmp_path):
    """Issue 26.5: with a `block_size` shorter than a long word, most of each document fell into
    pieces shorter than `min_block_chars` and was silently dropped. Now refused before anything is
    written, naming the domain, the share lost and the fix, and the fix works."""
    from lmfuse.prepare import MAX_DROPPED_FRACTION

    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"domain": d, "text": t}) + "\n" for d, t in
                              [("words", LONG_WORDS), ("words", LONG_WORDS[::-1]), ("plain", "Hello world! " * 40),
                               ("plain", "Hello world! The quick brown fox jumps over the lazy dog.\n" * 10)]))
    over = {"corpus.path": str(corpus), "prepare.block_size": 16}
    cfg = load_config(make_config(over))
    with pytest.raises(LmfuseError, match=r"would drop .*% of the text of domain\(s\) words \(words: ") as e:
        run_prepare(cfg, log=lambda *a: None)
    msg = str(e.value)
    assert "plain" not in msg  # under the limit: not named
    assert f"more than the {MAX_DROPPED_FRACTION:.0%} of a domain" in msg
    assert "raise prepare.block_size" in msg and "lower prepare.min_block_chars" in msg
    assert not (cfg.run_dir / "prepare" / "manifest.json").exists()
    # Following the fix: min_block_chars 1 keeps every non-blank character; a larger block_size keeps
    # all but a tail under the limit.
    for fix, out in [({"prepare.min_block_chars": 1}, "keep"), ({"prepare.block_size": 48}, "larger")]:
        cfg = load_config(make_config({**over, **fix, "output_dir": str(tmp_path / out)}, name=f"{out}.yaml"))
        man = run_prepare(cfg, log=lambda *a: None)
        assert all(d["dropped_fraction"] <= MAX_DROPPED_FRACTION for d in man["dropped_per_domain"].values()), fix
        if out == "keep":
            assert all(d["dropped_chars"] == 0 for d in man["dropped_per_domain"].values())


def test_the_prepare_key_of_an_existing_config_is_unchanged(make_config):
    """Existing runs keep their blocks: the count of dropped text (manifest, log) and the refusal
    leave prepare's key the hash of what it was before."""
    from lmfuse.fingerprint import model_fingerprint
    from lmfuse.graph import Graph
    from lmfuse.hashing import hash_obj
    from lmfuse.prepare import corpus_fingerprint

    cfg = load_config(make_config())
    old = hash_obj(["prepare", cfg.corpus.model_dump(exclude={"path", "domains"}), cfg.prepare.model_dump(),
                    corpus_fingerprint(Path(cfg.corpus.path)),
                    [[m.path, m.revision, model_fingerprint(m, tokenizer_only=True)] for m in cfg.models]])
    assert Graph(cfg)["prepare"].stage.config_hash() == old
    # A new prepare option must leave this hash alone at its default (as `corpus.domains` does when unset).
    assert set(cfg.prepare.model_dump()) == {"block_size", "validation_fraction", "min_validation_blocks",
                                             "max_blocks_per_domain", "min_block_chars", "seed"}


SPECIAL_STRINGS = "<s> </s> <|endoftext|> <|im_start|>"


def _with_im_start(kind: str):
    """A tiny tokenizer with `<|im_start|>` added as a special token (as chat models have it)."""
    from lmfuse.testing import build_tokenizer

    tok = build_tokenizer(kind)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tok


def test_special_token_strings_in_the_text_are_counted_as_plain_text():
    """Issue 26.8c: `<|endoftext|>` written in a document is text, not the tokenizer's control
    token: blocks are measured with it split as plain text (`split_special_tokens`), as extract
    stores it, so a block never holds a special id the tokenizer did not add itself."""
    from lmfuse.models import encode_text
    from lmfuse.prepare import count_tokens, split_document

    toks = [_with_im_start(k) for k in ("bpe", "spm", "wordpiece")]
    for tok in toks:
        text = f"a {SPECIAL_STRINGS} b"
        ids = encode_text(tok, [text])["input_ids"][0]
        own = tok(["a b"], add_special_tokens=True)["input_ids"][0]  # what the tokenizer adds itself
        specials = {tok.convert_tokens_to_ids(s) for s in SPECIAL_STRINGS.split() if s in tok.all_special_tokens}
        assert specials  # every tokenizer here has one of them (and `<|im_start|>`)
        assert [i for i in ids if i in specials] == [i for i in own if i in specials], tok.convert_ids_to_tokens(ids)
        assert count_tokens([tok], [text])[0] == len(ids) > len(tok(text)["input_ids"])
    doc = ("Chat log. " + SPECIAL_STRINGS + " " + "<|im_start|>user\nhello there</s>\n") * 12
    blocks = split_document(doc, toks, 24)
    assert "".join(blocks) == doc
    for tok in toks:
        assert max(len(encode_text(tok, [b])["input_ids"][0]) for b in blocks) <= 24


def test_splitting_special_token_strings_leaves_ordinary_text_alone(tokenizers):
    """Why the keys did not change: text without special-token strings tokenizes exactly as before
    (ids and offsets), so existing blocks and extractions stay valid."""
    from lmfuse.models import encode_text
    from lmfuse.testing import TRAIN_TEXT

    texts = [*TRAIN_TEXT, LONG, "<not special> [UNK ## ▁ Ġ <|endoftext| <s", ""]
    for tok in [*tokenizers, _with_im_start("bpe")]:
        before = tok(texts, add_special_tokens=True, return_offsets_mapping=True)
        after = encode_text(tok, texts, return_offsets_mapping=True)
        assert after["input_ids"] == before["input_ids"] and after["offset_mapping"] == before["offset_mapping"]
        # The tokenizer object is left as it was (a reader of its backend sees no change).
        assert not tok.backend_tokenizer.encode_special_tokens
