"""The domain-expert experiment end to end at tiny scale (slow): its data builder
(experiments/domain_experts/data.py --tiny: lmfuse's tiny test model on a small slice of the
development corpora in ../shared/corpora, which only the development checkout has), then
`lmfuse sweep` on the sweep file it binds (tiny.yaml: the experts, then the fusion runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "domain_experts" / "data.py"
CORPORA = ROOT.parent / "shared" / "corpora"
DOMAINS = ("code", "docs", "legal", "literature")


@pytest.mark.slow
def test_tiny_chain_writes_the_table(tmp_path):
    missing = [d for d in DOMAINS if not (CORPORA / f"{d}.jsonl").exists()]
    if missing:
        pytest.skip(f"the development corpora are not here ({CORPORA}: no {', '.join(missing)}); "
                    "the experiment reads ../shared/corpora, which only the development checkout has")
    out = tmp_path / "de"
    data = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny"], capture_output=True, text=True,
                          timeout=600)
    assert data.returncode == 0, data.stdout[-3000:] + data.stderr[-3000:]
    stats = json.loads((out / "data" / "stats.json").read_text())
    for d in DOMAINS:
        s = stats["domains"][d]
        assert s["heldout"]["blocks"] >= stats["settings"]["heldout_blocks"]
        assert s["expert"]["tokens"] >= stats["settings"]["expert_tokens"]
    assert stats["totals"]["fusion_train_tokens"] <= stats["settings"]["fusion_tokens_max"]
    lines = (out / "data" / "fusion.jsonl").read_text().splitlines()
    assert {json.loads(x)["split"] for x in lines} == {"train", "validation"}

    cmd = [sys.executable, "-m", "lmfuse.cli", "sweep", str(out / "sweep.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep = out / "sweep"
    for d in DOMAINS:  # each expert is a run without sources, trained on its own domain only
        res = json.loads((sweep / "runs" / f"expert-{d}-s0" / "eval" / "results.json").read_text())
        assert set(res["models"]) == {"smollm2", "clm"} and res["domains"] == [d]
    doc = json.loads((sweep / "parts" / "fusion" / "sweep.json").read_text())
    assert doc["groups"] == [*DOMAINS, "average", "overall"] and not doc["missing"]
    refs = {label: r["kind"] for label, r in doc["references"].items()}
    assert refs == {"smollm2": "target", **{f"expert-{d}": "source" for d in DOMAINS},
                    "ensemble-expert-code-expert-docs-expert-legal-expert-literature": "ensemble",
                    "merge-linear": "merge", "merge-task-arithmetic": "merge"}
    for v in doc["variants"]:  # minCE, avgCE: fused − control and − every baseline, over seeds 0 and 1
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert set(v["vs_baselines"]) == {label for label, k in refs.items() if k in ("ensemble", "merge")}
        assert "vs_control_best" in v
    table = (sweep / "sweep.md").read_text()  # the whole file: experts, fusion runs, baselines
    for row in ("`expert-code` (λ = 1, no sources;", "merge-linear (merge)", "smollm2 (target, before training)"):
        assert row in table
    assert "## Variant − baselines" in table
    assert done.stdout.count("merge: building") == 2  # each merge of the experts is made once, for every run

    # a second run finds every run finished and writes the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier and current; skipped") == 8
    assert (sweep / "sweep.md").read_text() == table
