"""The cross-architecture experiment end to end at tiny scale (slow): its data builder
(experiments/cross_arch/data.py --tiny: lmfuse's tiny test models, a byte-level BPE target and an
SPM-style source, on a small slice of the development corpora in ../shared/corpora, which only the
development checkout has, and Debian's `fortunes` package as the held-out-only domain), then
`lmfuse sweep` on the sweep file it binds (tiny.yaml: every part).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "cross_arch" / "data.py"
CORPORA = ROOT.parent / "shared" / "corpora"


@pytest.mark.slow
def test_tiny_chain_writes_the_tables(tmp_path):
    if not all((CORPORA / f"{d}.jsonl").exists() for d in ("code", "legal")):
        pytest.skip(f"the development corpora are not here ({CORPORA}); only the development checkout has them")
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("the held-out-only domain comes from Debian's `fortunes` package: needs apt-get and dpkg-deb")
    out = tmp_path / "ca"
    data = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny"], capture_output=True, text=True,
                          timeout=600)
    if "could not fetch Debian's `fortunes` package" in data.stderr:
        pytest.skip("no access to the Debian package archive")
    assert data.returncode == 0, data.stdout[-3000:] + data.stderr[-3000:]
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert set(stats["domains"]) == {"code", "legal", "fortunes"}
    assert "train" not in stats["domains"]["fortunes"]  # held out only
    for d in ("code", "legal", "fortunes"):
        assert stats["domains"][d]["validation"]["blocks"] >= stats["settings"]["heldout_blocks"]

    cmd = [sys.executable, "-m", "lmfuse.cli", "sweep", str(out / "sweep.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "sweep" / "sweep.json").read_text())  # the whole file: every part's runs
    assert not doc["missing"]
    assert doc["groups"] == ["code", "fortunes", "legal", "average", "overall"]
    runs = {r["run"]: r for v in doc["variants"] for r in v["runs"]}
    assert set(runs) == {"baseline-s0", "sampled-s0", "lambda-0-s0", "epochs-2-s0", "baseline-s1"}
    for r in runs.values():
        for col in ("code", "legal", "average", "fortunes"):
            c = r["vs_control"][col]
            assert c["lo"] <= c["diff"] <= c["hi"]
            assert c["diff"] == pytest.approx(r["fused"][col] - r["control"][col], abs=1e-9)
        assert "vs_control_best" in r
        assert r["fused"]["average"] == pytest.approx((r["fused"]["code"] + r["fused"]["legal"]) / 2)
    # a variant run with several seeds: seed means and the interval of the seed-averaged difference
    (baseline,) = [v for v in doc["variants"] if v["name"] == "baseline"]
    assert [r["seed"] for r in baseline["runs"]] == [0, 1]
    for col in ("code", "legal", "average", "fortunes"):
        pooled = baseline["vs_control"][col]
        assert pooled["lo"] <= pooled["mean"] <= pooled["hi"]
        assert pooled["mean"] == pytest.approx(sum(r["vs_control"][col]["diff"] for r in baseline["runs"]) / 2)
    for part in ("screen", "epochs", "confirm"):  # each part's own table
        md = (out / "sweep" / "parts" / part / "sweep.md").read_text()
        assert "](sweep_vs_control.png)" in md and (out / "sweep" / "parts" / part / "sweep_vs_control.png").exists()
    table = (out / "sweep" / "sweep.md").read_text()
    assert "| model | settings | code | fortunes | legal | average | overall |" in table
    assert "## Variant − control, both at their best checkpoints" in table

    # a second run finds every run finished and writes the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier and current; skipped") == 6  # baseline-s0 is in two parts
    assert (out / "sweep" / "sweep.md").read_text() == table
