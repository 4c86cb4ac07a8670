"""Cross-architecture fusion: Gemma-3-270M into SmolLM2-135M-Instruct, one factor at a time.

The target (SmolLM2, Llama, 49k byte-level BPE) is trained on a small mixed corpus of four
domains with Gemma-3 (262k SentencePiece-style BPE) as the source, next to the λ = 1 control
with the same data and budget. Each variant changes one option of a baseline (the demo's fusion
settings): top-k or sampled distributions, the tail rule, tokenizer-consistent targets, the
span-likelihood term, the frozen target as a candidate, λ, the learning rate, and the number of
passes over the corpus; a last part runs the baseline and the winners combined over three seeds.
Every model is scored on identical held-out blocks of the four domains and of a fifth that no
model trains on here (fortune-cookie texts from Debian's `fortunes` package). The table gives
fused − control with 95% paired bootstrap intervals at the end of the budget and with each model
at its best validation checkpoint, and the share of the control's gap to Gemma-3 that fusion
closes where Gemma-3 leads.

    python experiments/cross_arch/run.py --out runs/cross_arch --parts screen        # one part
    python experiments/cross_arch/run.py --out runs/cross_arch                        # every part
    python experiments/cross_arch/run.py --out /tmp/ca --tiny                         # tests the chain

Steps (each skips what is complete; rerun the same command to resume):
  data   OUT/data/fusion.jsonl (training pieces and held-out pieces, `"split"`), stats.json.
  sweep  OUT/fusion.yaml (base config) and OUT/sweep-<part>.yaml, run by lmfuse.sweep into
         OUT/sweep/ (one run directory and one artifact store for every part); each part's own
         table is copied to OUT/<part>.md.
  table  OUT/cross_arch.md and cross_arch.json: every finished run of the parts asked for.

Settings: real.yaml (default) or tiny.yaml next to this file, or --settings FILE (which may
`extends: OTHER.yaml`, relative to it: mappings merge key by key, anything else replaces). This
script reads ../shared/corpora and Debian's `fortunes` package (apt-get download); lmfuse does not.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lmfuse.compare import cell, compare, mean_std
from lmfuse.stats import Interval

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
    train_steps,
    write_if_changed,
    write_jsonl,
)

DEFAULT_CORPORA = HERE.parents[1].parent / "shared" / "corpora"
STEPS = ("data", "sweep", "table")
LEADS = ("legal", "literature")  # the domains where the issue expects Gemma-3 to lead


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(min_length=1)
    variants: list[dict[str, Any]] = Field(min_length=1, description="lmfuse sweep variants: {name, set}")


class Settings(BaseModel):
    """The experiment's knobs (real.yaml / tiny.yaml)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="the target: an lmfuse model path (pull:NAME, HF dir) or `tiny`")
    target_name: str = "smollm2"
    source: str = Field(description="the source: an lmfuse model path or `tiny` (lmfuse's tiny WordPiece model)")
    source_name: str = "gemma3"
    domains: list[str] = Field(min_length=1, description="domains with training text and held-out blocks")
    unseen: str | None = Field("fortunes", description="a held-out-only domain (`fortunes`: Debian's package)")
    seed: int = Field(0, description="seed of the data split")
    max_docs_per_domain: int | None = Field(None, ge=3)
    block_size: int = Field(256, ge=16)
    heldout_blocks: int = Field(32, ge=1)
    heldout_piece_tokens: int = Field(128, ge=8)
    heldout_pieces_per_doc: int = Field(2, ge=1)
    fusion_tokens: int = Field(12_000, ge=1, description="training tokens of the fusion corpus, at most")
    fusion_pieces_per_doc: int = Field(2, ge=1)
    baseline: dict[str, dict[str, Any]] = Field(description="config sections (extract, align, train) of the baseline")
    evaluations: int = Field(3, ge=1, description="validation passes per run, at least (and one per epoch)")
    eval: dict[str, Any] = Field(default_factory=lambda: {"batch_size": 8, "dtype": "bfloat16"})
    parts: dict[str, Part] = Field(min_length=1, description="parts in order: each one lmfuse sweep")
    estimate: dict[str, float] = Field(default_factory=lambda: {
        "forward_tokens_per_s": 1000.0, "source_tokens_per_s": 600.0, "train_seconds_per_step": 2.0,
        "overhead_s": 120.0})

    def data_key(self) -> dict:
        keys = ("target", "domains", "unseen", "seed", "max_docs_per_domain", "block_size", "heldout_blocks",
                "heldout_piece_tokens", "heldout_pieces_per_doc", "fusion_tokens", "fusion_pieces_per_doc")
        return {k: getattr(self, k) for k in keys}

    @property
    def all_domains(self) -> list[str]:
        return [*self.domains, *([self.unseen] if self.unseen else [])]


