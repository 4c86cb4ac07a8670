"""Continual training of the target on λ·CLM + (1 − λ)·fusion, on `accelerate`.

`run_train` sets up (`_setup`: model, optimizer, schedule, collator, resume), fits (`_fit`: the
loop) and finishes (the model moved into place, then the manifest). The data join and the collator
live in `lmfuse.traindata`; checkpoints, the final model and the best weights in
`lmfuse.checkpoint`. The same code trains the control (λ = 1, no sources read).

Determinism: the data order is a function of the seed and the step only (one permutation of
the training blocks per epoch), each optimizer step consumes one global batch laid out as
[grad_accum, world, batch_size], and the loss is normalised by the number of target tokens
in the whole global batch. So a resumed run (model, optimizer, scheduler and RNG states are
checkpointed) and a run on more processes with the same global batch follow the same curve.

Two checks guard against a learning rate too high for the target (issue 26). Divergence
(`divergence`): training stops, before the weights are updated, at the first step where the mean
training loss of the last `DIVERGE_WINDOW` steps is more than ln V above the loss of step 1 (V:
the target's vocabulary; ln V is the loss of a uniform guess over it), or where a loss or gradient
is not finite. The first loss and the window travel in the checkpoint, so a resumed run stops at
the same step. And when the run validates during training (`eval_every` or `keep_best`), the
validation loss is measured once before the first step (step 0: the untrained target; measuring it
touches no weights, RNG state or data order) and a run whose final validation loss ends above it
is flagged in the log, the manifest (`eval_loss_rose`) and the report's verdict.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmfuse.artifacts import ArtifactDir, atomic_write_bytes, read_json
from lmfuse.checkpoint import (
    BEST_DIR,
    BEST_STATE,
    CKPT_STATE,
    best_so_far,
    drop_final,
    final_metrics,
    last_good_checkpoint,
    load_checkpoint,
    promote_final,
    save_best,
    save_checkpoint,
    write_final,
)
from lmfuse.config import FuseConfig, TrainConfig
from lmfuse.errors import LmfuseError
from lmfuse.fusion import FUSIONS, FusionOptions
from lmfuse.hashing import hash_obj
from lmfuse.loss import IGNORE, fused_clm_loss
from lmfuse.stage import Build, Stage
from lmfuse.traindata import BlockData, FusedCollator, data_order

# Options that only change the fusion term: the control's hash must not depend on them.
FUSION_ONLY = ("fusion", "level", "quality", "include_target", "outside_topk", "temperature", "clm_weight",
               "clm_weight_schedule", "loss", "avgce_weighting", "span_weight")
# Options that change neither the weights nor the logs.
NOT_HASHED = ("control", "tensorboard", "save_every")
LOG = "log.jsonl"
# train.precision: float16 without a GPU.
FP16_ON_CPU = ("train.precision is float16, but float16 autocast needs a GPU and none is available: training "
               "runs in float32 (slower; set train.precision: bfloat16 on a CPU, or float32 to say so)")
# Divergence: the mean training loss of the last DIVERGE_WINDOW steps more than ln V above step 1's.
DIVERGE_WINDOW = 10
# What the log, the console and the model card say when validation ends above its step-0 value.
VALIDATION_ROSE = ("validation loss ended above its step-0 value: training made the target worse on held-out "
                   "text. The learning rate is likely too high for this target: lower train.learning_rate "
                   "(try 10× lower) and compare the step-0 and final validation losses again")


# -- artifact ----------------------------------------------------------------------------------
def out_dir(cfg: FuseConfig, control: bool = False) -> Path:
    """`RUN/train/fused` or, for the control, `RUN/train/clm`."""
    return cfg.run_dir / "train" / ("clm" if control else "fused")


class TrainStage(Stage):
    """`train/fused` (or, for the control, `train/clm`): the continually trained target.

    Its config hash covers the train section (minus the fusion-only options for the control)
    and the target model; its inputs are `extract/<target>` and, unless control, `align/<source>`
    for every source. The control reads only the target's token ids, so its `extract/<target>`
    input is the extraction's tokens key: another `extract.top_k` or `distribution` leaves an
    identical control current instead of training it again.

    Its one "shard" is the finished model: killed at any moment, a rerun goes on from the newest
    checkpoint that checks out, or, when training had finished, from the finished model waiting in
    `.final/` (`lmfuse.checkpoint`). The model's files are in place before the manifest is written.
    """

    kind = "train"
    all_ranks = True  # every process trains
    checks_inputs = False  # `BlockData` reads every input through verified reads (prepare included)

    def __init__(self, cfg: FuseConfig, control: bool = False):
        super().__init__(f"train/{'clm' if control else 'fused'}")
        self.cfg, self.control = cfg, control

    def inputs(self) -> dict[str, str]:
        tgt = f"extract/{self.cfg.target.name}"
        ins = {tgt: f"{tgt}#tokens" if self.control else tgt}
        if not self.control:
            ins.update({f"align/{s.name}": f"align/{s.name}" for s in self.cfg.sources})
        return ins

    def config_hash(self) -> str:
        cfg, control = self.cfg, self.control
        train = cfg.train.model_dump(exclude=set(NOT_HASHED))
        if control:
            train = {k: v for k, v in train.items() if k not in FUSION_ONLY}
        key = {"train": train, "target": cfg.target.model_dump(), "control": control}
        if not control:
            key["sources"] = [s.name for s in cfg.sources]
        return hash_obj(key)

    def on_complete(self, art: ArtifactDir) -> None:
        drop_final(art.path)  # killed between the manifest and this cleanup: nothing else is left to do

    def validate(self) -> None:
        check_train_config(self.cfg, self.control)

    def open(self, b: Build) -> None:
        # Every input is read and checked before any training (and before the claim).
        b.state.update(data=BlockData(self.cfg, self.control), acc=_make_accelerator(self.cfg.train.precision))

    def shard_done(self, b: Build, i: int) -> bool:
        return final_metrics(b.art.path) is not None

    def write(self, b: Build, todo: list[int]):
        cfg, control, acc, data, path = self.cfg, self.control, b.state["acc"], b.state["data"], b.art.path
        if final_metrics(path) is not None:
            acc.print(f"training had finished in {path}; moving the model into place")
            return
        run = _setup(cfg, control, data, acc, path)
        metrics = _fit(cfg, control, data, run, path)
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = acc.unwrap_model(run.model)
            model.config.use_cache = True
            write_final(model, run.tok, path, model_card(cfg, control, metrics), metrics)
        yield from ()

    def before_finish(self, b: Build) -> None:
        b.state["metrics"] = final_metrics(b.art.path)
        promote_final(b.art.path)

    def summary(self, b: Build, stats: list[dict]) -> dict:
        return dict(control=self.control, metrics=b.state["metrics"],
                    sources=[] if self.control else [s.name for s in self.cfg.sources])

    def after_finish(self, b: Build, manifest: dict) -> None:
        drop_final(b.art.path)


def clm_weight_at(cfg_train: TrainConfig, step: int, total: int, control: bool) -> float:
    """λ at an optimizer step: constant, or linear from λ to 1 (the reference's decay)."""
    if control:
        return 1.0
    lam = cfg_train.clm_weight
    if cfg_train.clm_weight_schedule == "linear":
        return lam + (1.0 - lam) * step / max(1, total)
    return lam


def divergence(first: float, recent: list[float], vocab: int) -> tuple[float, float] | None:
    """Whether training has diverged: `(mean, limit)` when it has, else None.

    The rule: the mean of the last `DIVERGE_WINDOW` training losses (nats per target token) is
    above `limit = first + ln(vocab)`, the loss of step 1 plus the loss of a uniform guess over the
    vocabulary. A model that far above its start does worse than guessing, whatever the batch of
    step 1 was; a run that merely learns slowly or noisily never gets near it.

    Args:
        first: The training loss of step 1 (measured before any update).
        recent: The training losses of the latest steps, oldest first (the current one last).
        vocab: The target's vocabulary size.
    """
    window = recent[-DIVERGE_WINDOW:]
    if not window:
        return None
    mean, limit = sum(window) / len(window), first + math.log(vocab)
    return (mean, limit) if mean > limit else None


def check_train_config(cfg: FuseConfig, control: bool) -> None:
    """Every problem that can be found before loading anything, raised together (a config made
    with `model_copy(update=...)` skips pydantic's checks)."""
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


_PRECISION_USED = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}  # accelerate's name -> ours


