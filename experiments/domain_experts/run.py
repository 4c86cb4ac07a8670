"""Domain experts: the paper's Table 7 (FuseLLM, Wan et al. 2024) at small scale, with lmfuse.

Base = SmolLM2-135M-Instruct. Each expert is the base continually trained by lmfuse on one
domain (λ = 1). The fusion sweep then trains the base on a small mixed corpus with the four
experts as sources (MinCE, AvgCE) next to the λ = 1 control, over three seeds, and scores every
model on identical held-out blocks: base, each expert, the ensemble of the experts, their linear
merge and their task-arithmetic merge, the control and the fused models. The table gives held-out
bits per byte per domain in the paper's layout, and fused − control with 95% paired bootstrap
intervals, at the end of the budget and at each run's best validation checkpoint.

    python experiments/domain_experts/run.py --out runs/domain_experts          # the real run
    python experiments/domain_experts/run.py --out /tmp/de --tiny               # minutes: tests the chain
    python experiments/domain_experts/run.py --out runs/domain_experts --steps-only table

Steps (each skips what is complete; rerun the same command to resume):
  data     OUT/data/: per-domain expert corpora, the mixed fusion corpus with its held-out documents
           (`"split": "validation"`), stats.json (token counts). Written once.
  experts  OUT/experts/<domain>/: an lmfuse run per domain (prepare, extract of the base, train
           with control=True); the expert is OUT/experts/<domain>/train/clm/.
  sweep    OUT/fusion.yaml (the base config) and OUT/sweep.yaml, run by lmfuse.sweep -> OUT/sweep/.
  table    OUT/table7.md (and table7.json).

Progress goes to the terminal and to OUT/run.log. Settings: real.yaml (default) or tiny.yaml
next to this file, or --settings FILE (which may `extends: OTHER.yaml`, relative to it: mappings
merge key by key, anything else replaces). This script reads ../shared/corpora; lmfuse does not.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lmfuse.compare import BOOT_SEED, N_BOOT, cell, mean_std

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/common.py

from common import (  # noqa: E402
    Log,
    Picker,
    Problem,
    block_stats,
    diff_ci,
    domain_bpb,
    driver_parser,
    existing_data,
    jsonable,
    log_line,
    read_domain,
    read_settings,
    run_steps,
    same_blocks,
    score_best,
    train_steps,
    write_if_changed,
    write_jsonl,
)

DEFAULT_CORPORA = HERE.parents[1].parent / "shared" / "corpora"
STEPS = ("data", "experts", "sweep", "table")


# -- settings ----------------------------------------------------------------------------------
class Settings(BaseModel):
    """The experiment's knobs (real.yaml / tiny.yaml)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="the base model: an lmfuse model path (pull:NAME, HF dir) or `tiny`")
    base_name: str = "smollm2"
    domains: list[str] = Field(min_length=2)
    seed: int = Field(0, description="seed of the data split (documents and pieces)")
    max_docs_per_domain: int | None = Field(None, ge=3, description="read only the first N documents")
    block_size: int = Field(256, ge=16)
    heldout_blocks: int = Field(32, ge=1, description="held-out blocks per domain")
    heldout_piece_tokens: int = Field(128, ge=8, description="held-out blocks are at most this long")
    heldout_pieces_per_doc: int = Field(2, ge=1)
    expert_tokens: int = Field(60_000, ge=1, description="tokens of each expert corpus, at least")
    expert_pieces_per_doc: int = Field(4, ge=1)
    expert_validation_blocks: int = Field(4, ge=1, description="a few blocks of each expert's own documents held "
                                                               "out for its final validation loss")
    fusion_tokens: int = Field(22_000, ge=1, description="training tokens of the fusion corpus, at most")
    fusion_tokens_max: int = Field(30_000, ge=1, description="hard cap, checked on the prepared blocks")
    fusion_pieces_per_doc: int = Field(2, ge=1)
    expert_train: dict[str, Any] = Field(default_factory=dict, description="lmfuse train keys for the experts")
    fusion_train: dict[str, Any] = Field(default_factory=dict, description="lmfuse train keys for the sweep")
    evaluations: int = Field(4, ge=1, description="validation passes per fusion training run")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    variants: list[dict[str, Any]] = Field(min_length=1, description="lmfuse sweep variants: {name, set}")
    extract_top_k: int = Field(10, ge=1)
    task_arithmetic_weight: float = 1.0
    eval: dict[str, Any] = Field(default_factory=lambda: {"batch_size": 8, "dtype": "float32"})
    estimate: dict[str, float] = Field(default_factory=lambda: {
        "forward_tokens_per_s": 1000.0, "train_seconds_per_step": 2.0, "overhead_s": 180.0})

    def data_key(self) -> dict:
        """The settings the data step depends on (a change means other data)."""
        keys = ("base", "domains", "seed", "max_docs_per_domain", "block_size", "heldout_blocks",
                "heldout_piece_tokens", "heldout_pieces_per_doc", "expert_tokens", "expert_pieces_per_doc",
                "expert_validation_blocks",
                "fusion_tokens", "fusion_tokens_max", "fusion_pieces_per_doc")
        return {k: getattr(self, k) for k in keys}

    def expert_name(self, domain: str) -> str:
        return f"expert-{domain}"


