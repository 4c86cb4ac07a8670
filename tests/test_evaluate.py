"""Evaluation: NLL and bits per byte against an independent computation; run_eval I/O and cache."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmfuse import evaluate, pipeline
from lmfuse.artifacts import ArtifactDir
from lmfuse.config import FuseConfig
from lmfuse.errors import LmfuseError
from lmfuse.evaluate import block_nll, end_offsets, select_blocks, summarize
from lmfuse.testing import make_tiny_model

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "emoji 🙂🚀 and 日本語のテキスト。",
    "x",
    "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: make_tiny_model(root / k, k) for k in ("bpe", "spm", "wordpiece")}


def _manual(model_dir, text):
    """Independent reference: one unbatched forward, log_softmax, gather; bytes from offsets."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    nll = -sum(lp[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1))
    first_special = enc["special_tokens_mask"][0]
    start = 0 if first_special else enc["offset_mapping"][0][1]
    return nll, ids.shape[1] - 1, len(text[start:].encode())


@pytest.mark.parametrize("kind", ["bpe", "spm", "wordpiece"])
def test_block_nll_matches_manual(tiny, kind):
    tok = AutoTokenizer.from_pretrained(tiny[kind])
    model = AutoModelForCausalLM.from_pretrained(tiny[kind], dtype=torch.float32).eval()
    rows = block_nll(model, tok, TEXTS, batch_size=2, device="cpu")  # batches mix lengths: padding matters
    for text, (nll, n, nb) in zip(TEXTS, rows, strict=True):
        ref_nll, ref_n, ref_b = _manual(tiny[kind], text)
        assert n == ref_n
        assert nb == ref_b
        assert nll == pytest.approx(ref_nll, rel=1e-5, abs=1e-5)
    s = summarize(rows, ["a"] * len(rows))
    tot_nll = sum(r[0] for r in rows)
    assert s["overall"]["bpb"] == pytest.approx(tot_nll / (math.log(2) * sum(r[2] for r in rows)))
    assert s["overall"]["ppl"] == pytest.approx(math.exp(tot_nll / sum(r[1] for r in rows)))


def test_bos_scores_whole_text(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["spm"])  # adds BOS: every byte is scored
    model = AutoModelForCausalLM.from_pretrained(tiny["spm"]).eval()
    (_, _, nb), = block_nll(model, tok, ["Hello wörld"], 1, "cpu")
    assert nb == len("Hello wörld".encode())


def test_batch_size_does_not_change_result(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["bpe"])
    model = AutoModelForCausalLM.from_pretrained(tiny["bpe"]).eval()
    a = block_nll(model, tok, TEXTS, 1, "cpu")
    b = block_nll(model, tok, TEXTS, 4, "cpu")
    for x, y in zip(a, b, strict=True):
        assert x[1:] == y[1:]
        assert x[0] == pytest.approx(y[0], rel=1e-5)


def test_end_offsets_specials():
    assert end_offsets([(0, 0), (0, 5), (5, 9), (0, 0)], [1, 0, 0, 1]) == [0, 5, 9, 9]


def test_summarize_pools_domains():
    rows = [(2.0, 2, 4), (4.0, 4, 4), (1.0, 1, 2)]
    s = summarize(rows, ["x", "x", "y"])
    assert s["domains"]["x"]["bpb"] == pytest.approx(6.0 / (math.log(2) * 8))
    assert s["domains"]["y"]["blocks"] == 1
    assert s["overall"]["tokens"] == 7
    assert s["overall"]["ppl"] == pytest.approx(math.e)


def test_domain_without_validation_blocks_refused():
    blocks = [{"domain": "code", "split": "validation", "text": "a"},
              {"domain": "legal", "split": "train", "text": "b"}]
    with pytest.raises(LmfuseError, match="legal") as e:
        select_blocks(blocks, "validation")
    assert "min_validation_blocks" in str(e.value)
    assert len(select_blocks(blocks, "all")) == 2


