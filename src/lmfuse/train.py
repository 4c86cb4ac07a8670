"""Continual training of the target on λ·CLM + (1 − λ)·fusion, on `accelerate`.

The collator fuses the candidates' aligned sparse distributions on the fly (`lmfuse.fusion`),
so changing a fusion option re-runs only this stage. The same code trains the control
(λ = 1, no sources read).

Determinism: the data order is a function of the seed and the step only (one permutation of
the training blocks per epoch), each optimizer step consumes one global batch laid out as
[grad_accum, world, batch_size], and the loss is normalised by the number of target tokens
in the whole global batch. So a resumed run (model, optimizer, scheduler and RNG states are
checkpointed) and a run on more processes with the same global batch follow the same curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmfuse.artifacts import (
    ArtifactDir,
    atomic_write_json,
    hash_obj,
    open_artifact,
    read_json,
    read_manifest,
)
from lmfuse.errors import LmfuseError
from lmfuse.extract import dist_arrays
from lmfuse.fusion import FUSIONS, FusedTargets, FusionOptions, fuse
from lmfuse.loss import IGNORE, fused_clm_loss

# Options that only change the fusion term: the control's hash must not depend on them.
FUSION_ONLY = ("fusion", "level", "quality", "include_target", "outside_topk", "temperature", "clm_weight",
               "clm_weight_schedule", "loss", "avgce_weighting", "span_weight")
# Options that change neither the weights nor the logs.
NOT_HASHED = ("control", "tensorboard", "save_every")
CKPT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_STATE = "best_state.json"
LOG = "log.jsonl"


# -- artifact ----------------------------------------------------------------------------------
def out_dir(cfg, control: bool = False) -> Path:
    return cfg.run_dir / "train" / ("clm" if control else "fused")


def _upstream_hash(path: Path) -> str | None:
    m = read_manifest(path)
    return None if m is None else (m.get("key") or m.get("config_hash"))


def artifact(cfg, control: bool = False, overwrite: bool = False) -> ArtifactDir:
    """The train artifact for this config (`train/fused` or `train/clm`).

    Its config hash covers the train section (minus the fusion-only options for the control)
    and the target model; its inputs are the keys (`ArtifactDir.key`) of `extract/<target>` and, unless
    control, of `align/<source>` for every source.
    """
    train = cfg.train.model_dump(exclude=set(NOT_HASHED))
    if control:
        train = {k: v for k, v in train.items() if k not in FUSION_ONLY}
    key = {"train": train, "target": cfg.target.model_dump(), "control": control}
    if not control:
        key["sources"] = [s.name for s in cfg.sources]
    inputs = {f"extract/{cfg.target.name}": _upstream_hash(cfg.run_dir / "extract" / cfg.target.name)}
    if not control:
        for s in cfg.sources:
            inputs[f"align/{s.name}"] = _upstream_hash(cfg.run_dir / "align" / s.name)
    return ArtifactDir(out_dir(cfg, control), "train", hash_obj(key), inputs, overwrite=overwrite)


# -- data --------------------------------------------------------------------------------------
def _row_index(ds) -> dict[int, int]:
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

    def __init__(self, cfg, control: bool):
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

    def _check_align(self, manifest: dict, ds, path: Path) -> None:
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


def _list_lengths(ds, column: str) -> np.ndarray:
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


def clm_weight_at(cfg_train, step: int, total: int, control: bool) -> float:
    """λ at an optimizer step: constant, or linear from λ to 1 (the reference's decay)."""
    if control:
        return 1.0
    lam = cfg_train.clm_weight
    if cfg_train.clm_weight_schedule == "linear":
        return lam + (1.0 - lam) * step / max(1, total)
    return lam


# -- validation --------------------------------------------------------------------------------
def check_train_config(cfg, control: bool) -> None:
    """Every problem that can be found before loading anything, raised together."""
    t = cfg.train
    problems = []
    if not control:
        if t.fusion not in FUSIONS:
            problems.append(f"train.fusion: unknown fusion function {t.fusion!r}; choose one of: "
                            f"{', '.join(FUSIONS.names())}")
        if not cfg.sources:
            problems.append("sources: fusion needs at least one source")
    if not (0.0 <= t.clm_weight <= 1.0):
        problems.append(f"train.clm_weight: λ must lie in [0, 1], got {t.clm_weight}")
    if problems:
        raise LmfuseError("cannot train:\n" + "\n".join(f"  - {p}" for p in problems), where="config train section",
                          fix="correct the fields named above")


# -- training ----------------------------------------------------------------------------------
def _mixed_precision(p: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[p]


def _make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several runs in one process (the pipeline trains fused then control): start clean.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mp = _mixed_precision(precision)
    if mp == "fp16" and not torch.cuda.is_available():
        mp = "no"  # fp16 autocast needs a GPU; fall back to fp32
    # The schedule counts optimizer steps of the global batch, whatever the number of processes.
    return Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False)


def _last_checkpoint(path: Path) -> Path | None:
    ckpts = sorted(p for p in (path / CKPT_DIR).glob("step-*") if (p / "trainer_state.json").exists())
    return ckpts[-1] if ckpts else None


def _save_checkpoint(acc, path: Path, step: int, extra: dict) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) + step; renamed into place when whole."""
    final = path / CKPT_DIR / f"step-{step:08d}"
    tmp = path / CKPT_DIR / f".tmp-step-{step:08d}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", {"step": step, **extra})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        # Keep only the newest checkpoint.
        for old in (path / CKPT_DIR).glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _save_best(acc, model, tok, path: Path, step: int, eval_loss: float) -> None:
    """Write the current weights as an HF model directory to `best/`, replacing it whole."""
    if not acc.is_main_process:
        return
    final, tmp = path / BEST_DIR, path / f".tmp-{BEST_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = acc.unwrap_model(model)
    unwrapped.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    atomic_write_json(tmp / BEST_STATE, {"step": step, "eval_loss": eval_loss})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _best_so_far(path: Path, resumed_step: int, main: bool = True) -> float:
    """The best validation loss already kept, or inf. A `best/` saved after the checkpoint we resume
    from is discarded: those steps run again (to the same weights) and will save it again."""
    state = read_json(path / BEST_DIR / BEST_STATE)
    if state is None:
        return math.inf
    if state["step"] > resumed_step:
        if main:
            shutil.rmtree(path / BEST_DIR, ignore_errors=True)
        return math.inf
    return float(state["eval_loss"])


def _global_tokens(data: BlockData, blocks: list[int], lengths: dict[int, int]) -> int:
    return sum(max(0, lengths[b] - 1) for b in blocks)


def run_train(cfg, control: bool = False, overwrite: bool = False) -> dict:
    """Train the fused model (or the λ = 1 control) and write `RUN/train/{fused,clm}/`.

    Args:
        cfg: The whole `FuseConfig`.
        control: Train the control: λ = 1, same data, budget and code; no sources read.
        overwrite: Replace an artifact made by another config instead of refusing.

    Returns:
        The manifest (with final metrics).
    """
    from lmfuse.models import load_model, load_tokenizer

    check_train_config(cfg, control)
    art = artifact(cfg, control, overwrite)
    if art.is_complete():
        return read_manifest(art.path)
    data = BlockData(cfg, control)  # reads and checks every input before any training
    t = cfg.train
    acc = _make_accelerator(t.precision)
    world, rank = acc.num_processes, acc.process_index
    if acc.is_main_process:
        art.begin()
    acc.wait_for_everyone()
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    set_seed(t.seed)
    tok = load_tokenizer(cfg.target)
    model = load_model(cfg.target, dtype="float32")  # fp32 master weights; autocast does bf16
    model.train()
    if t.gradient_checkpointing:
        # transformers 5 renamed it; keep working with 4.x too.
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = {b: int(data.tgt_len[data.tgt_rows[b]]) for b in data.train_ids}
    G = t.batch_size * t.grad_accum * world
    total = t.max_steps or max(1, math.ceil(t.epochs * len(data.train_ids) / G))
    order = data_order(len(data.train_ids), total * G, t.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(t.warmup_ratio * total), total)
    model, opt, sched = acc.prepare(model, opt, sched)
    opts = FusionOptions(t.temperature, t.outside_topk, t.avgce_weighting)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    collate = FusedCollator(t.fusion, opts, pad, vocab, span=t.span_weight > 0 and not control)

    start = 0
    ckpt = _last_checkpoint(art.path)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        start = read_json(ckpt / "trainer_state.json")["step"]
        acc.print(f"resuming from {ckpt.name} (step {start} of {total})")
    log_path = art.path / LOG
    if acc.is_main_process:
        _truncate_log(log_path, start)
    best = _best_so_far(art.path, start, acc.is_main_process) if t.keep_best else math.inf
    tb = _tensorboard(art.path) if (t.tensorboard and acc.is_main_process) else None

    last_eval = None
    last_train = {}
    every = max(1, total // 20)
    t0 = time.time()
    for step in range(start, total):
        lam = clm_weight_at(t, step, total, control)
        gblocks = [data.train_ids[i] for i in order[step * G:(step + 1) * G]]
        n_global = max(1, _global_tokens(data, gblocks, lengths))
        layout = np.asarray(gblocks).reshape(t.grad_accum, world, t.batch_size)
        sums = torch.zeros(4, dtype=torch.float64)
        for j in range(t.grad_accum):
            batch = collate([data.block(int(b)) for b in layout[j, rank]])
            n_local = int((batch["labels"] != IGNORE).sum())
            sync = contextlib.nullcontext() if j == t.grad_accum - 1 else acc.no_sync(model)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with sync:
                with acc.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    total_l, clm_l, fus_l, span_l = fused_clm_loss(
                        logits, batch["labels"], batch.get("target_ids"), batch.get("target_probs"),
                        batch["attention_mask"].bool(), lam, t.loss, t.logits_chunk_size,
                        batch.get("target_rest"), batch.get("span_target"), 0.0 if control else t.span_weight)
                # Normalise by the global token count; DDP averages over ranks, hence × world.
                scale = n_local / n_global
                acc.backward(total_l * scale * world)
            sums += torch.tensor([total_l.item(), clm_l.item(), fus_l.item(), span_l.item()],
                                 dtype=torch.float64) * scale
        grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        # Finite or fail, before the step: the weights (and the last checkpoint) stay finite.
        if not (torch.isfinite(sums).all() and torch.isfinite(torch.as_tensor(grad_norm)).all()):
            raise LmfuseError(
                f"the loss or its gradient is not finite at step {step + 1} (loss {float(sums[0])}, clm "
                f"{float(sums[1])}, fusion {float(sums[2])}, gradient norm {float(grad_norm)}); training stopped "
                "before the weights were updated", where=str(art.path),
                fix="lower train.learning_rate (or raise train.warmup_ratio), or train in float32 "
                    "(train.precision); a rerun resumes from the last checkpoint")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        rec = {"step": done, "loss": float(sums[0]), "clm": float(sums[1]), "fusion": float(sums[2]),
               "lr": sched.get_last_lr()[0], "clm_weight": lam, "tokens": n_global}
        if t.span_weight > 0 and not control:
            rec["span"] = float(sums[3])
        last_train = rec
        if acc.is_main_process:
            _append_log(log_path, rec)
            if tb:
                for k in ("loss", "clm", "fusion", "lr"):
                    tb.add_scalar(f"train/{k}", rec[k], done)
            if done % every == 0 or done == total:
                acc.print(f"step {done}/{total}  loss {rec['loss']:.4f}  clm {rec['clm']:.4f}  "
                          f"fusion {rec['fusion']:.4f}  lr {rec['lr']:.2e}  ({time.time() - t0:.1f}s)")
        if data.val_ids and ((t.eval_every and done % t.eval_every == 0) or done == total):
            last_eval = evaluate_loss(model, data, collate, acc, t.batch_size)
            if acc.is_main_process:
                _append_log(log_path, {"step": done, "eval_loss": last_eval})
                if tb:
                    tb.add_scalar("eval/loss", last_eval, done)
                acc.print(f"step {done}/{total}  eval loss {last_eval:.4f}")
            if t.keep_best and last_eval is not None and last_eval < best:
                best = last_eval
                _save_best(acc, model, tok, art.path, done, last_eval)
                acc.wait_for_everyone()
        if t.save_every and done % t.save_every == 0 and done < total:
            _save_checkpoint(acc, art.path, done, {"total": total})
    if tb:
        tb.close()

    best_state = read_json(art.path / BEST_DIR / BEST_STATE) if t.keep_best else None
    metrics = {"steps": total, "final_train_loss": last_train.get("loss"), "final_train_clm": last_train.get("clm"),
               "final_train_fusion": last_train.get("fusion"), "final_eval_loss": last_eval,
               "best_step": best_state["step"] if best_state else None,
               "best_eval_loss": best_state["eval_loss"] if best_state else None,
               "train_blocks": len(data.train_ids), "validation_blocks": len(data.val_ids),
               "global_batch": G, "world_size": world}
    acc.wait_for_everyone()
    manifest = None
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(art.path, safe_serialization=True)
        tok.save_pretrained(art.path)
        (art.path / "README.md").write_text(model_card(cfg, control, metrics))
        shutil.rmtree(art.path / CKPT_DIR, ignore_errors=True)
        manifest = art.finish(control=control, metrics=metrics,
                              sources=[] if control else [s.name for s in cfg.sources])
    acc.wait_for_everyone()
    return manifest or read_manifest(art.path)


@torch.no_grad()
def evaluate_loss(model, data: BlockData, collate: FusedCollator, acc, batch_size: int) -> float | None:
    """Mean next-token CE (nats per target token) on the validation blocks; None if there are none."""
    if not data.val_ids:
        return None
    was_training = model.training
    model.eval()
    mine = data.val_ids[acc.process_index::acc.num_processes]
    sums = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        items = [{**data.block(b), "candidates": []} for b in mine[i:i + batch_size]]
        batch = {k: v.to(acc.device) for k, v in collate(items).items()}
        with acc.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"] != IGNORE
        _, clm, _, _ = fused_clm_loss(logits, batch["labels"], None, None, mask, 1.0)
        n = int(mask.sum())
        sums += torch.tensor([clm.item() * n, n], dtype=torch.float64)
    sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
    if was_training:
        model.train()
    return float(sums[0] / max(1.0, float(sums[1])))


def _append_log(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LmfuseError("train.tensorboard is on but tensorboard is not installed", where="train.tensorboard",
                          fix="pip install 'lmfuse[tensorboard]' or set tensorboard: false") from e
    return SummaryWriter(str(path / "tensorboard"))


def model_card(cfg, control: bool, metrics: dict) -> str:
    """README.md for the output model directory."""
    t = cfg.train
    lines = [f"# {cfg.target.name} — {'continual-training control (λ = 1)' if control else 'fused with lmfuse'}", "",
             f"Target model: `{cfg.target.path}`", ""]
    if not control:
        lines += ["Trained with FuseLLM-style knowledge fusion (Wan et al., ICLR 2024) by lmfuse.", "",
                  "Sources: " + ", ".join(f"`{s.name}` (`{s.path}`)" for s in cfg.sources), "",
                  "| option | value |", "|---|---|",
                  *(f"| {k} | {getattr(t, k)} |" for k in FUSION_ONLY)]
    else:
        lines += ["Continual causal-LM training on the same data and budget as the fused model, "
                  "the control that shows what fusion adds.", ""]
    lines += ["", "## Data and training", "", f"Corpus: `{cfg.corpus.path}`, "
              f"{metrics['train_blocks']} training blocks, {metrics['validation_blocks']} validation blocks.", "",
              "| setting | value |", "|---|---|",
              *(f"| {k} | {getattr(t, k)} |" for k in ("learning_rate", "weight_decay", "warmup_ratio", "epochs",
                                                     "max_steps", "batch_size", "grad_accum", "precision", "seed")),
              f"| global batch | {metrics['global_batch']} |", "", "## Final metrics", "",
              "| metric | value |", "|---|---|",
              *(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in metrics.items()), ""]
    return "\n".join(lines)


def _main(argv: list[str]) -> None:
    """`python -m lmfuse.train CONFIG [--control] [--overwrite]`, for `accelerate launch`."""
    from lmfuse.config import load_config

    if not argv:
        print(_main.__doc__, file=sys.stderr)
        raise SystemExit(2)
    run_train(load_config(argv[0]), control="--control" in argv, overwrite="--overwrite" in argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