def load_settings(path: Path) -> Settings:
    return Settings.model_validate(read_settings(path))


# -- models ------------------------------------------------------------------------------------
def model_path(settings: Settings, out: Path, which: str) -> str:
    """An lmfuse model path; `tiny` builds lmfuse's tiny test models under OUT (a byte-level BPE
    target and a SentencePiece-style source, as in the real run)."""
    path = settings.target if which == "target" else settings.source
    if path != "tiny":
        return path
    from lmfuse.testing import make_tiny_model

    kind = "bpe" if which == "target" else "spm"
    return str(make_tiny_model(out / f"tiny-{which}", kind))


def target_tokenizer(settings: Settings, out: Path):
    from lmfuse.config import ModelSpec
    from lmfuse.models import load_tokenizer

    return load_tokenizer(ModelSpec(name=settings.target_name, path=model_path(settings, out, "target")))


# -- step 1: data ------------------------------------------------------------------------------
FORTUNE_SKIP = {"art", "ascii-art"}  # pictures drawn in characters, not text


def fortunes_corpus(out: Path, log: Log) -> Path:
    """Debian's `fortunes` package as JSONL, one document per 20 fortunes of one file.

    Downloaded with `apt-get download` (no root, nothing installed) and unpacked with `dpkg-deb`.
    """
    dest = out / "downloads" / "fortunes.jsonl"
    if dest.exists():
        return dest
    work = out / "downloads" / "fortunes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        subprocess.run(["apt-get", "download", "fortunes"], cwd=work, check=True, capture_output=True, text=True)
        deb = next(work.glob("fortunes_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise Problem(f"could not fetch Debian's `fortunes` package ({detail.strip()[:300]}); on a Debian-like "
                      "system with package access `apt-get download fortunes` must work, or set `unseen: null`") from e
    rows = []
    for f in sorted((work / "x" / "usr" / "share" / "games" / "fortunes").iterdir()):
        if f.suffix or f.is_symlink() or f.name in FORTUNE_SKIP:
            continue  # .dat indexes, .u8 links
        items = [x.strip("\n") for x in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [x for x in items if x.strip()]
        for i in range(0, len(items), 20):
            rows.append({"domain": "fortunes", "source": f"fortunes/{f.name}#{i // 20}",
                         "text": "\n\n".join(items[i:i + 20])})
    random.Random(0).shuffle(rows)  # fixed order, as the development corpora
    tmp = dest.with_suffix(".tmp")
    write_jsonl(tmp, rows)
    os.replace(tmp, dest)
    log(f"data: fortunes: {len(rows)} documents from {len({r['source'].split('#')[0] for r in rows})} files -> {dest}")
    return dest


def step_data(settings: Settings, out: Path, corpora: Path, log: Log) -> dict:
    """Write OUT/data/ once: fusion.jsonl (train + held-out pieces) and stats.json."""
    final = out / "data"
    stats = existing_data(final, settings.data_key(), "sweep", log)
    if stats is not None:
        return stats
    t0 = time.time()
    s = settings
    tok = target_tokenizer(s, out)
    tmp = out / ".data-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    margin = max(1, s.block_size // 32)  # prepare may re-cut a piece that needs every last token
    min_tokens = max(2, min(s.block_size, s.heldout_piece_tokens) // 4)
    rows: list[dict] = []
    for domain in s.all_domains:
        if domain == s.unseen and domain == "fortunes":
            docs = read_domain(fortunes_corpus(out, log).parent, "fortunes", s.max_docs_per_domain)
        else:
            docs = read_domain(corpora, domain, s.max_docs_per_domain)
        for d in docs:
            d["domain"] = domain
        pick = Picker(docs, tok, random.Random(f"{s.seed}/{domain}"), min_tokens)
        heldout = pick.take(min(s.heldout_piece_tokens, s.block_size), s.heldout_pieces_per_doc,
                            blocks=s.heldout_blocks)
        rows += [{**r, "split": "validation"} for r in heldout]
        if domain != s.unseen:
            fusion = pick.take(s.block_size - margin, s.fusion_pieces_per_doc,
                               at_most=s.fusion_tokens // len(s.domains))
            rows += [{**r, "split": "train"} for r in fusion]
        log(f"data: {domain}: {len(heldout)} held-out pieces; {pick.pos} of {len(docs)} documents used")
    write_jsonl(tmp / "fusion.jsonl", [{k: r[k] for k in ("domain", "source", "split", "text")} for r in rows])
    blocks = block_stats(rows, tok, s.block_size)
    stats: dict[str, Any] = {"settings": s.data_key(), "domains": blocks}
    problems = [f"{d}: {blocks[d].get('validation', {}).get('blocks', 0)} held-out blocks < {s.heldout_blocks}"
                for d in s.all_domains if blocks.get(d, {}).get("validation", {}).get("blocks", 0) < s.heldout_blocks]
    if problems:
        raise Problem("the data does not meet its budgets: " + "; ".join(problems))
    stats["totals"] = {
        "fusion_train_tokens": sum(b.get("train", {}).get("tokens", 0) for b in blocks.values()),
        "fusion_train_blocks": sum(b.get("train", {}).get("blocks", 0) for b in blocks.values()),
        "heldout_tokens": sum(b.get("validation", {}).get("tokens", 0) for b in blocks.values()),
        "heldout_blocks": sum(b.get("validation", {}).get("blocks", 0) for b in blocks.values()),
    }
    stats["seconds"] = round(time.time() - t0, 1)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the data appears whole or not at all
    t = stats["totals"]
    log(f"data: written to {final} in {stats['seconds']} s: {t['fusion_train_tokens']} training tokens "
        f"({t['fusion_train_blocks']} blocks), {t['heldout_blocks']} held-out blocks ({t['heldout_tokens']} tokens)")
    if s.target != "tiny":
        log(estimate_text(s, stats))
    return stats


# -- wall-time estimate ------------------------------------------------------------------------
def variant_train(settings: Settings, variant: dict) -> dict:
    """The train section of a variant (baseline + its `train.*` keys)."""
    train = dict(settings.baseline.get("train", {}))
    for k, v in (variant.get("set") or {}).items():
        if k.startswith("train."):
            train[k.removeprefix("train.")] = v
    return train


def estimate(settings: Settings, stats: dict) -> dict[str, float]:
    """Seconds per part on 2 CPU cores, from the settings' figures (runs two parts share counted once)."""
    s, t = settings, stats["totals"]
    e = s.estimate
    per_token = e["train_seconds_per_step"] / s.block_size
    v = t["heldout_tokens"]
    seen: set[tuple] = set()
    out: dict[str, float] = {}
    for part_name, part in s.parts.items():
        sec = 0.0
        for variant in part.variants:
            train = variant_train(s, variant)
            g = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1))
            steps = train_steps(train, t["fusion_train_blocks"])
            tokens = steps * g * t["fusion_train_tokens"] / max(t["fusion_train_blocks"], 1)
            passes = max(s.evaluations, math.ceil(float(train.get("epochs", 1))))
            control = json.dumps({k: train.get(k) for k in ("learning_rate", "epochs", "max_steps", "warmup_ratio")})
            for seed in part.seeds:
                for run in ((variant["name"], seed), (control, seed)):
                    if run in seen:
                        continue
                    seen.add(run)
                    sec += tokens * per_token + passes * v / e["forward_tokens_per_s"]  # training + validation
                    sec += 2 * v / e["forward_tokens_per_s"]  # held-out scoring at the end and at the best step
        if not out:  # the first part extracts both models and scores the target and the source
            sec += (t["fusion_train_tokens"] + v) * (1 / e["forward_tokens_per_s"] + 1 / e["source_tokens_per_s"])
            sec += v * (1 / e["forward_tokens_per_s"] + 1 / e["source_tokens_per_s"]) + e["overhead_s"]
        out[part_name] = sec
    return out


def estimate_text(settings: Settings, stats: dict) -> str:
    parts = estimate(settings, stats)
    lines = [f"estimated wall time on 2 CPU cores: {sum(parts.values()) / 60:.0f} min in all"]
    lines += [f"  part {k}: {v / 60:.0f} min" for k, v in parts.items()]
    return "\n".join(lines)


# -- step 2: the sweeps ------------------------------------------------------------------------
def fusion_config(settings: Settings, out: Path) -> dict:
    b = settings.baseline
    return {
        "output_dir": "sweep/runs/base",  # not used by the sweep
        "target": {"name": settings.target_name, "path": model_path(settings, out, "target"), "dtype": "bfloat16"},
        "sources": [{"name": settings.source_name, "path": model_path(settings, out, "source"), "dtype": "bfloat16"}],
        "corpus": {"path": "data/fusion.jsonl", "split_field": "split"},
        "prepare": {"block_size": settings.block_size, "min_validation_blocks": settings.heldout_blocks},
        "extract": dict(b.get("extract", {})),
        "vocab_map": {"method": "retokenize", **b.get("vocab_map", {})},
        "align": dict(b.get("align", {})),
        "train": {"seed": 0, "save_every": 0, **b.get("train", {}), "keep_best": True, "control": True},
        "eval": settings.eval,
    }


def with_eval_every(settings: Settings, variant: dict, blocks: int) -> dict:
    """The variant with `train.eval_every` set: `evaluations` passes at least and one per epoch."""
    train = variant_train(settings, variant)
    steps = train_steps(train, blocks)
    passes = max(settings.evaluations, math.ceil(float(train.get("epochs", 1))))
    return {"name": variant["name"],
            "set": {**(variant.get("set") or {}), "train.eval_every": max(1, math.ceil(steps / passes))}}


def part_names(settings: Settings, upto: Sequence[str] | None) -> list[str]:
    names = list(settings.parts)
    if not upto:
        return names
    unknown = [p for p in upto if p not in names]
    if unknown:
        raise Problem(f"no part {unknown}; the parts are {names}")
    return [p for p in names if p in upto]


def step_sweep(settings: Settings, out: Path, parts: Sequence[str], log: Log) -> None:
    from lmfuse.sweep import run_sweep_file

    stats_path = out / "data" / "stats.json"
    if not stats_path.exists():
        raise Problem(f"no data in {out / 'data'}: run the data step first")
    blocks = json.loads(stats_path.read_text())["totals"]["fusion_train_blocks"]
    write_if_changed(out / "fusion.yaml", yaml.safe_dump(fusion_config(settings, out), sort_keys=False))
    for name in parts:
        part = settings.parts[name]
        sweep = {"base": "fusion.yaml", "output_dir": "sweep", "seeds": part.seeds,
                 "variants": [with_eval_every(settings, v, blocks) for v in part.variants]}
        path = out / f"sweep-{name}.yaml"
        write_if_changed(path, yaml.safe_dump(sweep, sort_keys=False))
        t0 = time.time()
        log(f"sweep: part {name}: {len(part.variants)} variants × seeds {part.seeds}")
        run_sweep_file(path, log=log)
        # the part's own table and plots (the next part's sweep rewrites sweep.md and its plots)
        shutil.copyfile(out / "sweep" / "sweep.json", out / f"{name}.json")
        md = (out / "sweep" / "sweep.md").read_text()
        for png in sorted((out / "sweep").glob("sweep_*.png")):
            shutil.copyfile(png, out / f"{name}_{png.name}")
            md = md.replace(f"]({png.name})", f"]({name}_{png.name})")
        (out / f"{name}.md").write_text(md.replace("](runs/", "](sweep/runs/"))
        log(f"sweep: part {name} done in {(time.time() - t0) / 60:.1f} min -> {out / f'{name}.md'}")


# -- step 3: the table -------------------------------------------------------------------------
def _results(run_dir: Path) -> dict | None:
    path = run_dir / "eval" / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def collect(settings: Settings, out: Path, parts: Sequence[str], log: Log) -> dict:
    """Every finished run of the parts: bits per byte, fused − control, gap to the source closed."""
    doms, trained = settings.all_domains, settings.domains
    doc: dict[str, Any] = {"domains": doms, "trained": trained, "fixed": {}, "runs": [], "missing": [],
                           "pooled": []}
    recs: dict[str, list[dict]] = {}  # variant -> per seed: the eval records of its fused and control models
    for part_name in parts:
        part = settings.parts[part_name]
        for variant in part.variants:
            for seed in part.seeds:
                name = f"{variant['name']}-s{seed}"
                if any(r["run"] == name for r in doc["runs"]):
                    continue
                run_dir = out / "sweep" / "runs" / name
                res = _results(run_dir)
                if res is None or "fused" not in res["models"] or "clm" not in res["models"]:
                    doc["missing"].append(name)
                    continue
                models = res["models"]
                for label, col in ((settings.target_name, "target"), (settings.source_name, "source")):
                    if col not in doc["fixed"] and label in models:
                        doc["fixed"][col] = {"label": label, "rec": models[label]}
                fused, clm = models["fused"], models["clm"]
                same_blocks(fused, clm)
                entry = {"part": part_name, "variant": variant["name"], "set": variant.get("set") or {},
                         "seed": seed, "run": name,
                         "fused": domain_bpb(fused, trained) | _one(fused, settings.unseen),
                         "control": domain_bpb(clm, trained) | _one(clm, settings.unseen),
                         "vs_control": _diffs([fused], [clm], settings)}
                fb, cb = models.get("fused@best"), models.get("clm@best")  # eval scores `best/` (keep_best)
                if fb and cb:
                    entry |= {"fused_best": domain_bpb(fb, trained) | _one(fb, settings.unseen),
                              "control_best": domain_bpb(cb, trained) | _one(cb, settings.unseen),
                              "vs_control_best": _diffs([fb], [cb], settings),
                              "best_steps": {"fused": _best_step(run_dir, "fused"), "control": _best_step(run_dir, "clm")}}
                doc["runs"].append(entry)
                recs.setdefault(variant["name"], []).append({"entry": entry, "fused": fused, "control": clm,
                                                             "fused_best": fb, "control_best": cb})
    for col in list(doc["fixed"]):
        rec = doc["fixed"][col].pop("rec")
        doc["fixed"][col]["bpb"] = domain_bpb(rec, trained) | _one(rec, settings.unseen)
    doc["pooled"] = [_pooled(v, rs, settings) for v, rs in recs.items() if len(rs) > 1]
    src = doc["fixed"].get("source", {}).get("bpb")
    for entry in doc["runs"] + doc["pooled"]:
        for when in ("", "_best"):
            if f"fused{when}" in entry and src:
                entry[f"gap_closed{when}"] = {d: _gap(entry[f"control{when}"][d], entry[f"fused{when}"][d], src[d])
                                              for d in LEADS if d in trained}
    return doc


def _pooled(variant: str, rs: list[dict], settings: Settings) -> dict:
    """A variant over its seeds: mean bits per byte, the std over seeds of fused − control, and the
    interval of the seed-averaged difference (per-block NLL averaged over seeds, then bootstrapped)."""
    first = rs[0]["entry"]
    out: dict[str, Any] = {"part": first["part"], "variant": variant, "set": first["set"],
                           "seeds": [r["entry"]["seed"] for r in rs], "run": f"{variant}-mean"}
    for when in ("", "_best"):
        if any(r[f"fused{when}"] is None for r in rs):
            continue
        cols = rs[0]["entry"][f"vs_control{when}"]
        out[f"fused{when}"] = {c: float(sum(r["entry"][f"fused{when}"][c] for r in rs) / len(rs)) for c in cols}
        out[f"control{when}"] = {c: float(sum(r["entry"][f"control{when}"][c] for r in rs) / len(rs)) for c in cols}
        out[f"vs_control{when}"] = _diffs([r[f"fused{when}"] for r in rs], [r[f"control{when}"] for r in rs], settings)
        out[f"std{when}"] = {c: mean_std([r["entry"][f"vs_control{when}"][c][0] for r in rs]).std for c in cols}
        out[f"below_zero{when}"] = {c: sum(r["entry"][f"vs_control{when}"][c][2] < 0 for r in rs) for c in cols}
    return out


def _best_step(run_dir: Path, kind: str) -> int | None:
    state = run_dir / "train" / kind / "best" / "best_state.json"
    return json.loads(state.read_text()).get("step") if state.exists() else None


def _one(rec: dict, domain: str | None) -> dict[str, float]:
    return {domain: domain_bpb(rec, [domain])[domain]} if domain else {}


def _diffs(a: list[dict], b: list[dict], settings: Settings) -> dict[str, Interval]:
    """A − B on each trained domain, their average and the held-out-only domain (records: one per seed)."""
    out = diff_ci(a, b, settings.domains)
    if settings.unseen:
        out[settings.unseen] = compare(a, b, settings.unseen)
    return out


def _gap(control: float, fused: float, source: float) -> float:
    """Share of the control's gap to the source that fusion closes (NaN where the source does not lead)."""
    gap = control - source
    return (control - fused) / gap if gap > 0 else math.nan


def render(doc: dict, settings: Settings, stats: dict | None) -> str:
    doms, trained = doc["domains"], doc["trained"]
    cols = [*trained, "average", *[d for d in doms if d not in trained]]
    unseen = f" The last column, **{settings.unseen}**, is held out only: no model trains on it here." \
        if settings.unseen else ""
    lines = [f"# Cross-architecture fusion: {settings.source_name} → {settings.target_name}", ""]
    if stats:
        t = stats["totals"]
        lines += [f"Held-out bits per byte (lower is better) on {t['heldout_blocks']} identical held-out blocks "
                  f"({t['heldout_tokens']:,} tokens; {settings.heldout_blocks} per domain, each at most "
                  f"{min(settings.heldout_piece_tokens, settings.block_size)} tokens, from documents used nowhere "
                  f"else). Fusion corpus: {t['fusion_train_tokens']:,} training tokens ({t['fusion_train_blocks']} "
                  f"blocks). **average** = mean of the trained domains.{unseen} Every model is scored in "
                  f"{settings.eval.get('dtype') or 'its own dtype'}.", ""]
    head = ["model", *cols]
    sep = "|---|" + "---:|" * len(cols)

    def row(label: str, bpb: dict) -> str:
        return f"| {label} | " + " | ".join(cell(bpb.get(c, math.nan), sign=False) for c in cols) + " |"

    for when, title in (("", "At the end of the budget"), ("_best", "At the best validation checkpoint")):
        runs = [r for r in doc["runs"] if f"fused{when}" in r]
        if not runs:
            continue
        lines += [f"## {title}", ""]
        if when:
            lines += ["Each fused model and each control at the step with its lowest validation loss "
                      "(`train.keep_best`); the validation blocks are the held-out blocks, so both arms are "
                      "selected on the blocks they are scored on (the same optimism for both).", ""]
        lines += ["### Bits per byte", "", "| " + " | ".join(head) + " |", sep]
        lines += [row(f"{c} ({f['label']})", f["bpb"]) for c, f in doc["fixed"].items()]
        shown: set[str] = set()
        for r in runs:
            key = json.dumps(r[f"control{when}"], sort_keys=True)
            if key not in shown:
                shown.add(key)
                lines.append(row(f"control (λ = 1) for {r['variant']}-s{r['seed']}", r[f"control{when}"]))
            lines.append(row(f"fused `{r['variant']}` s{r['seed']}", r[f"fused{when}"]))
        lines += ["", "### Fused − control (same seed, same budget), 95% paired bootstrap interval", "",
                  "| variant | seed | " + " | ".join(cols) + " | gap closed: " + ", ".join(LEADS) + " |",
                  "|---|---|" + "---:|" * (len(cols) + 1)]
        for r in runs:
            gaps = r.get(f"gap_closed{when}", {})
            gap_txt = ", ".join(f"{g:.1%}" if math.isfinite(g) else "–" for g in gaps.values()) or "–"
            lines.append(f"| `{r['variant']}` | {r['seed']} | "
                         + " | ".join(cell(*r[f"vs_control{when}"][c]) for c in cols) + f" | {gap_txt} |")
        pooled = [p for p in doc.get("pooled", []) if f"vs_control{when}" in p]
        if pooled:
            lines += ["", "### Over seeds: mean ± std of fused − control, interval of the seed-averaged difference",
                      "", "| variant | seeds | " + " | ".join(cols) + " | gap closed: " + ", ".join(LEADS) + " |",
                      "|---|---|" + "---:|" * (len(cols) + 1)]
            for p in pooled:
                gaps = p.get(f"gap_closed{when}", {})
                gap_txt = ", ".join(f"{g:.1%}" if math.isfinite(g) else "–" for g in gaps.values()) or "–"
                cells = [cell(*p[f"vs_control{when}"][c], p[f"std{when}"][c]) for c in cols]
                lines.append(f"| `{p['variant']}` | {', '.join(map(str, p['seeds']))} | " + " | ".join(cells)
                             + f" | {gap_txt} |")
        lines.append("")
    lines += ["## Goal check (best checkpoints)", ""]
    for r in doc["runs"]:
        if "vs_control_best" not in r:
            continue
        d = r["vs_control_best"]
        wins = [x for x in LEADS if x in d and d[x][2] < 0]
        gaps = r.get("gap_closed_best", {})
        quarter = [x for x in LEADS if math.isfinite(gaps.get(x, math.nan)) and gaps[x] >= 0.25]
        lines.append(f"- `{r['variant']}` s{r['seed']}: beats the control with the CI below zero on "
                     f"{', '.join(wins) or 'neither'} (of {', '.join(LEADS)}); closes ≥ 25% of the gap to "
                     f"{settings.source_name} on {', '.join(quarter) or 'neither'}.")
    for p in doc.get("pooled", []):
        if "vs_control_best" not in p:
            continue
        d, below = p["vs_control_best"], p["below_zero_best"]
        gaps = p.get("gap_closed_best", {})
        parts = [f"{x}: {cell(*d[x])}, CI below zero in {below[x]} of "
                 f"{len(p['seeds'])} seeds, gap closed {gaps.get(x, math.nan):.1%}" for x in LEADS if x in d]
        lines.append(f"- `{p['variant']}` over seeds {', '.join(map(str, p['seeds']))}: " + "; ".join(parts) + ".")
    if doc["missing"]:
        lines += ["", f"Not finished yet: {', '.join(doc['missing'])}."]
    lines += ["", "Variants (each changes the baseline by the keys shown):", ""]
    for r in doc["runs"]:
        if r["seed"] == min(x["seed"] for x in doc["runs"] if x["variant"] == r["variant"]):
            keys = ", ".join(f"`{k}: {v}`" for k, v in r["set"].items() if k != "train.eval_every") or "the baseline"
            lines.append(f"- `{r['variant']}` ({r['part']}): {keys}")
    if doc["runs"]:
        steps = ", ".join(f"{r['run']} {r['best_steps']['fused']}/{r['best_steps']['control']}"
                          for r in doc["runs"] if "best_steps" in r)
        lines += ["", f"Best steps (fused/control): {steps}.", ""]
    return "\n".join(lines)


def step_table(settings: Settings, out: Path, parts: Sequence[str], log: Log) -> Path:
    doc = collect(settings, out, parts, log)
    stats_path = out / "data" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    md = out / "cross_arch.md"
    md.write_text(render(doc, settings, stats))
    (out / "cross_arch.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    log(f"table: {md} ({len(doc['runs'])} runs{', missing ' + str(len(doc['missing'])) if doc['missing'] else ''})")
    return md


# -- main --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = driver_parser(__doc__, STEPS, DEFAULT_CORPORA)
    p.add_argument("--parts", action="append", help="run (and tabulate) only this part (repeatable); default: all")
    args = p.parse_args(argv)
    settings_path = args.settings or HERE / ("tiny.yaml" if args.tiny else "real.yaml")
    settings = load_settings(settings_path)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        parts = part_names(settings, args.parts)
    except Problem as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.estimate:
        print(estimate_text(settings, json.loads((out / "data" / "stats.json").read_text())))
        return 0
    fns = {"data": lambda: step_data(settings, out, args.corpora.resolve(), log_line),
           "sweep": lambda: step_sweep(settings, out, parts, log_line),
           "table": lambda: step_table(settings, out, parts, log_line)}
    steps = [(s, fns[s]) for s in STEPS if not args.steps_only or s in args.steps_only]
    return run_steps(f"cross-architecture (settings {settings_path}, parts {', '.join(parts)})", out, steps)


if __name__ == "__main__":
    raise SystemExit(main())