# -- run_eval ----------------------------------------------------------------------------------
def _write_prepare(run, texts_domains):
    art = ArtifactDir(run / "prepare", "prepare", "datahash1")
    art.begin()
    n = len(texts_domains)
    art.write_shard(0, pa.table({
        "block_id": pa.array(range(n), pa.int64()), "doc_id": pa.array(range(n), pa.int64()),
        "domain": [d for _, d, _ in texts_domains], "split": [s for _, _, s in texts_domains],
        "text": [t for t, _, _ in texts_domains]}))
    art.finish(rows=n)


def _cfg(tmp_path, tiny, **kw):
    return FuseConfig.model_validate({
        "output_dir": str(tmp_path / "run"),
        "target": {"name": "tgt", "path": str(tiny["bpe"]), "dtype": "float32"},
        "sources": [{"name": "src", "path": str(tiny["spm"]), "dtype": "float32"}],
        "corpus": {"path": str(tmp_path / "corpus.jsonl")}, **kw})


def test_run_eval_writes_results_and_caches(tmp_path, tiny, monkeypatch):
    cfg = _cfg(tmp_path, tiny)
    _write_prepare(cfg.run_dir, [(TEXTS[0], "prose", "validation"), (TEXTS[1], "code", "validation"),
                                 (TEXTS[4], "prose", "train"), (TEXTS[2], "code", "validation")])
    lines = []
    doc = pipeline.run_eval(cfg, device="cpu", log=lines.append)
    assert list(doc["models"]) == ["tgt", "src"]
    assert doc["domains"] == ["code", "prose"]
    assert doc["blocks"] == 3
    # Progress: a stage header, a line per model, a "done in" line.
    assert lines[0].startswith("eval: 2 model(s) on 3 validation blocks (2 domain(s)) on cpu")
    assert lines[1].startswith("  tgt: ") and lines[1].endswith(" s)")
    assert lines[-1].startswith("eval done in ")
    # Per-block figures, paired by block id, that add up to the summaries.
    pb = doc["models"]["tgt"]["per_block"]
    assert pb["block_id"] == [0, 1, 3] and pb["domain"] == ["prose", "code", "code"]
    assert sum(pb["nll"]) == pytest.approx(doc["models"]["tgt"]["overall"]["nll"], rel=1e-12)
    assert sum(pb["bytes"]) == doc["models"]["tgt"]["overall"]["bytes"]
    assert sum(pb["tokens"]) == doc["models"]["tgt"]["overall"]["tokens"]
    assert doc["models"]["src"]["per_block"]["block_id"] == [0, 1, 3]
    on_disk = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    assert on_disk["models"]["tgt"]["domains"]["code"]["bpb"] > 0
    assert "| tgt |" in (cfg.run_dir / "eval" / "results.md").read_text()
    # The same numbers as a direct computation on the validation texts.
    tok = AutoTokenizer.from_pretrained(tiny["bpe"])
    model = AutoModelForCausalLM.from_pretrained(tiny["bpe"]).eval()
    ref = summarize(block_nll(model, tok, [TEXTS[0], TEXTS[1], TEXTS[2]], 8, "cpu"), ["prose", "code", "code"])
    assert doc["models"]["tgt"]["overall"]["bpb"] == pytest.approx(ref["overall"]["bpb"], rel=1e-6)

    # A trained model appears: only it is evaluated; the others come from the cache.
    make_tiny_model(cfg.run_dir / "train" / "clm", "bpe", seed=3)
    assert [m.label for m in evaluate.default_models(cfg)] == ["tgt", "src"]  # no manifest: unfinished
    (cfg.run_dir / "train" / "clm" / "manifest.json").write_text('{"stage": "train", "seconds": 1.0}')
    calls = []
    real = evaluate.block_nll
    monkeypatch.setattr(evaluate, "block_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines = []
    doc2 = pipeline.run_eval(cfg, device="cpu", log=lines.append)
    assert list(doc2["models"]) == ["tgt", "src", "clm"]
    assert len(calls) == 1
    assert doc2["models"]["tgt"] == doc["models"]["tgt"]
    assert any(line.startswith("  tgt: ") and line.endswith("(cached)") for line in lines)
    # The control says what it is in the results table.
    table = (cfg.run_dir / "eval" / "results.md").read_text()
    assert "| control (λ = 1) |" in table and "| clm |" not in table


def test_cache_without_per_block_figures_is_scored_again(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny)
    _write_prepare(cfg.run_dir, [(TEXTS[0], "prose", "validation"), (TEXTS[1], "code", "validation")])
    pipeline.run_eval(cfg, device="cpu", log=lambda *a: None)
    for cache in (cfg.run_dir / "eval" / "cache").glob("*.json"):  # as an older lmfuse wrote them
        rec = json.loads(cache.read_text())
        del rec["per_block"], rec[evaluate.CACHE_HASH]
        cache.write_text(json.dumps(rec))
    lines = []
    doc = pipeline.run_eval(cfg, device="cpu", log=lines.append)
    assert all("per_block" in rec for rec in doc["models"].values())
    assert sum("cached without a checksum (by an older lmfuse): scoring it again" in x for x in lines) == 2, lines


def test_eval_is_checksummed_and_an_edited_or_torn_cache_entry_is_scored_again(tmp_path, tiny):
    from lmfuse.artifacts import damage, read_manifest

    cfg = _cfg(tmp_path, tiny)
    _write_prepare(cfg.run_dir, [(TEXTS[0], "prose", "validation"), (TEXTS[1], "code", "validation")])
    doc = pipeline.run_eval(cfg, device="cpu", log=lambda *a: None)
    out = cfg.run_dir / "eval"
    caches = sorted((out / "cache").glob("*.json"))
    man = read_manifest(out)
    assert set(man["files"]) == {"results.json", "results.md", *(f"cache/{c.name}" for c in caches)}
    assert damage(out, man, full=True) == [] and evaluate.load_results(cfg.run_dir) == json.loads(
        (out / "results.json").read_text())
    assert all(evaluate.CACHE_HASH not in rec for rec in doc["models"].values())

    rec = json.loads(caches[0].read_text())
    rec["overall"]["bpb"] = 0.5  # valid JSON, one figure changed
    caches[0].write_text(json.dumps(rec))
    caches[1].write_text(caches[1].read_text()[:40])  # torn
    with pytest.raises(LmfuseError, match=caches[0].name) as e:
        evaluate.load_results(cfg.run_dir)
    assert e.value.fix.startswith("rebuild it: `lmfuse eval CONFIG`")
    (out / ".results.json.x1.tmp").write_text("{")  # what killed writes leave
    (out / "cache" / f".{caches[0].name}.x2.tmp").write_text("{")
    lines = []
    doc2 = pipeline.run_eval(cfg, device="cpu", log=lines.append)
    assert any(f"{caches[0].name} edited after it was written" in x for x in lines), lines
    assert any(f"{caches[1].name} unreadable" in x for x in lines), lines
    assert not any(x.endswith("(cached)") for x in lines), lines
    for label, rec in doc["models"].items():
        assert doc2["models"][label]["overall"]["bpb"] == pytest.approx(rec["overall"]["bpb"], rel=1e-9)
        assert doc2["models"][label]["per_block"] == rec["per_block"]
    assert not list(out.rglob("*.tmp"))
    assert evaluate.load_results(cfg.run_dir)["models"].keys() == doc["models"].keys()
    # Results without a manifest are an unfinished eval, not figures to report.
    (out / "manifest.json").unlink()
    with pytest.raises(LmfuseError, match="no complete eval artifact"):
        evaluate.load_results(cfg.run_dir)


def test_missing_corpus_is_blamed_on_the_flag(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny)
    with pytest.raises(LmfuseError) as e:
        pipeline.run_eval(cfg, device="cpu", corpus=tmp_path / "nope.jsonl")
    assert e.value.where == "--corpus" and "nope.jsonl" in e.value.what
    assert "config" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmfuseError) as e:
        pipeline.run_eval(cfg, device="cpu", corpus=empty)
    assert e.value.where == f"--corpus {empty}" and "no .txt files" in e.value.what


