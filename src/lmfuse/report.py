"""The run report: `RUN/report/report.md` and a self-contained `report.html` with PNG plots.

The report opens with its verdict: which trained model diverged (if any), whether training helped
at all (fused − untrained target, control − untrained target), whose validation loss ended above its
step-0 value (with the likely cause and the fix), then fused − control (λ = 1) and fused − best
source in bits per byte, overall and per domain, each with a 95% paired bootstrap confidence
interval over the held-out blocks (`lmfuse.compare` on the per-block figures `lmfuse eval` keeps).

Everything is read from the run directory (eval results, training logs, alignment and vocab-map
manifests, every manifest's `seconds`); parts that are missing are reported as "not run" rather
than failing, so the report can be written at any point of a run. Report files are readable by
everyone the umask allows (0644 under the usual umask 022), like any file a program writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmfuse.artifacts import atomic_write_bytes, read_json
from lmfuse.compare import (
    BOOT_SEED,
    MINUS,
    N_BOOT,
    OVERALL,
    best_source,
    bpb,
    cell,
    first_of_kind,
    outcome,
    signed,
)
from lmfuse.compare import compare as compare_records
from lmfuse.document import Document
from lmfuse.evaluate import (
    BEST,
    CONTROL,
    display_label,
    load_results,
    model_problem,
    ppl_text,
    problem_fix,
)
from lmfuse.stats import Interval

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
          "#CCB974", "#64B5CD"]
KIND_COLORS = {"fused": "#C44E52", "clm": "#4C72B0", "target": "#8C8C8C"}


# -- reading the run ---------------------------------------------------------------------------
def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Training and validation records of a `log.jsonl`: lines with `loss` and with `eval_loss`."""
    path = Path(path)
    train, val = [], []
    if not path.exists():
        return train, val
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if _num(rec.get("eval_loss")):
            val.append(rec)
        if _num(rec.get("loss")):
            train.append(rec)
    return train, val


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def stage_timings(run_dir: Path) -> list[tuple[str, float]]:
    """(artifact, seconds) for every complete artifact under the run directory, in pipeline order."""
    order = ["prepare", "extract", "vocab_map", "align", "train", "merge", "eval"]
    out = []
    for stage in order:
        base = run_dir / stage
        if not base.is_dir():
            continue
        for m in [base / "manifest.json", *sorted(base.glob("*/manifest.json"))]:
            rec = read_json(m) if m.exists() else None
            if rec and _num(rec.get("seconds")):
                out.append((str(m.parent.relative_to(run_dir)), float(rec["seconds"])))
    return out


def scalar_stats(manifest: dict | None) -> dict[str, float]:
    """Numeric top-level (and one level nested) manifest fields, except bookkeeping ones."""
    skip = {"seconds", "rows", "config_hash", "top_k", "k", "shard_size", "n_shards"}
    out: dict[str, float] = {}
    for k, v in (manifest or {}).items():
        if k in skip or k.endswith("_seconds"):
            continue
        if _num(v):
            out[k] = float(v)
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if _num(v2):
                    out[f"{k}.{k2}"] = float(v2)
    return out


def fraction_stats(stats: dict[str, float]) -> dict[str, float]:
    """The fields that are fractions in [0, 1] (aligned fraction, mapped mass, coverage...)."""
    words = ("fraction", "mass", "coverage", "rate", "ratio")
    return {k: v for k, v in stats.items() if 0.0 <= v <= 1.0 and any(w in k.lower() for w in words)}


