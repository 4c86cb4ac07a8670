"""The report: files and PNGs from a synthetic run directory; tolerant of missing parts."""

from __future__ import annotations

import json
import math
import random

from lmfuse.report import read_log, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def make_synthetic_run(run):
    """A run directory with eval results, training logs, align/vocab-map manifests and timings."""
    rng = random.Random(0)
    domains = ["code", "docs", "licences", "literature"]
    base = {"code": 0.62, "docs": 0.91, "licences": 0.95, "literature": 1.14}
    models = {"smollm2": ("target", 0.0), "gemma3": ("source", -0.1), "fused": ("fused", -0.021),
              "clm": ("clm", -0.018), "ensemble-a-b": ("ensemble", 0.01)}
    res = {"split": "validation", "data_hash": "x", "blocks": 40, "domains": domains, "models": {}}
    for label, (kind, shift) in models.items():
        doms = {d: {"bpb": base[d] + shift + rng.uniform(-0.01, 0.01), "ppl": 12.0 + shift * 10, "tokens": 1000,
                    "bytes": 4000, "nll": 1.0, "blocks": 10} for d in domains}
        overall = {"bpb": sum(v["bpb"] for v in doms.values()) / 4, "ppl": 11.5, "tokens": 4000, "bytes": 16000,
                   "nll": 4.0, "blocks": 40}
        res["models"][label] = {"domains": doms, "overall": overall, "kind": kind, "seconds": 3.0}
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps(res))
    (run / "eval" / "manifest.json").write_text(json.dumps({"stage": "eval", "seconds": 42.0}))
    for name, lam in (("fused", 0.9), ("clm", 1.0)):
        d = run / "train" / name
        d.mkdir(parents=True)
        lines = []
        for step in range(1, 201):
            clm = 2.5 * math.exp(-step / 80) + 1.2 + rng.gauss(0, 0.05)
            fusion = 3.0 * math.exp(-step / 60) + 1.5 + rng.gauss(0, 0.05)
            loss = lam * clm + (1 - lam) * fusion
            lines.append({"step": step, "loss": loss, "clm": clm, "fusion": fusion if lam < 1 else 0.0, "lr": 1e-5})
            if step % 50 == 0:
                lines.append({"step": step, "eval_loss": 1.3 + 1.5 * math.exp(-step / 80) + (0.01 if lam == 1 else 0)})
        (d / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 20")  # cut last line
        (d / "manifest.json").write_text(json.dumps({"stage": "train", "seconds": 800.0 if lam < 1 else 610.0}))
    for src, frac, mass in (("gemma3", 0.89, 0.77), ("coder", 0.93, 0.85)):
        (run / "align" / src).mkdir(parents=True)
        (run / "align" / src / "manifest.json").write_text(json.dumps(
            {"stage": "align", "seconds": 30.5, "aligned_fraction": frac, "mapped_mass_fraction": mass,
             "aligned_fraction_per_domain": {"code": frac - 0.05, "prose": frac + 0.03},
             "n_shards": 2, "align_seconds": 30.1, "target_positions": 51234}))
        (run / "vocab_map" / src).mkdir(parents=True)
        (run / "vocab_map" / src / "manifest.json").write_text(json.dumps(
            {"stage": "vocab_map", "seconds": 4.2, "coverage": {"exact_fraction": 0.6, "mapped_fraction": 0.97}}))
    for m in ("smollm2", "gemma3", "coder"):
        (run / "extract" / m).mkdir(parents=True)
        (run / "extract" / m / "manifest.json").write_text(json.dumps({"stage": "extract", "seconds": 120.0}))
    (run / "prepare").mkdir()
    (run / "prepare" / "manifest.json").write_text(json.dumps({"stage": "prepare", "seconds": 2.5}))
    return run


def test_report_full_run(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    md = write_report(run)
    text = md.read_text()
    for png in ("bpb.png", "bpb_delta.png", "loss.png", "align.png", "vocab_map.png", "timings.png"):
        p = run / "report" / png
        assert p.read_bytes().startswith(PNG), png
        assert f"]({png})" in text
    assert "aligned_fraction" in text and "gemma3" in text
    html = (run / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    assert "not run" not in text


def test_report_tolerates_empty_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    md = write_report(run)
    text = md.read_text()
    assert "Evaluation: not run" in text
    assert "`train/fused`: not run" in text and "`align`: not run" in text
    assert (run / "report" / "report.html").exists()
    assert not list((run / "report").glob("*.png"))


def test_read_log_skips_broken_lines(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "loss": NaN}\n')
    train, val = read_log(p)
    assert [r["step"] for r in train] == [1]
    assert [r["step"] for r in val] == [2]