def _make_accelerator(precision: str) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several runs in one process (the pipeline trains fused then control): start clean.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mp = _mixed_precision(precision)
    if mp == "fp16" and not torch.cuda.is_available():
        mp = "no"  # fp16 autocast needs a GPU: float32 instead, said in the log and the manifest
        print(f"warning: {FP16_ON_CPU}", flush=True)
    # The schedule counts optimizer steps of the global batch, whatever the number of processes.
    return Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False)


@dataclass
class _Run:
    """Everything the loop needs, built by `_setup`."""

    acc: Any  # accelerate.Accelerator
    model: Any  # prepared model
    opt: Any
    sched: Any
    tok: Any
    collate: FusedCollator
    total: int  # optimizer steps
    global_batch: int
    order: np.ndarray  # [total * global_batch] indices into data.train_ids
    lengths: dict[int, int]  # block_id -> target tokens
    start: int  # the step resumed from (0 = fresh)
    vocab: int  # the target's vocabulary size (the divergence rule's ln V)
    resumed: dict[str, Any]  # trainer_state.json of the checkpoint resumed from ({} when fresh)


def _setup(cfg: FuseConfig, control: bool, data: BlockData, acc: Any, path: Path) -> _Run:
    """Model, optimizer, schedule and collator; restored from the newest good checkpoint if any."""
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from lmfuse.models import load_model, load_tokenizer

    t = cfg.train
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
    G = t.batch_size * t.grad_accum * acc.num_processes
    total = t.max_steps or max(1, math.ceil(t.epochs * len(data.train_ids) / G))
    order = data_order(len(data.train_ids), total * G, t.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(t.warmup_ratio * total), total)
    model, opt, sched = acc.prepare(model, opt, sched)
    opts = FusionOptions(t.temperature, t.outside_topk, t.avgce_weighting)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    collate = FusedCollator(t.fusion, opts, pad, vocab, span=t.span_weight > 0 and not control)
    start, resumed = 0, {}
    found = last_good_checkpoint(path, acc.num_processes, log=acc.print)
    if found is not None:
        ckpt, start = found
        load_checkpoint(acc, ckpt)
        resumed = read_json(ckpt / CKPT_STATE) or {}
        acc.print(f"resuming from {ckpt.name} (step {start} of {total})")
    return _Run(acc, model, opt, sched, tok, collate, total, G, order, lengths, start, vocab, resumed)