# -- verdict -----------------------------------------------------------------------------------
def compare(results: dict, a: str, b: str, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict[str, Interval]:
    """bpb(a) − bpb(b) per domain and overall, with paired bootstrap CIs over held-out blocks.

    Each group is `lmfuse.compare.compare` of the two records; groups that neither pair of
    per-block figures nor pair of summaries covers are left out.

    Args:
        results: The `eval/results.json` object.
        a: Label of model A.
        b: Label of model B.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed (fixed: the same run gives the same report).

    Returns:
        `{domain: Interval, ..., "overall": Interval}` in bits per byte; negative: A is better.
        Without per-block figures (results written by an older lmfuse) the intervals are NaN.
    """
    ra, rb = results["models"][a], results["models"][b]
    cells = {g: compare_records([ra], [rb], g, n_boot, seed) for g in [*results["domains"], OVERALL]}
    return {g: iv for g, iv in cells.items() if math.isfinite(iv.diff)}


def _ci(iv: Interval, why: str = "no per-block figures") -> str:
    return f"95% CI {signed(iv.lo)} to {signed(iv.hi)}" if math.isfinite(iv.lo) else f"no CI: {why}"


def _words(iv: Interval, b: str | None = None, paired: bool = True) -> str:
    """Plain words for an interval of fused − `b`: inside the noise, or which model is better.

    Args:
        iv: The interval.
        b: What fused is compared with, for a full sentence; None for the short form.
        paired: Whether per-block figures exist (a NaN interval then means a single block).
    """
    said = outcome(iv.lo, iv.hi)
    if said == "none":
        if paired:
            return "one block: no interval, so no verdict"
        return "no confidence interval (rerun `lmfuse eval` to keep per-block figures)"
    if said == "noise":
        return ("inside the noise: no measurable difference" if b else "inside the noise")
    better = said == "better"
    if b is None:
        return "fused better" if better else "fused worse"
    return f"the fused model is {'better' if better else 'worse'} than {b}"


@dataclass
class Training:
    """What the verdict reads of the trained models beside their eval records.

    Attributes:
        broken: `{label: (kind, what, detail)}` of the models left out of every comparison
            (`lmfuse.evaluate.model_problem`: `not finite` or `diverged`).
        metrics: `{"fused" | "clm": the metrics of train/<kind>/manifest.json}`.
        learning_rate: `train.learning_rate` of the run (from its config.yaml), when known.
    """

    broken: dict[str, tuple[str | None, str, str]] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    learning_rate: float | None = None


def _final(models: dict, kind: str) -> str | None:
    """The model of a kind at the end of training: never a `@best` checkpoint standing in for a
    final model that was left out (diverged)."""
    label = first_of_kind(models, kind)
    return None if label is None or label.endswith(BEST) else label


def _trained_name(label: str) -> str:
    if label == "fused":
        return "the fused model"
    if label == "clm":
        return f"the {CONTROL}"
    return f"`{label}`"


def _lower_lr(lr: float | None) -> str:
    return f"lower `train.learning_rate` (try 10× lower{f', {lr / 10:g}' if lr else ''})"


def _alarms(training: Training, kinds: tuple[str, ...]) -> list[str]:
    """Sentences for trained models that diverged (left out of every comparison)."""
    out = []
    for label, (kind, _, detail) in training.broken.items():
        if kind not in kinds:
            continue
        out.append(f"{_trained_name(label)} diverged ({detail}), so it is left out of every "
                   f"comparison; {_lower_lr(training.learning_rate)} and train it again")
    return out


def _rose(training: Training, kinds: tuple[str, ...], names: dict[str, str]) -> list[str]:
    """Sentences for trained models whose validation loss ended above its step-0 value."""
    out = []
    lr = training.learning_rate
    for kind in kinds:
        m = training.metrics.get(kind) or {}
        start, end = m.get("initial_eval_loss"), m.get("final_eval_loss")
        rose = m.get("eval_loss_rose")
        if rose is None and _num(start) and _num(end):
            rose = end > start
        if not rose or not (_num(start) and _num(end)):
            continue
        out.append(f"{names[kind]}'s validation loss ended above where it started (step 0: {start:.4f} → end: "
                   f"{end:.4f} nats/token): the learning rate{f' ({lr:g})' if lr else ''} is likely too high for "
                   f"this target; {_lower_lr(lr)} and compare the step-0 and final validation losses again")
    return out


def _helped_words(iv: Interval, paired: bool) -> str:
    """Plain words for an interval of trained − untrained target."""
    said = outcome(iv.lo, iv.hi)
    if said == "none":
        return _words(iv, None, paired)
    return {"better": "better than the untrained target",
            "worse": "worse than the untrained target: training made it worse",
            "noise": "inside the noise: no measurable change from the untrained target"}[said]


def _helped(results: dict, trained: list[tuple[str, str]], target: str | None, n_boot: int, seed: int,
            why: str, paired: bool) -> list[str]:
    """`name − untrained target` sentences, one per trained model (label, name in a sentence)."""
    if target is None:
        return []
    out = []
    for label, name in trained:
        o = compare(results, label, target, n_boot, seed).get(OVERALL)
        if o is not None:
            out.append(f"{name} {MINUS} untrained target ({target}): **{signed(o.diff)} bits/byte** overall "
                       f"({_ci(o, why)}): {_helped_words(o, paired)}")
    return out


def _sentences(*groups: list[str]) -> str:
    """Groups of clauses as sentences: clauses joined by "; ", each group one sentence, the first
    letter of each but the first capitalised (the first follows "**Verdict:** ")."""
    out = []
    for g in groups:
        if g:
            text = "; ".join(g) + "."
            out.append(text if not out else text[0].upper() + text[1:])
    return " ".join(out)


def _clm_only_verdict(results: dict, n_boot: int, seed: int, training: Training
                      ) -> tuple[list[str], list[str], list[list[str]]] | None:
    """A run without sources (a CLM-only run, e.g. a domain expert): the trained model − the target."""
    models = results["models"]
    clm, target = _final(models, "clm"), first_of_kind(models, "target")
    clm_broken = any(k == "clm" for k, _, _ in training.broken.values())
    if (clm is None and not clm_broken) or any(m.get("kind") == "source" for m in models.values()):
        return None
    if target is None and not clm_broken:
        return None
    head_text = "**Verdict:** a run without sources: the target continually trained with λ = 1 alone (no fusion). "
    alarms = [a.replace(f"the {CONTROL}", "the trained model") for a in _alarms(training, ("clm",))]
    rose = _rose(training, ("clm",), {"clm": "the trained model"})
    if clm is None or target is None:
        return [head_text + _sentences(alarms, rose)], [], []
    cells = compare(results, clm, target, n_boot, seed)
    o = cells.get(OVERALL)
    said = ("no interval" if o is None or not math.isfinite(o.lo)
            else {"better": "better than the target", "worse": "worse than the target",
                  "noise": "inside the noise"}[outcome(o.lo, o.hi)])
    text = (head_text + f"Trained {MINUS} target ({target}): " + (f"**{signed(o.diff)} bits/byte** overall ({_ci(o)}): "
                                                                  f"{said}." if o is not None else "not scored."))
    if alarms or rose:
        more = _sentences(alarms, rose)
        text += " " + more[0].upper() + more[1:]
    groups = [*results["domains"], OVERALL]
    head = [f"trained {MINUS} … [95%\u00a0CI]", *groups]
    return [text], head, [[f"target ({target})", *[cell(*cells[g]) if g in cells else "–" for g in groups]]]


def verdict(results: dict | None, n_boot: int = N_BOOT, seed: int = BOOT_SEED, training: Training | None = None
            ) -> tuple[list[str], list[str], list[list[str]]]:
    """The report's opening: paragraphs, and a table of every difference with its CI.

    The first paragraph says, in this order: which trained model diverged (if any); whether
    training helped at all (fused − untrained target and control − untrained target); whose
    validation loss ended above its step-0 value, with the likely cause and the fix; then fused −
    control and fused − best source (and both at their best checkpoints with `train.keep_best`).

    Args:
        results: The `eval/results.json` object without the broken models, or None when eval has
            not run.
        n_boot: Bootstrap resamples per difference.
        seed: Bootstrap seed.
        training: The broken models left out of `results`, the trained models' manifest metrics
            and the learning rate.

    Returns:
        `(paragraphs, table head, table rows)`; the table is empty when there is nothing to compare.
    """
    training = training or Training()
    if not results or (not results.get("models") and not training.broken):
        return ["**Verdict:** none yet: the models have not been evaluated (`lmfuse eval`)."], [], []
    models = results["models"]
    fused = _final(models, "fused")
    fused_broken = any(k == "fused" for k, _, _ in training.broken.values())
    if fused is None and not fused_broken:
        return _clm_only_verdict(results, n_boot, seed, training) or (
            ["**Verdict:** none yet: no fused model has been evaluated (`lmfuse train`, then `lmfuse eval`)."], [], [])
    comparisons = []  # (column name, name in a sentence, intervals)
    control = _final(models, "clm")
    source = best_source(models)
    if fused is not None:
        if control is not None:
            comparisons.append((display_label(control, "clm"), "the control",
                                compare(results, fused, control, n_boot, seed)))
        if source is not None:
            comparisons.append((f"best source ({source})", source, compare(results, fused, source, n_boot, seed)))
        if not comparisons and not training.broken:
            return ["**Verdict:** none yet: neither the control nor a source was evaluated."], [], []
        # With `train.keep_best`, also each model at its best validation checkpoint (the comparison that
        # early stopping cannot explain away).
        if f"{fused}{BEST}" in models and control is not None and f"{control}{BEST}" in models:
            comparisons.append((f"{display_label(control, 'clm')}, both at their best checkpoints",
                                "the control (both at their best validation checkpoints)",
                                compare(results, f"{fused}{BEST}", f"{control}{BEST}", n_boot, seed)))

    paired = all(m.get("per_block") for m in models.values()
                 if m.get("kind") in ("fused", "clm", "source", "target"))
    why = "one block" if paired else "no per-block figures"
    target = first_of_kind(models, "target")
    trained = [(label, name) for label, name in ((fused, "fused"), (control, display_label(control or "", "clm")))
               if label is not None]
    helped = _helped(results, trained, target, n_boot, seed, why, paired)
    sentences = []
    for name, short, cells in comparisons:
        o = cells.get("overall")
        if o is None:
            continue
        sentences.append(f"fused {MINUS} {name}: **{signed(o.diff)} bits/byte** overall ({_ci(o, why)}): "
                         f"{_words(o, short, paired)}")
    alarms = _alarms(training, ("fused", "clm"))
    rose = _rose(training, ("fused", "clm"), {"fused": "the fused model", "clm": f"the {CONTROL}"})
    rest = ["against the control and the sources: " + sentences[0], *sentences[1:]] if sentences else []
    paragraphs = ["**Verdict:** " + _sentences(alarms, ["did training help? " + helped[0], *helped[1:]]
                                               if helped else [], rose, rest)]
    for name, _, cells in comparisons:
        per = [f"{g} {signed(iv.diff)} ({signed(iv.lo)} to {signed(iv.hi)}: {_words(iv)})" if math.isfinite(iv.lo)
               else f"{g} {signed(iv.diff)} ({_words(iv, None, paired)})" for g, iv in cells.items() if g != OVERALL]
        if per:
            paragraphs.append(f"Per domain, fused {MINUS} {name}: " + "; ".join(per) + ".")
    control_broken = any(k == "clm" for k, _, _ in training.broken.values())
    if control is None and not control_broken:
        paragraphs.append(f"The {CONTROL} was not evaluated (set `train.control: true`), so the fused model "
                          "cannot be told apart from plain continual training.")
    ref = fused or control or target
    ref_domains = (models[ref].get("per_block") or {}).get("domain", []) if ref else []
    counts = {d: ref_domains.count(d) for d in results["domains"]}
    spread = (f"{min(counts.values())}" if min(counts.values()) == max(counts.values())
              else f"{min(counts.values())}–{max(counts.values())}") if ref_domains else "?"
    paragraphs.append(
        f"Differences are in bits per byte of held-out text (Σ NLL / (ln 2 · Σ bytes) over the blocks); "
        f"below zero, the first model named is better. Intervals: 95% percentile paired bootstrap over the "
        f"{len(ref_domains) or results.get('blocks', '?')} {results.get('split', 'held-out')} blocks "
        f"({spread} per domain; {n_boot:,} resamples, seed {seed}); an interval that includes zero is inside "
        "the noise of which blocks were held out"
        + ("; with fewer than 10 blocks an interval is rough." if ref_domains and min(counts.values()) < 10
           else "."))
    groups = [*results["domains"], "overall"]
    head = [f"fused {MINUS} … [95%\u00a0CI]", *groups]
    rows = [[name, *[cell(*cells[g]) if g in cells else "–" for g in groups]] for name, _, cells in comparisons]
    if fused is not None and target is not None:
        cells = compare(results, fused, target, n_boot, seed)
        rows.append([f"untrained target ({target})", *[cell(*cells[g]) if g in cells else "–" for g in groups]])
    return paragraphs, head, rows


# -- plots -------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    return fig


def _color(i: int, label: str, kind: str | None = None) -> str:
    return KIND_COLORS.get(kind or label, COLORS[i % len(COLORS)])


def model_colors(models: dict[str, dict]) -> dict[str, str]:
    """One color per model, the same in every plot: fixed ones for target/fused/control, the rest
    drawn from the palette without reusing those."""
    free = [c for c in COLORS if c not in KIND_COLORS.values()]
    out, j = {}, 0
    for label, rec in models.items():
        kind = rec.get("kind")
        if kind in KIND_COLORS and kind not in [models[m].get("kind") for m in out]:
            out[label] = KIND_COLORS[kind]
        else:
            out[label] = free[j % len(free)]
            j += 1
    return out


def plot_bpb(results: dict, out: Path) -> Path:
    """Grouped bars: bits per byte per domain (and overall) for every model, values on bars."""
    import numpy as np

    models = list(results["models"])
    groups = [*results["domains"], "overall"]
    n = len(models)
    width = 0.8 / n
    fig = _figure(max(6.5, 1.1 + len(groups) * (0.35 + 0.32 * n)), 4.6)
    ax = fig.subplots()
    x = np.arange(len(groups))
    top = 0.0
    colors = model_colors(results["models"])
    for i, label in enumerate(models):
        rec = results["models"][label]
        vals = [bpb(rec, g) for g in groups]
        top = max([top, *[v for v in vals if np.isfinite(v)]])
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width * 0.92, label=display_label(label, rec.get("kind")),
                      color=colors[label])
        ax.bar_label(bars, fmt="%.3f", fontsize=7 if n > 3 else 8, rotation=90 if n > 2 else 0,
                     padding=2)
    ax.set_xticks(x, groups)
    ax.axvline(len(groups) - 1.5, color="#BBBBBB", lw=0.8, ls=":")
    ax.set_ylim(0, top * (1.22 if n > 2 else 1.12))
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_xlabel("validation domain")
    ax.set_title(f"Held-out bits per byte by domain ({results.get('blocks', '?')} {results.get('split', '')} blocks)")
    ax.legend(fontsize=8, ncols=min(n, 4), loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(out)
    return out


def plot_bpb_delta(results: dict, reference: str, out: Path) -> Path:
    """Bars: change in bits per byte of every other model against `reference` (negative = better)."""
    import numpy as np

    others = [m for m in results["models"] if m != reference]
    groups = [*results["domains"], "overall"]
    ref = results["models"][reference]
    ref_name = display_label(reference, ref.get("kind"))

    n = max(len(others), 1)
    width = 0.8 / n
    fig = _figure(max(6.5, 1.1 + len(groups) * (0.35 + 0.32 * n)), 4.4)
    ax = fig.subplots()
    x = np.arange(len(groups))
    colors = model_colors(results["models"])
    for i, label in enumerate(others):
        rec = results["models"][label]
        vals = [bpb(rec, g) - bpb(ref, g) for g in groups]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width * 0.92, label=display_label(label, rec.get("kind")),
                      color=colors[label])
        ax.bar_label(bars, labels=[signed(v, 3) for v in vals], fontsize=7 if n > 3 else 8, rotation=90 if n > 2 else 0, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.2)
    ax.set_xticks(x, groups)
    ax.set_ylabel(f"Δ bits per byte vs {ref_name}\n(below 0 = better)")
    ax.set_title(f"Change in bits per byte relative to {ref_name}")
    ax.legend(fontsize=8, ncols=min(n, 4), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(out)
    return out


def _smooth(y: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in y:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


# The fused curve is a thick solid line; the control's a thin dashed line drawn over it, so where
# the two coincide both stay visible (the fused line shows around and between the dashes).
LOSS_STYLE = {
    "fused": {"ls": "-", "lw": 2.6, "zorder": 3, "marker": "o"},
    "clm": {"ls": (0, (4, 3)), "lw": 1.3, "zorder": 4, "marker": "s"},
}


def plot_losses(logs: dict[str, tuple[list[dict], list[dict]]], out: Path) -> Path:
    """Training (LM part) and validation loss per step, fused vs control.

    The fused model's curves are thick and solid, the control's thin and dashed on top of them,
    so where the two coincide neither hides the other.
    """
    fig = _figure(11, 4.2)
    ax_tr, ax_va = fig.subplots(1, 2)
    order = sorted(logs, key=lambda n: LOSS_STYLE.get(n, {}).get("zorder", 2))
    for name in order:
        train, val = logs[name]
        color = _color(list(logs).index(name), name)
        style = LOSS_STYLE.get(name, {"ls": "-", "lw": 1.8, "zorder": 2, "marker": "o"})
        shown = display_label(name, name)
        if train:
            steps = [r["step"] for r in train]
            # The LM (CLM) part of the fused loss is what the control optimises: compare those.
            key = "clm" if all(_num(r.get("clm")) for r in train) else "loss"
            y = [r[key] for r in train]
            w = max(1, len(y) // 10)
            if w > 1:
                ax_tr.plot(steps, y, color=color, alpha=0.25, lw=0.8, zorder=1)
            ax_tr.plot(steps, _smooth(y, w), color=color, lw=style["lw"], ls=style["ls"], zorder=style["zorder"],
                       marker=style["marker"] if len(y) == 1 else None,
                       label=f"{shown}: {'LM part of the loss' if key == 'clm' else 'loss'}"
                             + (f" (mean of {w} steps)" if w > 1 else ""))
            if key == "clm" and all(_num(r.get("fusion")) for r in train) and any(r["fusion"] for r in train):
                ax_tr.plot(steps, _smooth([r["fusion"] for r in train], w), color=color, lw=1.2, ls=":",
                           zorder=style["zorder"], label=f"{shown}: fusion part")
        if val:
            ax_va.plot([r["step"] for r in val], [r["eval_loss"] for r in val], color=color, lw=style["lw"],
                       ls=style["ls"], zorder=style["zorder"], marker=style["marker"], ms=5 if name == "fused" else 4,
                       mfc=color if name == "fused" else "white", label=shown)
    ax_tr.set_title("Training loss")
    ax_va.set_title("Validation loss")
    for ax in (ax_tr, ax_va):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats per token, lower is better)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            first = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("fused"))  # fused first
            ax.legend([handles[i] for i in first], [labels[i] for i in first], fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="#888888")
    fig.savefig(out)
    return out


def plot_fractions(stats: dict[str, dict[str, float]], title: str, out: Path) -> Path:
    """Grouped bars of fraction diagnostics (0–1) per source, values on bars."""
    import numpy as np

    sources = list(stats)
    keys = sorted({k for s in stats.values() for k in s})
    n = len(keys)
    width = 0.8 / n
    fig = _figure(max(6.0, 1.5 + len(sources) * (0.4 + 0.45 * n)), 4.2)
    ax = fig.subplots()
    x = np.arange(len(sources))
    for i, k in enumerate(keys):
        vals = [stats[s].get(k, np.nan) * 100 for s in sources]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width * 0.92, label=_pretty(k),
                      color=COLORS[i % len(COLORS)])
        ax.bar_label(bars, fmt="%.1f%%", fontsize=8 if n < 5 else 7, padding=2, rotation=0 if n < 5 else 90)
    ax.set_xticks(x, sources)
    ax.set_ylim(0, 112 if n < 5 else 122)
    ax.set_ylabel("percent (higher is better)")
    ax.set_xlabel("source model")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=min(n, 3), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(out)
    return out


