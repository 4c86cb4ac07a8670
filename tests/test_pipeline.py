import json

from lmfuse.config import load_config
from lmfuse.pipeline import run_pipeline


def _run(cfg):
    lines: list[str] = []
    outcome = run_pipeline(cfg, log=lines.append)
    return outcome, "\n".join(lines)


def test_run_skips_what_is_done_and_reruns_only_what_a_change_touches(make_config):
    cfg_path = make_config({"train.max_steps": 2})
    cfg = load_config(cfg_path)
    first, _ = _run(cfg)
    assert set(first.values()) == {"ran"}
    assert list(first) == ["prepare", "extract/tgt", "extract/src_spm", "extract/src_wp", "vocab_map/src_spm",
                           "vocab_map/src_wp", "align/src_spm", "align/src_wp", "train/fused", "train/clm"]
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    assert {"tgt", "src_spm", "src_wp", "fused", "clm"} <= set(results["models"])
    assert (cfg.run_dir / "report" / "report.md").exists()
    fused_weights = (cfg.run_dir / "train" / "fused" / "model.safetensors").read_bytes()

    # A completed run: nothing runs again, and each skip is said.
    again, log = _run(cfg)
    assert set(again.values()) == {"skipped"}
    assert log.count("[skip]") == len(again)
    assert (cfg.run_dir / "train" / "fused" / "model.safetensors").read_bytes() == fused_weights

    # A fusion option changes: only the fused training (and eval/report after it) runs again.
    changed = load_config(make_config({"train.max_steps": 2, "train.fusion": "avgCE"}, name="avg.yaml"))
    third, log = _run(changed)
    assert third.pop("train/fused") == "re-ran"
    assert set(third.values()) == {"skipped"}, third
    assert "train/fused: its config or inputs changed" in log
    assert (cfg.run_dir / "train" / "fused" / "model.safetensors").read_bytes() != fused_weights

    # The alignment method changes: align and the fused training run again, not extraction or the control.
    dtw = load_config(make_config({"train.max_steps": 2, "train.fusion": "avgCE", "align.method": "dtw"},
                                  name="dtw.yaml"))
    fourth, _ = _run(dtw)
    assert {k for k, v in fourth.items() if v != "skipped"} == {"align/src_spm", "align/src_wp", "train/fused"}

    # An upstream option changes (the blocks): everything below `prepare` runs again, down to both
    # trainings, although align's and train's own options did not change (their inputs' keys did).
    blocks = load_config(make_config({"train.max_steps": 2, "train.fusion": "avgCE", "align.method": "dtw",
                                      "prepare.block_size": 40}, name="blocks.yaml"))
    fifth, _ = _run(blocks)
    assert {k for k, v in fifth.items() if v == "skipped"} == {"vocab_map/src_spm", "vocab_map/src_wp"}, fifth


def test_interrupted_stage_is_resumed(make_config):
    cfg = load_config(make_config({"train.max_steps": 1, "train.control": False}))
    from lmfuse.extract import run_extract
    from lmfuse.prepare import run_prepare

    run_prepare(cfg, log=lambda *a: None)
    run_extract(cfg, "tgt", progress=False, log=lambda *a: None)
    art = cfg.run_dir / "extract" / "tgt"
    (art / "manifest.json").unlink()
    for p in sorted((art / "shards").glob("*.arrow"))[1:]:
        p.unlink()
    outcome, log = _run(cfg)
    assert outcome["extract/tgt"] == "resumed" and outcome["prepare"] == "skipped"
    assert "[resume] extract/tgt" in log
    assert "train/clm" not in outcome


def test_baselines_of_models_that_cannot_be_combined_are_refused_before_any_work(make_config):
    import pytest

    from lmfuse.errors import LmfuseError

    cfg = load_config(make_config({"baselines.ensemble": [["tgt", "src_spm"]]}))
    with pytest.raises(LmfuseError, match="cannot ensemble tgt, src_spm") as e:
        run_pipeline(cfg, log=lambda *a: None)
    assert "share a tokenizer" in str(e.value)
    assert not (cfg.run_dir / "prepare").exists()
    cfg = load_config(make_config({"baselines.merge": [{"models": ["tgt", "src_wp"]}]}, name="m.yaml"))
    with pytest.raises(LmfuseError, match="cannot merge"):
        run_pipeline(cfg, log=lambda *a: None)
    assert not (cfg.run_dir / "prepare").exists()


def test_fusion_training_on_real_aligned_data_learns_and_the_output_loads(make_config):
    """prepare → extract → vocab-map → align → train, two sources of other tokenizers, tiny models."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(make_config({"train.max_steps": 16, "train.learning_rate": 3e-3, "train.control": False,
                                   "train.level": "token", "train.warmup_ratio": 0.0}))
    run_pipeline(cfg, log=lambda *a: None, report=False)
    log = [json.loads(x) for x in (cfg.run_dir / "train" / "fused" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    fusion = [r["fusion"] for r in log if "fusion" in r]
    assert len(losses) == 16
    assert sum(losses[-4:]) < sum(losses[:4])
    assert sum(fusion[-4:]) < sum(fusion[:4])  # it learns the fused targets, not just the text
    out = cfg.run_dir / "train" / "fused"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hello world", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 4
    assert "fusion" in (out / "README.md").read_text().lower()
    assert torch.isfinite(torch.tensor(losses)).all()


def test_cli_eval_adds_models_given_on_the_command_line(make_config, tiny_models):
    import subprocess
    import sys

    cfg_path = make_config({"train.max_steps": 1, "train.control": False})
    cfg = load_config(cfg_path)
    run_pipeline(cfg, log=lambda *a: None, report=False)
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "eval", str(cfg_path), "--model",
                          f"again={tiny_models['bpe']}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    models = json.loads((cfg.run_dir / "eval" / "results.json").read_text())["models"]
    assert {"tgt", "fused", "again"} <= set(models)
    # The same weights under another label give the same figures.
    assert models["again"]["overall"]["bpb"] == models["tgt"]["overall"]["bpb"]
    bad = subprocess.run([sys.executable, "-m", "lmfuse.cli", "eval", str(cfg_path), "--model", "nolabel"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "LABEL=PATH" in bad.stderr


def test_eval_on_another_corpus_scores_all_its_blocks(make_config, tmp_path):
    import subprocess
    import sys

    cfg_path = make_config({"train.max_steps": 1, "train.control": False})
    cfg = load_config(cfg_path)
    run_pipeline(cfg, log=lambda *a: None, report=False)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"domain": d, "text": f"{d} text, number {i}. " * 20})
                               for d in ("poetry", "news") for i in range(3)) + "\n")
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "eval", str(cfg_path), "--corpus", str(other)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    found = list((cfg.run_dir / "eval_corpora").glob("other-*/eval/results.json"))
    assert len(found) == 1
    doc = json.loads(found[0].read_text())
    assert doc["split"] == "all" and doc["domains"] == ["news", "poetry"]
    assert {"tgt", "src_spm", "src_wp", "fused"} <= set(doc["models"])
    # The run's own held-out results are not where these went.
    assert not (cfg.run_dir / "eval" / "results.json").exists()
