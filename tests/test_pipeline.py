import json

import pytest

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
    from lmfuse.pipeline import run_extract, run_prepare

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


def _changed(outcome: dict) -> set[str]:
    return {k for k, v in outcome.items() if v != "skipped"}


def test_each_upstream_change_reruns_exactly_the_stages_below_it(make_config, tiny_models, tiny_corpus, tmp_path):
    """Corpus, extract option, new weights at a model's path, vocab-map method: each reruns its
    stages and everything below them, nothing else (prepare option, align method and fusion
    option: the test above)."""
    import shutil

    from lmfuse.testing import build_model

    spm = tmp_path / "spm_copy"
    shutil.copytree(tiny_models["spm"], spm)
    over = {"train.max_steps": 1, "sources": [
        {"name": "src_spm", "path": str(spm), "dtype": "float32"},
        {"name": "src_wp", "path": str(tiny_models["wordpiece"]), "dtype": "float32"}]}

    def run(extra: dict, name: str) -> set[str]:
        cfg = load_config(make_config({**over, **extra}, name=name))
        return _changed(run_pipeline(cfg, log=lambda *a: None, report=False))

    every = {"prepare", "extract/tgt", "extract/src_spm", "extract/src_wp", "vocab_map/src_spm", "vocab_map/src_wp",
             "align/src_spm", "align/src_wp", "train/fused", "train/clm"}
    assert run({}, "a.yaml") == every

    # New weights saved over a source's weights, same path and config: only what reads them.
    model = build_model("spm", json.loads((spm / "config.json").read_text())["vocab_size"], seed=7)
    model.save_pretrained(tmp_path / "new_weights", safe_serialization=True)
    shutil.copyfile(tmp_path / "new_weights" / "model.safetensors", spm / "model.safetensors")
    assert run({}, "a.yaml") == {"extract/src_spm", "align/src_spm", "train/fused"}

    # An extract option: every extraction and everything below; the blocks and vocab maps stay, and
    # so does the control, which reads only the target's token ids (the extraction's tokens_key).
    assert run({"extract.top_k": 4}, "b.yaml") == every - {"prepare", "vocab_map/src_spm", "vocab_map/src_wp",
                                                           "train/clm"}

    # The vocab-map method: the maps, the alignments and the fused training; not the control.
    assert run({"extract.top_k": 4, "vocab_map.method": "exact"}, "c.yaml") == {
        "vocab_map/src_spm", "vocab_map/src_wp", "align/src_spm", "align/src_wp", "train/fused"}

    # The corpus's contents (same path): everything but the vocab maps (they read no text).
    with tiny_corpus.open("a") as f:
        f.write(json.dumps({"domain": "prose", "text": "One more document about foxes and dogs. " * 4}) + "\n")
    assert run({"extract.top_k": 4, "vocab_map.method": "exact"}, "c.yaml") == \
        every - {"vocab_map/src_spm", "vocab_map/src_wp"}


