"""`extract`: run one model over the blocks and store its sparse next-token distributions.

Per block: token ids, character offsets, the top-k of the log-softmax over the full
vocabulary (int32 ids, fp16 log-probs), and the cross-entropy of each gold next token.
Shard i always holds the same blocks, so a killed run resumes, and a data-parallel run
(`accelerate launch`) writes the same bytes as one process.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa

from lmfuse.artifacts import ArtifactDir, hash_obj, load_arrow_dataset, read_manifest
from lmfuse.errors import LmfuseError
from lmfuse.parallel import barrier, device, is_main, my_shards, rank_world

SCHEMA = pa.schema([
    ("block_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("offset_start", pa.list_(pa.int32())),
    ("offset_end", pa.list_(pa.int32())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float16())),
    ("token_ce", pa.list_(pa.float32())),
    ("seq_ce", pa.float32()),
    ("nll_sum", pa.float64()),
    ("scored_bytes", pa.int64()),
])


def topk_from_logits(logits, input_ids, k: int, chunk: int = 8):
    """Top-k log-probabilities and gold-token cross-entropy from raw logits.

    The log-softmax is taken over the full vocabulary in fp32 (whatever the logits' dtype)
    before the top-k, so the stored log-probs are true log-probabilities. Positions are done
    `chunk` at a time so that the fp32 copy stays in cache: at a 262k vocabulary this is about
    1.7x faster than one pass over the whole `[T, V]` block.

    Args:
        logits: [T, V] logits of one sequence (any float dtype).
        input_ids: [T] token ids of the sequence.
        k: how many entries to keep per position.
        chunk: positions per step.

    Returns:
        topk_ids [T, k] int32, topk_logprobs [T, k] float32, token_ce [T-1] float32
        (token_ce[i] = -log p(input_ids[i+1] | ..i)), and lse [T] float32 (the log-partition,
        non-finite exactly when the position's logits hold a NaN or +inf, or are all -inf).
    """
    import torch

    T = logits.shape[0]
    k = min(k, logits.shape[-1])
    dev = logits.device
    ids = torch.empty((T, k), dtype=torch.int32, device=dev)
    lps = torch.empty((T, k), dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    gold_logit = torch.empty(max(T - 1, 0), dtype=torch.float32, device=dev)
    nxt = input_ids[1:].long().to(dev)
    for s in range(0, T, chunk):
        f = logits[s:s + chunk].float()  # (c, V)
        z = torch.logsumexp(f, dim=-1)
        val, idx = torch.topk(f, k=k, dim=-1)
        lse[s:s + chunk] = z
        ids[s:s + chunk] = idx.to(torch.int32)
        lps[s:s + chunk] = val - z[:, None]
        e = min(s + chunk, T - 1)
        if e > s:
            gold_logit[s:e] = f[: e - s].gather(-1, nxt[s:e, None]).squeeze(-1)
    token_ce = lse[:-1] - gold_logit
    return ids, lps, token_ce, lse


def dist_arrays(row: dict, T: int) -> tuple[np.ndarray, np.ndarray]:
    """One extracted block's stored next-token distributions as padded arrays.

    The one reader of the stored distribution columns, so `align` and `train` do not depend on
    how `extract` stores them.

    Args:
        row: one block of an extraction (column name -> array or list).
        T: the block's number of positions (tokens).

    Returns:
        ids int64 [T, K] (-1 = padding) and logprobs float32 [T, K] (-inf at padding).
    """
    ids = np.asarray(row["topk_ids"], dtype=np.int64)
    lp = np.asarray(row["topk_logprobs"], dtype=np.float32)
    if T <= 0 or len(ids) % T or len(lp) != len(ids):
        raise LmfuseError(f"block {row.get('block_id', '?')}: distribution arrays of length {len(ids)}/{len(lp)} "
                          f"do not fit {T} positions", fix="rerun `lmfuse extract` with --overwrite")
    K = len(ids) // T
    return ids.reshape(T, K), lp.reshape(T, K)


def encode_blocks(tok, texts: list[str]) -> list[dict]:
    """Tokenize blocks with the tokenizer's own special tokens and normalized offsets.

    Special tokens (BOS, ...) get the offset `(e, e)` of the text end before them, so
    `offset_end` never decreases.
    """
    enc = tok(texts, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    out = []
    for ids, offs, special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        starts, ends, e = [], [], 0
        for (s, t), sp in zip(offs, special):
            if sp:
                s = t = e
            starts.append(s)
            ends.append(t)
            e = max(e, t)
        out.append({"input_ids": ids, "offset_start": starts, "offset_end": ends})
    return out


def artifact(cfg, model_name: str, overwrite: bool = False) -> ArtifactDir:
    from lmfuse import prepare

    spec = cfg.model(model_name)
    h = hash_obj(["extract", spec.model_dump(exclude={"name"}), cfg.extract.model_dump()])
    return ArtifactDir(cfg.run_dir / "extract" / model_name, "extract", h,
                       {"prepare": prepare.artifact(cfg).config_hash}, overwrite)


def list_array(rows: list[np.ndarray], typ) -> pa.Array:
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def extract_shard(model, tok, block_ids: list[int], texts: list[str], k: int, batch_size: int, dev: str,
                  model_name: str = "model", on_tokens=None) -> pa.Table:
    """Extract one shard of blocks; rows in the order of `block_ids`."""
    import torch

    encs = encode_blocks(tok, texts)
    order = sorted(range(len(texts)), key=lambda i: (-len(encs[i]["input_ids"]), i))  # less padding
    results: dict[int, dict] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lens = [len(encs[i]["input_ids"]) for i in idx]
        T = max(lens)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : lens[r]] = torch.tensor(encs[i]["input_ids"])
            mask[r, : lens[r]] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for r, i in enumerate(idx):
            top_ids, top_lp, ce, lse = topk_from_logits(logits[r, : lens[r]], ids[r, : lens[r]], k)
            if not torch.isfinite(lse).all():
                bad = int((~torch.isfinite(lse)).nonzero()[0])
                raise LmfuseError(f"non-finite logits (NaN/inf) at token position {bad}",
                                  where=f"model {model_name}, block {block_ids[i]}",
                                  fix="run this model in float32 (dtype: float32) or check its weights")
            ce = ce.cpu().numpy().astype(np.float32)
            e0 = encs[i]["offset_end"][0]
            results[i] = {
                "topk_ids": top_ids.cpu().numpy().reshape(-1),
                "topk_logprobs": top_lp.cpu().numpy().astype(np.float16).reshape(-1),
                "token_ce": ce,
                "nll_sum": float(ce.astype(np.float64).sum()),
                "scored_bytes": len(texts[i][e0:].encode("utf-8")),
            }
        if on_tokens:
            on_tokens(sum(lens))
    rows = range(len(texts))
    cols = {
        "block_id": pa.array(block_ids, pa.int64()),
        "input_ids": list_array([np.asarray(encs[i]["input_ids"], np.int32) for i in rows], pa.int32()),
        "offset_start": list_array([np.asarray(encs[i]["offset_start"], np.int32) for i in rows], pa.int32()),
        "offset_end": list_array([np.asarray(encs[i]["offset_end"], np.int32) for i in rows], pa.int32()),
        "topk_ids": list_array([results[i]["topk_ids"] for i in rows], pa.int32()),
        "topk_logprobs": list_array([results[i]["topk_logprobs"] for i in rows], pa.float16()),
        "token_ce": list_array([results[i]["token_ce"] for i in rows], pa.float32()),
        "seq_ce": pa.array([results[i]["token_ce"].mean() if len(results[i]["token_ce"]) else 0.0 for i in rows],
                           pa.float32()),
        "nll_sum": pa.array([results[i]["nll_sum"] for i in rows], pa.float64()),
        "scored_bytes": pa.array([results[i]["scored_bytes"] for i in rows], pa.int64()),
    }
    return pa.table(cols, schema=SCHEMA)


def run_extract(cfg, model_name: str, overwrite: bool = False, log=print, progress: bool = True) -> dict:
    """Extract one model's distributions over all prepared blocks (resumable, data-parallel)."""
    from tqdm.auto import tqdm

    from lmfuse import prepare
    from lmfuse.models import load_model, load_tokenizer, tokenizer_fingerprint

    art = artifact(cfg, model_name, overwrite)
    if art.is_complete():
        return read_manifest(art.path)
    blocks = prepare.artifact(cfg).load()
    if is_main():
        art.begin()
    barrier()
    spec = cfg.model(model_name)
    k, S = cfg.extract.top_k, cfg.extract.shard_size
    n_shards = math.ceil(len(blocks) / S)
    todo = [i for i in my_shards(n_shards) if not art.shard_done(i)]
    t0, n_tok = time.time(), 0
    if todo:
        tok = load_tokenizer(spec)
        dev = device()
        model = load_model(spec, device=dev)
        if k > len(tok):
            raise LmfuseError(f"top_k {k} exceeds the vocabulary size {len(tok)}", where="extract.top_k",
                              fix=f"set extract.top_k to at most {len(tok)}")
        bar = tqdm(total=sum(min(S, len(blocks) - i * S) for i in todo), unit="block", disable=not progress,
                   desc=f"extract {model_name}" + (" [rank {}/{}]".format(*rank_world()) if rank_world()[1] > 1 else ""))
        for i in todo:
            rows = blocks[i * S: (i + 1) * S]

            def on_tokens(n):
                nonlocal n_tok
                n_tok += n
                bar.set_postfix_str(f"{n_tok / max(time.time() - t0, 1e-9):,.0f} tok/s")

            table = extract_shard(model, tok, rows["block_id"], rows["text"], k, cfg.extract.batch_size, dev,
                                  model_name, on_tokens)
            art.write_shard(i, table)
            bar.update(len(rows["block_id"]))
        bar.close()
        del model
    barrier()
    if not is_main():
        return {}
    missing = [i for i in range(n_shards) if not art.shard_done(i)]
    if missing:
        raise LmfuseError(f"shards {missing[:5]} of extract/{model_name} are missing after the run",
                          where=str(art.path), fix="rerun the same command: it resumes")
    tok = load_tokenizer(spec)
    ds = load_arrow_dataset(art.shard_paths())
    n_tokens = int(sum(len(x) for x in ds["input_ids"]))
    size = sum(p.stat().st_size for p in art.shard_paths())
    elapsed = time.time() - t0
    manifest = art.finish(
        model=model_name, model_path=spec.path, dtype=spec.dtype, top_k=k, shard_size=S, n_shards=n_shards,
        n_blocks=len(blocks), n_tokens=n_tokens, bytes_per_token=round(size / max(n_tokens, 1), 2),
        tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok),
        tokens_per_second=round(n_tok / elapsed, 1) if n_tok else None,
        mean_nll_per_byte=float(np.sum(ds["nll_sum"]) / max(np.sum(ds["scored_bytes"]), 1)),
    )
    log(f"extract {model_name}: {len(blocks)} blocks, {n_tokens} tokens, {manifest['bytes_per_token']} bytes/token "
        f"-> {art.path}")
    return manifest
