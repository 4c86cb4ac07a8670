import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmfuse.artifacts import load_arrow_dataset, read_manifest
from lmfuse.config import load_config
from lmfuse.errors import LmfuseError
from lmfuse.extract import (
    count_draws,
    dist_arrays,
    position_diagnostics,
    sample_from_logits,
    sampling_uniforms,
    topk_from_logits,
)
from lmfuse.graph import Graph
from lmfuse.pipeline import run_extract, run_prepare
from lmfuse.prepare import load_blocks

QUIET = {"log": lambda *a: None}


def lmfuse(*args, check=True, env=None):
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"lmfuse {' '.join(map(str, args))} failed:\n{res.stdout}\n{res.stderr}")
    return res


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("shard-*.arrow"))}


def rows_of(path: Path) -> list[dict]:
    return list(load_arrow_dataset(sorted((path / "shards").glob("shard-*.arrow"))))


SAMPLED = {"extract.distribution": "sampled", "extract.samples": 64}


def test_topk_from_logits_hand_built():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 0.1, 3.0], [1.0, 2.0, 3.0, 4.0]])
    ids = torch.tensor([0, 3, 1])
    top_ids, top_lp, ce, _ = topk_from_logits(logits, ids, 2)
    lsm = torch.log_softmax(logits, -1)
    assert top_ids.tolist() == [[0, 1], [3, 0], [3, 2]]
    assert torch.allclose(top_lp, lsm.gather(-1, top_ids.long()))
    assert torch.allclose(ce, torch.stack([-lsm[0, 3], -lsm[1, 1]]))


def test_sample_from_logits_hand_built():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.0, 0.5], [0.25, 0.25, 0.25, 0.25]])
    logits = torch.log(p) + torch.tensor([[1.0], [-3.0], [0.0]])  # the log-partition must not matter
    ids = torch.tensor([3, 1, 2])
    u = np.array([[0.05, 0.25, 0.29, 0.61, 0.99],  # CDF .1 .3 .6 1
                  [0.0, 0.2, 0.5, 0.7, 1 - 1e-12],  # CDF 0 .5 .5 1: ids 0 and 2 have no mass
                  [0.0, 0.3, 0.55, 0.8, 0.9]])
    for chunk, block in ((1, 256), (2, 256), (8, 256), (2, 3), (8, 1)):  # one block, or several (padded)
        draws, ce, lse = sample_from_logits(logits, ids, u, chunk=chunk, block=block)
        assert draws.tolist() == [[0, 1, 1, 3, 3], [1, 1, 3, 3, 3], [0, 1, 2, 3, 3]]
        lsm = torch.log_softmax(logits, -1)
        assert torch.allclose(lse, torch.logsumexp(logits, -1))
        assert torch.allclose(ce, torch.stack([-lsm[0, 1], -lsm[1, 2]]))
    # bf16 logits are read, never written (the sampler works on an fp32 copy).
    lb = logits.to(torch.bfloat16)
    before = lb.clone()
    sample_from_logits(lb, ids, u)
    assert torch.equal(lb, before)
    bad = logits.clone()
    bad[1, 2] = float("nan")
    draws, _, lse = sample_from_logits(bad, ids, u, block=3)
    assert torch.isfinite(lse).tolist() == [True, False, True]
    assert draws.min() >= 0 and draws.max() < 4  # meaningless there, but in range


def test_sample_from_logits_matches_an_exact_inverse_cdf():
    """Against a float64 inverse CDF on a 1000-id vocabulary: the same ids up to rounding."""
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    u = sampling_uniforms(0, 0, 64, 64)
    p = torch.softmax(logits.double(), -1)
    ref = torch.searchsorted(p.cumsum(-1), torch.from_numpy(u) * p.sum(-1, keepdim=True), right=True)
    for block in (1, 7, 64, 256, 1024):
        draws, _, lse = sample_from_logits(logits, torch.zeros(64, dtype=torch.long), u, block=block)
        assert (draws == ref).double().mean() >= 0.999
        torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


