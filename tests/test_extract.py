import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmfuse.artifacts import read_manifest
from lmfuse.config import load_config
from lmfuse.errors import LmfuseError
from lmfuse.extract import run_extract, topk_from_logits
from lmfuse.prepare import load_blocks, run_prepare

QUIET = {"log": lambda *a: None}


def lmfuse(*args, check=True, env=None):
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"lmfuse {' '.join(map(str, args))} failed:\n{res.stdout}\n{res.stderr}")
    return res


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("shard-*.arrow"))}


def test_topk_from_logits_hand_built():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 0.1, 3.0], [1.0, 2.0, 3.0, 4.0]])
    ids = torch.tensor([0, 3, 1])
    top_ids, top_lp, ce, _ = topk_from_logits(logits, ids, 2)
    lsm = torch.log_softmax(logits, -1)
    assert top_ids.tolist() == [[0, 1], [3, 0], [3, 2]]
    assert torch.allclose(top_lp, lsm.gather(-1, top_ids.long()))
    assert torch.allclose(ce, torch.stack([-lsm[0, 3], -lsm[1, 1]]))


def test_cli_prepare_extract_matches_a_direct_forward_pass(make_config, tiny_models):
    cfg_path = make_config()
    lmfuse("prepare", cfg_path)
    lmfuse("extract", cfg_path, "-m", "tgt", "-m", "src_spm")
    cfg = load_config(cfg_path)
    blocks = load_blocks(cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, kind in [("tgt", "bpe"), ("src_spm", "spm")]:
        path = cfg.run_dir / "extract" / name
        manifest = read_manifest(path)
        assert manifest["n_blocks"] == len(blocks) and manifest["top_k"] == 5
        from lmfuse.artifacts import load_arrow_dataset

        ds = load_arrow_dataset(sorted((path / "shards").glob("*.arrow")))
        assert ds["block_id"] == blocks["block_id"]
        tok = AutoTokenizer.from_pretrained(tiny_models[kind])
        model = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
        for row, text in list(zip(ds, blocks["text"]))[:12]:
            enc = tok(text, return_offsets_mapping=True)
            assert row["input_ids"] == enc["input_ids"]
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                lsm = torch.log_softmax(model(ids).logits[0].double(), -1)
            T = ids.shape[1]
            top_ids = np.array(row["topk_ids"]).reshape(T, 5)
            top_lp = np.array(row["topk_logprobs"], dtype=np.float32).reshape(T, 5)
            ref_lp, ref_ids = torch.topk(lsm, 5, -1)
            np.testing.assert_allclose(top_lp, ref_lp.numpy(), atol=2e-3, rtol=1e-3)  # fp16 storage
            np.testing.assert_allclose(lsm.numpy()[np.arange(T)[:, None], top_ids], ref_lp.numpy(), atol=1e-5)
            gold = -lsm[torch.arange(T - 1), ids[0, 1:]].numpy()
            np.testing.assert_allclose(row["token_ce"], gold, rtol=1e-5, atol=1e-5)
            assert row["seq_ce"] == pytest.approx(gold.mean(), rel=1e-5)
            assert row["nll_sum"] == pytest.approx(gold.sum(), rel=1e-6)
            first_end = enc["offset_mapping"][0][1] if kind == "bpe" else 0  # spm's first token is BOS
            assert row["scored_bytes"] == len(text[first_end:].encode())
            ends = row["offset_end"]
            assert all(a <= b for a, b in zip(ends, ends[1:]))


KILL_SCRIPT = """
import sys, time
from lmfuse.artifacts import ArtifactDir
from lmfuse.config import load_config
from lmfuse.extract import run_extract
orig = ArtifactDir.write_shard
def slow(self, i, table):
    orig(self, i, table)
    print("wrote", i, flush=True)
    time.sleep(0.4)
ArtifactDir.write_shard = slow
run_extract(load_config(sys.argv[1]), sys.argv[2], progress=False)
print("done", flush=True)
"""


def test_extract_killed_with_sigkill_resumes_to_the_same_artifact(make_config, tmp_path):
    cfg = load_config(make_config())
    run_prepare(cfg, **QUIET)
    run_extract(cfg, "src_spm", progress=False, **QUIET)
    reference = shard_bytes(cfg.run_dir / "extract" / "src_spm")
    ref_manifest = read_manifest(cfg.run_dir / "extract" / "src_spm")
    assert len(reference) >= 4
    shutil.rmtree(cfg.run_dir / "extract" / "src_spm")

    script = tmp_path / "slow_extract.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(make_config()), "src_spm"], stdout=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("wrote") and int(line.split()[1]) >= 1:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = shard_bytes(cfg.run_dir / "extract" / "src_spm")
    assert 1 <= len(partial) < len(reference)
    assert read_manifest(cfg.run_dir / "extract" / "src_spm") is None  # not marked complete

    manifest = run_extract(cfg, "src_spm", progress=False, **QUIET)
    assert shard_bytes(cfg.run_dir / "extract" / "src_spm") == reference
    assert manifest["n_tokens"] == ref_manifest["n_tokens"]
    assert manifest["config_hash"] == ref_manifest["config_hash"]


def test_two_process_accelerate_run_writes_the_same_artifact(make_config):
    cfg_path = make_config()
    cfg = load_config(cfg_path)
    run_prepare(cfg, **QUIET)
    # float32 sums depend on how a matmul is split over threads; torchrun gives each rank one
    # thread, so the one-process run is pinned to one thread too (the claim is "same bytes for
    # the same threads per process", whatever the machine's core count or load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_extract(cfg, "tgt", progress=False, **QUIET)
    finally:
        torch.set_num_threads(threads)
    one = shard_bytes(cfg.run_dir / "extract" / "tgt")
    shutil.rmtree(cfg.run_dir / "extract" / "tgt")
    lmfuse_bin = shutil.which("lmfuse")
    # accelerate 1.x starts one process for `--cpu`; two CPU processes need its torchrun launcher.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", lmfuse_bin, "extract",
           str(cfg_path), "-m", "tgt"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0/2]" in res.stderr and "[rank 1/2]" in res.stderr  # really two processes
    assert read_manifest(cfg.run_dir / "extract" / "tgt") is not None
    assert shard_bytes(cfg.run_dir / "extract" / "tgt") == one


def test_nan_logits_are_reported_with_the_block(make_config, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "nan_model"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["spm"])
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_models["spm"]).save_pretrained(bad)
    cfg = load_config(make_config({"sources": [{"name": "broken", "path": str(bad), "dtype": "float32"}]}))
    run_prepare(cfg, **QUIET)
    with pytest.raises(LmfuseError, match="non-finite logits") as e:
        run_extract(cfg, "broken", progress=False, **QUIET)
    assert "model broken, block 0" in str(e.value)
    assert read_manifest(cfg.run_dir / "extract" / "broken") is None


def test_model_path_that_does_not_exist(make_config):
    res = lmfuse("validate", make_config({"sources": [{"name": "gone", "path": "/no/such/model"}]}), check=False)
    assert res.returncode == 1
    assert "sources[0].path" in res.stderr and "does not exist" in res.stderr
