"""The demo: quick and full runs never share a directory; the CLI a new user meets; the real run (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmfuse import pipeline
from lmfuse.cli import app
from lmfuse.demo import demo_config, run_demo
from lmfuse.errors import LmfuseError


@pytest.fixture()
def fake_pipeline(monkeypatch):
    """Replace the pipeline with one that writes a marker artifact per run: seconds, no models."""
    runs = []

    def fake(cfg, overwrite=False, log=print, report=True):
        run = Path(cfg.output_dir)
        quick = cfg.prepare.block_size == demo_config(run, quick=True)["prepare"]["block_size"]
        art = run / "train" / "fused"
        art.mkdir(parents=True, exist_ok=True)
        (art / "weights").write_text("quick" if quick else "full")
        (run / "report").mkdir(exist_ok=True)
        (run / "report" / "report.html").write_text("<html></html>")
        runs.append(run)
        return {}

    monkeypatch.setattr(pipeline, "run_pipeline", fake)
    return runs


@pytest.mark.parametrize("order", [(True, False), (False, True)], ids=["quick-then-full", "full-then-quick"])
def test_quick_and_full_demos_keep_their_own_directories(tmp_path, monkeypatch, fake_pipeline, order):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for quick in order:
        res = runner.invoke(app, ["demo", *(["--quick"] if quick else [])])
        assert res.exit_code == 0, res.output
        # The last line points to the HTML report, as the README says.
        last = res.output.strip().splitlines()[-1]
        expected = Path("lmfuse-demo-quick" if quick else "lmfuse-demo") / "report" / "report.html"
        assert last.endswith(f"report: {expected}"), last
    assert (tmp_path / "lmfuse-demo" / "train" / "fused" / "weights").read_text() == "full"
    assert (tmp_path / "lmfuse-demo-quick" / "train" / "fused" / "weights").read_text() == "quick"
    assert [r.name for r in fake_pipeline] == ["lmfuse-demo-quick" if q else "lmfuse-demo" for q in order]


def test_quick_demo_refuses_a_full_runs_directory_and_the_reverse(tmp_path, fake_pipeline):
    full, quick = tmp_path / "full", tmp_path / "quick"
    run_demo(full, quick=False, log=lambda *a: None)
    run_demo(quick, quick=True, log=lambda *a: None)
    with pytest.raises(LmfuseError, match="holds a full demo run") as e:
        run_demo(full, quick=True, log=lambda *a: None)
    assert "lmfuse-demo-quick" in str(e.value)
    with pytest.raises(LmfuseError, match="holds a quick demo run"):
        run_demo(quick, quick=False, log=lambda *a: None)
    assert (full / "train" / "fused" / "weights").read_text() == "full"
    assert (quick / "train" / "fused" / "weights").read_text() == "quick"
    assert yaml_block_size(full) == 256 and yaml_block_size(quick) == 128  # demo.yaml untouched too
    run_demo(full, quick=False, log=lambda *a: None)  # the same kind again: fine (it resumes)
    assert len(fake_pipeline) == 3


def yaml_block_size(run):
    import yaml

    return yaml.safe_load((run / "demo.yaml").read_text())["prepare"]["block_size"]


@pytest.mark.parametrize("command", [[], ["extract"], ["vocab-map"], ["align"], ["train"], ["eval"], ["run"],
                                     ["demo"], ["report"], ["models", "pull"]])
def test_help_shows_plain_flags(command):
    out = CliRunner().invoke(app, [*command, "--help"]).output
    options = out[out.index("Options:"):]  # (typer shows positional arguments' types, e.g. `CONFIG <path>`)
    assert "<" not in options, options
    assert "--help  " in options


def test_help_names_flag_values():
    runner = CliRunner()
    assert "-m, --model NAME" in runner.invoke(app, ["extract", "--help"]).output
    assert "-s, --source NAME" in runner.invoke(app, ["align", "--help"]).output
    out = runner.invoke(app, ["eval", "--help"]).output
    assert "-m, --model LABEL=PATH" in out and "--corpus PATH" in out and "--device DEV" in out
    out = runner.invoke(app, ["train", "--help"]).output
    assert "  --overwrite " in out and "  --control " in out


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_on_the_real_models(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "demo", "--quick", "-o", str(out)],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].endswith(str(out / "report" / "report.html"))
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
    # The report, opened in a real browser at 1400 px: verdict first, every plot and table on the page.
    from test_report import CHROMIUM, assert_layout, render

    if CHROMIUM is None:
        import warnings

        warnings.warn("no chromium: the demo report was not opened in a browser", stacklevel=1)
    else:
        checks, _ = render(report / "report.html", tmp_path)
        assert_layout(checks, n_images=6)
    align = json.loads((out / "align" / "gemma3-270m" / "manifest.json").read_text())
    assert 0.8 < align["aligned_fraction"] < 1.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "train" / "fused")
    tok = AutoTokenizer.from_pretrained(out / "train" / "fused")
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