def test_sampling_uniforms_depend_only_on_seed_block_and_position():
    a = sampling_uniforms(0, 7, 5, 16)
    assert a.shape == (5, 16) and np.all(np.diff(a, axis=1) >= 0) and a.min() >= 0 and a.max() < 1
    np.testing.assert_array_equal(sampling_uniforms(0, 7, 3, 16), a[:3])  # a longer block: same first rows
    assert not np.array_equal(sampling_uniforms(0, 8, 5, 16), a)
    assert not np.array_equal(sampling_uniforms(1, 7, 5, 16), a)


def test_sampled_distribution_is_unbiased():
    """Mean of count / samples over many blocks ≈ softmax, within binomial noise."""
    p = np.array([[0.5, 0.3, 0.15, 0.04, 0.01], [0.2, 0.2, 0.2, 0.2, 0.2], [0.97, 0.01, 0.01, 0.005, 0.005]])
    T, V = p.shape
    R, n = 2000, 64  # blocks (seeds of the draws), draws per position
    logits = torch.log(torch.tensor(p, dtype=torch.float32)).repeat(R, 1)  # [R*T, V]
    u = np.concatenate([sampling_uniforms(3, b, T, n) for b in range(R)])
    draws, _, _ = sample_from_logits(logits, torch.zeros(R * T, dtype=torch.long), u, block=2)  # 3 blocks
    freq = np.zeros((R * T, V))
    lens, ids, counts = count_draws(draws.numpy())
    np.add.at(freq, (np.repeat(np.arange(R * T), lens), ids), counts / n)
    mean = freq.reshape(R, T, V).mean(0)
    std = np.sqrt(p * (1 - p) / (n * R))  # of the mean of R binomial(n, p) / n
    assert np.all(np.abs(mean - p) <= 4.5 * std + 1e-9), (mean - p) / std
    np.testing.assert_allclose(freq.sum(1), 1.0)


def test_count_draws_and_dist_arrays_round_trip():
    draws = np.array([[0, 0, 1, 3], [2, 2, 2, 2], [1, 3, 3, 5]])
    lens, ids, counts = count_draws(draws)
    assert lens.tolist() == [3, 1, 3] and ids.tolist() == [0, 1, 3, 2, 1, 3, 5] and counts.tolist() == [2, 1, 1, 4, 1, 2, 1]
    for conv in (np.asarray, list):  # numpy arrays (align.read_shard_rows) or lists (datasets rows)
        row = {"dist_len": conv(lens.astype(np.uint16)), "dist_ids": conv(ids.astype(np.uint16)),
               "dist_counts": conv(counts.astype(np.uint8))}
        got_ids, got_lp = dist_arrays(row, 3)
        assert got_ids.dtype == np.int64 and got_lp.dtype == np.float32
        assert got_ids.tolist() == [[0, 1, 3], [2, -1, -1], [1, 3, 5]]
        np.testing.assert_allclose(got_lp, [[np.log(0.5), np.log(0.25), np.log(0.25)], [0, -np.inf, -np.inf],
                                            [np.log(0.25), np.log(0.5), np.log(0.25)]], rtol=1e-6)
    lp = np.log([0.6, 0.3, 0.5, 0.25]).astype(np.float16)
    row = {"dist_len": [2, 2], "dist_ids": np.array([4, 9, 1, 2], np.int32), "dist_logprobs": lp}
    got_ids, got_lp = dist_arrays(row, 2)
    assert got_ids.tolist() == [[4, 9], [1, 2]]
    np.testing.assert_array_equal(got_lp, lp.astype(np.float32).reshape(2, 2))
    legacy = {"topk_ids": [4, 9, 1, 2], "topk_logprobs": lp}  # fixed-k layout of earlier versions
    assert dist_arrays(legacy, 2)[0].tolist() == [[4, 9], [1, 2]]
    with pytest.raises(LmfuseError, match="do not fit 3 positions"):
        dist_arrays(row, 3)
    with pytest.raises(LmfuseError, match="do not fit"):
        dist_arrays({**row, "dist_ids": [4, 9, 1]}, 2)