def test_run_eval_refuses_unloadable_model_first(tmp_path, tiny, monkeypatch):
    cfg = _cfg(tmp_path, tiny)
    _write_prepare(cfg.run_dir, [(TEXTS[0], "prose", "validation")])
    monkeypatch.setattr(evaluate, "block_nll", lambda *a, **k: pytest.fail("evaluated before checking"))
    with pytest.raises(LmfuseError, match="cannot be loaded"):
        pipeline.run_eval(cfg, models=[("ok", tiny["bpe"]), ("broken", tmp_path / "nope")], device="cpu")


def test_run_eval_refuses_empty_domain(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny)
    _write_prepare(cfg.run_dir, [(TEXTS[0], "prose", "validation"), (TEXTS[1], "code", "train")])
    with pytest.raises(LmfuseError, match="'code'.*validation_fraction|validation_fraction"):
        pipeline.run_eval(cfg, device="cpu")


def test_eval_corpus_reports_its_blocks_not_a_split(tmp_path, tiny, capsys):
    cfg = _cfg(tmp_path, tiny, prepare={"block_size": 48})
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"domain": d, "text": f"{d} text, number {i}. " * 8})
                               for d in ("poetry", "news") for i in range(3)) + "\n")
    lines = []
    doc = pipeline.run_eval(cfg, device="cpu", corpus=other, log=lines.append)
    assert doc["split"] == "all" and doc["domains"] == ["news", "poetry"]
    assert lines[0].startswith(f"eval --corpus: {doc['blocks']} blocks from 6 documents of {other} (all scored)")
    printed = capsys.readouterr().out + "\n".join(lines)
    assert " train, " not in printed and "validation" not in printed