def _fit(cfg: FuseConfig, control: bool, data: BlockData, r: _Run, path: Path) -> dict[str, Any]:
    """The training loop from `r.start` to `r.total`; returns the final metrics."""
    t, acc, model = cfg.train, r.acc, r.model
    world, rank, G, total = acc.num_processes, acc.process_index, r.global_batch, r.total
    log_path = path / LOG
    if acc.is_main_process:
        _truncate_log(log_path, r.start)
    best = best_so_far(path, r.start, acc.is_main_process) if t.keep_best else math.inf
    acc.wait_for_everyone()
    tb = _tensorboard(path) if (t.tensorboard and acc.is_main_process) else None

    # Step 0: the untrained target's validation loss, measured once. A resumed run has it in its
    # checkpoint (and its log line kept); a run started over measures it again (its log was emptied).
    initial = r.resumed.get("initial_eval_loss")
    if r.start == 0 and data.val_ids and (t.eval_every or t.keep_best):
        with _rng_kept():
            initial = evaluate_loss(model, data, r.collate, acc, t.batch_size)
        if acc.is_main_process:
            _append_log(log_path, {"step": 0, "eval_loss": initial})
            if tb:
                tb.add_scalar("eval/loss", initial, 0)
            acc.print(f"step 0/{total}  eval loss {initial:.4f} (before training)")
    # The divergence rule's state: step 1's loss and the latest losses (restored on resume).
    first_loss = r.resumed.get("first_loss")
    recent = list(r.resumed.get("recent_losses") or [])

    last_eval = None
    last_train: dict[str, Any] = {}
    every = max(1, total // 20)
    t0 = time.time()
    for step in range(r.start, total):
        lam = clm_weight_at(t, step, total, control)
        gblocks = [data.train_ids[i] for i in r.order[step * G:(step + 1) * G]]
        n_global = max(1, sum(max(0, r.lengths[b] - 1) for b in gblocks))
        layout = np.asarray(gblocks).reshape(t.grad_accum, world, t.batch_size)
        sums = torch.zeros(4, dtype=torch.float64)  # total, clm, fusion, span
        for j in range(t.grad_accum):
            batch = r.collate([data.block(int(b)) for b in layout[j, rank]])
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
                "before the weights were updated", where=str(path),
                fix="lower train.learning_rate (or raise train.warmup_ratio), or train in float32 "
                    "(train.precision); a rerun of the same config resumes from the last checkpoint, one with "
                    "another learning rate starts over")
        first_loss = float(sums[0]) if first_loss is None else first_loss
        recent = [*recent, float(sums[0])][-DIVERGE_WINDOW:]
        diverged = divergence(first_loss, recent, r.vocab)
        if diverged is not None:
            mean, limit = diverged
            raise LmfuseError(
                f"training diverged at step {step + 1}: the mean training loss of steps "
                f"{step + 2 - len(recent)}–{step + 1} is {mean:.4g} nats/token, more than ln V = "
                f"{limit - first_loss:.2f} above the loss of step 1 ({first_loss:.4f}): worse than a uniform "
                f"guess over the target's {r.vocab:,} tokens. Training stopped before the weights were updated",
                where=str(path),
                fix=f"lower train.learning_rate (try 10× lower: {t.learning_rate / 10:g}; or raise "
                    "train.warmup_ratio) and train again (a run with another learning rate starts over)")
        r.opt.step()
        r.sched.step()
        r.opt.zero_grad(set_to_none=True)
        done = step + 1
        rec = {"step": done, "loss": float(sums[0]), "clm": float(sums[1]), "fusion": float(sums[2]),
               "lr": r.sched.get_last_lr()[0], "clm_weight": lam, "tokens": n_global}
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
            last_eval = evaluate_loss(model, data, r.collate, acc, t.batch_size)
            if acc.is_main_process:
                _append_log(log_path, {"step": done, "eval_loss": last_eval})
                if tb:
                    tb.add_scalar("eval/loss", last_eval, done)
                acc.print(f"step {done}/{total}  eval loss {last_eval:.4f}")
            if t.keep_best and last_eval is not None and last_eval < best:
                best = last_eval
                if acc.is_main_process:
                    save_best(acc.unwrap_model(model), r.tok, path, done, last_eval)
                acc.wait_for_everyone()
        if t.save_every and done % t.save_every == 0 and done < total:
            save_checkpoint(acc, path, done, {"total": total, "initial_eval_loss": initial,
                                              "first_loss": first_loss, "recent_losses": recent})
    rose = None if initial is None or last_eval is None else last_eval > initial
    if rose and acc.is_main_process:
        _append_log(log_path, {"step": total, "warning": VALIDATION_ROSE, "initial_eval_loss": initial,
                               "final_eval_loss": last_eval})
        acc.print(f"warning: {VALIDATION_ROSE} (step 0: {initial:.4f}, step {total}: {last_eval:.4f} nats/token)")
    if tb:
        tb.close()

    best_state = read_json(path / BEST_DIR / BEST_STATE) if t.keep_best else None
    return {"steps": total, "final_train_loss": last_train.get("loss"), "final_train_clm": last_train.get("clm"),
            "final_train_fusion": last_train.get("fusion"), "precision_used": _PRECISION_USED[acc.mixed_precision],
            "initial_eval_loss": initial,
            "final_eval_loss": last_eval, "eval_loss_rose": rose,
            "best_step": best_state["step"] if best_state else None,
            "best_eval_loss": best_state["eval_loss"] if best_state else None,
            "train_blocks": len(data.train_ids), "validation_blocks": len(data.val_ids),
            "global_batch": G, "world_size": world}