def test_position_diagnostics_hand_built():
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    logits = torch.log(p) + 2.0
    lse = torch.logsumexp(logits, -1)
    ids = torch.tensor([[0, 2, 2, -1],  # a repeated id counts once
                        [1, -1, -1, -1],
                        [2, 0, 1, -1]])
    gold = torch.tensor([2, 0, -1])  # the last position has no next token
    mass, gold_in, entries = position_diagnostics(logits, lse, ids, gold)
    np.testing.assert_allclose(mass.numpy(), [0.7, 1 / 3, 1.0], rtol=1e-6)
    assert gold_in.tolist() == [True, False, False]
    assert entries.tolist() == [2, 1, 3]


@pytest.mark.parametrize("distribution", ["topk", "sampled"])
def test_cli_prepare_extract_matches_a_direct_forward_pass(make_config, tiny_models, distribution):
    cfg_path = make_config({"extract.distribution": distribution})
    lmfuse("prepare", cfg_path)
    lmfuse("extract", cfg_path, "-m", "tgt", "-m", "src_spm")
    cfg = load_config(cfg_path)
    blocks = load_blocks(cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, kind in [("tgt", "bpe"), ("src_spm", "spm")]:
        path = cfg.run_dir / "extract" / name
        manifest = read_manifest(path)
        assert manifest["n_blocks"] == len(blocks) and manifest["distribution"] == distribution
        if distribution == "topk":
            assert manifest["top_k"] == 5 and "samples" not in manifest
        else:
            assert manifest["samples"] == 64 and manifest["seed"] == 0 and "top_k" not in manifest
        ds = load_arrow_dataset(sorted((path / "shards").glob("*.arrow")))
        assert ds["block_id"] == blocks["block_id"]
        tok = AutoTokenizer.from_pretrained(tiny_models[kind])
        model = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
        same_draws = []
        for row, text in list(zip(ds, blocks["text"]))[:12]:
            enc = tok(text, return_offsets_mapping=True)
            assert row["input_ids"] == enc["input_ids"]
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0]
            lsm = torch.log_softmax(logits.double(), -1)
            T = ids.shape[1]
            top_ids, top_lp = dist_arrays(row, T)
            if distribution == "topk":
                ref_lp, ref_ids = torch.topk(lsm, 5, -1)
                order = np.argsort(-top_lp, axis=1, kind="stable")  # stored by id; compare by rank
                np.testing.assert_allclose(np.take_along_axis(top_lp, order, 1), ref_lp.numpy(), atol=2e-3,
                                           rtol=1e-3)  # fp16 storage
                np.testing.assert_allclose(lsm.numpy()[np.arange(T)[:, None], top_ids], top_lp, atol=2e-3, rtol=1e-3)
                assert np.all(np.diff(top_ids, axis=1) > 0)  # ascending ids
            else:
                assert np.all((top_ids[:, 1:] > top_ids[:, :-1]) | (top_ids[:, 1:] == -1))
                np.testing.assert_allclose(np.exp(top_lp.astype(np.float64)).sum(1), 1.0, rtol=1e-6)
                counts = np.rint(np.exp(top_lp.astype(np.float64)) * 64)
                np.testing.assert_allclose(np.log(counts[top_ids >= 0] / 64), top_lp[top_ids >= 0], rtol=1e-6)
                # The same seed redraws the same ids from a direct forward pass; logits differ from the
                # batched run's by ~1e-7, which may move a rare draw across a CDF step.
                draws, _, _ = sample_from_logits(logits, ids[0], sampling_uniforms(0, row["block_id"], T, 64))
                n, uid, cnt = count_draws(draws.numpy())
                same_draws.append(np.array_equal(n, row["dist_len"]) and np.array_equal(uid, row["dist_ids"])
                                  and np.array_equal(cnt, row["dist_counts"]))
            gold = -lsm[torch.arange(T - 1), ids[0, 1:]].numpy()
            np.testing.assert_allclose(row["token_ce"], gold, rtol=1e-5, atol=1e-5)
            assert row["seq_ce"] == pytest.approx(gold.mean(), rel=1e-5)
            assert row["nll_sum"] == pytest.approx(gold.sum(), rel=1e-6)
            first_end = enc["offset_mapping"][0][1] if kind == "bpe" else 0  # spm's first token is BOS
            assert row["scored_bytes"] == len(text[first_end:].encode())
            ends = row["offset_end"]
            assert all(a <= b for a, b in zip(ends, ends[1:]))
        if distribution == "sampled":
            assert np.mean(same_draws) >= 0.9, same_draws


