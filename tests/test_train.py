"""End to end training on tiny models with synthetic prepare/extract/align artifacts."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lmfuse.artifacts import ArtifactDir, manifest_hash
from lmfuse.config import FuseConfig
from lmfuse.errors import LmfuseError
from lmfuse.fusion import FusionOptions
from lmfuse.pipeline import artifact, run_train
from lmfuse.testing import TRAIN_TEXT, make_tiny_model
from lmfuse.traindata import BlockData, FusedCollator, data_order

K = 4


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    # Llama (no dropout), so runs are deterministic across processes.
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tgt", "spm")


def _texts(n=12):
    words = " ".join(TRAIN_TEXT).split()
    return [" ".join(words[(i * 5 + j) % len(words)] for j in range(8 + i % 5)) for i in range(n)]


def _topk(rng, gold, V, k, p_gold):
    """[T, k] ids/logprobs: gold next token first (prob p_gold), then random others."""
    T = len(gold)
    ids = rng.integers(0, V, size=(T, k))
    ids[:, 0] = np.where(gold >= 0, gold, ids[:, 0])
    lp = np.log(np.sort(rng.uniform(0.005, 0.05, size=(T, k)))[:, ::-1])
    lp[:, 0] = np.log(p_gold)
    return ids.astype(np.int32), lp.astype(np.float16)


def write_synthetic_run(run, target_dir, n_sources=2, seed=0, n_blocks=12, target_name="tgt", validation=True):
    """prepare/, extract/<target>/ and align/<source>/ in the ARCHITECTURE.md column formats, keyed
    as the stage graph keys them for `make_cfg`'s config (so training takes them as current)."""
    from transformers import AutoTokenizer

    from lmfuse.graph import Graph

    g = Graph(make_cfg(run, target_dir, n_sources=n_sources or 2, target_name=target_name))  # the tests' config

    def keyed(label):
        return g[label].config_hash, g[label].input_keys

    tok = AutoTokenizer.from_pretrained(target_dir)
    V = len(tok)
    rng = np.random.default_rng(seed)
    texts = _texts(n_blocks)
    prep = ArtifactDir(run / "prepare", "prepare", *keyed("prepare"))
    prep.begin()
    prep.write_shard(0, pa.table({
        "block_id": pa.array(range(n_blocks), pa.int64()), "doc_id": pa.array(range(n_blocks), pa.int64()),
        "domain": ["d"] * n_blocks,
        "split": ["validation" if validation and i % 4 == 3 else "train" for i in range(n_blocks)],
        "text": texts}))
    prep.finish(rows=n_blocks)
    enc = [tok(t, return_offsets_mapping=True) for t in texts]
    ext = ArtifactDir(run / "extract" / target_name, "extract", *keyed(f"extract/{target_name}"))
    ext.begin()
    cols = {k: [] for k in ("input_ids", "offset_start", "offset_end", "topk_ids", "topk_logprobs", "token_ce",
                            "seq_ce", "nll_sum", "scored_bytes")}
    for e, text in zip(enc, texts, strict=True):
        ids = np.asarray(e["input_ids"])
        gold = np.append(ids[1:], -1)
        tid, tlp = _topk(rng, gold, V, K, 0.3)
        ce = rng.uniform(1, 3, size=len(ids) - 1).astype(np.float32)
        cols["input_ids"].append(ids.astype(np.int32))
        cols["offset_start"].append(np.array([o[0] for o in e["offset_mapping"]], np.int32))
        cols["offset_end"].append(np.array([o[1] for o in e["offset_mapping"]], np.int32))
        cols["topk_ids"].append(tid.ravel())
        cols["topk_logprobs"].append(tlp.ravel())
        cols["token_ce"].append(ce)
        cols["seq_ce"].append(float(ce.mean()))
        cols["nll_sum"].append(float(ce.sum()))
        cols["scored_bytes"].append(len(text.encode()))
    types = {"input_ids": pa.list_(pa.int32()), "offset_start": pa.list_(pa.int32()),
             "offset_end": pa.list_(pa.int32()), "topk_ids": pa.list_(pa.int32()),
             "topk_logprobs": pa.list_(pa.float16()), "token_ce": pa.list_(pa.float32()),
             "seq_ce": pa.float32(), "nll_sum": pa.float64(), "scored_bytes": pa.int64()}
    ext.write_shard(0, pa.table({"block_id": pa.array(range(n_blocks), pa.int64()),
                                 **{k: pa.array(v, types[k]) for k, v in cols.items()}}))
    ext.finish(rows=n_blocks, k=K, tokens_key=g.key(f"extract/{target_name}#tokens"))
    for s in range(n_sources):
        al = ArtifactDir(run / "align" / f"src{s}", "align", *keyed(f"align/src{s}"))
        al.begin()
        acol = {k: [] for k in ("aligned", "topk_ids", "topk_logprobs", "token_ce", "span_nll", "span_exact",
                                "seq_ce", "nll_per_byte")}
        for e in enc:
            ids = np.asarray(e["input_ids"])
            T = len(ids)
            gold = np.append(ids[1:], -1)
            aligned = rng.uniform(size=T) < 0.8
            tid, tlp = _topk(rng, gold, V, K, 0.5 + 0.1 * s)
            tid[~aligned] = -1
            tlp[~aligned] = -np.inf
            ce = np.where(aligned[:-1], rng.uniform(0.5, 2, size=T - 1), np.nan).astype(np.float32)
            acol["aligned"].append(aligned.astype(np.uint8))
            acol["topk_ids"].append(tid.ravel())
            acol["topk_logprobs"].append(tlp.ravel())
            acol["token_ce"].append(ce)
            acol["span_nll"].append(rng.uniform(0.5, 3, size=T - 1).astype(np.float32))
            acol["span_exact"].append((aligned[:-1] & aligned[1:]).astype(np.uint8))
            acol["seq_ce"].append(float(np.nanmean(ce)))
            acol["nll_per_byte"].append(float(rng.uniform(0.5, 1.5)))
        atypes = {"aligned": pa.list_(pa.uint8()), "topk_ids": pa.list_(pa.int32()),
                  "topk_logprobs": pa.list_(pa.float16()), "token_ce": pa.list_(pa.float32()),
                  "span_nll": pa.list_(pa.float32()), "span_exact": pa.list_(pa.uint8()), "seq_ce": pa.float32(),
                  "nll_per_byte": pa.float32()}
        al.write_shard(0, pa.table({"block_id": pa.array(range(n_blocks), pa.int64()),
                                    **{k: pa.array(v, atypes[k]) for k, v in acol.items()}}))
        al.finish(rows=n_blocks, k=K)
    return run


