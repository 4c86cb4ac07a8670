"""The sweep's table: `sweep.json`, `sweep.md` and `sweep.html` (with PNG plots) from the runs' eval results.

Per domain and overall: held-out bits per byte of each variant and of its control; the
difference variant − control paired by seed, with a 95% paired bootstrap interval over held-out
blocks; mean ± std over seeds with the interval of the seed-averaged difference; and each
variant − the best source of each domain. Every comparison and number format is
`lmfuse.compare`'s. The runner (`lmfuse.sweep`) calls `summarize_sweep`, then `write_outputs`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmfuse.artifacts import atomic_write_bytes, atomic_write_json
from lmfuse.compare import (
    ALPHA,
    BOOT_SEED,
    N_BOOT,
    OVERALL,
    best_source,
    bpb,
    cell,
    compare,
    compare_domains,
    first_of_kind,
    mean_std,
    outcome,
)
from lmfuse.document import Document
from lmfuse.stats import Interval
from lmfuse.sweep_file import Sweep, Variant, _value_name

if TYPE_CHECKING:  # the runner's type; importing lmfuse.sweep here would be a cycle
    from lmfuse.sweep import Run


def _settings(v: Variant) -> str:
    """A variant's overrides for the log: `train.fusion=avgCE, train.clm_weight=0.5`."""
    return ", ".join(f"{k}={_value_name(x)}" for k, x in v.overrides.items()) or "the base config"


# -- the sweep.json object -----------------------------------------------------------------------
def _iv(iv: Interval) -> dict:
    """One difference with its interval, as sweep.json keeps it."""
    return {"diff": iv.diff, "lo": iv.lo, "hi": iv.hi, "inside_noise": _inside_noise(iv.lo, iv.hi)}


def _inside_noise(lo: float, hi: float) -> bool | None:
    """sweep.json's verdict: True when the interval holds zero, None without an interval."""
    return {"noise": True, "none": None}.get(outcome(lo, hi), False)


def _pooled(iv: Interval, runs: Sequence[dict], what: str, g: str) -> dict:
    """Over seeds: mean ± std of the per-seed differences, the interval `iv` of the seed-averaged
    difference, and how many seeds' own intervals lie below / above zero."""
    per = [x[what][g] for x in runs if g in x[what]]
    said = [outcome(p["lo"], p["hi"]) for p in per]
    return {**mean_std([p["diff"] for p in per])._asdict(), "lo": iv.lo, "hi": iv.hi,
            "inside_noise": _inside_noise(iv.lo, iv.hi),
            "seeds_better": said.count("better"), "seeds_worse": said.count("worse")}


class _Groups:
    """The table's columns: the domains, `average` (the mean of the domains the sweep file names
    under `table.average`, each alike) and `overall` (every block pooled)."""

    def __init__(self, domains: Sequence[str], average: Sequence[str] | None):
        self.average = [d for d in average or [] if d in domains]
        self.names = [*domains, *([AVERAGE] if self.average else []), OVERALL]

    def bpb(self, rec: dict, g: str) -> float:
        if g == AVERAGE:
            return sum(bpb(rec, d) for d in self.average) / len(self.average)
        return bpb(rec, g)

    def compare(self, a: Sequence[dict], b: Sequence[dict], g: str) -> Interval:
        if g == AVERAGE:
            try:
                return compare_domains(a, b, self.average)[AVERAGE]
            except ValueError:  # no per-block figures: the difference of the means, no interval
                return Interval(sum(self.bpb(r, g) for r in a) / len(a) - sum(self.bpb(r, g) for r in b) / len(b),
                                math.nan, math.nan)
        return compare(a, b, g)

    def bpbs(self, recs: Sequence[dict]) -> dict[str, dict]:
        """Bits per byte per group, mean ± std over `recs` (one record per seed)."""
        return {g: mean_std([self.bpb(r, g) for r in recs])._asdict() for g in self.names}

    def one(self, rec: dict) -> dict[str, float]:
        return {g: self.bpb(rec, g) for g in self.names}


AVERAGE = "average"
BASELINE_KINDS = ("ensemble", "merge")  # the baselines compared with every variant