KILL_SCRIPT = """
import sys, time
from lmfuse.artifacts import ArtifactDir
from lmfuse.config import load_config
from lmfuse.pipeline import run_extract
orig = ArtifactDir.write_shard
def slow(self, i, table):
    orig(self, i, table)
    print("wrote", i, flush=True)
    time.sleep(0.4)
ArtifactDir.write_shard = slow
run_extract(load_config(sys.argv[1]), sys.argv[2], progress=False)
print("done", flush=True)
"""


@pytest.mark.parametrize("overrides", [{}, SAMPLED], ids=["topk", "sampled"])
def test_extract_killed_with_sigkill_resumes_to_the_same_artifact(make_config, tmp_path, overrides):
    cfg = load_config(make_config(overrides))
    run_prepare(cfg, **QUIET)
    run_extract(cfg, "src_spm", progress=False, **QUIET)
    reference = shard_bytes(cfg.run_dir / "extract" / "src_spm")
    ref_manifest = read_manifest(cfg.run_dir / "extract" / "src_spm")
    assert len(reference) >= 4
    shutil.rmtree(cfg.run_dir / "extract" / "src_spm")

    script = tmp_path / "slow_extract.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(make_config(overrides)), "src_spm"],
                            stdout=subprocess.PIPE, text=True)
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
    for key in ("n_tokens", "config_hash", "mass_kept", "gold_in_stored_fraction", "entries_per_position",
                "diagnostics_per_domain", "bytes_per_token", "mean_nll_per_byte"):
        assert manifest[key] == ref_manifest[key], key


@pytest.mark.parametrize("overrides", [{}, SAMPLED], ids=["topk", "sampled"])
def test_two_process_accelerate_run_writes_the_same_artifact(make_config, overrides):
    cfg_path = make_config(overrides)
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
    assert len(list((cfg.run_dir / "extract" / "tgt" / "stats").glob("stats-*.json"))) == len(one)


def test_sampled_rows_do_not_depend_on_batching_or_sharding(make_config, tmp_path):
    runs = {}
    for name, bs, ss, seed in [("a", 3, 4, 0), ("b", 1, 5, 0), ("c", 7, 3, 0), ("d", 3, 4, 1)]:
        cfg = load_config(make_config({**SAMPLED, "output_dir": str(tmp_path / name), "extract.batch_size": bs,
                                       "extract.shard_size": ss, "extract.seed": seed}, name=f"{name}.yaml"))
        run_prepare(cfg, **QUIET)
        run_extract(cfg, "tgt", progress=False, **QUIET)
        runs[name] = rows_of(cfg.run_dir / "extract" / "tgt")
    cols = ("block_id", "input_ids", "dist_len", "dist_ids", "dist_counts")

    def same(r, q):
        return all(np.array_equal(r[c], q[c]) for c in cols)

    assert [r["block_id"] for r in runs["a"]] == [r["block_id"] for r in runs["b"]]
    # Other batches pad differently, which moves logits by ~1e-7; a draw may then cross a CDF
    # step, but no more than that: the draws themselves do not depend on the batch.
    for other in ("b", "c"):
        assert np.mean([same(r, q) for r, q in zip(runs["a"], runs[other])]) >= 0.9
        for r, q in zip(runs["a"], runs[other]):
            np.testing.assert_allclose(r["token_ce"], q["token_ce"], rtol=1e-5, atol=1e-6)
    assert not any(same(r, q) for r, q in zip(runs["a"], runs["d"]))  # another seed draws otherwise