def make_cfg(run, target_dir, n_sources=2, target_name="tgt", **train):
    base = {"max_steps": 8, "batch_size": 2, "learning_rate": 3e-3, "warmup_ratio": 0.0, "precision": "float32",
            "clm_weight": 0.5}
    base.update(train)
    return FuseConfig.model_validate({
        "output_dir": str(run), "corpus": {"path": str(run / "corpus.jsonl")},
        "target": {"name": target_name, "path": str(target_dir), "dtype": "float32"},
        "sources": [{"name": f"src{s}", "path": str(target_dir)} for s in range(n_sources)],
        "train": base})


def _log(path):
    return [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]


def test_data_order_is_deterministic_and_covers_epochs():
    a, b = data_order(5, 12, 3), data_order(5, 12, 3)
    assert (a == b).all() and sorted(a[:5]) == list(range(5)) and sorted(a[5:10]) == list(range(5))
    assert not (data_order(5, 12, 4) == a).all()


@pytest.mark.parametrize("level,quality", [("sequence", "nll_per_byte"), ("token", "ce_per_token"),
                                           ("token", "nll_per_byte")])
def test_collator_builds_normalised_sparse_targets(tmp_path, target_dir, level, quality):
    run = write_synthetic_run(tmp_path / "run", target_dir, n_sources=3)
    cfg = make_cfg(run, target_dir, n_sources=3, level=level, quality=quality)
    data = BlockData(cfg, control=False)
    coll = FusedCollator("avgCE", FusionOptions(), 0, 10_000)
    batch = coll([data.block(b) for b in data.train_ids[:3]])
    tid, tp, labels = batch["target_ids"], batch["target_probs"], batch["labels"]
    assert tid.shape[:2] == labels.shape and tid.shape[2] <= 4 * (K + 1)
    sums = tp.sum(-1)
    has = labels != -100
    assert torch.allclose(sums[has], torch.ones_like(sums[has]), atol=1e-5)
    # Padding holds no targets at all.
    pad = batch["attention_mask"] == 0
    assert pad.any() and (tid[pad] == -1).all() and (tp[pad] == 0).all()
    # A block's last token has no next token: its row is a whole distribution or empty, nothing between.
    last = ~has & ~pad
    assert last.sum() == 3
    empty = (tid[last] == -1).all(-1)
    assert torch.allclose(sums[last][~empty], torch.ones_like(sums[last][~empty]), atol=1e-5)
    assert (sums[last][empty] == 0).all()


