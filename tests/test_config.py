import subprocess
import sys

import pytest
import yaml

from lmfuse.config import load_config, validate_config
from lmfuse.errors import LmfuseError


def test_valid_config_has_no_problems(make_config):
    assert validate_config(make_config()) == []
    cfg = load_config(make_config())
    assert [m.name for m in cfg.sources] == ["src_spm", "src_wp"]
    assert cfg.train.clm_weight == 0.9


def test_three_mistakes_are_all_reported(make_config):
    path = make_config({"train.clm_weight": 1.5, "extract.top_k": 0,
                        "sources": [{"name": "s", "path": "/does/not/exist"}]})
    problems = validate_config(path)
    assert len(problems) == 3, problems
    assert any(p.startswith("sources[0].path") and "does not exist" in p for p in problems)
    path = make_config({"train.clm_weight": 1.5, "extract.top_k": 0, "prepare.block_size": 1})
    problems = validate_config(path)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "train.clm_weight" in text and "[0, 1]" in text
    assert "extract.top_k" in text
    assert "prepare.block_size" in text


def test_cli_validate_prints_every_problem(make_config):
    path = make_config({"train.clm_weight": -0.1, "train.fusion": "maxCE", "corpus.path": "/nope.jsonl",
                        "sources": [{"name": "s", "path": "/does/not/exist"}]})
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "validate", str(path)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "4 problem(s)" in res.stderr, res.stderr
    for needle in ["train.clm_weight", "corpus.path", "sources[0].path"]:
        assert needle in res.stderr, res.stderr
    path = make_config({"train.fusion": "maxCE", "corpus.path": "/nope.jsonl",
                        "sources": [{"name": "s", "path": "/does/not/exist"}]}, name="c2.yaml")
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "validate", str(path)], capture_output=True, text=True)
    assert res.returncode == 1 and "3 problem(s)" in res.stderr
    for needle in ["train.fusion: unknown fusion function 'maxCE'", "corpus.path", "sources[0].path"]:
        assert needle in res.stderr, res.stderr


def test_a_mistyped_relative_model_path_is_refused_not_sent_to_the_hub(make_config, tiny_models, tmp_path):
    """Issue 9.8: `path: models/spmm` (a typo of a local folder) passed validate and run tried the Hub."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "spm").symlink_to(tiny_models["spm"])
    ok = make_config({"sources": [{"name": "s", "path": "models/spm"}]})
    assert validate_config(ok) == []
    assert load_config(ok).sources[0].path == str(tmp_path / "models" / "spm")  # relative to the config file
    problems = validate_config(make_config({"sources": [{"name": "s", "path": "models/spmm"}]}, name="typo.yaml"))
    assert len(problems) == 1 and problems[0].startswith("sources[0].path: 'models/spmm' does not exist")
    assert str(tmp_path / "models" / "spmm") in problems[0] and "hub:models/spmm" in problems[0]
    with pytest.raises(LmfuseError, match="models/spmm"):
        load_config(tmp_path / "typo.yaml")
    # A hub id says so; it is kept as written (nothing here reaches the Hub).
    hub = make_config({"sources": [{"name": "s", "path": "hub:HuggingFaceTB/SmolLM2-135M"}]}, name="hub.yaml")
    assert validate_config(hub) == []
    assert load_config(hub).sources[0].path == "hub:HuggingFaceTB/SmolLM2-135M"
    # The same check when other fields fail type validation.
    problems = validate_config(make_config({"train.clm_weight": "x", "sources": [{"name": "s", "path": "models/spmm"}]},
                                           name="both.yaml"))
    assert any(p.startswith("sources[0].path: 'models/spmm' does not exist") for p in problems)


def test_zero_sources_and_duplicate_names(make_config):
    # No sources is a CLM-only run (a domain expert), valid; a source named like the target is not.
    assert validate_config(make_config({"sources": []})) == []
    assert not load_config(make_config({"sources": []})).fuses
    path = make_config({"sources": [{"name": "tgt", "path": "/x"}]})
    assert any("unique" in p for p in validate_config(path))


def test_unknown_field_is_reported_with_its_place(make_config):
    path = make_config({"train.learnig_rate": 0.1})
    assert any(p.startswith("train.learnig_rate") for p in validate_config(path))


def test_load_config_raises_one_error_listing_all(make_config):
    with pytest.raises(LmfuseError) as e:
        load_config(make_config({"extract.top_k": 0, "train.clm_weight": 2}))
    assert "2 problem(s)" in str(e.value)


def test_not_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(LmfuseError, match="not valid YAML"):
        validate_config(p)
    p.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(LmfuseError, match="mapping"):
        validate_config(p)


def test_help_lists_the_subcommands():
    res = subprocess.run([sys.executable, "-m", "lmfuse.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # The command names in the "Commands:" section (a name that only appears in some command's
    # description, such as "models" in "Run models over the blocks", does not count).
    section = res.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()}
    expected = {"validate", "prepare", "extract", "vocab-map", "align", "train", "eval", "report", "run", "sweep",
                "demo", "models"}
    assert expected <= listed, sorted(expected - listed)


def test_an_output_dir_inside_a_folder_corpus_is_refused(make_config, tmp_path):
    """Issue 26.3: the run's own files changed the folder corpus's fingerprint, so every `lmfuse run`
    rebuilt every stage. Refused at validate, with the field, the folder and a place that works."""
    corpus = tmp_path / "texts"
    (corpus / "prose").mkdir(parents=True)
    (corpus / "prose" / "a.txt").write_text("Some prose to read. " * 20)
    for output_dir in ("texts/run", "texts", str(corpus / "prose" / "deeper" / "run"), "texts/../texts/x"):
        problems = validate_config(make_config({"corpus.path": "texts", "output_dir": output_dir}))
        assert len(problems) == 1, (output_dir, problems)
        assert problems[0].startswith(f"output_dir: {output_dir!r} is inside the corpus folder 'texts' ({corpus.resolve()})")
        assert "every stage" in problems[0] and f"put output_dir outside it, e.g. {corpus.resolve()}-run" in problems[0]
    with pytest.raises(LmfuseError, match="is inside the corpus folder"):
        load_config(tmp_path / "config.yaml")
    # Through a symbolic link to the folder: the same folder.
    (tmp_path / "link").symlink_to(corpus)
    assert validate_config(make_config({"corpus.path": "link", "output_dir": "texts/run"}))
    # Beside the folder, or beside a single-file corpus (the usual layout), is fine.
    assert validate_config(make_config({"corpus.path": "texts", "output_dir": "texts-run"})) == []
    assert validate_config(make_config({"corpus.path": "texts/prose/a.txt", "output_dir": "texts/prose/run"})) == []
    assert validate_config(make_config()) == []  # corpus.jsonl and run/ side by side