def test_manifest_diagnostics_match_the_stored_rows(make_config, tiny_models):
    """Mass kept, gold-in-stored and entries per position, overall and per domain, recomputed from the rows."""
    from transformers import AutoModelForCausalLM

    from lmfuse.align import read_shard_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_models["bpe"]).eval()
    for overrides in ({}, SAMPLED):
        cfg = load_config(make_config({**overrides, "output_dir": str(make_config().parent / (
            "run_" + cfg_name(overrides)))}, name=cfg_name(overrides) + ".yaml"))
        run_prepare(cfg, **QUIET)
        manifest = run_extract(cfg, "tgt", progress=False, **QUIET)
        path = cfg.run_dir / "extract" / "tgt"
        blocks = load_blocks(cfg)
        domain = dict(zip(blocks["block_id"], blocks["domain"]))
        raw = [r for p in sorted((path / "shards").glob("*.arrow")) for r in read_shard_rows(p)]
        acc: dict[str, np.ndarray] = {}
        for row, raw_row in zip(rows_of(path), raw):
            T = len(row["input_ids"])
            ids, lp = dist_arrays(row, T)
            ids2, lp2 = dist_arrays(raw_row, T)  # the two readers agree
            np.testing.assert_array_equal(ids, ids2)
            np.testing.assert_array_equal(lp, lp2)
            with torch.no_grad():
                p = torch.softmax(model(torch.tensor([row["input_ids"]])).logits[0].double(), -1).numpy()
            mass = np.where(ids >= 0, p[np.arange(T)[:, None], np.clip(ids, 0, None)], 0).sum(1)
            gold_in = (ids[:-1] == np.asarray(row["input_ids"])[1:, None]).any(1)
            a = acc.setdefault(domain[row["block_id"]], np.zeros(5))
            a += [T, T - 1, mass.sum(), gold_in.sum(), (ids >= 0).sum()]
        tot = sum(acc.values())
        assert manifest["mass_kept"] == pytest.approx(tot[2] / tot[0], abs=1e-5)
        assert manifest["gold_in_stored_fraction"] == pytest.approx(tot[3] / tot[1], abs=1e-6)
        assert manifest["entries_per_position"] == pytest.approx(tot[4] / tot[0], abs=1e-3)
        assert manifest["n_tokens"] == tot[0]
        assert set(manifest["diagnostics_per_domain"]) == set(acc) == {"code", "legal", "prose"}
        for d, a in acc.items():
            got = manifest["diagnostics_per_domain"][d]
            assert got["mass_kept"] == pytest.approx(a[2] / a[0], abs=1e-5)
            assert got["gold_in_stored_fraction"] == pytest.approx(a[3] / a[1], abs=1e-6)
            assert got["positions"] == a[0]
        if overrides:
            assert 1 < manifest["entries_per_position"] <= 64 and manifest["max_entries"] <= 64
        else:
            assert manifest["entries_per_position"] == 5 and manifest["max_entries"] == 5
        assert len(list((path / "stats").glob("stats-*.json"))) == manifest["n_shards"]


def cfg_name(overrides: dict) -> str:
    return overrides.get("extract.distribution", "topk")


