"""What a training run leaves on disk, written so that a kill at any moment leaves a state the
rerun can use.

Inside `train/<fused|clm>/`:

```
checkpoints/step-N/   accelerate state (model.safetensors, optimizer.bin, scheduler.bin,
                      random_states_<rank>.pkl) + trainer_state.json (step, every file's size and
                      hash), written last in `.tmp-step-N/`, which is then renamed
.final/               the finished model (HF directory, README.md) + final.json (the metrics),
                      written in `.tmp-final/` and renamed when whole; its files then move up
                      into the artifact directory, the checkpoints go, the manifest is written,
                      and `.final/` goes last
best/                 `train.keep_best` weights + best_state.json, replaced whole
```

A rerun resumes from the newest checkpoint that checks out (sizes and hashes); an incomplete or
damaged one is skipped (the next older one, or step 0, is used instead). A `.final/` that holds
final.json means training is over: the rerun only finishes moving it into place. Model weights are
safetensors; optimizer, scheduler and RNG states are plain tensors and numbers that load with
`torch.load(weights_only=True)`, never as arbitrary pickles.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmfuse.artifacts import atomic_write_json, read_json, writing_to
from lmfuse.hashing import file_hash

CKPT_DIR = "checkpoints"
CKPT_STATE = "trainer_state.json"
FINAL_DIR = ".final"
FINAL_TMP = ".tmp-final"
FINAL_STATE = "final.json"
BEST_DIR = "best"
BEST_STATE = "best_state.json"
# What accelerate's `save_state` writes for one model, optimizer and scheduler (rank files apart);
# a checkpoint written before trainer_state.json listed its files must hold these.
ACCELERATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.pt", "model.pt")


# -- checkpoints -------------------------------------------------------------------------------
def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` except the state file."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        if rel != CKPT_STATE:
            out[rel] = {"bytes": f.stat().st_size, "sha256": file_hash(f)}
    return out


def save_checkpoint(acc: Any, path: Path, step: int, extra: dict[str, Any]) -> Path:
    """Save accelerate's state (model, optimizer, scheduler, RNG) as `checkpoints/step-N/`.

    The state goes to a temp directory; `trainer_state.json` (step and every file's size and hash)
    is written last and the directory renamed into place, so `step-N/` is whole or absent. Older
    checkpoints are removed only after that.

    Args:
        acc: The `accelerate.Accelerator` (every process calls this).
        path: The train artifact directory.
        step: Optimizer steps done.
        extra: More fields for trainer_state.json.

    Returns:
        The checkpoint directory.
    """
    root = path / CKPT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    with writing_to(tmp, f"write the training checkpoint of step {step}"):
        acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / CKPT_STATE, {"step": step, **extra, "files": _file_records(tmp)})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in root.iterdir():  # the newest checkpoint is enough; leftovers of killed saves go too
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def checkpoint_problem(ckpt: Path, world: int = 1) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it checks out.

    Every file trainer_state.json lists must have its size and hash; a checkpoint from before
    files were listed must hold accelerate's files for `world` processes. Pickled model weights
    are refused.

    Args:
        ckpt: A `checkpoints/step-N/` directory.
        world: Processes of the run that resumes (one RNG file each).
    """
    try:
        state = read_json(ckpt / CKPT_STATE)
    except Exception as e:  # a damaged state file: the checkpoint is not usable, whatever the error
        return f"unreadable {CKPT_STATE}: {e}"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"no {CKPT_STATE} with a step (the save did not finish)"
    pickled = [n for n in PICKLED_WEIGHTS if (ckpt / n).exists()]
    if pickled:
        return f"model weights stored as a pickle ({pickled[0]}); lmfuse loads safetensors only"
    files = state.get("files")
    if not isinstance(files, dict):
        needed = [*ACCELERATE_FILES, *(f"random_states_{r}.pkl" for r in range(world))]
        missing = [n for n in needed if not (ckpt / n).is_file()]
        return f"missing {', '.join(missing)}" if missing else None
    for name, rec in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != rec.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, {rec.get('bytes')} were written"
        if file_hash(f) != rec.get("sha256"):
            return f"{name} does not match the hash written with it (damaged)"
    if not any(n.endswith(".safetensors") for n in files):
        return "no safetensors model weights"
    ranks = [r for r in range(world) if f"random_states_{r}.pkl" not in files]
    if ranks:
        return f"made by fewer processes (no RNG state for rank {ranks[0]})"
    return None


def last_good_checkpoint(path: Path, world: int = 1, log: Callable[[str], Any] = print) -> tuple[Path, int] | None:
    """The newest checkpoint that checks out and its step, or None (start from step 0).

    Args:
        path: The train artifact directory.
        world: Processes of the run that resumes.
        log: Where a line naming each skipped checkpoint goes.
    """
    root = path / CKPT_DIR
    if not root.is_dir():
        return None
    for ckpt in sorted(root.glob("step-*"), reverse=True):
        problem = checkpoint_problem(ckpt, world)
        if problem is None:
            return ckpt, int(read_json(ckpt / CKPT_STATE)["step"])
        log(f"skipping checkpoint {ckpt.name}: {problem}")
    return None


def load_checkpoint(acc: Any, ckpt: Path) -> None:
    """Restore model, optimizer, scheduler and RNG states; no arbitrary unpickling."""
    acc.load_state(str(ckpt), load_kwargs={"weights_only": True})


# -- the finished model ------------------------------------------------------------------------
def write_final(model: Any, tok: Any, path: Path, card: str, metrics: dict[str, Any]) -> Path:
    """Write the finished model to `.final/`, whole or not at all (main process only).

    Args:
        model: The unwrapped model (`save_pretrained`).
        tok: Its tokenizer.
        path: The train artifact directory.
        card: The README.md model card.
        metrics: Final metrics, kept in final.json for the manifest.

    Returns:
        The `.final/` directory.
    """
    tmp, final = path / FINAL_TMP, path / FINAL_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_to(tmp, "write the finished model"):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    atomic_write_json(tmp / FINAL_STATE, {"metrics": metrics})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def final_metrics(path: Path) -> dict[str, Any] | None:
    """The metrics of a finished model waiting in `.final/`, or None when there is none."""
    try:
        state = read_json(path / FINAL_DIR / FINAL_STATE)
    except Exception:  # written atomically, so only outside damage gets here: train again
        return None
    return state.get("metrics") if isinstance(state, dict) else None


def promote_final(path: Path) -> None:
    """Move the finished model's files from `.final/` into the artifact directory and drop the
    checkpoints. Each move is a rename, and a rerun after a kill moves what is left."""
    final = path / FINAL_DIR
    for f in sorted(final.iterdir()):
        if f.name != FINAL_STATE:
            os.replace(f, path / f.name)
    shutil.rmtree(path / CKPT_DIR, ignore_errors=True)


def drop_final(path: Path) -> None:
    """Remove `.final/` (after the manifest) and what killed writes left (`.tmp-*`, `.old-best`)."""
    for leftover in (FINAL_DIR, FINAL_TMP, f".tmp-{BEST_DIR}", f".old-{BEST_DIR}"):
        shutil.rmtree(path / leftover, ignore_errors=True)


# -- the best weights (`train.keep_best`) ------------------------------------------------------
def save_best(model: Any, tok: Any, path: Path, step: int, eval_loss: float) -> None:
    """Write the weights as an HF directory to `best/`, replacing it whole (main process only).

    The old `best/` is renamed aside before the new one takes its place, so `best/` never holds a
    half-deleted model: a kill leaves the old one, the new one, or none.
    """
    final, tmp, old = path / BEST_DIR, path / f".tmp-{BEST_DIR}", path / f".old-{BEST_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_to(tmp, f"write the best weights (step {step})"):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    atomic_write_json(tmp / BEST_STATE, {"step": step, "eval_loss": eval_loss})
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def best_so_far(path: Path, resumed_step: int, main: bool = True) -> float:
    """The best validation loss already kept, or inf.

    A `best/` saved after the checkpoint we resume from is discarded: those steps run again (to
    the same weights) and will save it again.

    Args:
        path: The train artifact directory.
        resumed_step: The step training resumes from.
        main: Whether this is the main process (the one that deletes).
    """
    best, old = path / BEST_DIR, path / f".old-{BEST_DIR}"
    if not best.exists() and (old / BEST_STATE).exists():
        os.replace(old, best)  # killed between the two renames of `save_best`: the old one stands
    try:
        state = read_json(best / BEST_STATE)
    except Exception:
        state = None
    if not isinstance(state, dict) or state.get("step", math.inf) > resumed_step:
        if main:
            shutil.rmtree(best, ignore_errors=True)
        return math.inf
    return float(state["eval_loss"])