def load_settings(path: Path) -> Settings:
    return Settings.model_validate(read_settings(path))


# -- logging -----------------------------------------------------------------------------------
# -- the base model ----------------------------------------------------------------------------
def base_path(settings: Settings, out: Path) -> str:
    """The base model's lmfuse path; `tiny` builds lmfuse's tiny Llama-style model under OUT."""
    if settings.base != "tiny":
        return settings.base
    from lmfuse.testing import make_tiny_model

    return str(make_tiny_model(out / "tiny-base", "spm"))


def base_tokenizer(settings: Settings, out: Path):
    from lmfuse.config import ModelSpec
    from lmfuse.models import load_tokenizer

    return load_tokenizer(ModelSpec(name=settings.base_name, path=base_path(settings, out)))


# -- step 1: data ------------------------------------------------------------------------------
def step_data(settings: Settings, out: Path, corpora: Path, log: Log) -> dict:
    """Write OUT/data/ once: experts/<domain>.jsonl, fusion.jsonl, stats.json."""
    final = out / "data"
    stats = existing_data(final, settings.data_key(), "experts and sweep", log)
    if stats is not None:
        return stats
    t0 = time.time()
    s = settings
    tok = base_tokenizer(s, out)
    tmp = out / ".data-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "experts").mkdir(parents=True)
    margin = max(1, s.block_size // 32)  # prepare may re-cut a piece that needs every last token
    min_tokens = max(2, min(s.block_size, s.heldout_piece_tokens) // 4)
    fusion_rows: list[dict] = []
    chosen: dict[str, dict[str, list[dict]]] = {}
    for domain in s.domains:
        docs = read_domain(corpora, domain, s.max_docs_per_domain)
        for d in docs:
            d["domain"] = domain
        pick = Picker(docs, tok, random.Random(f"{s.seed}/{domain}"), min_tokens)
        heldout = pick.take(min(s.heldout_piece_tokens, s.block_size), s.heldout_pieces_per_doc,
                            blocks=s.heldout_blocks)
        fusion = pick.take(s.block_size - margin, s.fusion_pieces_per_doc, at_most=s.fusion_tokens // len(s.domains))
        expert = pick.take(s.block_size - margin, s.expert_pieces_per_doc, at_least=s.expert_tokens)
        # lmfuse's train needs validation blocks (it reports a validation loss at the end)
        expert_val = pick.take(s.block_size - margin, s.expert_pieces_per_doc, blocks=s.expert_validation_blocks)
        chosen[domain] = {"heldout": heldout, "fusion": fusion, "expert": expert, "expert_val": expert_val,
                          "docs_read": len(docs),
                          "docs_used": pick.pos}
        fusion_rows += [{**r, "split": "validation"} for r in heldout] + [{**r, "split": "train"} for r in fusion]
        write_jsonl(tmp / "experts" / f"{domain}.jsonl",
                     [{**r, "split": "train"} for r in expert] + [{**r, "split": "validation"} for r in expert_val])
        log(f"data: {domain}: {len(heldout)} held-out pieces ({sum(r['tokens'] for r in heldout)} tokens), fusion "
            f"{sum(r['tokens'] for r in fusion)} tokens, expert {sum(r['tokens'] for r in expert)} tokens from "
            f"{pick.pos} of {len(docs)} documents")
    write_jsonl(tmp / "fusion.jsonl", [{k: r[k] for k in ("domain", "source", "split", "text")} for r in fusion_rows])

    fusion_blocks = block_stats(fusion_rows, tok, s.block_size)
    stats: dict[str, Any] = {"settings": settings.data_key(), "tokenizer": base_path(s, out), "domains": {}}
    problems = []
    for domain in s.domains:
        c = chosen[domain]
        eb = block_stats([{**r, "split": "train"} for r in c["expert"]]
                         + [{**r, "split": "validation"} for r in c["expert_val"]], tok, s.block_size)[domain]
        expert_blocks = eb["train"]
        fb = fusion_blocks[domain]
        stats["domains"][domain] = {
            "documents_read": c["docs_read"], "documents_used": c["docs_used"],
            "heldout": {"pieces": len(c["heldout"]), "documents": len({r["source"].split("#")[0] for r in c["heldout"]}),
                        **fb.get("validation", {})},
            "fusion_train": {"pieces": len(c["fusion"]), **fb.get("train", {})},
            "expert": {"pieces": len(c["expert"]), **expert_blocks},
            "expert_validation": {"pieces": len(c["expert_val"]), **eb.get("validation", {})},
        }
        if fb.get("validation", {}).get("blocks", 0) < s.heldout_blocks:
            problems.append(f"{domain}: {fb.get('validation', {}).get('blocks', 0)} held-out blocks < {s.heldout_blocks}")
        if expert_blocks["tokens"] < s.expert_tokens:
            problems.append(f"{domain}: expert corpus {expert_blocks['tokens']} tokens < {s.expert_tokens}")
    fusion_train = sum(d["fusion_train"].get("tokens", 0) for d in stats["domains"].values())
    stats["totals"] = {
        "fusion_train_tokens": fusion_train,
        "fusion_train_blocks": sum(d["fusion_train"].get("blocks", 0) for d in stats["domains"].values()),
        "heldout_tokens": sum(d["heldout"].get("tokens", 0) for d in stats["domains"].values()),
        "heldout_blocks": sum(d["heldout"].get("blocks", 0) for d in stats["domains"].values()),
        "expert_tokens": {d: v["expert"]["tokens"] for d, v in stats["domains"].items()},
        "expert_blocks": {d: v["expert"]["blocks"] for d, v in stats["domains"].items()},
        "expert_validation_tokens": sum(v["expert_validation"].get("tokens", 0) for v in stats["domains"].values()),
    }
    if fusion_train > s.fusion_tokens_max:
        problems.append(f"fusion corpus {fusion_train} training tokens > fusion_tokens_max {s.fusion_tokens_max}")
    if problems:
        raise Problem("the data does not meet its budgets: " + "; ".join(problems))
    stats["seconds"] = round(time.time() - t0, 1)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the data appears whole or not at all
    log(f"data: written to {final} in {stats['seconds']} s: fusion {fusion_train} training tokens "
        f"({stats['totals']['fusion_train_blocks']} blocks), {stats['totals']['heldout_blocks']} held-out blocks "
        f"({stats['totals']['heldout_tokens']} tokens), experts {stats['totals']['expert_tokens']} tokens")
    if settings.base != "tiny":  # the estimate's figures are the real models'
        log(estimate_text(settings, stats))
    return stats


# -- wall-time estimate ------------------------------------------------------------------------
def estimate(settings: Settings, stats: dict) -> dict[str, float]:
    """Seconds per part of the real run on 2 CPU cores, from the settings' figures.

    Forward passes (extract, evaluations) cost tokens / forward_tokens_per_s. Training costs
    train_seconds_per_step per full block of block_size tokens, in proportion to the tokens a step
    holds (blocks cut at paragraph boundaries are shorter; the demo measured 1.6 s per 256 tokens,
    so 2 s is on the safe side).
    """
    s, t = settings, stats["totals"]
    fwd = s.estimate["forward_tokens_per_s"]
    per_token = s.estimate["train_seconds_per_step"] / s.block_size
    n_exp = len(s.domains)
    v = t["heldout_tokens"]

    def trained(train: dict, blocks: int, tokens: int) -> float:
        """Tokens one training run processes: its steps × the mean tokens of a step's blocks."""
        g = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1))
        return train_steps(train, blocks) * g * tokens / max(blocks, 1)

    fusion_steps = train_steps(s.fusion_train, t["fusion_train_blocks"])
    fusion_tokens = trained(s.fusion_train, t["fusion_train_blocks"], t["fusion_train_tokens"])
    runs = len(s.seeds) * (len(s.variants) + 1)  # fused per variant and seed, one control per seed
    evals_in_training = min(s.evaluations, fusion_steps)
    # scored once each: base, experts, ensemble (one forward per expert), 2 merges, controls, fused
    scored = 1 + n_exp + n_exp + 2 + len(s.seeds) * (1 + len(s.variants))
    return {
        "experts: extract the base on the expert corpora": (sum(t["expert_tokens"].values())
                                                            + t["expert_validation_tokens"]) / fwd,
        "experts: training": sum(trained(s.expert_train, t["expert_blocks"][d], t["expert_tokens"][d])
                                 for d in t["expert_blocks"]) * per_token,
        "fusion: extract base + experts": (1 + n_exp) * (t["fusion_train_tokens"] + v) / fwd,
        "fusion: training (controls + fused)": runs * fusion_tokens * per_token,
        "fusion: validation passes during training": runs * evals_in_training * v / fwd,
        "eval: held-out scoring (end of budget)": scored * v / fwd,
        "eval: best checkpoints": runs * v / fwd,
        "model loading, vocab maps, alignment, merges, reports": s.estimate.get("overhead_s", 180.0),
    }


def estimate_text(settings: Settings, stats: dict) -> str:
    parts = estimate(settings, stats)
    total = sum(parts.values())
    lines = [f"estimated wall time on 2 CPU cores ({settings.estimate['forward_tokens_per_s']:.0f} tok/s forward, "
             f"{settings.estimate['train_seconds_per_step']:.1f} s per training step of {settings.block_size} tokens): "
             f"{total / 60:.0f} min"]
    lines += [f"  {k}: {v / 60:.1f} min" for k, v in parts.items()]
    return "\n".join(lines)


# -- step 2: experts ---------------------------------------------------------------------------
def expert_config(settings: Settings, out: Path, domain: str) -> dict:
    base = base_path(settings, out)
    train = {"seed": 0, "eval_every": 0, "save_every": 0, **settings.expert_train, "control": True}
    return {
        "output_dir": ".",
        "target": {"name": settings.base_name, "path": base, "dtype": "bfloat16"},
        # the schema asks for a source; only prepare, extract (of the target) and train(control) run
        "sources": [{"name": f"{settings.base_name}-as-source", "path": base, "dtype": "bfloat16"}],
        "corpus": {"path": f"../../data/experts/{domain}.jsonl", "split_field": "split"},
        "prepare": {"block_size": settings.block_size, "min_validation_blocks": 1},
        "extract": {"top_k": 1, "batch_size": 4},
        "train": train,
    }


def step_experts(settings: Settings, out: Path, log: Log) -> dict[str, Path]:
    """Train one expert per domain: lmfuse prepare, extract (base), train(control=True)."""
    from lmfuse.config import load_config
    from lmfuse.pipeline import run_extract, run_prepare, run_train

    if not (out / "data" / "stats.json").exists():
        raise Problem(f"no data in {out / 'data'}: run the data step first (--steps-only data, or all steps)")
    experts = {}
    for domain in settings.domains:
        run_dir = out / "experts" / domain
        path = run_dir / "config.yaml"
        write_if_changed(path, yaml.safe_dump(expert_config(settings, out, domain), sort_keys=False))
        cfg = load_config(path)
        model = run_dir / "train" / "clm"
        if (model / "manifest.json").exists():
            log(f"experts: {domain}: complete ({model})")
            experts[domain] = model
            continue
        t0 = time.time()
        log(f"experts: {domain}: prepare")
        run_prepare(cfg, log=log)
        log(f"experts: {domain}: extract {settings.base_name}")
        run_extract(cfg, settings.base_name, log=log, progress=False)
        log(f"experts: {domain}: train (λ = 1)")
        m = run_train(cfg, control=True)
        log(f"experts: {domain}: done in {time.time() - t0:.1f} s: {m['metrics']['steps']} steps on "
            f"{m['metrics']['train_blocks']} blocks -> {model}")
        experts[domain] = model
    return experts


# -- step 3: the fusion sweep ------------------------------------------------------------------
def labels(settings: Settings) -> dict[str, Any]:
    """How the sweep's eval names each model (lmfuse.baselines: ensemble-<names>, merges by name)."""
    names = [settings.expert_name(d) for d in settings.domains]
    return {"base": settings.base_name, "experts": names, "ensemble": "ensemble-" + "-".join(names),
            "merge_linear": "merge-linear", "merge_ta": "merge-task-arithmetic"}


def fusion_config(settings: Settings, out: Path, stats: dict) -> dict:
    lab = labels(settings)
    steps = train_steps(settings.fusion_train, stats["totals"]["fusion_train_blocks"])
    eval_every = max(1, math.ceil(steps / settings.evaluations))  # evaluations at k·eval_every and at the end
    train = {"seed": 0, "save_every": 0, **settings.fusion_train, "keep_best": True, "eval_every": eval_every,
             "control": True}
    return {
        "output_dir": "sweep/runs/base",  # not used by the sweep
        "target": {"name": settings.base_name, "path": base_path(settings, out), "dtype": "bfloat16"},
        "sources": [{"name": n, "path": f"experts/{d}/train/clm", "dtype": "bfloat16"}
                    for n, d in zip(lab["experts"], settings.domains)],
        "corpus": {"path": "data/fusion.jsonl", "split_field": "split"},
        "prepare": {"block_size": settings.block_size, "min_validation_blocks": settings.heldout_blocks},
        "extract": {"top_k": settings.extract_top_k, "batch_size": 4},
        "vocab_map": {"method": "retokenize"},
        "align": {"method": "offsets"},
        "train": train,
        "eval": settings.eval,
        "baselines": {
            "ensemble": [list(lab["experts"])],  # copies: no YAML anchors in the written config
            "merge": [{"models": list(lab["experts"]), "method": "linear", "name": lab["merge_linear"]},
                      {"models": list(lab["experts"]), "method": "task_arithmetic", "base": settings.base_name,
                       "weights": [settings.task_arithmetic_weight] * len(lab["experts"]), "name": lab["merge_ta"]}],
        },
    }


def run_names(settings: Settings) -> list[tuple[str, int, str]]:
    """(variant, seed, run directory name) in the sweep's naming (`<variant>-s<seed>`)."""
    return [(v["name"], seed, f"{v['name']}-s{seed}") for v in settings.variants for seed in settings.seeds]


def share_merges(settings: Settings, sweep_dir: Path) -> None:
    """Point every run's `merge/` at one folder, so each merge is built and scored once.

    lmfuse builds a merge as an artifact under `RUN/merge/<label>/` and keys its eval cache by the
    merge's resolved path: in a sweep every run would build its own copy (two fp32 copies of the
    model per run) and score it again. Through one shared folder the merge artifact is current
    after the first run and the cache key is the same.
    """
    shared = sweep_dir / "merge"
    shared.mkdir(parents=True, exist_ok=True)
    for _, _, name in run_names(settings):
        link = sweep_dir / "runs" / name / "merge"
        link.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(shared, link.parent)
        if link.is_symlink() and os.readlink(link) == rel:
            continue
        if link.exists() and not link.is_symlink():
            shutil.rmtree(link)  # a run's own copy from before: the shared one replaces it
        elif link.is_symlink():
            link.unlink()
        os.symlink(rel, link)


def step_sweep(settings: Settings, out: Path, log: Log) -> dict:
    from lmfuse.sweep import run_sweep_file

    stats_path = out / "data" / "stats.json"
    missing = [d for d in settings.domains if not (out / "experts" / d / "train" / "clm" / "manifest.json").exists()]
    if not stats_path.exists() or missing:
        raise Problem(f"the sweep needs the data and every expert (missing: {missing or 'data'}): run those steps")
    stats = json.loads(stats_path.read_text())
    write_if_changed(out / "fusion.yaml", yaml.safe_dump(fusion_config(settings, out, stats), sort_keys=False))
    sweep = {"base": "fusion.yaml", "output_dir": "sweep", "seeds": settings.seeds, "variants": settings.variants}
    write_if_changed(out / "sweep.yaml", yaml.safe_dump(sweep, sort_keys=False))
    share_merges(settings, out / "sweep")
    return run_sweep_file(out / "sweep.yaml", log=log)


# -- step 4: the table -------------------------------------------------------------------------
def best_record(run: dict, kind: str, cache: Path, log: Log) -> dict | None:
    """The held-out record of a run's `best/` checkpoint: `lmfuse eval` scores it as `<kind>@best`
    (`train.keep_best`); runs evaluated before eval did so are scored here (`common.score_best`)."""
    rec = run["models"].get(f"{kind}@best")
    if rec is None:
        return score_best(run["dir"], kind, cache, log)
    state = run["dir"] / "train" / kind / "best" / "best_state.json"
    return {**rec, "step": json.loads(state.read_text()).get("step") if state.exists() else None}


def collect(settings: Settings, out: Path, log: Log) -> dict:
    """Every figure of the table from the sweep's runs (and the best checkpoints, scored here)."""
    from lmfuse.evaluate import load_results

    lab = labels(settings)
    sweep_dir = out / "sweep"
    doms = list(settings.domains)
    runs: dict[str, dict[int, dict]] = {}
    first = None
    for variant, seed, name in run_names(settings):
        res = load_results(sweep_dir / "runs" / name)
        if res is None or "fused" not in res["models"] or "clm" not in res["models"]:
            raise Problem(f"the sweep run {name} has no eval results yet: run the sweep step")
        first = first or res
        runs.setdefault(variant, {})[seed] = {"dir": sweep_dir / "runs" / name, "models": res["models"]}
    assert first is not None
    models = first["models"]
    fixed = {"base": lab["base"], **{f"expert {d}": n for d, n in zip(doms, lab["experts"])},
             "ensemble": lab["ensemble"], "merge (linear)": lab["merge_linear"],
             "merge (task arithmetic)": lab["merge_ta"]}
    absent = [label for label in fixed.values() if label not in models]
    if absent:
        raise Problem(f"the sweep's eval has no results for {absent} (models evaluated: {sorted(models)})")
    cache = out / "best_eval"
    doc: dict[str, Any] = {"domains": doms, "seeds": settings.seeds, "fixed": {}, "control": {}, "fused": {},
                           "control_best": {}, "fused_best": {}, "vs_control": {}, "vs_control_best": {},
                           "best_steps": {}}
    # fused − each of the rows the goal names as the ones to beat, besides the control
    refs = {"ensemble": models[lab["ensemble"]], "merge (linear)": models[lab["merge_linear"]]}
    for key in ("vs_fixed", "vs_fixed_best"):
        doc[key] = {ref: {v["name"]: {} for v in settings.variants} for ref in refs}
    for col, label in fixed.items():
        doc["fixed"][col] = {"label": label, "bpb": domain_bpb(models[label], doms)}
    first_variant = settings.variants[0]["name"]
    for seed in settings.seeds:  # the control is shared by the variants (fusion options do not enter it)
        r = runs[first_variant][seed]
        doc["control"][seed] = domain_bpb(r["models"]["clm"], doms)
        best = best_record(r, "clm", cache, log)
        if best:
            doc["control_best"][seed] = domain_bpb(best, doms)
            doc["best_steps"][f"control-s{seed}"] = best["step"]
    for v in settings.variants:
        name = v["name"]
        doc["fused"][name], doc["fused_best"][name] = {}, {}
        doc["vs_control"][name], doc["vs_control_best"][name] = {}, {}
        fused_recs, clm_recs, fused_best, clm_best = [], [], [], []
        for seed in settings.seeds:
            r = runs[name][seed]
            fused, clm = r["models"]["fused"], r["models"]["clm"]
            same_blocks(fused, models[lab["base"]])
            doc["fused"][name][seed] = domain_bpb(fused, doms)
            doc["vs_control"][name][seed] = diff_ci([fused], [clm], doms)
            for ref, rec in refs.items():
                doc["vs_fixed"][ref][name][seed] = diff_ci([fused], [rec], doms)
            fused_recs.append(fused)
            clm_recs.append(clm)
            fb, cb = best_record(r, "fused", cache, log), best_record(r, "clm", cache, log)
            if fb and cb:
                doc["fused_best"][name][seed] = domain_bpb(fb, doms)
                doc["vs_control_best"][name][seed] = diff_ci([fb], [cb], doms)
                for ref, rec in refs.items():
                    doc["vs_fixed_best"][ref][name][seed] = diff_ci([fb], [rec], doms)
                doc["best_steps"][f"{name}-s{seed}"] = fb["step"]
                fused_best.append(fb)
                clm_best.append(cb)
        if len(settings.seeds) > 1:  # the interval of the seed-averaged difference
            doc["vs_control"][name]["pooled"] = diff_ci(fused_recs, clm_recs, doms)
            for ref, rec in refs.items():
                doc["vs_fixed"][ref][name]["pooled"] = diff_ci(fused_recs, [rec], doms)
            if len(fused_best) == len(settings.seeds):
                doc["vs_control_best"][name]["pooled"] = diff_ci(fused_best, clm_best, doms)
                for ref, rec in refs.items():
                    doc["vs_fixed_best"][ref][name]["pooled"] = diff_ci(fused_best, [rec], doms)
    return doc


def render(doc: dict, settings: Settings, stats: dict | None) -> str:
    doms = doc["domains"]
    rows = [*doms, "average"]
    variants = [v["name"] for v in settings.variants]
    seeds = doc["seeds"]
    seeds_txt = ", ".join(map(str, seeds))

    def cell_stats(per_seed: dict, row: str) -> tuple[float, float]:
        spread = mean_std([per_seed[s][row] for s in seeds if s in per_seed])
        return spread.mean, spread.std

    def main_table(control: dict, fused: dict, suffix: str) -> list[str]:
        head = ["domain", *doc["fixed"], f"control{suffix}", *[f"fused {v}{suffix}" for v in variants]]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for row in rows:
            vals = [(f["bpb"][row], math.nan) for f in doc["fixed"].values()]
            vals.append(cell_stats(control, row))
            vals += [cell_stats(fused.get(v, {}), row) for v in variants]
            best = min((m for m, _ in vals if math.isfinite(m)), default=math.nan)
            cells = []
            for m, sd in vals:
                c = cell(m, std=sd, sign=False)
                cells.append(f"**{c}**" if m == best else c)
            lines.append(f"| {'**average**' if row == 'average' else row} | " + " | ".join(cells) + " |")
        return lines

    def diff_table(diffs: dict) -> list[str]:
        lines = ["| variant | seed | " + " | ".join(rows) + " |", "|---|---|" + "---:|" * len(rows)]
        for v in variants:
            per = diffs.get(v, {})
            for s in seeds:
                if s in per:
                    lines.append(f"| {v} | {s} | " + " | ".join(cell(*per[s][r]) for r in rows) + " |")
            if "pooled" in per:
                cells = []
                for r in rows:
                    spread = mean_std([per[s][r][0] for s in seeds if s in per])
                    cells.append(cell(spread.mean, *per["pooled"][r][1:], spread.std))
                lines.append(f"| {v} | **mean ± std** | " + " | ".join(cells) + " |")
        return lines

    def verdict(fused: dict, control: dict, diffs: dict, fixed_diffs: dict, when: str) -> list[str]:
        out = []
        for v in variants:
            if not fused.get(v):
                continue
            mine = cell_stats(fused[v], "average")[0]
            others = {k: f["bpb"]["average"] for k, f in doc["fixed"].items()}
            others["control"] = cell_stats(control, "average")[0]
            lower = [k for k, x in others.items() if x <= mine]
            per = diffs.get(v, {})
            wins = sum(1 for s in seeds if s in per and per[s]["average"][2] < 0)
            out.append(f"- **fused {v}** ({when}): average {cell(mine, sign=False)}; "
                       + ("lower than base, every expert, the ensemble, both merges and the control" if not lower
                          else f"not the lowest: {', '.join(lower)} as low or lower")
                       + f"; beats the control on average with the 95% CI below zero in {wins} of {len(seeds)} seeds"
                       + "".join(f"; below the {ref} with the CI below zero in "
                                 f"{sum(1 for x in seeds if x in per_ref.get(v, {}) and per_ref[v][x]['average'][2] < 0)}"
                                 f" of {len(seeds)}" for ref, per_ref in fixed_diffs.items()) + ".")
        return out

    s = settings
    lines = ["# Domain experts: the paper's Table 7 at small scale", ""]
    if stats:
        t = stats["totals"]
        lines += [
            f"Held-out bits per byte (lower is better) on identical held-out blocks: {t['heldout_blocks']} blocks "
            f"({t['heldout_tokens']:,} tokens) in all, at least {s.heldout_blocks} per domain, each at most "
            f"{min(s.heldout_piece_tokens, s.block_size)} tokens, from documents used nowhere else. "
            f"Base `{base_label(s)}`; each expert is the base continually trained (λ = 1) on its domain's "
            f"{min(t['expert_tokens'].values()):,}–{max(t['expert_tokens'].values()):,} tokens; the control and the "
            f"fused models are trained on the mixed fusion corpus, {t['fusion_train_tokens']:,} training tokens "
            f"({t['fusion_train_blocks']} blocks), with the same budget. Control and fused: mean ± std over "
            f"seeds {seeds_txt}. **average** = mean of the domain rows (the paper's average). Bold: the lowest "
            "in the row.", ""]
    lines += ["Columns: **base** the untrained target; **expert d** the base trained on domain d; **ensemble** "
              "the experts' next-token probabilities averaged; **merge (linear)** the experts' weights averaged; "
              f"**merge (task arithmetic)** base + Σ {s.task_arithmetic_weight:g} · (expert − base); **control** "
              "λ = 1 training on the fusion corpus; **fused minCE/avgCE** the base trained on the fusion corpus with "
              "the four experts (and itself) as candidates.", ""]
    lines += ["## At the end of the budget", "", *main_table(doc["control"], doc["fused"], ""), ""]
    have_best = bool(doc["control_best"]) and any(doc["fused_best"].values())
    if have_best:
        steps = ", ".join(f"{k} {v}" for k, v in doc["best_steps"].items())
        lines += ["## At the best validation checkpoint", "",
                  "Control and fused models at the step with their lowest validation loss (`train.keep_best`: "
                  "`train/<fused|clm>/best/`), scored by `lmfuse eval` as `fused@best` and `clm@best` on the same "
                  f"held-out blocks and dtype; the other columns do not change. Best steps: {steps}.", "",
                  *main_table(doc["control_best"], doc["fused_best"], " @best"), ""]
    lines += ["## Fused − control (same seed)", "",
              "Bits per byte, below zero = fused is better, with the 95% paired bootstrap interval over held-out "
              f"blocks ({N_BOOT:,} resamples, seed {BOOT_SEED}): per domain `lmfuse.stats.paired_bootstrap` (the same "
              "figures as the sweep's `sweep.json`); average: blocks resampled within each domain, the mean of the "
              "domains' differences. Mean ± std row: the std is over seeds, the interval that of the seed-averaged "
              "difference (per-block NLL averaged over seeds).", "", "### End of the budget", "",
              *diff_table(doc["vs_control"]), ""]
    if have_best:
        lines += ["### Best validation checkpoint (each model at its own best step)", "",
                  *diff_table(doc["vs_control_best"]), ""]
    lines += ["## Fused − ensemble, fused − merge (linear)", "",
              "The two rows below the control that the goal also asks fused to beat, with the same intervals "
              "(the ensemble and the merge are fixed models: the same record in every seed).", ""]
    for ref in doc["vs_fixed"]:
        lines += [f"### Fused − {ref}, end of the budget", "", *diff_table(doc["vs_fixed"][ref]), ""]
        if have_best:
            lines += [f"### Fused @best − {ref}", "", *diff_table(doc["vs_fixed_best"][ref]), ""]
    lines += ["## Goal check", "",
              *verdict(doc["fused"], doc["control"], doc["vs_control"], doc["vs_fixed"], "end of budget")]
    if have_best:
        lines += verdict(doc["fused_best"], doc["control_best"], doc["vs_control_best"], doc["vs_fixed_best"],
                         "best checkpoint")
    lines.append("")
    return "\n".join(lines)


def base_label(settings: Settings) -> str:
    return "lmfuse tiny test model" if settings.base == "tiny" else settings.base


def step_table(settings: Settings, out: Path, log: Log) -> Path:
    doc = collect(settings, out, log)
    stats_path = out / "data" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    md = out / "table7.md"
    md.write_text(render(doc, settings, stats))
    (out / "table7.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    log(f"table: {md}")
    return md


# -- main --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = driver_parser(__doc__, STEPS, DEFAULT_CORPORA).parse_args(argv)
    settings_path = args.settings or HERE / ("tiny.yaml" if args.tiny else "real.yaml")
    settings = load_settings(settings_path)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.estimate:
        print(estimate_text(settings, json.loads((out / "data" / "stats.json").read_text())))
        return 0
    fns = {"data": lambda: step_data(settings, out, args.corpora.resolve(), log_line),
           "experts": lambda: step_experts(settings, out, log_line),
           "sweep": lambda: step_sweep(settings, out, log_line),
           "table": lambda: step_table(settings, out, log_line)}
    steps = [(s, fns[s]) for s in STEPS if not args.steps_only or s in args.steps_only]
    return run_steps(f"domain experts (settings {settings_path})", out, steps)


if __name__ == "__main__":
    raise SystemExit(main())
