"""Issue 26: diverged and non-finite models are scored, tabled and reported, never a traceback;
training that diverges is stopped with the step and the fix."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lmfuse import pipeline
from lmfuse.artifacts import ArtifactDir
from lmfuse.config import FuseConfig
from lmfuse.errors import LmfuseError
from lmfuse.testing import make_tiny_model
from test_train import make_cfg, write_synthetic_run

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {k: make_tiny_model(root / k, k) for k in ("bpe", "spm")}
    out["bpe2"] = make_tiny_model(root / "bpe2", "bpe", seed=5)
    # What a training at an absurd learning rate leaves: finite weights whose logits are so large
    # that the mean NLL is thousands of nats per token (exp of it overflows).
    out["overflow"] = _edited(tiny_dir=out["bpe"], dest=root / "overflow", how="overflow")
    out["nan"] = _edited(tiny_dir=out["bpe"], dest=root / "nan", how="nan")
    return out


def _edited(tiny_dir, dest, how):
    shutil.copytree(tiny_dir, dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        if how == "overflow":
            model.transformer.ln_f.weight.mul_(1e5)
            model.transformer.ln_f.bias.mul_(1e5)
        else:
            for p in model.parameters():
                p.fill_(float("nan"))
    model.save_pretrained(dest)
    return dest


def _config(tmp_path, tiny) -> dict:
    return {"output_dir": str(tmp_path / "run"),
            "target": {"name": "tgt", "path": str(tiny["bpe"]), "dtype": "float32"},
            "sources": [{"name": "src", "path": str(tiny["spm"]), "dtype": "float32"}],
            "corpus": {"path": str(tmp_path / "corpus.jsonl")}}


def _run_dir(tmp_path, tiny, fused: str) -> FuseConfig:
    """A run whose prepare artifact holds TEXTS (two domains) and whose trained models are done:
    `fused` is the model named, the control a healthy one."""
    data = _config(tmp_path, tiny)
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    cfg = FuseConfig.model_validate(data)
    art = ArtifactDir(cfg.run_dir / "prepare", "prepare", "datahash1")
    art.begin()
    n = len(TEXTS)
    art.write_shard(0, pa.table({
        "block_id": pa.array(range(n), pa.int64()), "doc_id": pa.array(range(n), pa.int64()),
        "domain": ["prose", "code", "legal", "prose"], "split": ["validation"] * n, "text": TEXTS}))
    art.finish(rows=n)
    for kind, model in (("fused", tiny[fused]), ("clm", tiny["bpe2"])):
        shutil.copytree(model, cfg.run_dir / "train" / kind)
        (cfg.run_dir / "train" / kind / "manifest.json").write_text('{"stage": "train", "seconds": 1.0}')
    return cfg


@pytest.mark.parametrize("fused", ["overflow", "nan"])
def test_a_diverged_fused_model_is_scored_tabled_and_reported(tmp_path, tiny, fused):
    """Before: `math.exp` overflowed (mean NLL > 709 nats/token) or `min` met None in the table,
    and eval ended in a traceback with no results and no report."""
    cfg = _run_dir(tmp_path, tiny, fused)
    lines = []
    doc = pipeline.run_eval(cfg, device="cpu", log=lines.append)
    out = cfg.run_dir / "eval"
    on_disk = json.loads((out / "results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))  # strict JSON
    assert set(on_disk["models"]) == {"tgt", "src", "fused", "clm"}
    rec = doc["models"]["fused"]
    table = (out / "results.md").read_text()
    row = next(r for r in table.splitlines() if r.startswith("| fused"))
    said = next(x for x in lines if x.startswith("  fused: "))
    if fused == "overflow":
        nll_per_token = rec["overall"]["nll"] / rec["overall"]["tokens"]
        assert nll_per_token > 709.8 and math.isfinite(rec["overall"]["bpb"])
        assert rec["overall"]["ppl"] == math.inf and on_disk["models"]["fused"]["overall"]["ppl"] is None
        assert "∞" in row and "diverged" in row
        assert "DIVERGED" in said and "perplexity is infinite" in said
    else:
        assert on_disk["models"]["fused"]["non_finite"] is True
        assert "not finite" in row
        assert "NOT FINITE" in said
    # Every other row is there, with its figures; the best one is in bold.
    for label in ("tgt", "src", "control (λ = 1)"):
        assert re.search(rf"^\| {re.escape(label)} \| \**\d\.\d{{4}}", table, re.M), label
    assert table.count("**") == 2
    assert (out / "manifest.json").exists()

    text = pipeline.write_report(cfg.run_dir).read_text()
    first = text.split("\n\n")[1]
    assert first.startswith("**Verdict:** the fused model diverged")
    assert "train.learning_rate" in first
    # The rest is still said: did the control's training help, against the untrained target?
    assert "control (λ = 1) − untrained target (tgt): **" in first
    assert "`fused`" in text.split("## Held-out results")[1]


def test_cli_eval_and_report_exit_0_when_a_model_diverged(tmp_path, tiny):
    cfg = _run_dir(tmp_path, tiny, "overflow")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, tiny)))
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "eval", str(path), "--device", "cpu"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "fused: " in res.stdout and "DIVERGED" in res.stdout
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "report", str(cfg.run_dir)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "the fused model diverged" in (cfg.run_dir / "report" / "report.md").read_text()


# -- training that diverges ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("target") / "tgt", "spm")


def test_the_divergence_rule():
    from lmfuse.train import DIVERGE_WINDOW, divergence

    ln_v = math.log(1000)
    # Below the limit (the first step's loss + ln V, on the mean of the last DIVERGE_WINDOW steps): nothing.
    assert divergence(2.0, [2.0, 3.0, 2.5], 1000) is None
    assert divergence(2.0, [2.0] + [2.0 + ln_v] * (DIVERGE_WINDOW - 1), 1000) is None
    # Above it: the mean and the limit.
    mean, limit = divergence(2.0, [2.0, 4.0 + 2 * ln_v], 1000)
    assert mean == pytest.approx(3.0 + ln_v) and limit == pytest.approx(2.0 + ln_v)
    # Only the last DIVERGE_WINDOW losses count: an old spike has left the window.
    assert divergence(2.0, [1e6] + [2.0] * DIVERGE_WINDOW, 1000) is None


def test_training_that_diverges_is_stopped_with_the_step_and_the_fix(tmp_path, target_dir):
    """Before: a learning rate of 1 "trained" to the end (loss 6.5 → 36 and back), then eval."""
    run = write_synthetic_run(tmp_path / "run", target_dir)
    cfg = make_cfg(run, target_dir, max_steps=12, learning_rate=1.0)
    with pytest.raises(LmfuseError, match=r"training diverged at step \d+") as e:
        pipeline.run_train(cfg, control=True)
    assert "mean training loss" in e.value.what and "loss of step 1" in e.value.what
    assert "lower train.learning_rate" in e.value.fix and "10× lower" in e.value.fix
    assert not (run / "train" / "clm" / "manifest.json").exists()


class Killed(BaseException):
    pass


def test_the_divergence_rule_gives_the_same_step_after_a_resume(tmp_path, target_dir, monkeypatch):
    """The first step's loss and the window of recent losses travel in the checkpoint: a rerun
    after a kill stops at the step the uninterrupted run stops at, with the same numbers."""
    import lmfuse.train as tr

    real_loss, real_lam, real_save = tr.fused_clm_loss, tr.clm_weight_at, tr.save_checkpoint
    now = {}

    def lam(t, step, total, control):
        now["step"] = step
        return real_lam(t, step, total, control)

    def inflated(*a, **k):  # from the 5th step on, the loss reads 3× what it is
        out = real_loss(*a, **k)
        return (out[0] * 3, *out[1:]) if now.get("step", 0) >= 4 and torch.is_grad_enabled() else out

    monkeypatch.setattr(tr, "clm_weight_at", lam)
    monkeypatch.setattr(tr, "fused_clm_loss", inflated)
    said = []
    for name in ("ref", "killed"):
        run = write_synthetic_run(tmp_path / name, target_dir)
        cfg = make_cfg(run, target_dir, max_steps=40, save_every=4, clm_weight=1.0)
        if name == "killed":
            def save_then_die(acc, path, step, extra):
                out = real_save(acc, path, step, extra)
                if step == 4:
                    raise Killed
                return out

            with monkeypatch.context() as mp:
                mp.setattr(tr, "save_checkpoint", save_then_die)
                with pytest.raises(Killed):
                    pipeline.run_train(cfg, control=True)
            now.clear()
        with pytest.raises(LmfuseError, match="training diverged") as e:
            pipeline.run_train(cfg, control=True)
        said.append(e.value.what)
    assert said[0] == said[1]
    step = int(re.search(r"diverged at step (\d+)", said[0]).group(1))
    assert step > 6  # the window mattered: right after the resume, the inflated steps alone were over the limit