def test_sampled_storage_schema_and_bytes_per_token(make_config, capsys):
    import pyarrow as pa

    from lmfuse.artifacts import write_arrow

    sizes = {}
    for samples, counts in ((64, pa.uint8()), (300, pa.uint16())):
        cfg = load_config(make_config({**SAMPLED, "extract.samples": samples}))
        run_prepare(cfg, **QUIET)
        manifest = run_extract(cfg, "src_wp", progress=False, overwrite=True, **QUIET)
        path = cfg.run_dir / "extract" / "src_wp"
        shard = sorted((path / "shards").glob("*.arrow"))[0]
        with pa.memory_map(str(shard)) as f:
            table = pa.ipc.open_stream(f).read_all()  # what align.read_shard_rows does
        assert table.schema.field("dist_len").type == pa.list_(pa.uint16())
        assert table.schema.field("dist_ids").type == pa.list_(pa.uint16())  # a 344-token vocabulary
        assert table.schema.field("dist_counts").type == pa.list_(counts)
        assert "dist_logprobs" not in table.schema.names
        for r in range(table.num_rows):
            n = np.asarray(table.column("dist_len")[r].values, dtype=np.int64)
            c = np.asarray(table.column("dist_counts")[r].values, dtype=np.int64)
            assert len(n) == len(table.column("input_ids")[r]) and n.sum() == len(c)
            np.testing.assert_array_equal(np.add.reduceat(c, np.cumsum(n) - n), samples)  # all draws counted
        # zstd-compressed on disk: smaller than the same table written plainly
        plain = path / "plain.arrow"
        write_arrow(plain, table, compression=None)
        assert shard.stat().st_size < plain.stat().st_size
        total = sum(p.stat().st_size for p in (path / "shards").glob("*.arrow"))
        assert manifest["bytes_per_token"] == pytest.approx(total / manifest["n_tokens"], abs=0.01)
        sizes[samples] = manifest["bytes_per_token"]
    with capsys.disabled():
        print(f"\nsampled storage on the tiny corpus (wordpiece model): {sizes} bytes/token by samples")


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


def test_tokens_key_ignores_the_extract_options_and_follows_blocks_and_model(make_config, tiny_models):
    """The control is keyed on it (train.artifact): what top_k is stored must not retrain it; new
    blocks or another model (tokenizer or weights) must."""
    def key(overrides):
        return Graph(load_config(make_config(overrides))).key("extract/tgt#tokens")

    base = key({})
    assert key({"extract.top_k": 3}) == key({"extract.distribution": "sampled", "extract.shard_size": 2}) == base
    assert key({"prepare.block_size": 40}) != base
    assert key({"target.path": str(tiny_models["spm"])}) != base
    assert key({"target.dtype": "bfloat16"}) != base


def test_special_token_strings_in_the_corpus_are_stored_as_text(make_config, tiny_corpus, tiny_models):
    """Issue 26.8c: `<s>`, `</s>`, `<|endoftext|>` written in the corpus were stored as the
    tokenizers' special ids (the target's EOS mid-text, which it then learns to emit). Now every
    model's extraction holds them as plain text: the only special ids are those the tokenizer adds
    itself (the spm BOS at position 0), and every block fits `block_size` as stored."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in tiny_corpus.read_text().splitlines()]
    for r in rows:
        r["text"] = "<|im_start|>user\n<s>" + r["text"].replace("\n", " </s>\n<s> ") + " <|endoftext|>"
    tiny_corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(make_config())
    run_prepare(cfg, **QUIET)
    texts = {b["block_id"]: b["text"] for b in load_blocks(cfg)}
    assert sum(t.count("<|endoftext|>") + t.count("<s>") + t.count("</s>") for t in texts.values()) > 50
    for name, kind in [("tgt", "bpe"), ("src_spm", "spm"), ("src_wp", "wordpiece")]:
        run_extract(cfg, name, progress=False, **QUIET)
        tok = AutoTokenizer.from_pretrained(tiny_models[kind])
        specials = {tok.convert_tokens_to_ids(s) for s in ("<s>", "</s>", "<|endoftext|>") if s in tok.all_special_tokens}
        own = [i for i in tok("x")["input_ids"] if i in specials]  # what the tokenizer adds itself (spm: BOS)
        for row in rows_of(cfg.run_dir / "extract" / name):
            ids = list(row["input_ids"])
            assert [i for i in ids if i in specials] == own, (name, tok.convert_ids_to_tokens(ids))
            assert len(ids) <= cfg.prepare.block_size
            if kind == "bpe":  # byte-level BPE decodes back to the very text, literal special strings included
                assert tok.decode(ids) == texts[row["block_id"]]