@torch.no_grad()
def evaluate_loss(model: Any, data: BlockData, collate: FusedCollator, acc: Any, batch_size: int) -> float | None:
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


@contextlib.contextmanager
def _rng_kept():
    """Every random number generator training reads left as it was (the step-0 validation draws
    none, and this makes sure it cannot change the run)."""
    import random

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _append_log(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def _log_step(line: str) -> int | None:
    """The step of a log line, or None for a line a kill cut short."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec.get("step") if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to the step we resume from (later ones will be written again); a line
    cut short by a kill goes too. Starting over (step 0), nothing is kept: the step-0 validation is
    measured again. Replaced whole, so a kill here loses nothing."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if step > 0 and (s := _log_step(ln)) is not None and s <= step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LmfuseError("train.tensorboard is on but tensorboard is not installed", where="train.tensorboard",
                          fix="pip install 'lmfuse[tensorboard]' or set tensorboard: false") from e
    return SummaryWriter(str(path / "tensorboard"))


def model_card(cfg: FuseConfig, control: bool, metrics: dict) -> str:
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
    if metrics.get("eval_loss_rose"):
        lines += ["", f"**Warning:** the {VALIDATION_ROSE} (step 0: {metrics['initial_eval_loss']:.4f}, end: "
                      f"{metrics['final_eval_loss']:.4f} nats/token)."]
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