def _pretty(key: str) -> str:
    """`aligned_fraction_per_domain.code` → `aligned fraction: code`."""
    head, _, tail = key.partition(".")
    head = head.removesuffix("_per_domain").replace("_", " ")
    return f"{head}: {tail.replace('_', ' ')}" if tail else head


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def plot_timings(timings: list[tuple[str, float]], out: Path) -> Path:
    """Horizontal bars: wall-clock seconds per stage artifact."""
    names = [n for n, _ in timings][::-1]
    secs = [s for _, s in timings][::-1]
    fig = _figure(7.5, 1.2 + 0.38 * len(names))
    ax = fig.subplots()
    stages = sorted({n.split("/")[0] for n in names})
    colors = [COLORS[stages.index(n.split("/")[0]) % len(COLORS)] for n in names]
    bars = ax.barh(names, secs, color=colors)
    ax.bar_label(bars, labels=[_fmt_seconds(s) for s in secs], fontsize=8, padding=3)
    ax.set_xlim(0, max(secs) * 1.2 if secs and max(secs) > 0 else 1)
    ax.set_xlabel("wall-clock seconds")
    ax.set_title("Time per stage")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(out)
    return out


# -- documents ---------------------------------------------------------------------------------
def write_report(run_dir: str | Path) -> Path:
    """Write `RUN/report/report.md`, `report.html` (PNGs embedded) and the PNGs; return the .md path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    doc = Document()
    doc.h(f"lmfuse report: {run_dir.name}", 1)
    results = load_results(run_dir)  # checked against eval's manifest: an edited figure is refused
    training = _training(run_dir)
    if results and results.get("models"):
        # A model whose NLL is NaN/inf (null in results.json) or whose perplexity overflows (diverged) is
        # named, and left out of every table, plot and comparison.
        for k, r in results["models"].items():
            problem = model_problem(r)
            if problem:
                training.broken[k] = (r.get("kind"), *problem)
        results["models"] = {k: r for k, r in results["models"].items() if k not in training.broken}
    if results and results.get("models"):  # results.json has sorted keys: show models in a reading order
        rank = {"target": 0, "source": 1, "fused": 2, "clm": 3}
        results["models"] = dict(sorted(results["models"].items(), key=lambda kv: rank.get(kv[1].get("kind"), 4)))
    # The verdict comes first: what fusion did, against the control and the best source.
    paragraphs, head, rows = verdict(results, training=training)
    doc.p(paragraphs[0], anchor="verdict")
    if rows:
        doc.table(head, rows)
    for para in paragraphs[1:]:
        doc.p(para)
    cfg = _config_summary(run_dir)
    if cfg:
        doc.p(cfg)

    # Results.
    doc.h("Held-out results")
    not_finite = [k for k, (_, what, _) in training.broken.items() if what == "not finite"]
    if not_finite:
        doc.p(f"**Not finite:** {', '.join(f'`{b}`' for b in not_finite)}: the NLL is NaN or infinite on some "
              "held-out blocks (NaN/inf weights?), so these models are left out of every table, plot and comparison.")
    diverged = {k: v for k, v in training.broken.items() if v[1] == "diverged"}
    if diverged:
        doc.p("**Diverged:** " + ". ".join(f"`{k}`: {detail}; {problem_fix(kind)}"
                                           for k, (kind, _, detail) in diverged.items())
              + ". Left out of every table, plot and comparison.")
    if not results or not results.get("models"):
        doc.p("Evaluation: not run (`lmfuse eval`).")
    else:
        doc.p("Bits per byte (lower is better) is the comparison that is fair across tokenizers; "
              "perplexity is per token of each model's own tokenizer.")
        head = ["model", *results["domains"], "overall", "overall ppl/token"]
        rows = []
        best = min(results["models"].values(), key=lambda r: r["overall"]["bpb"])["overall"]["bpb"]
        for label, rec in results["models"].items():
            kind = rec.get("kind")
            if kind == "clm":
                cells = [display_label(label, kind)]
            else:
                cells = [f"{label} ({kind})" if kind not in (None, "model", label) else label]
            cells += [f"{rec['domains'][d]['bpb']:.4f}" if d in rec["domains"] else "–" for d in results["domains"]]
            o = rec["overall"]["bpb"]
            cells += [f"**{o:.4f}**" if o == best else f"{o:.4f}", ppl_text(rec["overall"])]
            rows.append(cells)
        doc.table(head, rows)
        doc.img(plot_bpb(results, out / "bpb.png"), "Bits per byte per domain for every model")
        ref = _reference(results)
        if ref and len(results["models"]) > 1:
            ref_name = display_label(ref, results["models"][ref].get("kind"))
            doc.img(plot_bpb_delta(results, ref, out / "bpb_delta.png"),
                    f"Change in bits per byte against {ref_name} (below zero is better)")

    # Training.
    doc.h("Training")
    logs = {}
    for name in ("fused", "clm"):
        train, val = read_log(run_dir / "train" / name / "log.jsonl")
        if train or val:
            logs[name] = (train, val)
    for name in ("fused", "clm"):
        if name not in logs:
            doc.p(f"`train/{name}`: not run." if name == "fused" else f"`train/{name}` (the control, λ = 1): not run.")
    if logs:
        rows = []
        for name, (train, val) in logs.items():
            # Step 0 (the untrained target, when the run validates during training): from the log, or the manifest.
            start = next((r["eval_loss"] for r in val if r["step"] == 0),
                         (training.metrics.get(name) or {}).get("initial_eval_loss"))
            rows.append([display_label(name, name), len(train), train[-1]["step"] if train else "–",
                         f"{train[-1]['loss']:.4f}" if train else "–",
                         f"{start:.4f}" if _num(start) else "–",
                         f"{val[-1]['eval_loss']:.4f}" if val else "–"])
        doc.table(["model", "logged steps", "last step", "last training loss", "validation loss at step 0",
                   "last validation loss"], rows)
        doc.img(plot_losses(logs, out / "loss.png"),
                f"Training and validation loss, fused (thick solid line) vs the {CONTROL} (thin dashed line); "
                "the fused model's training curve is the LM part of its loss")

    # Can the fusion targets be trusted? (before any training)
    _target_diagnostics(doc, run_dir)

    # Alignment diagnostics.
    doc.h("Alignment and vocabulary mapping")
    for stage, title in (("vocab_map", "Vocabulary mapping per source"), ("align", "Alignment per source")):
        found = {p.parent.name: scalar_stats(read_json(p)) for p in sorted((run_dir / stage).glob("*/manifest.json"))}
        if not found:
            doc.p(f"`{stage}`: not run.")
            continue
        keys = sorted({k for s in found.values() for k in s})
        fr = {s: fraction_stats(v) for s, v in found.items()}
        fractions = {k for v in fr.values() for k in v}
        doc.p(f"**{title}** (from `{stage}/<source>/manifest.json`).")
        # One row per manifest field, one column per source: as many fields as a stage records,
        # the table stays as wide as the number of sources.
        doc.table(["manifest field", *found],
                  [[k, *[_fmt(found[s].get(k), k in fractions) for s in found]] for k in keys])
        if any(fr.values()):
            doc.img(plot_fractions(fr, title, out / f"{stage}.png"), title)

    # Timings.
    doc.h("Time per stage")
    timings = stage_timings(run_dir)
    if not timings:
        doc.p("No complete stage yet.")
    else:
        doc.table(["artifact", "wall-clock"],
                  [[f"{n} (control, λ = 1)" if n == "train/clm" else n, _fmt_seconds(s)] for n, s in timings])
        doc.p(f"Total: {_fmt_seconds(sum(s for _, s in timings))} of wall-clock time on this machine (from each "
              "artifact's `manifest.json`; other work sharing the machine makes every stage slower; "
              "pulling models is not included).")
        shown = [(f"{n} (control)" if n == "train/clm" else n, t) for n, t in timings]
        doc.img(plot_timings(shown, out / "timings.png"), "Wall-clock time per stage")

    md = out / "report.md"
    atomic_write_bytes(md, doc.markdown().encode())
    atomic_write_bytes(out / "report.html", doc.html(f"lmfuse report: {run_dir.name}").encode())
    return md


def _share(x: Any) -> str:
    return f"{100 * float(x):.1f}%" if _num(x) and float(x) == float(x) else "–"


def _target_diagnostics(doc: Document, run_dir: Path) -> None:
    """Per model and domain, what the stored distributions keep; per source, what alignment does to them."""
    extracts = {p.parent.name: read_json(p) for p in sorted((run_dir / "extract").glob("*/manifest.json"))}
    aligns = {p.parent.name: read_json(p) for p in sorted((run_dir / "align").glob("*/manifest.json"))}
    rows = []
    for name, m in extracts.items():
        per = {**(m.get("diagnostics_per_domain") or {}),
               "all": {"mass_kept": m.get("mass_kept"), "gold_in_stored_fraction": m.get("gold_in_stored_fraction"),
                       "entries_per_position": m.get("entries_per_position")}}
        if per["all"]["mass_kept"] is None:
            continue
        form = (f"{m.get('samples')} draws" if m.get("distribution") == "sampled" else f"top-{m.get('top_k')}")
        for dom, d in per.items():
            rows.append([name, form, dom, _share(d.get("mass_kept")), _share(d.get("gold_in_stored_fraction")),
                         f"{d['entries_per_position']:.1f}" if _num(d.get("entries_per_position")) else "–"])
    arows = []
    for name, m in aligns.items():
        per = {**(m.get("diagnostics_per_domain") or {}), "all": m.get("diagnostics")}
        if not per["all"]:
            continue
        for dom, d in per.items():
            arows.append([name, m.get("token_rule", "map"), dom, *[_share(d.get(k)) for k in (
                "aligned_fraction", "next_end_same", "mapped_mass", "not_target_token_mass", "to_gold_mass",
                "dropped_mass", "gold_in_stored")]])
    if not rows and not arows:
        return
    doc.h("Can the fusion targets be trusted?")
    doc.p("Measured before any training. A stored distribution that keeps little of the model's probability, or "
          "often misses the token that came next, gives biased targets when renormalised "
          "(`train.outside_topk`); mass on tokens the target would not write there trains the target towards a "
          "tokenization it never produces (`align.token_rule: consistent` moves or drops it). "
          "See docs/alignment.md, Diagnostics.")
    if rows:
        doc.table(["model", "stored", "domain", "mass kept", "gold token stored", "entries / position"], rows)
    if arows:
        doc.table(["source", "token rule", "domain", "aligned", "next token ends together", "mass mapped",
                   "on tokens the target would not write", "moved to gold", "dropped", "gold token stored"], arows)


def _fmt(v: float | None, fraction: bool = False) -> str:
    if v is None:
        return "–"
    if float(v).is_integer() and abs(v) >= 1 and not fraction:
        return f"{int(v):,}"
    return f"{v:.4f}"


def _reference(results: dict) -> str | None:
    """The model to compare against: the control if present, else the target."""
    models = results["models"]
    return first_of_kind(models, "clm") or first_of_kind(models, "target") or next(iter(models), None)


def _training(run_dir: Path) -> Training:
    """The trained models' manifest metrics and the run's learning rate (what is missing or
    unreadable is left out: the report can be written at any point)."""
    out = Training()
    for name in ("fused", "clm"):
        try:
            man = read_json(run_dir / "train" / name / "manifest.json")
        except Exception:  # a damaged manifest must not stop the report
            man = None
        if isinstance(man, dict) and isinstance(man.get("metrics"), dict):
            out.metrics[name] = man["metrics"]
    try:
        import yaml

        lr = ((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train") or {}).get("learning_rate")
        out.learning_rate = float(lr) if _num(lr) or isinstance(lr, str) else None
    except Exception:  # no config copy, or a broken one
        out.learning_rate = None
    return out


def _config_summary(run_dir: Path) -> str | None:
    p = run_dir / "config.yaml"
    if not p.exists():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(p.read_text()) or {}
        tgt = cfg.get("target", {}).get("name", "?")
        srcs = ", ".join(s.get("name", "?") for s in cfg.get("sources", []))
        tr = cfg.get("train", {}) or {}
        return (f"Target `{tgt}`; sources {srcs or '–'}; fusion `{tr.get('fusion', 'minCE')}` at "
                f"`{tr.get('level', 'sequence')}` level, λ = {tr.get('clm_weight', 0.9)}.")
    except Exception:  # a broken config copy must not stop the report
        return None
