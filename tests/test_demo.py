import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_on_the_real_models(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "demo", "--quick", "-o", str(out)],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())["models"]
    assert set(results) >= {"smollm2-135m", "gemma3-270m", "fused", "clm"}
    domains = set(results["smollm2-135m"]["domains"])
    assert domains == {"code", "docs", "legal", "literature"}
    # Real pretrained models, not random weights: about one bit per byte, not eight.
    for r in results.values():
        assert 0.3 < r["overall"]["bpb"] < 2.0
    # Gemma-3-270M knows the King James Bible better than SmolLM2-135M (see docs/results.md).
    assert results["gemma3-270m"]["domains"]["literature"]["bpb"] < results["smollm2-135m"]["domains"]["literature"]["bpb"]
    report = out / "report"
    assert (report / "report.html").stat().st_size > 10_000
    assert (report / "bpb.png").exists()
    align = json.loads((out / "align" / "gemma3-270m" / "manifest.json").read_text())
    assert 0.8 < align["aligned_fraction"] < 1.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "train" / "fused")
    tok = AutoTokenizer.from_pretrained(out / "train" / "fused")
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
