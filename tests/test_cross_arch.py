"""The cross-architecture experiment (experiments/cross_arch/run.py) end to end at tiny scale (slow).

`--tiny` runs every step and part with lmfuse's tiny test models (a byte-level BPE target and an
SPM-style source) on a small slice of the development corpora in ../shared/corpora, which only
the development checkout has, and Debian's `fortunes` package as the held-out-only domain.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "cross_arch" / "run.py"
CORPORA = ROOT.parent / "shared" / "corpora"


@pytest.mark.slow
def test_tiny_chain_writes_the_table(tmp_path):
    if not all((CORPORA / f"{d}.jsonl").exists() for d in ("code", "legal")):
        pytest.skip(f"the development corpora are not here ({CORPORA}); only the development checkout has them")
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("the held-out-only domain comes from Debian's `fortunes` package: needs apt-get and dpkg-deb")
    out = tmp_path / "ca"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if "could not fetch Debian's `fortunes` package" in done.stdout:
        pytest.skip("no access to the Debian package archive")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stats = json.loads((out / "data" / "stats.json").read_text())
    assert set(stats["domains"]) == {"code", "legal", "fortunes"}
    assert "train" not in stats["domains"]["fortunes"]  # held out only
    for d in ("code", "legal", "fortunes"):
        assert stats["domains"][d]["validation"]["blocks"] >= stats["settings"]["heldout_blocks"]

    doc = json.loads((out / "cross_arch.json").read_text())
    runs = {r["run"]: r for r in doc["runs"]}
    assert set(runs) == {"baseline-s0", "sampled-s0", "lambda-0-s0", "epochs-2-s0", "baseline-s1"}
    assert not doc["missing"]
    for r in runs.values():
        for col in ("code", "legal", "average", "fortunes"):
            diff, lo, hi = r["vs_control"][col]
            assert lo <= diff <= hi
            assert diff == pytest.approx(r["fused"][col] - r["control"][col], abs=1e-9)
        assert "vs_control_best" in r
    # a variant run with several seeds gets one pooled row: seed means and the seed-averaged interval
    (pooled,) = doc["pooled"]
    assert pooled["variant"] == "baseline" and pooled["seeds"] == [0, 1]
    seeds = [runs["baseline-s0"], runs["baseline-s1"]]
    for col in ("code", "legal", "average", "fortunes"):
        assert pooled["fused"][col] == pytest.approx(sum(r["fused"][col] for r in seeds) / 2, abs=1e-12)
        diff, lo, hi = pooled["vs_control"][col]
        assert lo <= diff <= hi
        assert diff == pytest.approx(sum(r["vs_control"][col][0] for r in seeds) / 2, abs=1e-3)
        assert 0 <= pooled["below_zero"][col] <= 2
    # each part's own sweep table is kept, and the combined table names every column
    for part in ("screen", "epochs", "confirm"):
        md = (out / f"{part}.md").read_text()
        assert f"]({part}_sweep_vs_control.png)" in md and (out / f"{part}_sweep_vs_control.png").exists()
    table = (out / "cross_arch.md").read_text()
    assert "| model | code | legal | average | fortunes |" in table
    assert "## At the best validation checkpoint" in table
    assert "| `baseline` | 0, 1 |" in table

    # a second run finds everything complete and writes the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "cross_arch.md").read_text() == table