def summarize_sweep(sweep: Sweep, runs: Sequence[Run], control_keys: Mapping[str, str | None],
                    store: Mapping[str, int]) -> dict:
    """The `sweep.json` object: per run and per variant figures, differences with their CIs.

    Args:
        sweep: The sweep (its file, base, output directory, seeds, variants).
        runs: Its runs (`name`, `dir`, `variant`, `seed`); those without eval results of a fused
            model and a control (or, for a run without sources, of its trained model) are listed
            under `missing`.
        control_keys: Run name → the artifact key of its control (`train/clm`): variants whose
            runs share their controls share a control row.
        store: Complete artifacts in the sweep's store, per stage (`sweep.store_counts`).
    """
    from lmfuse.evaluate import BEST, load_results

    results = {r.name: load_results(r.dir) for r in runs}

    def has(r: Run, kind: str) -> bool:
        return bool(results[r.name]) and first_of_kind(results[r.name]["models"], kind) is not None

    done = [r for r in runs if has(r, "clm") and (has(r, "fused") or not r.cfg.fuses)]
    domains: list[str] = []
    for r in done:
        domains += [d for d in results[r.name]["domains"] if d not in domains]
    gr = _Groups(domains, getattr(sweep, "average", None))
    groups = gr.names
    doc: dict[str, Any] = {
        "sweep": str(sweep.source) if sweep.source else None, "base": sweep.base_label,
        "output_dir": str(sweep.out_dir), "seeds": sweep.seeds, "domains": domains, "groups": groups,
        "average_of": gr.average, "common": sweep.common, "n_boot": N_BOOT, "alpha": ALPHA,
        "bootstrap_seed": BOOT_SEED, "missing": [r.name for r in runs if r not in done], "variants": [],
        "controls": [], "references": {},
    }
    fusing = [r for r in done if r.cfg.fuses]
    first = results[fusing[0].name] if fusing else results[done[0].name] if done else None
    if first:
        doc.update(split=first.get("split"), blocks=first.get("blocks"))
        for kind in ("target", "source", *BASELINE_KINDS):  # results.json keeps no order: the target first
            for label, rec in sorted(first["models"].items()):
                if rec.get("kind") == kind:
                    doc["references"][label] = {"kind": kind, "bpb": gr.one(rec)}
    baselines = [label for label, ref in doc["references"].items() if ref["kind"] in BASELINE_KINDS]
    controls: dict[tuple, dict] = {}  # control keys per seed → the control row
    for v in sweep.variants:
        vruns = [r for r in done if r.variant.name == v.name]
        entry: dict[str, Any] = {"name": v.name, "set": v.overrides, "runs": []}
        doc["variants"].append(entry)
        if vruns and not vruns[0].cfg.fuses:  # trained without sources (λ = 1 alone): its figures only
            recs = [results[r.name]["models"][first_of_kind(results[r.name]["models"], "clm")] for r in vruns]
            entry.update(no_sources=True, trained=gr.bpbs(recs))
            entry["runs"] = [{"seed": r.seed, "run": r.name, "run_dir": str(r.dir), "trained": gr.one(x)}
                             for r, x in zip(vruns, recs)]
            continue
        if not vruns:
            continue
        recs = []
        for r in vruns:
            models = results[r.name]["models"]
            fused, clm = models[first_of_kind(models, "fused")], models[first_of_kind(models, "clm")]
            best = {g: s for g in groups if (s := best_source(models, OVERALL if g == AVERAGE else g))}
            # `train.keep_best`: both arms at their lowest validation loss (`fused@best`, `clm@best`).
            fb, cb = models.get(f"fused{BEST}"), models.get(f"clm{BEST}")
            recs.append((r, models, fused, clm, best, fb, cb))
            entry["runs"].append({
                "seed": r.seed, "run": r.name, "run_dir": str(r.dir), "blocks": results[r.name].get("blocks"),
                "control_key": control_keys.get(r.name),
                "fused": gr.one(fused), "control": gr.one(clm),
                "vs_control": {g: _iv(gr.compare([fused], [clm], g)) for g in groups},
                "best_source": best,
                "vs_best_source": {g: _iv(gr.compare([fused], [models[best[g]]], g)) for g in best},
                "vs_baselines": {b: {g: _iv(gr.compare([fused], [models[b]], g)) for g in groups}
                                 for b in baselines if b in models},
                **({"fused_best": gr.one(fb), "control_best": gr.one(cb),
                    "vs_control_best": {g: _iv(gr.compare([fb], [cb], g)) for g in groups}}
                   if fb and cb else {}),
            })
        fuseds, clms = [x[2] for x in recs], [x[3] for x in recs]
        best = recs[0][4]
        entry["fused"] = gr.bpbs(fuseds)
        entry["control"] = gr.bpbs(clms)
        entry["vs_control"] = {g: _pooled(gr.compare(fuseds, clms, g), entry["runs"], "vs_control", g)
                               for g in groups}
        entry["best_source"] = best
        entry["vs_best_source"] = {
            g: _pooled(gr.compare(fuseds, [m[best[g]] for _, m, *_ in recs], g), entry["runs"], "vs_best_source", g)
            for g in best}
        entry["vs_baselines"] = {
            b: {g: _pooled(gr.compare(fuseds, [m[b] for _, m, *_ in recs], g),
                           [{"x": x["vs_baselines"][b]} for x in entry["runs"]], "x", g) for g in groups}
            for b in baselines if all(b in m for _, m, *_ in recs)}
        fbs, cbs = [x[5] for x in recs], [x[6] for x in recs]
        if all(fbs) and all(cbs):  # every seed kept its best checkpoints
            entry["fused_best"] = gr.bpbs(fbs)
            entry["control_best"] = gr.bpbs(cbs)
            entry["vs_control_best"] = {g: _pooled(gr.compare(fbs, cbs, g), entry["runs"], "vs_control_best", g)
                                        for g in groups}
        ckey = tuple((x["seed"], x["control_key"]) for x in entry["runs"])
        row = controls.setdefault(ckey, {"variants": [], "bpb": entry["control"],
                                         "seeds": [x["seed"] for x in entry["runs"]],
                                         "keys": [x["control_key"] for x in entry["runs"]]})
        if "control_best" in entry:
            row["bpb_best"] = entry["control_best"]
        row["variants"].append(v.name)
    doc["controls"] = list(controls.values())
    doc["store"] = dict(store)
    return doc


