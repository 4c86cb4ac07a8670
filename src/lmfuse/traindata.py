"""Training data: the target's tokens joined with every candidate's aligned distributions, the
collator that fuses them on the fly, and the data order.

`BlockData` joins `extract/<target>` and each `align/<source>` by `block_id` and checks, before any
training, that the aligned data was made for this target (same extraction, same positions).
`FusedCollator` turns blocks into a padded batch with sparse fused targets (`lmfuse.fusion`), so a
change of fusion options re-runs only `train`. `data_order` is a function of the seed alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmfuse.artifacts import open_artifact
from lmfuse.config import FuseConfig
from lmfuse.errors import LmfuseError
from lmfuse.extract import dist_arrays
from lmfuse.fusion import FusedTargets, FusionOptions, fuse
from lmfuse.loss import IGNORE


def _row_index(ds: Any) -> dict[int, int]:
    """block_id → row of a dataset."""
    ids = np.asarray(ds["block_id"], dtype=np.int64)
    return {int(b): i for i, b in enumerate(ids)}


@dataclass
class Candidate:
    """One candidate's data for one block (all numpy)."""

    ids: np.ndarray  # [T, K] int64
    logprobs: np.ndarray  # [T, K] float32
    aligned: np.ndarray  # [T] bool
    quality: np.ndarray  # [] (sequence) or [T] (token), lower is better
    span_ll: np.ndarray | None = None  # [T] log-likelihood of exactly the gold next token's text, NaN = none


