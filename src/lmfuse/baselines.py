"""Baselines that fusion must beat: probability ensembles and parameter merges (the `clm` control is
trained by `train.py`; eval picks up `RUN/train/clm`).

- `ensemble`: the average of the next-token probabilities of models that share a tokenizer, wrapped
  as a model whose `forward` returns the log of the averaged probabilities, so the same NLL code
  (`evaluate.block_nll`) scores it.
- `merge`: parameter averaging of same-architecture models, `linear` (weighted average, weights
  normalized to sum to 1) or `task_arithmetic` (base + Σ w_i (θ_i − base)); writes a normal HF
  directory (safetensors + tokenizer).

Why not mergekit: `pip download --no-deps mergekit` (0.1.5) works here, but it requires `peft`,
`immutables`, `click` and `scipy` (peft is not installed and pins its own transformers range) and
brings its own YAML schema and CLI, for two methods that are a streamed weighted sum of safetensors
tensors here (about 60 lines). Users who want TIES/DARE/SLERP can run mergekit on the side and pass
its output directory to `lmfuse eval` as a model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmfuse.config import FuseConfig, ModelSpec
from lmfuse.errors import LmfuseError
from lmfuse.evalmodel import EvalModel, dir_spec, hf_model_dir, safe_name
from lmfuse.fingerprint import model_fingerprint
from lmfuse.hashing import hash_obj
from lmfuse.registry import Registry
from lmfuse.stage import Build, Stage

# Each configured kind of baseline → the builder of its eval entries (`baselines.ensemble`, `.merge`).
EVAL_ENTRIES: Registry[Callable[..., list[EvalModel]]] = Registry("baseline")
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method")
# What a source directory holds that is no part of a merged model (an lmfuse artifact's records).
NOT_COPIED = {"manifest.json", "stage.json", "merge.json", "log.jsonl", "README.md", "best_state.json"}
WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".gguf", ".pt", ".pth")


# -- ensemble ----------------------------------------------------------------------------------
@dataclass
class EnsembleOutput:
    logits: Any  # (B, T, V) log of the averaged probabilities


def _ensemble_module():
    import torch

    class EnsembleLM(torch.nn.Module):
        """Several causal LMs with one vocabulary, seen as one: log Σ_i w_i softmax(logits_i).

        Args:
            members: Models whose logits have the same `[B, T, V]` shape.
            weights: One non-negative weight per model (normalized; default equal).
        """

        def __init__(self, members: Sequence[torch.nn.Module], weights: Sequence[float] | None = None):
            super().__init__()
            if not members:
                raise LmfuseError("an ensemble needs at least one model")
            w = [1.0] * len(members) if weights is None else [float(x) for x in weights]
            if len(w) != len(members) or any(x < 0 for x in w) or sum(w) <= 0:
                raise LmfuseError(f"ensemble weights {w} do not fit {len(members)} models",
                                  fix="give one non-negative weight per model, not all zero")
            self.members = torch.nn.ModuleList(members)
            self.log_weights = [math.log(x / sum(w)) if x > 0 else -math.inf for x in w]
            self.config = getattr(members[0], "config", None)

        def forward(self, input_ids, attention_mask=None, **kw) -> EnsembleOutput:
            acc = None
            for m, lw in zip(self.members, self.log_weights, strict=True):
                if lw == -math.inf:
                    continue
                # Accumulate in log space one member at a time: no [n, B, T, V] stack.
                lp = torch.log_softmax(m(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1) + lw
                acc = lp if acc is None else torch.logaddexp(acc, lp)
            return EnsembleOutput(logits=acc)

    return EnsembleLM


def ensemble_model(members, weights: Sequence[float] | None = None):
    """Wrap loaded models (same vocabulary) as one model; see `EnsembleLM`."""
    sizes = {m.get_output_embeddings().weight.shape[0] if hasattr(m, "get_output_embeddings") else None
             for m in members}
    if len(sizes) > 1:
        raise LmfuseError(f"ensemble members have output vocabularies of different sizes {sorted(map(str, sizes))}",
                          fix="ensemble only models that share a tokenizer")
    return _ensemble_module()(members, weights)


def vocab_problem(tokenizers: Sequence[Any], names: Sequence[str]) -> str | None:
    """Why these tokenizers do not share one vocabulary (token → id), or None."""
    ref = tokenizers[0].get_vocab()
    for name, tok in zip(names[1:], tokenizers[1:], strict=True):
        v = tok.get_vocab()
        if v != ref:
            diff = len(set(v.items()) ^ set(ref.items()))
            return (f"{names[0]} ({len(ref)} tokens) and {name} ({len(v)} tokens) have different vocabularies "
                    f"({diff} token→id pairs differ)")
    return None


def check_same_tokenizer(specs: Sequence[Any], what: str) -> None:
    """Refuse models whose tokenizers differ (token → id) or whose configs disagree on vocab size."""
    from transformers import AutoConfig

    from lmfuse.models import load_tokenizer, resolve_model

    names = [s.name for s in specs]
    problem = vocab_problem([load_tokenizer(s) for s in specs], names)
    if problem is None:
        sizes = {s.name: getattr(AutoConfig.from_pretrained(resolve_model(s)), "vocab_size", None) for s in specs}
        if len(set(sizes.values())) > 1:
            problem = f"the models' vocab sizes differ: {sizes}"
    if problem:
        raise LmfuseError(f"cannot {what} {', '.join(names)}: {problem}", where=f"baselines ({what})",
                          fix=f"{what} only models that share a tokenizer; models with different tokenizers "
                              "are what fusion (`lmfuse train`) is for")


def check_ensembles(entries: Sequence[Any]) -> None:
    for e in entries:
        check_same_tokenizer(e.members, "ensemble")


def load_ensemble(specs: Sequence[Any], dtype: str | None = None, device: str | None = None,
                  weights: Sequence[float] | None = None):
    from lmfuse.models import load_model

    check_same_tokenizer(specs, "ensemble")
    return ensemble_model([load_model(s, dtype=dtype, device=device) for s in specs], weights)


# -- merge: pure tensor functions --------------------------------------------------------------
@MERGE_METHODS.register("linear")
def merge_linear(tensors: Sequence[Any], weights: Sequence[float], base: Any = None):
    """Weighted average `Σ w_i θ_i / Σ w_i`.

    Args:
        tensors: `n` tensors of one shape (one parameter of each model).
        weights: `n` weights.
        base: Unused.
    """
    total = float(sum(weights))
    if total == 0:
        raise LmfuseError("linear merge weights sum to 0", fix="give weights with a non-zero sum")
    out = tensors[0].float() * (weights[0] / total)
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out += t.float() * (w / total)
    return out


@MERGE_METHODS.register("task_arithmetic")
def merge_task_arithmetic(tensors: Sequence[Any], weights: Sequence[float], base: Any = None):
    """Task arithmetic (Ilharco et al. 2023): `base + Σ w_i (θ_i − base)`; weights are not normalized.

    Args:
        tensors: `n` tensors of one shape.
        weights: `n` weights.
        base: The base model's tensor of the same shape.
    """
    if base is None:
        raise LmfuseError("task_arithmetic needs a base model", fix="set `base: MODEL_NAME` in the merge entry")
    b = base.float()
    out = b.clone()
    for t, w in zip(tensors, weights, strict=True):
        out += (t.float() - b) * w
    return out


def _merge_tensor(fn, ts, weights, base):
    if not ts[0].is_floating_point():
        # Integer buffers (position ids, masks) cannot be averaged; they must agree.
        ref = base if base is not None else ts[0]
        if any(not t.equal(ref) for t in ts):
            raise LmfuseError("models differ in a non-float buffer", fix="merge copies of one architecture")
        return ref.clone()
    return fn(ts, weights, base).to(ts[0].dtype)


def check_same_shapes(shapes: Sequence[dict[str, tuple]], names: Sequence[str]) -> None:
    """Refuse models whose parameter names or shapes differ, naming the first differences."""
    ref = shapes[0]
    for name, s in zip(names[1:], shapes[1:], strict=True):
        missing, extra = sorted(set(ref) - set(s)), sorted(set(s) - set(ref))
        bad = [f"{k}: {ref[k]} vs {s[k]}" for k in ref if k in s and tuple(ref[k]) != tuple(s[k])]
        if missing or extra or bad:
            detail = "; ".join(filter(None, [
                f"missing in {name}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
                f"only in {name}: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "",
                f"shapes differ: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else "",
            ]))
            raise LmfuseError(f"cannot merge {names[0]} and {name}: different architectures ({detail})",
                              where="baselines.merge",
                              fix="merge only models of one architecture and size (fine-tunes of one base); "
                                  "for different architectures use fusion or an ensemble")


# -- merge: model directories ------------------------------------------------------------------
def _weight_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name → safetensors file of a HF model directory."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LmfuseError("no .safetensors weights in the model directory", where=str(model_dir),
                          fix="merge needs safetensors weights (lmfuse converts GGUF and pulled models)")
    from safetensors import safe_open

    index = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                index[k] = f
    return index


def _shapes(index: dict[str, Path]) -> dict[str, tuple]:
    from safetensors import safe_open

    out = {}
    for f in sorted(set(index.values())):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                out[k] = tuple(sf.get_slice(k).get_shape())
    return out


def merge_models(model_dirs: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
                 method: str = "linear", base: str | Path | None = None,
                 names: Sequence[str] | None = None) -> Path:
    """Merge HF model directories of one architecture into a new HF directory.

    Tensors are streamed one name at a time, so memory holds the merged model plus one tensor per
    input. Config, generation config and tokenizer are copied from `base` (task arithmetic) or the
    first model.

    Args:
        model_dirs: `n` HF directories with safetensors weights.
        out: Output directory (written atomically).
        weights: `n` weights (default equal).
        method: `linear` or `task_arithmetic`.
        base: Base model directory for `task_arithmetic`.
        names: Model names for error messages.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dirs = [Path(d) for d in model_dirs]
    names = list(names or [d.name for d in dirs])
    fn = MERGE_METHODS.get(method)
    if method == "task_arithmetic" and base is None:
        raise LmfuseError("task_arithmetic needs a base model", fix="set `base: MODEL_NAME` in the merge entry")
    all_dirs = dirs + ([Path(base)] if base is not None else [])
    all_names = names + (["base"] if base is not None else [])
    configs = [json.loads((d / "config.json").read_text()) for d in all_dirs]
    archs = [(c.get("model_type"), tuple(c.get("architectures") or [])) for c in configs]
    if len(set(archs)) > 1:
        raise LmfuseError(f"cannot merge models of different architectures: "
                          f"{', '.join(f'{n}={a[0]}' for n, a in zip(all_names, archs, strict=True))}",
                          where="baselines.merge", fix="merge only models of one architecture and size")
    indexes = [_weight_index(d) for d in all_dirs]
    check_same_shapes([_shapes(ix) for ix in indexes], all_names)
    weights = list(weights) if weights is not None else [1.0] * len(dirs)
    if len(weights) != len(dirs):
        raise LmfuseError(f"{len(weights)} weights for {len(dirs)} models", fix="give one weight per model")

    handles: dict[Path, Any] = {}
    try:
        def get(ix, k):
            f = ix[k]
            if f not in handles:
                handles[f] = safe_open(str(f), "pt")
            return handles[f].get_tensor(k)

        merged = {}
        for k in indexes[0]:
            ts = [get(ix, k) for ix in indexes[:len(dirs)]]
            b = get(indexes[-1], k) if base is not None else None
            merged[k] = _merge_tensor(fn, ts, weights, b).contiguous()
            del ts, b
    finally:
        handles.clear()

    out = Path(out).resolve()  # a sweep's run links it into the store: replace the directory, not the link
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        src = Path(base) if base is not None else dirs[0]
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "merge.json").write_text(json.dumps({
            "method": method, "models": [str(d) for d in dirs], "names": names, "weights": weights,
            "base": None if base is None else str(base), "torch": torch.__version__}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- config glue -------------------------------------------------------------------------------
MERGE_DIR = "merge"  # RUN/merge/<label>/: one artifact per configured merge
TRAINED = ("fused", "clm")  # names a baseline may give the run's trained models


def resolve_name(cfg: FuseConfig, name: str, where: str) -> ModelSpec:
    """A config model name, or `fused`/`clm` (the trained models), as a ModelSpec."""
    if name in TRAINED:
        d = hf_model_dir(cfg.run_dir / "train" / name)
        if d is None:
            raise LmfuseError(f"{where} names {name!r}, but {cfg.run_dir / 'train' / name} holds no model yet",
                              where=where, fix=f"run `lmfuse train` first, or drop {name!r} from the entry")
        return dir_spec(name, d)
    try:
        return cfg.model(name)
    except LmfuseError as e:
        raise LmfuseError(e.what, where=where, fix=e.fix) from None


def merge_label(entry: dict) -> str:
    if entry.get("name"):
        return str(entry["name"])
    method = entry.get("method", "linear")
    prefix = "merge" if method == "linear" else f"ta-{entry['base']}"
    return f"{prefix}-{'-'.join(entry['models'])}"


def merge_dir(cfg: FuseConfig, entry: dict) -> Path:
    """Where a configured merge lives: `RUN/merge/<label>/`."""
    return cfg.run_dir / MERGE_DIR / safe_name(merge_label(entry))


@EVAL_ENTRIES.register("ensemble")
def ensemble_entries(cfg: FuseConfig) -> list[EvalModel]:
    out = []
    for i, group in enumerate(cfg.baselines.ensemble):
        specs = [resolve_name(cfg, n, f"baselines.ensemble[{i}]") for n in group]
        out.append(EvalModel(f"ensemble-{'-'.join(group)}", "ensemble", None, specs))
    return out


@EVAL_ENTRIES.register("merge")
def merge_entries(cfg: FuseConfig) -> list[EvalModel]:
    out = []
    for entry in cfg.baselines.merge:
        label = merge_label(entry)
        out.append(EvalModel(label, "merge", dir_spec(safe_name(label), merge_dir(cfg, entry))))
    return out


def eval_models(cfg: FuseConfig) -> list[EvalModel]:
    """The configured baselines as `EvalModel`s (merges must be built: `build_merges`)."""
    return [m for name in EVAL_ENTRIES.names() for m in EVAL_ENTRIES.get(name)(cfg)]


class MergeStage(Stage):
    """`merge/<label>`: one configured merge baseline, an HF model directory.

    Keyed by its method and weights (config hash), by the content fingerprints of the config's
    models it merges and of its base, so new weights at the same path make it stale, and by the
    keys of the run's trained models it merges (`train/fused`, `train/clm`: inputs of the graph),
    so its key, and its place in a sweep's store, is known before anything is trained. Eval reads
    it as an input, so a complete merge is checked by content before reuse and rebuilt if damaged.
    The merged directory is written whole (temp dir + rename) and the manifest, with every
    file's checksum, last.
    """

    kind = "merge"
    verify_on_reuse = True

    def __init__(self, cfg: FuseConfig, index: int):
        self.cfg, self.index = cfg, index
        self.entry = cfg.baselines.merge[index]
        self.where = f"baselines.merge[{index}]"
        super().__init__(f"{MERGE_DIR}/{safe_name(merge_label(self.entry))}")

    def _specs(self) -> tuple[list[ModelSpec], ModelSpec | None]:
        specs = [resolve_name(self.cfg, n, self.where) for n in self.entry["models"]]
        base = resolve_name(self.cfg, self.entry["base"], self.where) if self.entry.get("base") else None
        return specs, base

    def config_hash(self) -> str:
        e = self.entry
        method = e.get("method", "linear")
        return hash_obj({"method": method, "weights": e.get("weights"), "models": e["models"],
                         "base": e.get("base") if method == "task_arithmetic" else None})

    def _names(self) -> list[tuple[str, str]]:
        """(role, model name) of what it merges: `model` for each model, `base` for task arithmetic's base."""
        e = self.entry
        out = [("model", n) for n in e["models"]]
        if e.get("base") and e.get("method", "linear") == "task_arithmetic":
            out.append(("base", e["base"]))
        return out

    def inputs(self) -> dict[str, str]:
        # The trained models are the run's artifacts: their keys are known before they are trained.
        return {f"train/{n}": f"train/{n}" for _, n in self._names() if n in TRAINED}

    def input_values(self) -> dict[str, str]:
        return {f"{role}/{n}": model_fingerprint(resolve_name(self.cfg, n, self.where))
                for role, n in self._names() if n not in TRAINED}

    def shard_done(self, b: Build, i: int) -> bool:
        return bool(b.state.get("written"))  # damaged files are not patched: the merge is made whole again

    def write(self, b: Build, todo: list[int]):
        from lmfuse.models import resolve_model

        specs, base = self._specs()
        e = self.entry
        method = e.get("method", "linear")
        if method == "task_arithmetic" and base is None:
            raise LmfuseError("task_arithmetic needs a base", where=self.where, fix="set `base: MODEL_NAME`")
        check_same_tokenizer(specs + ([base] if base else []), "merge")
        b.log(f"merge: building {b.art.path.name} ({method} of {', '.join(e['models'])}) -> {b.art.path}")
        merge_models([Path(resolve_model(s)) for s in specs], b.art.path, e.get("weights"), method,
                     None if method == "linear" or base is None else Path(resolve_model(base)),
                     names=[s.name for s in specs])
        b.state["written"] = True
        return iter(())

    def summary(self, b: Build, stats: list[dict]) -> dict:
        e = self.entry
        return dict(method=e.get("method", "linear"), models=list(e["models"]), weights=e.get("weights"),
                    base=e.get("base"))


def preflight(cfg: FuseConfig) -> None:
    """Check every configured baseline before any stage runs (not hours later, at eval).

    `fused` and `clm` do not exist yet; they share the target's tokenizer and architecture, so
    the target stands in for them here.
    """
    from lmfuse.models import resolve_model

    trained = {"fused": cfg.fuses, "clm": cfg.train.control or not cfg.fuses}

    def spec(name: str, where: str) -> ModelSpec:
        if name in TRAINED and not trained[name]:
            raise LmfuseError(f"{where} names {name!r}, but this run trains no such model",
                              where=where, fix="drop it from the entry" + (
                                  "" if name == "fused" else ", or set `train.control: true`"))
        return cfg.target if name in TRAINED else resolve_name(cfg, name, where)

    for i, group in enumerate(cfg.baselines.ensemble):
        check_same_tokenizer([spec(n, f"baselines.ensemble[{i}]") for n in group], "ensemble")
    for i, entry in enumerate(cfg.baselines.merge):
        where = f"baselines.merge[{i}]"
        names = list(entry["models"]) + ([entry["base"]] if entry.get("base") else [])
        specs = [spec(n, where) for n in names]
        check_same_tokenizer(specs, "merge")
        check_same_shapes([_shapes(_weight_index(Path(resolve_model(s)))) for s in specs], names)