# -- writing -------------------------------------------------------------------------------------
def _words(cells: Mapping[str, dict], groups: Sequence[str]) -> str:
    """Plain words for a row of intervals: where the variant is better, worse, or inside the noise."""
    said = {g: outcome(cells[g]["lo"], cells[g]["hi"]) for g in groups if g in cells}
    better, worse, no_ci = ([g for g, o in said.items() if o == x] for x in ("better", "worse", "none"))
    parts = []
    if better:
        parts.append("better on " + ", ".join(better))
    if worse:
        parts.append("worse on " + ", ".join(worse))
    if "noise" in said.values():
        parts.append("inside the noise elsewhere" if (better or worse) else "inside the noise everywhere")
    if no_ci:
        parts.append("no interval on " + ", ".join(no_ci) + " (one block or no per-block figures)")
    return "; ".join(parts) or "–"


def _ci_cell(c: dict) -> str:
    """`−0.0012 [−0.0035, +0.0010]`: one seed's difference and its CI."""
    return cell(c["diff"], c["lo"], c["hi"])


def _mean_cell(c: dict) -> str:
    """`−0.0012 ± 0.0008 [−0.0030, +0.0005]`: mean and std over seeds, CI of the seed-averaged difference."""
    return cell(c["mean"], c["lo"], c["hi"], c["std"])


def _bpb_cell(c: dict) -> str:
    """`1.2345 ± 0.0012`: bits per byte, mean ± std over seeds."""
    return cell(c["mean"], std=c["std"], sign=False)


_REF = {"vs_control": "its control (λ = 1, same seed)", "vs_best_source": "the best source of the domain",
        "vs_control_best": "its control (both @best)"}


