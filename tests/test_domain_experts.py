"""The domain-expert experiment (experiments/domain_experts/run.py) end to end at tiny scale (slow).

`--tiny` runs every step (data, experts, sweep, table) with lmfuse's tiny test model on a small
slice of the development corpora in ../shared/corpora, which only the development checkout has.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "domain_experts" / "run.py"
CORPORA = ROOT.parent / "shared" / "corpora"
DOMAINS = ("code", "docs", "legal", "literature")


@pytest.mark.slow
def test_tiny_chain_writes_the_table(tmp_path):
    missing = [d for d in DOMAINS if not (CORPORA / f"{d}.jsonl").exists()]
    if missing:
        pytest.skip(f"the development corpora are not here ({CORPORA}: no {', '.join(missing)}); "
                    "the experiment reads ../shared/corpora, which only the development checkout has")
    out = tmp_path / "de"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stats = json.loads((out / "data" / "stats.json").read_text())
    for d in DOMAINS:
        s = stats["domains"][d]
        assert s["heldout"]["blocks"] >= stats["settings"]["heldout_blocks"]
        assert s["expert"]["tokens"] >= stats["settings"]["expert_tokens"]
    assert stats["totals"]["fusion_train_tokens"] <= stats["settings"]["fusion_tokens_max"]
    lines = (out / "data" / "fusion.jsonl").read_text().splitlines()
    assert {json.loads(x)["split"] for x in lines} == {"train", "validation"}

    table = (out / "table7.md").read_text()
    header = next(x for x in table.splitlines() if x.startswith("| domain |"))
    for col in ("base", *(f"expert {d}" for d in DOMAINS), "ensemble", "merge (linear)",
                "merge (task arithmetic)", "control", "fused minCE", "fused avgCE"):
        assert f"| {col} |" in header, col
    rows = {x.split("|")[1].strip() for x in table.splitlines() if x.startswith("| ")}
    assert {*DOMAINS, "**average**"} <= rows
    assert "## At the best validation checkpoint" in table
    assert "## Fused − control (same seed)" in table
    assert "### Fused − ensemble, end of the budget" in table and "### Fused @best − merge (linear)" in table

    # a second run finds every step complete and writes the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "finished earlier and current; skipped" in again.stdout
    assert (out / "table7.md").read_text() == table