def test_collator_rest_bucket_and_span_targets(tmp_path, target_dir):
    run = write_synthetic_run(tmp_path / "run", target_dir, n_sources=2)
    cfg = make_cfg(run, target_dir, n_sources=2, include_target=False)
    data = BlockData(cfg, control=False)
    items = [data.block(b) for b in data.train_ids[:3]]
    batch = FusedCollator("avgCE", FusionOptions(outside_topk="rest"), 0, 10_000, span=True)(items)
    has = batch["labels"] != -100
    # Stored probabilities plus the rest bucket make one distribution at every labelled position.
    total = batch["target_probs"].sum(-1) + batch["target_rest"]
    assert torch.allclose(total[has], torch.ones_like(total[has]), atol=1e-5)
    assert (batch["target_rest"][has] > 0).any()
    # Span targets, worked out by hand for minCE: where some source scored exactly the gold token's
    # text (span_exact), the probability the best-quality one of those gives it; NaN elsewhere and
    # at the last token (no gold token).
    span = FusedCollator("minCE", FusionOptions(), 0, 10_000, span=True)(items)["span_target"]
    n_spans = 0
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        for t in range(n):
            offers = [(float(c.quality), i, c.span_ll[t]) for i, c in enumerate(it["candidates"])
                      if np.isfinite(c.span_ll[t])]
            if t == n - 1 or not offers:
                assert torch.isnan(span[b, t]), (b, t)
                continue
            _, _, ll = min(offers)
            assert float(span[b, t]) == pytest.approx(np.exp(min(ll, 0.0)), rel=1e-5), (b, t)
            n_spans += 1
        assert torch.isnan(span[b, n:]).all()
    assert n_spans > 10
    # Without the options, neither is built.
    plain = FusedCollator("avgCE", FusionOptions(), 0, 10_000)(items)
    assert "target_rest" not in plain and "span_target" not in plain


def test_rest_and_span_train_end_to_end(tmp_path, target_dir):
    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, max_steps=6, outside_topk="rest", span_weight=0.5, logits_chunk_size=4)
    run_train(cfg)
    train = [r for r in _log(run / "train" / "fused") if "loss" in r]
    assert all(np.isfinite([r["loss"], r["fusion"], r["span"]]).all() and r["span"] > 0 for r in train)
    # total = λ·clm + (1 − λ)·fusion + μ·span
    for r in train:
        assert r["loss"] == pytest.approx(0.5 * r["clm"] + 0.5 * r["fusion"] + 0.5 * r["span"], rel=1e-5)
    assert train[-1]["loss"] < train[0]["loss"]


def test_training_without_validation_blocks_finishes(tmp_path, target_dir):
    run = write_synthetic_run(tmp_path / "run", target_dir, validation=False)  # every block trains
    man = run_train(make_cfg(run, target_dir, max_steps=2, eval_every=1, keep_best=True), control=True)
    assert man["metrics"]["final_eval_loss"] is None and man["metrics"]["validation_blocks"] == 0
    assert not [r for r in _log(run / "train" / "clm") if "eval_loss" in r]


def test_keep_best_saves_the_lowest_validation_loss_weights(tmp_path, target_dir):
    from transformers import AutoModelForCausalLM

    from lmfuse.checkpoint import best_so_far

    run = write_synthetic_run(tmp_path / "run", target_dir)
    # A large learning rate: validation loss falls, then rises, so the best step is not the last.
    cfg = make_cfg(run, target_dir, max_steps=8, eval_every=2, keep_best=True, learning_rate=3e-2)
    man = run_train(cfg)
    out = run / "train" / "fused"
    evals = {r["step"]: r["eval_loss"] for r in _log(out) if "eval_loss" in r}
    assert min(evals) == 0  # the untrained target's validation loss, which is never a best step
    evals.pop(0)
    best_step = min(evals, key=evals.get)
    assert man["metrics"]["best_step"] == best_step
    assert man["metrics"]["best_eval_loss"] == pytest.approx(evals[best_step])
    best = AutoModelForCausalLM.from_pretrained(out / "best")
    final = AutoModelForCausalLM.from_pretrained(out)
    same = all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), final.state_dict().values()))
    assert same == (best_step == 8)
    # Resuming from a checkpoint older than the kept best discards it (those steps run again).
    assert best_so_far(out, resumed_step=best_step) == pytest.approx(evals[best_step])
    assert best_so_far(out, resumed_step=best_step - 1) == float("inf") and not (out / "best").exists()


