"""The report: files and PNGs from a synthetic run directory; tolerant of missing parts."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import stat
import subprocess

import pytest

from lmfuse.evaluate import per_block as per_block_records
from lmfuse.evaluate import summarize
from lmfuse.report import compare, read_log, write_report
from lmfuse.stats import paired_bootstrap

PNG = b"\x89PNG\r\n\x1a\n"


def _align_diag(frac, mass):
    return {"aligned_fraction": frac, "next_end_same": 0.81, "mapped_mass": mass, "exact_mass": mass - 0.2,
            "not_target_token_mass": 0.0, "to_gold_mass": 0.12, "dropped_mass": 0.03, "gold_in_stored": 0.7}


def make_synthetic_run(run, per_block: bool = True, domains: list[str] | None = None, per_domain: int = 10):
    """A run directory with eval results, training logs, align/vocab-map manifests and timings.

    The eval results are well formed: per-block NLL and bytes for every model (10 blocks per
    domain), and summaries computed from them as `lmfuse eval` does.
    """
    rng = random.Random(0)
    domains = domains or ["code", "docs", "licences", "literature"]
    base = {d: 0.6 + 0.5 * rng.random() for d in domains}
    models = {"smollm2": ("target", 0.0), "gemma3": ("source", -0.1), "fused": ("fused", -0.021),
              "clm": ("clm", -0.018), "ensemble-a-b": ("ensemble", 0.01)}
    blocks = [(i, d) for i, d in enumerate(d for d in domains for _ in range(per_domain))]
    hardness = {i: rng.gauss(0, 0.05) for i, _ in blocks}  # shared by every model: the pairing matters
    nbytes = {i: rng.randint(300, 900) for i, _ in blocks}
    res = {"split": "validation", "data_hash": "x", "blocks": len(blocks), "domains": domains, "models": {}}
    for label, (kind, shift) in models.items():
        bos = label == "gemma3"  # a BOS model scores every byte; the others not their first token's
        rows = []
        for i, d in blocks:
            nb = nbytes[i] - (0 if bos else 3)
            bpb = base[d] + shift + hardness[i] + rng.gauss(0, 0.004)
            rows.append((bpb * math.log(2) * nb, nb // 4, nb))
        rec = summarize(rows, [d for _, d in blocks])
        rec.update(kind=kind, seconds=3.0)
        if per_block:
            rec["per_block"] = per_block_records(rows, [{"block_id": i, "domain": d} for i, d in blocks])
        res["models"][label] = rec
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
        # The fields align.py and vocabmap.py write, one per domain for the per-domain ones.
        (run / "align" / src).mkdir(parents=True)
        (run / "align" / src / "manifest.json").write_text(json.dumps(
            {"stage": "align", "seconds": 30.5, "source": src, "target": "smollm2", "method": "offsets",
             "top_k": 10, "shard_size": 16, "n_shards": 2, "n_blocks": 96, "target_positions": 51234,
             "aligned_positions": round(51234 * frac), "aligned_fraction": frac, "mapped_mass_fraction": mass,
             "exact_mass_fraction": mass - 0.2,
             "aligned_fraction_per_domain": {d: round(frac - 0.05 + 0.03 * k, 6) for k, d in enumerate(domains)},
             "token_rule": "consistent", "diagnostics": _align_diag(frac, mass),
             "diagnostics_per_domain": {d: _align_diag(frac - 0.01 * k, mass) for k, d in enumerate(domains)},
             "align_seconds": 30.1}))
        (run / "vocab_map" / src).mkdir(parents=True)
        (run / "vocab_map" / src / "manifest.json").write_text(json.dumps(
            {"stage": "vocab_map", "seconds": 4.2, "source": src, "target": "smollm2", "method": "retokenize",
             "source_vocab_size": 262144, "target_vocab_size": 49152, "map_seconds": 4.0,
             "coverage": {"unmapped": 0.0, "exact": 0.176, "mined": 0.0, "retokenize": 0.82, "special": 0.004}}))
    for m in ("smollm2", "gemma3", "coder"):
        (run / "extract" / m).mkdir(parents=True)
        (run / "extract" / m / "manifest.json").write_text(json.dumps(
            {"stage": "extract", "seconds": 120.0, "distribution": "topk", "top_k": 10, "mass_kept": 0.713,
             "gold_in_stored_fraction": 0.664, "entries_per_position": 10.0,
             "diagnostics_per_domain": {d: {"mass_kept": 0.7 + 0.01 * k, "gold_in_stored_fraction": 0.6,
                                            "entries_per_position": 10.0} for k, d in enumerate(domains)}}))
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


def test_report_shows_whether_the_targets_can_be_trusted(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    text = write_report(run).read_text()
    section = text.split("## Can the fusion targets be trusted?")[1].split("\n## ")[0]
    # Per model and domain (extract), per source, rule and domain (align), with the figures.
    assert "| smollm2 | top-10 | all | 71.3% | 66.4% | 10.0 |" in section
    assert "| smollm2 | top-10 | docs | 71.0% |" in section
    assert "| gemma3 | consistent | all | 89.0% | 81.0% | 77.0% | 0.0% | 12.0% | 3.0% | 70.0% |" in section
    assert section.count("| coder | consistent |") == 5  # four domains + all


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


# -- the verdict -------------------------------------------------------------------------------
def test_report_states_its_verdict_first(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    text = write_report(run).read_text()
    first = text.split("\n\n")[1]  # the paragraph after the title
    assert first.startswith("**Verdict:** did training help? ")  # then fused − control (issue 26.7)
    assert "fused − control (λ = 1): **" in first
    assert "fused − best source (gemma3)" in first and "95% CI" in first
    # The numbers are the paired bootstrap of the per-block figures, each model with its own bytes.
    res = json.loads((run / "eval" / "results.json").read_text())["models"]
    fa, ca, ga = res["fused"]["per_block"], res["clm"]["per_block"], res["gemma3"]["per_block"]
    iv = paired_bootstrap(fa["nll"], ca["nll"], fa["bytes"], b_nbytes=ca["bytes"], n_boot=10_000, seed=0)
    assert f"{iv.diff:+.4f} bits/byte".replace("-", "−") in first
    assert f"95% CI {iv.lo:+.4f} to {iv.hi:+.4f}".replace("-", "−") in first
    assert iv.diff == pytest.approx(res["fused"]["overall"]["bpb"] - res["clm"]["overall"]["bpb"], abs=1e-12)
    src = paired_bootstrap(fa["nll"], ga["nll"], fa["bytes"], b_nbytes=ga["bytes"], n_boot=10_000, seed=0)
    assert src.lo > 0 and "the fused model is worse than gemma3" in first
    # Per domain, and before everything else in the report.
    per = next(p for p in text.split("\n\n") if p.startswith("Per domain, fused − control (λ = 1): "))
    for d in ("code", "docs", "licences", "literature"):
        assert re.search(rf"{d} [+−]\d\.\d{{4}} \([+−]\d\.\d{{4}} to [+−]\d\.\d{{4}}: ", per), d
    assert text.index("Verdict") < text.index("## Held-out results")


def test_verdict_says_inside_the_noise_when_the_interval_holds_zero(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    p = run / "eval" / "results.json"
    res = json.loads(p.read_text())
    fused = res["models"]["fused"]
    res["models"]["clm"] = {**json.loads(json.dumps(fused)), "kind": "clm"}  # the same figures: Δ = 0
    p.write_text(json.dumps(res))
    cells = compare(res, "fused", "clm", n_boot=500)
    assert set(cells) == {"code", "docs", "licences", "literature", "overall"}
    assert all(iv == (0.0, 0.0, 0.0) for iv in cells.values())
    first = write_report(run).read_text().split("\n\n")[1]
    assert "fused − control (λ = 1): **+0.0000 bits/byte** overall (95% CI +0.0000 to +0.0000): inside the noise" in first


def test_verdict_without_per_block_figures_gives_differences_without_intervals(tmp_path):
    run = make_synthetic_run(tmp_path / "run", per_block=False)  # results from an older lmfuse
    text = write_report(run).read_text()
    assert "**Verdict:** did training help? " in text and "fused − control (λ = 1): **" in text
    assert "no confidence interval (rerun `lmfuse eval`" in text


def test_verdict_with_one_block_per_domain_gives_no_interval_there(tmp_path):
    run = make_synthetic_run(tmp_path / "run", per_domain=1)  # like `lmfuse demo --quick`
    text = write_report(run).read_text()
    per = next(p for p in text.split("\n\n") if p.startswith("Per domain, fused − control (λ = 1): "))
    assert per.count(" (one block: no interval, so no verdict)") == 4
    assert "95% CI" in text.split("\n\n")[1]  # overall: four blocks, an interval
    assert "(1 per domain;" in text and "with fewer than 10 blocks an interval is rough" in text


def test_verdict_when_nothing_to_compare(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert write_report(run).read_text().split("\n\n")[1].startswith("**Verdict:** none yet")


def test_control_is_labelled_as_the_control(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    text = write_report(run).read_text()
    assert "| control (λ = 1) |" in text  # results and training tables
    assert "| clm" not in text and "(clm)" not in text


def test_report_files_are_world_readable(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    old = os.umask(0o022)
    try:
        write_report(run)
    finally:
        os.umask(old)
    files = sorted((run / "report").iterdir())
    assert {f.name for f in files} >= {"report.md", "report.html", "bpb.png"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
    # Every atomic write (manifests, results.json, config copies) gets an ordinary file's mode.
    from lmfuse.artifacts import atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o640


# -- in a real browser -------------------------------------------------------------------------
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: the report is not checked in a browser "
                             "(Debian: apt-get install -y chromium; .ci/run installs it when CI=true)")

# Runs in the page after load; writes what the test checks into a <pre> that --dump-dom prints.
PAGE_CHECKS = """<script>
window.addEventListener('load', () => {
  const de = document.documentElement;
  const box = el => { const r = el.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top + scrollY,
                                                                      width: r.width, height: r.height}; };
  const shown = el => { const cs = getComputedStyle(el); return cs.display !== 'none' && cs.visibility !== 'hidden'
                                                                 && parseFloat(cs.opacity) > 0; };
  const v = document.getElementById('verdict');
  const out = {
    scrollWidth: de.scrollWidth, clientWidth: de.clientWidth, height: de.scrollHeight,
    firstH2: box(document.querySelector('h2')).top,
    verdict: v && {text: v.innerText, box: box(v), shown: shown(v)},
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, natural: i.naturalWidth,
                                            box: box(i), shown: shown(i)})),
    tables: [...document.querySelectorAll('table')].map(t => ({
      head: t.querySelector('th').innerText, scrollWidth: t.scrollWidth, box: box(t), shown: shown(t),
      wrapClient: t.parentElement.clientWidth, wrapBox: box(t.parentElement),
      wrapOverflow: getComputedStyle(t.parentElement).overflowX})),
  };
  const pre = document.createElement('pre');
  pre.id = 'lmfuse-checks';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(args: list[str], url: str, profile) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def render(html_path, tmp_path, width: int = 1400) -> tuple[dict, object]:
    """Lay out a report in headless chromium at `width` px: (the page checks, a full-page screenshot)."""
    probe = html_path.with_name("browser-check.html")
    probe.write_text(html_path.read_text().replace("</body>", PAGE_CHECKS + "</body>"))
    try:
        res = _chromium([f"--window-size={width},1000", "--dump-dom"], probe.as_uri(), tmp_path / "profile")
    finally:
        probe.unlink()
    start = res.stdout.find('<pre id="lmfuse-checks">')
    assert start >= 0, f"chromium printed no checks (rc {res.returncode}): {res.stderr[-2000:]}"
    import html as html_lib

    body = res.stdout[start + len('<pre id="lmfuse-checks">'):res.stdout.index("</pre>", start)]
    checks = json.loads(html_lib.unescape(body))
    shot = tmp_path / f"report-{width}px.png"
    res = _chromium([f"--window-size={width},{checks['height'] + 40}", f"--screenshot={shot}"],
                    html_path.as_uri(), tmp_path / "profile")
    assert shot.exists() and shot.read_bytes().startswith(PNG), res.stderr[-2000:]
    return checks, shot


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def assert_layout(checks: dict, n_images: int) -> None:
    width = checks["clientWidth"]
    assert checks["scrollWidth"] <= width, "the page scrolls sideways"
    v = checks["verdict"]
    assert v and v["shown"] and v["box"]["width"] > 0 and v["box"]["height"] > 0
    assert v["text"].startswith("Verdict: did training help? ") and "95% CI" in v["text"]
    assert "fused − control (λ = 1): " in v["text"]
    assert v["box"]["top"] < checks["firstH2"], "the verdict is not the first thing in the report"
    assert v["box"]["right"] <= width
    assert len(checks["images"]) == n_images
    for img in checks["images"]:
        assert img["complete"] and img["natural"] > 0 and img["shown"], img["alt"]
        assert img["box"]["width"] > 100 and img["box"]["height"] > 100, img["alt"]
        assert img["box"]["left"] >= 0 and img["box"]["right"] <= width, img["alt"]
    for t in checks["tables"]:
        assert t["shown"] and t["box"]["height"] > 0, t["head"]
        # The table's box never reaches past the page; a table wider than its box scrolls inside it.
        assert t["wrapBox"]["left"] >= 0 and t["wrapBox"]["right"] <= width, t["head"]
        assert t["scrollWidth"] <= t["wrapClient"] or t["wrapOverflow"] in ("auto", "scroll"), t["head"]


