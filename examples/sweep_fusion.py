"""Sweep the fusion knobs on the demo's data: which options make fusion beat the control?

Runs after `lmfuse demo -o DIR` (it reuses DIR's extraction, vocab map and alignment; only
training and evaluation run again) and writes a Markdown table of held-out bits per byte.

    python examples/sweep_fusion.py --demo-dir lmfuse-demo --out docs/fusion_sweep.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmfuse.config import parse_config
from lmfuse.demo import demo_config
from lmfuse.evaluate import run_eval
from lmfuse.pipeline import run_pipeline
from lmfuse.train import run_train

VARIANTS: dict[str, dict] = {
    "demo: minCE, sequence, per-byte quality, λ = 0.9": {},
    "λ = 0.5": {"clm_weight": 0.5},
    "token level": {"level": "token"},
    "avgCE": {"fusion": "avgCE"},
    "target not a candidate": {"include_target": False},
    "mass outside top-k on the gold token": {"outside_topk": "gold"},
    "paper's per-token CE quality": {"quality": "ce_per_token"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", type=Path, default=Path("lmfuse-demo"))
    ap.add_argument("--out", type=Path, default=Path("fusion_sweep.md"))
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--control-seed", type=int, default=1, help="also train the control with this data seed (noise)")
    a = ap.parse_args()

    rows: dict[str, dict] = {}
    base = demo_config(a.demo_dir)
    for label, train in VARIANTS.items():
        if a.only and label not in a.only:
            continue
        data = json.loads(json.dumps(base))
        data["train"].update({**train, "eval_every": 0, "control": True})
        cfg, problems = parse_config(data)
        assert not problems, problems
        t0 = time.time()
        run_pipeline(cfg, report=False, log=lambda *x: None)
        res = run_eval(cfg)["models"]
        rows[label] = {"fused": res["fused"], "clm": res["clm"], "minutes": (time.time() - t0) / 60}
        print(f"{label}: fused {res['fused']['overall']['bpb']:.4f} vs clm {res['clm']['overall']['bpb']:.4f}", flush=True)
    # The control retrained on another shuffle of the same data: how big is noise?
    data = json.loads(json.dumps(base))
    data["output_dir"] = str(a.demo_dir / f"control-seed{a.control_seed}")
    data["train"].update({"seed": a.control_seed, "eval_every": 0})
    for stage in ("prepare", "extract", "vocab_map", "align"):
        src, dst = a.demo_dir / stage, Path(data["output_dir"]) / stage
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())
    cfg, _ = parse_config(data)
    run_train(cfg, control=True)
    label = f"clm-seed{a.control_seed}"
    noise = run_eval(cfg, models=[(label, cfg.run_dir / "train" / "clm")])["models"][label]

    domains = list(next(iter(rows.values()))["clm"]["domains"])
    clm = next(iter(rows.values()))["clm"]
    lines = ["| variant | " + " | ".join(domains) + " | overall |", "|---|" + "---:|" * (len(domains) + 1)]

    def fmt(m, ref):
        return " | ".join(f"{m['domains'][d]['bpb'] - ref['domains'][d]['bpb']:+.4f}" for d in domains) + \
            f" | **{m['overall']['bpb'] - ref['overall']['bpb']:+.4f}**"

    for label, r in rows.items():
        lines.append(f"| fused, {label} | {fmt(r['fused'], clm)} |")
    lines.append(f"| control retrained with data seed {a.control_seed} (noise) | {fmt(noise, clm)} |")
    head = (f"Held-out bits per byte of each variant minus the λ = 1 control's ({clm['overall']['bpb']:.4f} overall); "
            "below zero = fusion helped.\n\n")
    a.out.write_text(head + "\n".join(lines) + "\n")
    print(a.out.read_text())


if __name__ == "__main__":
    main()