def test_best_checkpoints_are_scored_beside_the_final_models(tmp_path, tiny):
    import shutil

    cfg = _cfg(tmp_path, tiny)
    for kind in ("fused", "clm"):
        out = cfg.run_dir / "train" / kind
        shutil.copytree(tiny["bpe"], out)
        (out / "manifest.json").write_text("{}")
    shutil.copytree(tiny["bpe"], cfg.run_dir / "train" / "fused" / "best")
    models = {m.label: m.kind for m in evaluate.default_models(cfg)}
    assert models == {"tgt": "target", "src": "source", "fused": "fused", "clm": "clm", "fused@best": "fused"}


def test_a_nan_model_is_flagged_and_results_stay_valid_json(tmp_path, tiny):
    import shutil

    nan_dir = tmp_path / "nan_model"
    shutil.copytree(tiny["spm"], nan_dir)
    model = AutoModelForCausalLM.from_pretrained(nan_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(nan_dir)
    cfg = FuseConfig.model_validate({
        "output_dir": str(tmp_path / "run"),
        "target": {"name": "tgt", "path": str(tiny["bpe"]), "dtype": "float32"},
        "sources": [{"name": "broken", "path": str(nan_dir), "dtype": "float32"}],
        "corpus": {"path": str(tmp_path / "corpus.jsonl")}})
    _write_prepare(cfg.run_dir, [(TEXTS[0], "prose", "validation"), (TEXTS[1], "code", "validation")])
    lines = []
    pipeline.run_eval(cfg, device="cpu", log=lines.append)
    text = (cfg.run_dir / "eval" / "results.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))  # strict JSON
    assert doc["models"]["broken"]["non_finite"] is True
    assert doc["models"]["broken"]["overall"]["bpb"] is None
    assert math.isfinite(doc["models"]["tgt"]["overall"]["bpb"])
    assert any("broken: NOT FINITE" in line for line in lines)
