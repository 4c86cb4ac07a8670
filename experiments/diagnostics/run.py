"""Fusion-target diagnostics on the demo's data: can the stored targets be trusted?

For SmolLM2-135M (target) and Gemma-3-270M (source) on the demo corpus and blocks (the config
`lmfuse demo` uses), for each stored form (`topk` k = 10, `sampled` 64 draws) and each token
rule (`map`, `consistent`), this runs prepare → extract → vocab-map → align (no training) and
prints per model/source and domain: the probability mass the stored distribution keeps, how
often it holds the gold next token, and the alignment diagnostics of docs/alignment.md.

    python experiments/diagnostics/run.py --out runs/diagnostics      # ≈ 10 min on 2 CPU cores

Writes OUT/diagnostics.json and OUT/diagnostics.md. Extraction runs once per stored form; the
token rules reuse it (only align runs again).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from lmfuse.config import load_config
from lmfuse.demo import demo_config
from lmfuse.pipeline import run_align, run_extract, run_prepare, run_vocab_map

FORMS = {"topk": {"distribution": "topk", "top_k": 10}, "sampled": {"distribution": "sampled", "samples": 64}}
RULES = ("map", "consistent")


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def run(out: Path) -> dict:
    results: dict = {"extract": {}, "align": {}}
    for form, opts in FORMS.items():
        run_dir = out / form
        data = demo_config(run_dir)
        data["extract"] = {**data["extract"], **opts}
        for rule in RULES:
            data["align"] = {**data["align"], "token_rule": rule}
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / f"config-{rule}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            cfg = load_config(path)
            run_prepare(cfg)
            for m in cfg.models:
                man = run_extract(cfg, m.name)
                results["extract"].setdefault(form, {})[m.name] = {
                    "all": {k: man[k] for k in ("mass_kept", "gold_in_stored_fraction", "entries_per_position")},
                    **man["diagnostics_per_domain"], "bytes_per_token": man["bytes_per_token"]}
            src = cfg.sources[0].name
            run_vocab_map(cfg, src)
            man = run_align(cfg, src, overwrite=True)  # the other rule's artifact is replaced
            results["align"].setdefault(form, {})[rule] = {"all": man["diagnostics"], **man["diagnostics_per_domain"]}
    return results


def markdown(res: dict) -> str:
    lines = ["### Stored distributions (extract)", "",
             "| form | model | domain | mass kept | gold stored | entries/position |", "|---|---|---|---:|---:|---:|"]
    for form, models in res["extract"].items():
        for model, doms in models.items():
            for dom, d in doms.items():
                if dom == "bytes_per_token":
                    continue
                lines.append(f"| {form} | {model} | {dom} | {_pct(d['mass_kept'])} | "
                             f"{_pct(d['gold_in_stored_fraction'])} | {d['entries_per_position']:.1f} |")
    lines += ["", "### Gemma-3 → SmolLM2 after alignment", "",
              "| form | token rule | domain | aligned | next token ends together | mapped mass | exact | "
              "on tokens the target would not write | moved to gold | dropped | gold stored |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for form, rules in res["align"].items():
        for rule, doms in rules.items():
            for dom, d in doms.items():
                lines.append(f"| {form} | {rule} | {dom} | {_pct(d['aligned_fraction'])} | {_pct(d['next_end_same'])} | "
                             f"{_pct(d['mapped_mass'])} | {_pct(d['exact_mass'])} | {_pct(d['not_target_token_mass'])} | "
                             f"{_pct(d['to_gold_mass'])} | {_pct(d['dropped_mass'])} | {_pct(d['gold_in_stored'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/diagnostics", help="where the runs and the tables go")
    out = Path(ap.parse_args().out).resolve()
    res = run(out)
    (out / "diagnostics.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "diagnostics.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