class BlockData:
    """Random access to one block's target tokens and candidates, joined by `block_id`.

    Args:
        cfg: The whole config.
        control: Read only the target extraction (no sources).
    """

    def __init__(self, cfg: FuseConfig, control: bool):
        run = cfg.run_dir
        self.cfg, self.control = cfg, control
        t = cfg.train
        _, prep = open_artifact(run / "prepare", "prepare")
        if prep is None:
            raise LmfuseError("the prepared blocks are empty", where=str(run / "prepare"),
                              fix="check the corpus and rerun `lmfuse prepare`")
        self.tgt_manifest, self.tgt = open_artifact(run / "extract" / cfg.target.name, "extract")
        self.tgt_rows = _row_index(self.tgt)
        self.tgt_len = _list_lengths(self.tgt, "input_ids")  # [rows]
        splits = np.asarray(prep["split"])
        blocks = np.asarray(prep["block_id"], dtype=np.int64)
        self.train_ids = [int(b) for b in blocks[splits == "train"]]
        self.val_ids = [int(b) for b in blocks[splits == "validation"]]
        missing = [b for b in self.train_ids + self.val_ids if b not in self.tgt_rows]
        if missing:
            raise LmfuseError(f"{len(missing)} prepared blocks (first: {missing[0]}) are missing from the target "
                              "extraction", where=str(run / "extract" / cfg.target.name),
                              fix="rerun `lmfuse extract` for the target")
        if not self.train_ids:
            raise LmfuseError("no training blocks", where=str(run / "prepare"),
                              fix="use a larger corpus or a smaller validation_fraction")
        self.sources = []
        if not control:
            if not cfg.sources:
                raise LmfuseError("fusion needs at least one source", where="sources",
                                  fix="add a source model, or train only the control (λ = 1)")
            for s in cfg.sources:
                path = run / "align" / s.name
                manifest, ds = open_artifact(path, "align")
                self._check_align(manifest, ds, path)
                self.sources.append((s.name, ds, _row_index(ds)))
        self.level, self.quality = t.level, t.quality
        self.include_target = t.include_target

    def _check_align(self, manifest: dict, ds: Any, path: Path) -> None:
        """Refuse aligned data made for another target (tokenizer) before any training."""
        tgt_hash = self.tgt_manifest.get("key") or self.tgt_manifest.get("config_hash")
        named = manifest.get("target")
        inputs = manifest.get("inputs") or {}
        fix = "rerun `lmfuse align` for this target (or `lmfuse run` the whole config)"
        if named is not None and named != self.cfg.target.name:
            raise LmfuseError(f"aligned data was made for target {named!r}, not {self.cfg.target.name!r}",
                              where=str(path), fix=fix)
        # align.py names its target input `extract_target`; `extract/<name>` is also accepted.
        if "extract_target" in inputs:
            ext_inputs = {"extract_target": inputs["extract_target"]}
        else:
            ext_inputs = {k: v for k, v in inputs.items() if k.startswith("extract/")}
        if ext_inputs and tgt_hash not in ext_inputs.values():
            raise LmfuseError("aligned data was made from another target extraction (another target model or "
                              f"tokenizer): its inputs {ext_inputs}, the target extraction's hash {tgt_hash}",
                              where=str(path), fix=fix)
        # Position counts must match the target tokenization block by block.
        rows = _row_index(ds)
        n_aligned = _list_lengths(ds, "aligned")
        for b in self.train_ids + self.val_ids:
            if b not in rows:
                raise LmfuseError(f"block {b} is missing from the aligned data", where=str(path), fix=fix)
            if n_aligned[rows[b]] != self.tgt_len[self.tgt_rows[b]]:
                raise LmfuseError(f"block {b}: aligned data has {n_aligned[rows[b]]} positions, the target "
                                  f"tokenization has {self.tgt_len[self.tgt_rows[b]]}: it was made for another "
                                  "target tokenizer", where=str(path), fix=fix)

    def block(self, block_id: int) -> dict:
        """input_ids [T] int64 and the candidates (target first when included)."""
        r = self.tgt[self.tgt_rows[block_id]]
        input_ids = np.asarray(r["input_ids"], dtype=np.int64)
        T = len(input_ids)
        out = {"block_id": block_id, "input_ids": input_ids, "candidates": []}
        if self.control:
            return out
        if self.include_target:
            if self.level == "sequence":
                q = (r["nll_sum"] / max(1, r["scored_bytes"])) if self.quality == "nll_per_byte" else r["seq_ce"]
            else:  # the target's own token_ce is also its span NLL
                q = _pad_last(r["token_ce"], T)
            ids, lps = dist_arrays(r, T)
            n_tok = self.tgt_manifest.get("vocab_size")
            if n_tok:  # an extraction made before padded ids were left out: they are mass on no token
                lps = np.where(ids >= n_tok, -np.inf, lps).astype(np.float32)
                ids = np.where(ids >= n_tok, -1, ids)
            cand = _candidate(ids.ravel(), lps.ravel(), np.ones(T, bool), q, T,
                              f"extract/{self.cfg.target.name}", block_id)
            cand.span_ll = -_pad_last(r["token_ce"], T)  # the target scores its own tokens exactly
            out["candidates"].append(cand)
        for name, ds, rows in self.sources:
            if block_id not in rows:
                raise LmfuseError(f"block {block_id} is missing from the aligned data", where=f"align/{name}",
                                  fix="rerun `lmfuse align`")
            a = ds[rows[block_id]]
            if self.level == "sequence":
                q = a["nll_per_byte"] if self.quality == "nll_per_byte" else a["seq_ce"]
            else:
                q = _pad_last(a["span_nll"] if self.quality == "nll_per_byte" else a["token_ce"], T)
            aligned = np.asarray(a["aligned"], dtype=bool)
            if len(aligned) != T:
                raise LmfuseError(f"block {block_id}: {len(aligned)} aligned positions but the target has {T}",
                                  where=f"align/{name}", fix="rerun `lmfuse align` for this target")
            cand = _candidate(a["topk_ids"], a["topk_logprobs"], aligned, q, T, f"align/{name}", block_id)
            exact = _pad_last(a["span_exact"], T) > 0 if "span_exact" in a else np.zeros(T, bool)
            cand.span_ll = np.where(exact, -_pad_last(a["span_nll"], T), np.nan)
            out["candidates"].append(cand)
        return out


def _list_lengths(ds: Any, column: str) -> np.ndarray:
    """Lengths of a list column without reading its values."""
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(ds.data.column(column)).to_numpy(zero_copy_only=False))