def plot_differences(doc: dict, what: str, out: Path) -> Path | None:
    """Per-domain difference of every variant to `what` (`vs_control`, `vs_control_best` or `vs_best_source`).

    One marker per seed (marker shape = seed, colour = variant) with its 95% CI as an error bar;
    the dash is the mean over seeds. Below zero: the variant is better.
    """
    import numpy as np
    from matplotlib.figure import Figure

    variants = [v for v in doc["variants"] if v["runs"] and v.get(what)]
    groups = doc["groups"]
    if not variants:
        return None
    colors = ["#C44E52", "#4C72B0", "#55A868", "#DD8452", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
              "#CCB974", "#64B5CD"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    n = len(variants)
    fig = Figure(figsize=(max(7.5, 1.2 + len(groups) * (0.5 + 0.28 * n)), 4.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    width = 0.8 / n
    seeds = doc["seeds"]
    for i, v in enumerate(variants):
        color = colors[i % len(colors)]
        for j, run in enumerate(v["runs"]):
            k = seeds.index(run["seed"]) if run["seed"] in seeds else j
            off = (k - (len(seeds) - 1) / 2) * width * 0.6 / max(len(seeds), 1)
            xs, ys, lo, hi = [], [], [], []
            for gi, g in enumerate(groups):
                c = run[what].get(g)
                if c is None or not math.isfinite(c["diff"]):
                    continue
                xs.append(x[gi] - 0.4 + width * (i + 0.5) + off)
                ys.append(c["diff"])
                lo.append(c["diff"] - c["lo"] if math.isfinite(c["lo"]) else 0.0)
                hi.append(c["hi"] - c["diff"] if math.isfinite(c["hi"]) else 0.0)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=markers[k % len(markers)], color=color, ms=5, capsize=2,
                        lw=0.9, label=v["name"] if j == 0 else None)
        for gi, g in enumerate(groups):
            m = v[what].get(g, {}).get("mean", math.nan)
            if math.isfinite(m):
                cx = x[gi] - 0.4 + width * (i + 0.5)
                ax.plot([cx - width * 0.4, cx + width * 0.4], [m, m], color=color, lw=2)
    for k, s in enumerate(seeds):
        ax.plot([], [], markers[k % len(markers)], color="#555555", label=f"seed {s}")
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(len(groups) - 1.5, color="#BBBBBB", lw=0.8, ls=":")
    ax.set_xticks(x, groups)
    ref = _REF[what]
    ax.set_ylabel(f"Δ bits per byte vs {ref}\n(below 0 = better)")
    ax.set_title(f"Variant − {ref}\none marker per seed, 95% CI over held-out blocks; dash: mean", fontsize=10)
    ax.legend(fontsize=8, ncols=min(n + len(seeds), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(out)
    return out


def _seed_rows(variants: Sequence[dict], what: str, groups: Sequence[str]) -> list[list[str]]:
    """A row per (variant, seed) with each difference and its CI, then a mean ± std row per variant."""
    rows = []
    for v in variants:
        for r in v["runs"]:
            rows.append([f"`{v['name']}`", str(r["seed"]), *[_ci_cell(r[what][g]) for g in groups],
                         _words(r[what], groups)])
        if len(v["runs"]) > 1:
            rows.append([f"`{v['name']}`", "**mean ± std**", *[_mean_cell(v[what][g]) for g in groups],
                         _words(v[what], groups)])
    return rows


def render(doc: dict, out_dir: Path) -> Document:
    """The sweep table as a document (plots written to `out_dir`)."""
    groups = doc["groups"]
    finished = [v for v in doc["variants"] if v["runs"]]
    variants = [v for v in finished if not v.get("no_sources")]  # the fused ones
    d = Document()
    title = Path(doc["sweep"]).name if doc.get("sweep") else str(out_dir)
    d.h(f"lmfuse sweep: {title}", 1)
    if not finished:
        d.p("No run has finished yet.")
        return d
    def verdict(o: dict) -> str:
        said = {"noise": "inside the noise", "none": "no interval", "better": "better than the control",
                "worse": "worse than the control"}[outcome(o["lo"], o["hi"])]
        return (f"{_mean_cell(o)} ({said}; {o['seeds_better']} of {o['n']} seed(s) better, "
                f"{o['seeds_worse']} worse)")

    summary = [f"`{v['name']}` {verdict(v['vs_control']['overall'])}" for v in variants]
    if summary:
        d.p("**Variant − control, overall bits per byte** (mean ± std over seeds [95% CI of the seed-averaged "
            "difference]; below zero, the variant is better): " + "; ".join(summary) + ".")
    at_best = [v for v in variants if v.get("vs_control_best")]
    if at_best:
        d.p("**The same, both at their best checkpoints** (`train.keep_best`: each arm's weights at its lowest "
            "validation loss): " + "; ".join(f"`{v['name']}` {verdict(v['vs_control_best']['overall'])}"
                                               for v in at_best) + ".")
    blocks = doc.get("blocks")
    per = [r.get("blocks") for v in variants for r in v["runs"]]
    if doc.get("average_of"):
        d.p(f"**{AVERAGE}** = the mean of {', '.join(doc['average_of'])} (each domain alike; its interval "
            "resamples blocks within each domain); **overall** pools every block.")
    d.p(f"Base config `{doc['base']}`; {len(doc['variants'])} variant(s) × {len(doc['seeds'])} seed(s) "
        f"(`train.seed` ∈ {{{', '.join(map(str, doc['seeds']))}}}); held-out "
        f"{doc.get('split', 'validation')} blocks: {blocks}"
        + (" (the variants differ in their blocks: their prepare options differ)" if len(set(per)) > 1 else "")
        + f". Bits per byte = Σ NLL / (ln 2 · Σ bytes) over the blocks; lower is better. Intervals: 95% percentile "
        f"paired bootstrap over held-out blocks ({doc['n_boot']:,} resamples, seed {doc['bootstrap_seed']}); a "
        "difference whose interval includes zero is inside the noise of which blocks were held out."
        + (f" Not finished, left out: {', '.join(doc['missing'])}." if doc["missing"] else ""))

    d.h("Held-out bits per byte")
    d.p("Mean ± std over seeds. The control is the λ = 1 continual training on the same data and budget; "
        "it does not depend on fusion options, so variants that differ only in those share it.")
    rows = []
    for v in variants:
        rows.append([f"`{v['name']}`", _settings_text(v["set"]), *[_bpb_cell(v["fused"][g]) for g in groups]])
        if "fused_best" in v:
            rows.append([f"`{v['name']}` @best", "its best checkpoint", *[_bpb_cell(v["fused_best"][g]) for g in groups]])
    many = len(doc["controls"]) > 1
    for c in doc["controls"]:
        who = f" for {', '.join(c['variants'])}" if many else ""
        rows.append([f"control (λ = 1){who}", "", *[_bpb_cell(c["bpb"][g]) for g in groups]])
        if "bpb_best" in c:
            rows.append([f"control (λ = 1){who} @best", "its best checkpoint",
                         *[_bpb_cell(c["bpb_best"][g]) for g in groups]])
    for v in finished:
        if v.get("no_sources"):
            rows.append([f"`{v['name']}` (λ = 1, no sources; on its own run's held-out blocks)", _settings_text(v["set"]),
                         *[_bpb_cell(v["trained"][g]) for g in groups]])
    roles = {"target": "target, before training", "source": "source", "ensemble": "ensemble", "merge": "merge"}
    for label, ref in doc["references"].items():
        rows.append([f"{label} ({roles[ref['kind']]})", "", *[cell(ref["bpb"][g], sign=False) for g in groups]])
    d.table(["model", "settings", *groups], rows, text=(0, 1))

    if not variants:
        return _runs_section(d, doc, finished, out_dir)
    d.h("Variant − control (same seed)")
    d.p("Per seed: the difference with its 95% CI. Mean row: mean ± std over seeds, then the 95% CI of the "
        "seed-averaged difference (per-block NLL averaged over seeds, then resampled by block).")
    d.table(["variant", "seed", *groups, "in words"], _seed_rows(variants, "vs_control", groups), text=(0, 1, -1))
    p = plot_differences(doc, "vs_control", out_dir / "sweep_vs_control.png")
    if p:
        d.img(p, "Variant − its same-seed control per domain (95% CI over held-out blocks; one marker per seed)")

    if at_best:
        d.h("Variant − control, both at their best checkpoints")
        d.p("With `train.keep_best`, each arm is also scored with its weights at its lowest validation loss. A "
            "fused model that only overfits less than the control is level with it here; this is the "
            "comparison early stopping cannot explain away. Same layout as above.")
        d.table(["variant", "seed", *groups, "in words"], _seed_rows(at_best, "vs_control_best", groups),
                text=(0, 1, -1))
        p = plot_differences(doc, "vs_control_best", out_dir / "sweep_vs_control_best.png")
        if p:
            d.img(p, "Variant − its same-seed control, both at their best checkpoints (95% CI; one marker per seed)")

    if any(v.get("vs_best_source") for v in variants):
        d.h("Variant − best source of each domain")
        best = variants[0]["best_source"]
        d.p("The source with the lowest bits per byte in each domain (overall: over all domains): "
            + ", ".join(f"{g}: `{s}`" for g, s in best.items()) + ". Mean ± std over seeds [95% CI of the "
            "seed-averaged difference]; below zero, the variant beats that source.")
        rows = []
        for v in variants:
            cells = v["vs_best_source"]
            rows.append([f"`{v['name']}`", *[_mean_cell(cells[g]) if g in cells else "–" for g in groups],
                         _words(cells, groups)])
        d.table(["variant", *groups, "in words"], rows, text=(0, -1))
        p = plot_differences(doc, "vs_best_source", out_dir / "sweep_vs_best_source.png")
        if p:
            d.img(p, "Variant − best source of each domain (95% CI over held-out blocks; one marker per seed)")

    with_baselines = [v for v in variants if v.get("vs_baselines")]
    if with_baselines:
        d.h("Variant − baselines")
        d.p("Each variant − each probability ensemble and parameter merge of the runs (`baselines` in the "
            "config). Mean ± std over seeds [95% CI of the seed-averaged difference]; below zero, the variant "
            "is better.")
        rows = []
        for v in with_baselines:
            for b, cells in v["vs_baselines"].items():
                rows.append([f"`{v['name']}`", b, *[_mean_cell(cells[g]) for g in groups], _words(cells, groups)])
        d.table(["variant", "baseline", *groups, "in words"], rows, text=(0, 1, -1))
    return _runs_section(d, doc, finished, out_dir)


def _runs_section(d: Document, doc: dict, variants: Sequence[dict], out_dir: Path) -> Document:
    d.h("Runs")
    rows = []
    for v in variants:
        for r in v["runs"]:
            rel = os.path.relpath(Path(r["run_dir"]) / "report" / "report.html", out_dir)
            rows.append([r["run"], f"`{v['name']}`", str(r["seed"]), f"[report]({rel})"])
    d.table(["run", "variant", "seed", "report"], rows, text=(0, 1, 3))
    store = doc.get("store", {})
    d.p("Shared artifacts in `store/` (each made once, linked from every run that needs it): "
        + ", ".join(f"{k} {n}" for k, n in store.items()) + ".")
    return d


def _settings_text(s: dict) -> str:
    return ", ".join(f"`{k}={_value_name(v)}`" for k, v in s.items()) or "base"


def write_outputs(doc: dict, out_dir: str | Path) -> Path:
    """Write `sweep.json`, `sweep.md`, `sweep.html` and the PNGs; return the `.md` path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "sweep.json", doc)  # NaN written as null
    d = render(doc, out_dir)
    md = out_dir / "sweep.md"
    atomic_write_bytes(md, d.markdown().encode())
    title = f"lmfuse sweep: {Path(doc['sweep']).name if doc.get('sweep') else out_dir.name}"
    atomic_write_bytes(out_dir / "sweep.html", d.html(title, embed_images=False).encode())
    return md
