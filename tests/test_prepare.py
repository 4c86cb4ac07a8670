import json

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