@needs_chromium
def test_report_in_a_browser_at_1400px(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    write_report(run)
    checks, shot = render(run / "report" / "report.html", tmp_path)
    assert_layout(checks, n_images=6)
    heads = [t["head"].replace("\u00a0", " ") for t in checks["tables"]]
    assert heads == ["fused − … [95% CI]", "model", "model", "model", "source", "manifest field", "manifest field",
                     "artifact"]
    # At 1400 px every table of a four-domain run fits without scrolling, alignment's included.
    for t in checks["tables"]:
        assert t["scrollWidth"] <= t["wrapClient"], t["head"]
    assert _png_size(shot) == (1400, checks["height"] + 40)
    if os.environ.get("LMFUSE_SCREENSHOT_DIR"):  # to look at it
        shutil.copy(shot, os.environ["LMFUSE_SCREENSHOT_DIR"])


@needs_chromium
def test_report_with_many_domains_scrolls_tables_inside_not_the_page(tmp_path):
    domains = [f"domain_with_a_long_name_{i:02d}" for i in range(14)]
    run = make_synthetic_run(tmp_path / "run", domains=domains)
    write_report(run)
    checks, _ = render(run / "report" / "report.html", tmp_path)
    assert_layout(checks, n_images=6)
    assert any(t["scrollWidth"] > t["wrapClient"] for t in checks["tables"])  # this one needs its scrollbar


def test_verdict_compares_best_checkpoints_when_kept(tmp_path):
    from lmfuse.report import verdict

    run = make_synthetic_run(tmp_path / "run")
    results = json.loads((run / "eval" / "results.json").read_text())
    for label in ("fused", "clm"):
        rec = json.loads(json.dumps(results["models"][label]))
        # At its best checkpoint the fused model is 0.05 bits/byte better on every block; the control the same.
        shift = 0.05 * math.log(2) if label == "fused" else 0.0
        rec["per_block"]["nll"] = [n - shift * b for n, b in zip(rec["per_block"]["nll"], rec["per_block"]["bytes"])]
        results["models"][f"{label}@best"] = rec
    paragraphs, head, rows = verdict(results, n_boot=500)
    assert "both at their best validation checkpoints" in paragraphs[0]
    best_row = next(r for r in rows if "best checkpoints" in r[0])
    final_row = rows[0]
    overall = head.index("overall")
    # The best-checkpoint difference is the end-of-budget one minus 0.05.
    d_best = float(best_row[overall].split()[0].replace("\u2212", "-"))
    d_final = float(final_row[overall].split()[0].replace("\u2212", "-"))
    assert d_best == pytest.approx(d_final - 0.05, abs=2e-4)


def test_a_non_finite_model_is_named_and_left_out(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    results = json.loads((run / "eval" / "results.json").read_text())
    rec = results["models"]["gemma3"]
    rec["non_finite"] = True
    rec["overall"]["bpb"] = None
    for d in rec["domains"].values():
        d["bpb"] = None
    (run / "eval" / "results.json").write_text(json.dumps(results))
    text = write_report(run).read_text()
    assert "**Not finite:** `gemma3`" in text
    held = text.split("## Held-out results")[1].split("\n## ")[0]
    assert "| gemma3" not in held and "| smollm2 (target) |" in held
    assert "gemma3" not in text.split("## Held-out results")[0]  # nor does the verdict name it


# -- did training help? (issue 26.7) ---------------------------------------------------------------
def test_verdict_first_says_whether_training_helped(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    text = write_report(run).read_text()
    first = text.split("\n\n")[1]
    assert first.startswith("**Verdict:** did training help? fused − untrained target (smollm2): **")
    res = json.loads((run / "eval" / "results.json").read_text())["models"]
    t = res["smollm2"]["per_block"]
    for label, name in (("fused", "fused"), ("clm", "control (λ = 1)")):
        pb = res[label]["per_block"]
        iv = paired_bootstrap(pb["nll"], t["nll"], pb["bytes"], b_nbytes=t["bytes"], n_boot=10_000, seed=0)
        said = (f"{name} − untrained target (smollm2): **{iv.diff:+.4f} bits/byte** overall "
                f"(95% CI {iv.lo:+.4f} to {iv.hi:+.4f}): better than the untrained target").replace("-", "−")
        assert said in first, name
    # Then the rest, as before.
    assert first.index("untrained target") < first.index("fused − control (λ = 1): **")
    assert "fused − best source (gemma3)" in first
    # The table has the row too.
    assert "| untrained target (smollm2) |" in text


def _worse_than_the_target(run, by: float) -> None:
    """Make the fused model and the control `by` bits/byte worse than the target on every block."""
    p = run / "eval" / "results.json"
    res = json.loads(p.read_text())
    for label in ("fused", "clm"):
        rec = res["models"][label]
        pb = rec["per_block"]
        pb["nll"] = [n + by * math.log(2) * b for n, b in zip(pb["nll"], pb["bytes"])]
        rows = list(zip(pb["nll"], pb["tokens"], pb["bytes"]))
        res["models"][label] = {**rec, **summarize(rows, pb["domain"])}
    p.write_text(json.dumps(res))


def test_verdict_says_when_training_made_the_target_worse_and_why(tmp_path):
    """Issue 26.7: a target trained at too high a learning rate got worse than it was (0.74 → 1.04
    bits/byte) and the verdict only said "fused − control: −0.0137, inside the noise"."""
    run = make_synthetic_run(tmp_path / "run")
    _worse_than_the_target(run, 0.3)
    (run / "config.yaml").write_text("target: {name: smollm2}\ntrain: {learning_rate: 0.001}\n")
    for name, (start, end) in (("fused", (1.9, 2.6)), ("clm", (1.9, 1.8))):
        man = run / "train" / name / "manifest.json"
        m = json.loads(man.read_text())
        m["metrics"] = {"initial_eval_loss": start, "final_eval_loss": end, "eval_loss_rose": end > start}
        man.write_text(json.dumps(m))
    text = write_report(run).read_text()
    first = text.split("\n\n")[1]
    assert "fused − untrained target (smollm2): **+0.2" in first
    assert "worse than the untrained target: training made it worse" in first
    # The fused run's validation loss rose, the control's did not: only the fused one is flagged.
    assert ("The fused model's validation loss ended above where it started (step 0: 1.9000 → end: 2.6000 "
            "nats/token)") in first
    assert "control's validation loss ended above" not in first
    assert "learning rate (0.001) is likely too high for this target" in first
    assert "lower `train.learning_rate` (try 10× lower, 0.0001)" in first
    assert first.index("untrained target") < first.index("fused − control (λ = 1): **")
    # The training table gives the step-0 validation loss next to the last one.
    assert "| fused | 200 | 200 |" in text and "| 1.9000 |" in text


def test_clm_only_verdict_flags_a_validation_loss_that_rose(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    p = run / "eval" / "results.json"
    res = json.loads(p.read_text())
    res["models"] = {k: v for k, v in res["models"].items() if v["kind"] in ("target", "clm")}
    p.write_text(json.dumps(res))
    shutil.rmtree(run / "train" / "fused")
    man = run / "train" / "clm" / "manifest.json"
    m = json.loads(man.read_text())
    m["metrics"] = {"initial_eval_loss": 1.5, "final_eval_loss": 1.7, "eval_loss_rose": True}
    man.write_text(json.dumps(m))
    first = write_report(run).read_text().split("\n\n")[1]
    assert "a run without sources" in first
    assert "validation loss ended above where it started (step 0: 1.5000 → end: 1.7000" in first