def test_damaged_shards_are_repaired_by_run_and_by_overwrite_never_used(make_config):
    from lmfuse.errors import LmfuseError
    from lmfuse.pipeline import run_align, run_extract

    cfg = load_config(make_config({"train.max_steps": 1, "train.control": False}))
    quiet = {"log": lambda *a: None}
    run_pipeline(cfg, report=False, **quiet)
    shard = cfg.run_dir / "extract" / "tgt" / "shards" / "shard-00001.arrow"
    good = shard.read_bytes()

    # Truncated: `run` sees it (sizes are checked on every read) and rebuilds that shard only.
    shard.write_bytes(good[: len(good) // 2])
    lines: list[str] = []
    outcome = run_pipeline(cfg, report=False, log=lines.append)
    assert outcome["extract/tgt"] == "repaired" and "[repair] extract/tgt" in "\n".join(lines)
    assert shard.read_bytes() == good
    assert {k for k, v in outcome.items() if v != "skipped"} == {"extract/tgt"}  # same bytes, same key

    # A flipped byte (same size): the stage that starts on it refuses it, naming file and fix...
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(LmfuseError) as e:
        run_align(cfg, "src_spm", overwrite=True, **quiet)
    assert "extract/tgt" in str(e.value) and "shard-00001.arrow" in str(e.value)
    assert "lmfuse extract CONFIG --model tgt --overwrite" in str(e.value)
    # ... and `extract --overwrite` rebuilds the complete-but-damaged artifact.
    run_extract(cfg, "tgt", overwrite=True, progress=False, **quiet)
    assert shard.read_bytes() == good
    assert run_align(cfg, "src_spm", **quiet)["n_shards"] >= 2


def test_an_out_of_range_token_id_is_an_error_not_a_crash(make_config, tiny_models):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from lmfuse.artifacts import write_arrow
    from lmfuse.errors import LmfuseError
    from lmfuse.pipeline import run_align, run_extract, run_prepare, run_vocab_map

    cfg = load_config(make_config({"sources": [{"name": "src_wp", "path": str(tiny_models["wordpiece"]),
                                                "dtype": "float32"}]}))
    quiet = {"log": lambda *a: None}
    run_prepare(cfg, **quiet)
    for m in ("tgt", "src_wp"):
        run_extract(cfg, m, progress=False, **quiet)
    run_vocab_map(cfg, "src_wp", **quiet)
    art = cfg.run_dir / "extract" / "src_wp"
    path = art / "shards" / "shard-00000.arrow"
    with pa.memory_map(str(path)) as src:
        table = ipc.open_stream(src).read_all()
    ids = table.column("input_ids").to_pylist()
    ids[0][1] = 10**6
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids",
                             pa.array(ids, pa.list_(pa.int32())))
    write_arrow(path, table, "zstd")
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["files"]  # as an older lmfuse wrote it: no checksum catches the edit
    del manifest["manifest_sha256"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmfuseError, match="token id 1000000 is outside the vocabulary of src_wp") as e:
        run_align(cfg, "src_wp", **quiet)
    assert "lmfuse extract CONFIG --model src_wp --overwrite" in str(e.value)


def test_cli_errors_on_the_run_directory_exit_2_without_a_traceback(make_config, tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    cfg_path = make_config({"output_dir": str(blocker / "run")}, name="file.yaml")
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "prepare", str(cfg_path)], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: cannot create the run directory" in res.stderr and "output_dir" in res.stderr

    # A second writer on one run directory: refused at once, the holder named.
    cfg_path = make_config(name="ok.yaml")
    run_dir = load_config(cfg_path).run_dir
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lmfuse.lock import run_lock\n"
                               "with run_lock(sys.argv[1]):\n print('locked', flush=True); sys.stdin.readline()",
                               str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "prepare", str(cfg_path)], capture_output=True,
                             text=True)
        assert res.returncode == 2 and f"pid {holder.pid}" in res.stderr and "Traceback" not in res.stderr
        assert not (run_dir / "prepare").exists()
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_config_without_sources_is_a_clm_only_run(make_config):
    """No sources: prepare, the target's extraction and the λ = 1 training alone (a domain expert),
    scored and reported like any run; the merges of a later fusion can name it as a model."""
    cfg = load_config(make_config({"train.max_steps": 2, "sources": [], "train.control": False}))
    outcome, log = _run(cfg)
    assert list(outcome) == ["prepare", "extract/tgt", "train/clm"]
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"tgt", "clm"}
    assert not (cfg.run_dir / "train" / "fused").exists()
    report = (cfg.run_dir / "report" / "report.md").read_text()
    assert "a run without sources" in report and "Trained − target" in report
    assert (cfg.run_dir / "train" / "clm" / "config.json").exists()  # an HF model directory
    again, _ = _run(cfg)
    assert set(again.values()) == {"skipped"}