def _pad_last(x, T: int) -> np.ndarray:
    """[T-1] per-position values → [T] with NaN at the last position (no next token)."""
    v = np.full(T, np.nan, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    v[: len(x)] = x[:T]
    return v


def _candidate(ids, logprobs, aligned, quality, T: int, where: str, block_id: int) -> Candidate:
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float32)
    if T == 0 or len(ids) % T or len(lp) != len(ids):
        raise LmfuseError(f"block {block_id}: top-k arrays of length {len(ids)}/{len(lp)} do not fit {T} positions",
                          where=where, fix="rerun the stage that wrote it")
    K = len(ids) // T
    return Candidate(ids.reshape(T, K), lp.reshape(T, K), aligned, np.asarray(quality, dtype=np.float64))


class FusedCollator:
    """Blocks → a padded batch with fused sparse targets.

    Output: input_ids, attention_mask, labels (next token, −100 = none) [B, T] and, unless
    there are no candidates, target_ids [B, T, M] int64 (−1 = pad) and target_probs [B, T, M].
    """

    def __init__(self, fusion: str, opts: FusionOptions, pad_id: int = 0, vocab_size: int | None = None,
                 span: bool = False):
        self.fusion, self.opts, self.pad_id, self.vocab_size = fusion, opts, pad_id, vocab_size
        self.span = span

    def fuse_block(self, item: dict) -> FusedTargets:
        ids = item["input_ids"]
        gold = np.append(ids[1:], -1)
        cands = item["candidates"]
        K = max(c.ids.shape[1] for c in cands)

        def padk(x, fill):
            return np.pad(x, ((0, 0), (0, K - x.shape[1])), constant_values=fill)

        c_ids = np.stack([padk(c.ids, -1) for c in cands])
        c_lp = np.stack([padk(c.logprobs, -np.inf) for c in cands])
        aligned = np.stack([c.aligned for c in cands])
        qual = np.stack([np.broadcast_to(c.quality, aligned.shape[1:]) for c in cands])
        if self.vocab_size is not None and c_ids.max(initial=-1) >= self.vocab_size:
            raise LmfuseError(f"block {item['block_id']}: aligned token id {int(c_ids.max())} is outside the target "
                              f"vocabulary ({self.vocab_size})", where="align",
                              fix="the aligned data was made for another target tokenizer; rerun `lmfuse align`")
        span_ll = None
        if self.span:
            span_ll = np.stack([c.span_ll if c.span_ll is not None else np.full(len(gold), np.nan) for c in cands])
        return fuse(c_ids, c_lp, aligned, qual, gold, self.fusion, self.opts, span_ll)

    def __call__(self, items: list[dict]) -> dict:
        B = len(items)
        T = max(len(it["input_ids"]) for it in items)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        attn = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            attn[b, :n] = 1
            labels[b, : n - 1] = it["input_ids"][1:]
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attn),
                 "labels": torch.from_numpy(labels)}
        if items and items[0]["candidates"]:
            fused = [self.fuse_block(it) for it in items]
            M = max(f.ids.shape[1] for f in fused)
            tid = np.full((B, T, M), -1, dtype=np.int64)
            tp = np.zeros((B, T, M), dtype=np.float32)
            rest = np.zeros((B, T), dtype=np.float32)
            span = np.full((B, T), np.nan, dtype=np.float32)
            for b, f in enumerate(fused):
                n = f.ids.shape[0]
                tid[b, :n, : f.ids.shape[1]] = f.ids
                tp[b, :n, : f.probs.shape[1]] = f.probs
                rest[b, :n] = f.rest
                span[b, :n] = f.span
            batch["target_ids"] = torch.from_numpy(tid)
            batch["target_probs"] = torch.from_numpy(tp)
            if self.opts.outside_topk == "rest":
                batch["target_rest"] = torch.from_numpy(rest)
            if self.span:
                batch["span_target"] = torch.from_numpy(span)
        return batch


def data_order(n: int, total: int, seed: int) -> np.ndarray:
    """The first `total` block indices of the training stream: one permutation per epoch.

    Args:
        n: number of training blocks.
        total: indices needed (steps × global batch).
        seed: the train seed.

    Returns:
        [total] int64 indices into the training blocks.
    """
    epochs = math.ceil(total / n)
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)]
    return np.concatenate(perms)[:total]