def test_end_to_end_loss_decreases_and_model_loads(tmp_path, target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, max_steps=12, eval_every=4, precision="bfloat16", logits_chunk_size=5,
                   fusion="avgCE", level="token", gradient_checkpointing=True, tensorboard=True)
    man = run_train(cfg)
    out = run / "train" / "fused"
    log = _log(out)
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert len(train) == 12 and [r["step"] for r in evals] == [0, 4, 8, 12]  # step 0: before training
    assert train[-1]["loss"] < train[0]["loss"] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["fusion"] > 0 for r in train)
    assert man["metrics"]["steps"] == 12 and (out / "README.md").read_text().count("avgCE") >= 1
    assert (out / "model.safetensors").exists() and not (out / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > 1
    # Complete: a second call skips.
    assert run_train(cfg)["created"] == man["created"]


def test_control_hash_ignores_fusion_options_and_inputs(tmp_path, target_dir):
    run = write_synthetic_run(tmp_path / "run", target_dir)
    a = make_cfg(run, target_dir)
    b = make_cfg(run, target_dir, fusion="avgCE", clm_weight=0.1, temperature=2.0)
    assert artifact(a, "train/clm").config_hash == artifact(b, "train/clm").config_hash
    assert artifact(a, "train/fused").config_hash != artifact(b, "train/fused").config_hash
    assert set(artifact(a, "train/fused").inputs) == {"extract/tgt", "align/src0", "align/src1"}
    from lmfuse.artifacts import read_manifest

    assert artifact(a, "train/fused").inputs["align/src0"] == read_manifest(run / "align" / "src0")["key"]
    assert set(artifact(a, "train/clm").inputs) == {"extract/tgt"}
    assert artifact(a, "train/clm").path.name == "clm"
    c = make_cfg(run, target_dir, learning_rate=1e-4)
    assert artifact(a, "train/clm").config_hash != artifact(c, "train/clm").config_hash


def test_control_runs_without_sources_data(tmp_path, target_dir):
    run = write_synthetic_run(tmp_path / "run", target_dir, n_sources=0)
    cfg = make_cfg(run, target_dir, max_steps=3)
    man = run_train(cfg, control=True)
    log = _log(run / "train" / "clm")
    assert man["control"] and all(r["fusion"] == 0 and r["clm_weight"] == 1.0 for r in log if "loss" in r)
    with pytest.raises(LmfuseError, match="no complete align artifact"):
        run_train(cfg)


def test_bad_inputs_are_refused_before_training(tmp_path, target_dir):
    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir)
    with pytest.raises(LmfuseError, match="unknown fusion function"):
        run_train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"fusion": "maxCE"})}))
    with pytest.raises(LmfuseError, match=r"λ must lie in \[0, 1\]"):
        run_train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"clm_weight": 1.5})}))
    # Aligned data made from another target extraction.
    other = write_synthetic_run(tmp_path / "other", target_dir, target_name="tgt")
    man = json.loads((other / "align" / "src0" / "manifest.json").read_text())
    man["inputs"]["extract_target"] = "somethingelse"
    man["manifest_sha256"] = manifest_hash(man)  # re-sealed: made so, not damaged after
    (other / "align" / "src0" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(LmfuseError, match="another target"):
        run_train(make_cfg(other, target_dir))
    assert not (other / "train" / "fused").exists()


def _script(tmp_path, run, target_dir, crash_after_checkpoint=None, die_in_cleanup=False, **train):
    cfg = make_cfg(run, target_dir, **train)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, signal, sys
        import lmfuse.train
        from lmfuse.config import FuseConfig
        from lmfuse.pipeline import run_train
        save = lmfuse.train.save_checkpoint
        def save_then_die(acc, path, step, extra):
            out = save(acc, path, step, extra)
            if step == {crash_after_checkpoint!r}:
                os.kill(os.getpid(), signal.SIGKILL)  # a real SIGKILL, right after the checkpoint
            return out
        lmfuse.train.save_checkpoint = save_then_die
        if {die_in_cleanup!r}:
            import pathlib, shutil
            rmtree = shutil.rmtree
            def rmtree_then_die(path, *a, **k):
                if pathlib.Path(path).name == "checkpoints":  # the final cleanup of the checkpoints:
                    for f in pathlib.Path(path).glob("step-*/model.safetensors"):
                        f.unlink()  # its first files are gone when the SIGKILL comes
                    os.kill(os.getpid(), signal.SIGKILL)
                return rmtree(path, *a, **k)
            shutil.rmtree = rmtree_then_die
        cfg = FuseConfig.model_validate(json.load(open({str(tmp_path / "cfg.json")!r})))
        run_train(cfg)
    """))
    return script


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path, target_dir):
    ref_run = write_synthetic_run(tmp_path / "ref", target_dir)
    run_train(make_cfg(ref_run, target_dir, save_every=3, max_steps=7, grad_accum=2))
    run = write_synthetic_run(tmp_path / "run", target_dir)
    script = _script(tmp_path, run, target_dir, crash_after_checkpoint=6, save_every=3, max_steps=7, grad_accum=2)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    out = run / "train" / "fused"
    assert (out / "checkpoints" / "step-00000006").exists() and not (out / "manifest.json").exists()
    _script(tmp_path, run, target_dir, save_every=3, max_steps=7, grad_accum=2)  # same script, no crash
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from step-00000006" in res.stdout
    a, b = _weights(ref_run / "train" / "fused"), _weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la, lb = _log(ref_run / "train" / "fused"), _log(out)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r.get("loss") for r in la] == pytest.approx([r.get("loss") for r in lb], abs=1e-6)


def test_sigkill_while_removing_the_checkpoints_then_rerun_finishes(tmp_path, target_dir):
    """Issue 9.5: killed in the final cleanup, train was stuck for good (model without manifest,
    every rerun `FileNotFoundError … step-…/pytorch_model.bin`)."""
    ref_run = write_synthetic_run(tmp_path / "ref", target_dir)
    run_train(make_cfg(ref_run, target_dir, **RESUME))
    run = write_synthetic_run(tmp_path / "run", target_dir)
    script = _script(tmp_path, run, target_dir, die_in_cleanup=True, **RESUME)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    out = run / "train" / "fused"
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("checkpoints/step-*/model.safetensors"))  # the state that got stuck
    _script(tmp_path, run, target_dir, **RESUME)  # same script, no fault
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    _same_weights(_weights(ref_run / "train" / "fused"), _weights(out))
    _same_log(_log(ref_run / "train" / "fused"), _log(out))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


RESUME = {"save_every": 3, "max_steps": 7, "grad_accum": 2}


class Killed(BaseException):
    """A simulated kill: nothing in lmfuse catches it, so the files stay as a kill leaves them."""


def _same_log(a, b):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, abs=1e-6)


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, target_dir):
    """Weights and log of the run the killed-and-rerun ones must reproduce."""
    run = write_synthetic_run(tmp_path_factory.mktemp("uninterrupted") / "run", target_dir)
    run_train(make_cfg(run, target_dir, **RESUME))
    return _weights(run / "train" / "fused"), _log(run / "train" / "fused")


def _kill_inside_checkpoint_save(mp, out):
    import lmfuse.checkpoint as ck

    records = ck._file_records

    def die(directory):  # accelerate has written the step-6 state; its list of files is next
        if directory.name == ".tmp-step-00000006":
            raise Killed
        return records(directory)

    mp.setattr(ck, "_file_records", die)


def _kill_after_checkpoint_then_damage_it(mp, out):
    import lmfuse.train as tr

    save = tr.save_checkpoint

    def save_then_die(acc, path, step, extra):
        ckpt = save(acc, path, step, extra)
        if step == 6:
            weights = ckpt / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-100] ^= 0xFF  # one flipped byte, same size
            weights.write_bytes(bytes(data))
            raise Killed
        return ckpt

    mp.setattr(tr, "save_checkpoint", save_then_die)


def _kill_writing_the_final_model(mp, out):
    import lmfuse.checkpoint as ck

    write = ck.atomic_write_json

    def die(path, obj):
        if path.name == ck.FINAL_STATE:  # weights and tokenizer written, the metrics not yet
            raise Killed
        return write(path, obj)

    mp.setattr(ck, "atomic_write_json", die)


def _kill_moving_the_final_model(mp, out):
    import lmfuse.checkpoint as ck

    replace, moved = os.replace, []

    def die(src, dst):
        if Path(src).parent.name == ck.FINAL_DIR:
            if moved:
                raise Killed  # one file moved up, the others still in .final/
            moved.append(src)
        return replace(src, dst)

    mp.setattr(ck.os, "replace", die)


def _kill_removing_the_checkpoints(mp, out):
    import lmfuse.checkpoint as ck

    rmtree = shutil.rmtree

    def die(path, *a, **k):
        if Path(path).name == ck.CKPT_DIR:
            for f in Path(path).glob("step-*/model.safetensors"):
                f.unlink()
            raise Killed
        return rmtree(path, *a, **k)

    mp.setattr(ck.shutil, "rmtree", die)


def _kill_before_the_manifest(mp, out):
    def die(self, **extra):
        raise Killed

    mp.setattr(ArtifactDir, "finish", die)


def _kill_after_the_manifest(mp, out):
    import lmfuse.train as tr

    def die(path):
        raise Killed

    mp.setattr(tr, "drop_final", die)


@pytest.mark.parametrize("kill", [_kill_inside_checkpoint_save, _kill_after_checkpoint_then_damage_it,
                                  _kill_writing_the_final_model, _kill_moving_the_final_model,
                                  _kill_removing_the_checkpoints, _kill_before_the_manifest,
                                  _kill_after_the_manifest], ids=lambda f: f.__name__.removeprefix("_kill_"))
def test_killed_at_any_moment_a_rerun_ends_with_the_uninterrupted_weights(tmp_path, target_dir, uninterrupted,
                                                                         monkeypatch, kill, capsys):
    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, **RESUME)
    out = run / "train" / "fused"
    with monkeypatch.context() as mp:
        kill(mp, out)
        with pytest.raises(Killed):
            run_train(cfg)
    complete = (out / "manifest.json").exists()
    assert complete == (kill is _kill_after_the_manifest)
    man = run_train(cfg)
    assert man["metrics"]["steps"] == 7 and (out / "manifest.json").exists()
    weights, log = uninterrupted
    _same_weights(weights, _weights(out))
    _same_log(log, _log(out))
    # Nothing half-written is left, and the model loads.
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    if kill is _kill_after_checkpoint_then_damage_it:
        assert "skipping checkpoint step-00000006" in capsys.readouterr().out


def test_resume_loads_no_pickled_weights_and_unpickles_nothing(tmp_path, target_dir, monkeypatch):
    """Model weights come from safetensors; optimizer, scheduler and RNG states load with
    `torch.load(weights_only=True)`."""
    import lmfuse.train as tr

    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, **RESUME)
    save = tr.save_checkpoint

    def save_then_die(acc, path, step, extra):
        ckpt = save(acc, path, step, extra)
        if step == 6:
            raise Killed
        return ckpt

    with monkeypatch.context() as mp:
        mp.setattr(tr, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_train(cfg)
    ckpt = run / "train" / "fused" / "checkpoints" / "step-00000006"
    assert (ckpt / "model.safetensors").exists() and not list(ckpt.glob("pytorch_model*"))
    loads = []
    real_load = torch.load

    def recording_load(*a, **k):
        loads.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", recording_load)
    run_train(cfg)
    assert len(loads) >= 3 and all(w is True for w in loads), loads  # optimizer, scheduler, RNG


def test_a_checkpoint_that_does_not_check_out_is_named_and_skipped(tmp_path):
    from lmfuse.checkpoint import CKPT_STATE, checkpoint_problem, last_good_checkpoint

    root = tmp_path / "checkpoints"
    old, new = root / "step-00000003", root / "step-00000006"
    for d, step in ((old, 3), (new, 6)):
        d.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            (d / name).write_bytes(name.encode() * step)
        from lmfuse.checkpoint import _file_records

        (d / CKPT_STATE).write_text(json.dumps({"step": step, "files": _file_records(d)}))
    assert last_good_checkpoint(tmp_path, log=lambda m: None) == (new, 6)
    (new / "optimizer.bin").write_bytes(b"optimizer.bin" * 5)  # cut short
    assert "optimizer.bin has" in checkpoint_problem(new)
    said = []
    assert last_good_checkpoint(tmp_path, log=said.append) == (old, 3)
    assert said and "step-00000006" in said[0]
    (old / "scheduler.bin").write_bytes(b"x" * len(b"scheduler.bin" * 3))  # same size, other bytes
    assert "does not match" in checkpoint_problem(old)
    assert last_good_checkpoint(tmp_path, log=lambda m: None) is None
    (old / CKPT_STATE).write_text('{"step": 3, "fi')  # cut by a kill
    assert checkpoint_problem(old).startswith("unreadable trainer_state.json")
    # A checkpoint from before files were listed: accelerate's files must all be there.
    (new / CKPT_STATE).write_text(json.dumps({"step": 6}))
    (new / "model.safetensors").unlink()
    assert checkpoint_problem(new) == "missing model.safetensors"
    (new / "model.safetensors").write_bytes(b"w")
    assert checkpoint_problem(new) is None
    assert checkpoint_problem(new, world=2) == "missing random_states_1.pkl"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, target_dir):
    run1 = write_synthetic_run(tmp_path / "one", target_dir)
    run_train(make_cfg(run1, target_dir, batch_size=2, max_steps=4))
    run2 = write_synthetic_run(tmp_path / "two", target_dir)
    script = _script(tmp_path, run2, target_dir, batch_size=1, max_steps=4)
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process (simple launcher); two CPU
    # processes need the torchrun launcher (`--multi_gpu`) with ACCELERATE_USE_CPU set.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    l1 = [r for r in _log(run1 / "train" / "fused") if "loss" in r]
    l2 = [r for r in _log(run2 / "train" / "fused") if "loss" in r]
    for key in ("loss", "clm", "fusion"):
        assert [r[key] for r in l1] == pytest.approx([r[key] for r in l2], abs=1e-5)
    assert json.loads((run2 / "train" / "fused" / "manifest.json").read_text())["metrics"]["world_size"] == 2


def test_a_non_finite_loss_stops_training_before_the_weights_change(tmp_path, target_dir, monkeypatch):
    import lmfuse.train as tr

    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, max_steps=4, save_every=2)
    real = tr.fused_clm_loss
    calls = {"n": 0}

    def diverging(*a, **k):  # one loss call per optimizer step here: the 3rd step goes NaN
        out = real(*a, **k)
        calls["n"] += 1
        return (out[0] * float("nan"), *out[1:]) if calls["n"] == 3 else out

    monkeypatch.setattr(tr, "fused_clm_loss", diverging)
    with pytest.raises(LmfuseError, match="not finite at step 3") as e:
        run_train(cfg)
    assert "learning_rate" in str(e.value)
    out = run / "train" / "fused"
    assert not (out / "manifest.json").exists()  # not complete
    # The checkpoint of step 2 is there and finite: a rerun (without the fault) resumes from it.
    from safetensors.torch import load_file

    from lmfuse.checkpoint import checkpoint_problem

    [ckpt] = (out / "checkpoints").glob("step-*")
    assert ckpt.name == "step-00000002" and checkpoint_problem(ckpt) is None
    weights = load_file(next(ckpt.glob("*.safetensors")))
    assert all(torch.isfinite(w).all() for w in weights.values())
    monkeypatch.setattr(tr, "fused_clm_loss", real)
    man = run_train(cfg)
    assert man["metrics"]["steps"] == 4 and np.isfinite(man["metrics"]["final_train_loss"])


# -- validation before the first step (issue 26.7) -------------------------------------------------
VALIDATED = {"max_steps": 6, "eval_every": 2, "keep_best": True, "save_every": 2}


def test_validation_before_the_first_step_is_logged_and_changes_nothing(tmp_path, target_dir):
    plain = write_synthetic_run(tmp_path / "plain", target_dir)
    man_plain = run_train(make_cfg(plain, target_dir, max_steps=6))
    run = write_synthetic_run(tmp_path / "run", target_dir)
    man = run_train(make_cfg(run, target_dir, **VALIDATED))
    out = run / "train" / "fused"
    # The same weights, bit for bit, and the same training losses: measuring step 0 changes nothing.
    a, b = _weights(plain / "train" / "fused"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in _log(plain / "train" / "fused") if "loss" in r] == [r for r in _log(out) if "loss" in r]
    # Step 0 is the first line of the log and is in the manifest; it never counts as the best step.
    log = _log(out)
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6] and log[0] == evals[0]
    metrics = man["metrics"]
    assert metrics["initial_eval_loss"] == evals[0]["eval_loss"] and metrics["best_step"] > 0
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"] and metrics["eval_loss_rose"] is False
    assert not [r for r in log if "warning" in r]
    # A run that does not validate during training measures no step 0.
    assert man_plain["metrics"]["initial_eval_loss"] is None and man_plain["metrics"]["eval_loss_rose"] is None
    assert [r["step"] for r in _log(plain / "train" / "fused") if "eval_loss" in r] == [6]


def _kill_at_the_checkpoint_of_step_4(mp):
    import lmfuse.train as tr

    save = tr.save_checkpoint

    def save_then_die(acc, path, step, extra):
        ckpt = save(acc, path, step, extra)
        if step == 4:
            raise Killed
        return ckpt

    mp.setattr(tr, "save_checkpoint", save_then_die)


def _kill_inside_the_first_checkpoint(mp):
    import lmfuse.checkpoint as ck

    records = ck._file_records

    def die(directory):  # no checkpoint checks out: the rerun starts from step 0 again
        if directory.name == ".tmp-step-00000002":
            raise Killed
        return records(directory)

    mp.setattr(ck, "_file_records", die)


@pytest.mark.parametrize("kill,evals_in_rerun", [(_kill_at_the_checkpoint_of_step_4, 1),
                                                 (_kill_inside_the_first_checkpoint, 4)],
                         ids=["after-step-4", "inside-the-first-checkpoint"])
def test_a_resumed_run_measures_step_0_once(tmp_path, target_dir, monkeypatch, kill, evals_in_rerun):
    import lmfuse.train as tr

    ref = write_synthetic_run(tmp_path / "ref", target_dir)
    man_ref = run_train(make_cfg(ref, target_dir, **VALIDATED))
    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, **VALIDATED)
    with monkeypatch.context() as mp:
        kill(mp)
        with pytest.raises(Killed):
            run_train(cfg)
    real, calls = tr.evaluate_loss, []
    monkeypatch.setattr(tr, "evaluate_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    man = run_train(cfg)
    # Resumed from step 4: only step 6 is validated again; from step 0: steps 0, 2, 4 and 6.
    assert len(calls) == evals_in_rerun
    out = run / "train" / "fused"
    _same_log(_log(ref / "train" / "fused"), _log(out))
    assert [r["step"] for r in _log(out) if "eval_loss" in r] == [0, 2, 4, 6]
    _same_weights(_weights(ref / "train" / "fused"), _weights(out))
    for k in ("initial_eval_loss", "final_eval_loss", "best_step", "eval_loss_rose"):
        assert man["metrics"][k] == pytest.approx(man_ref["metrics"][k], abs=1e-6), k


def test_a_validation_loss_that_ends_above_its_start_is_flagged(tmp_path, target_dir, capsys):
    """Issue 26.7: a target trained at too high a learning rate ended worse than it started, and
    nothing said so."""
    run = write_synthetic_run(tmp_path / "run", target_dir)
    man = run_train(make_cfg(run, target_dir, max_steps=8, eval_every=4, learning_rate=0.3), control=True)
    m = man["metrics"]
    assert m["final_eval_loss"] > m["initial_eval_loss"] and m["eval_loss_rose"] is True
    out = run / "train" / "clm"
    [warning] = [r for r in _log(out) if "warning" in r]
    assert warning["step"] == 8 and warning["initial_eval_loss"] == m["initial_eval_loss"]
    assert warning["final_eval_loss"] == m["final_eval_loss"]
    assert "learning rate" in warning["warning"] and "train.learning_rate" in warning["warning"]
    printed = capsys.readouterr().out
    assert "validation loss ended above its step-0 value" in printed and "10× lower" in printed
    assert "validation loss ended above its step-0 value" in (out / "README.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 autocast runs on a GPU")
def test_float16_without_a_gpu_says_it_trains_in_float32(tmp_path, target_dir, capsys):
    """Issue 26.8: `train.precision: float16` on a CPU trained in float32 without a word."""
    run = write_synthetic_run(tmp_path / "run", target_dir)
    man = run_train(make_cfg(run, target_dir, max_steps=2, precision="float16"))
    assert man["metrics"]["precision_used"] == "float32"
    assert "float16 autocast needs a GPU" in capsys.readouterr().out
    assert "| precision_used | float32 |" in (run / "train" / "fused" / "README.md").read_text()
    other = write_synthetic_run(tmp_path / "other", target_dir)
    assert run_train(make_cfg(other, target_dir, max_steps=2))["metrics"]["precision_used"] == "float32"
