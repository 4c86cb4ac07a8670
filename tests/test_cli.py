"""The `lmfuse` command's exit codes and messages (README, CLI reference): 1 for a config that
does not validate, whichever command reads it; 2 for the other errors."""

import subprocess
import sys

import pytest


def lmfuse(*args):
    return subprocess.run([sys.executable, "-m", "lmfuse.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("command", [["validate"], ["run"], ["prepare"], ["extract", "-m", "tgt"]])
def test_a_config_that_does_not_validate_exits_1_from_every_command(make_config, command):
    """Issue 26.8a: `lmfuse run` on an invalid config exited 2, `validate` 1 (the README says 1)."""
    path = make_config({"train.clm_weight": 1.5, "extract.top_k": 0})
    res = lmfuse(*command[:1], path, *command[1:])
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert "2 problem(s)" in res.stderr and "train.clm_weight" in res.stderr and "extract.top_k" in res.stderr
    assert not (path.parent / "run").exists()  # nothing was started


def test_an_output_dir_inside_a_folder_corpus_is_refused_by_validate_and_run(make_config, tmp_path):
    """Issue 26.3 through the CLI: the problem is named with its field, the folder and the fix."""
    corpus = tmp_path / "texts"
    (corpus / "prose").mkdir(parents=True)
    (corpus / "prose" / "a.txt").write_text("Some prose to read. " * 20)
    path = make_config({"corpus.path": "texts", "output_dir": "texts/run"})
    for command in ("validate", "run"):
        res = lmfuse(command, path)
        assert res.returncode == 1, (command, res.returncode, res.stderr[-2000:])
        assert "output_dir: 'texts/run' is inside the corpus folder" in res.stderr, res.stderr
        assert "put output_dir outside" in res.stderr
    assert not (corpus / "run").exists()


def test_other_errors_still_exit_2(make_config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")  # not YAML: no config to validate
    for command in ("validate", "run"):
        res = lmfuse(command, bad)
        assert res.returncode == 2 and "not valid YAML" in res.stderr and "Traceback" not in res.stderr


def test_a_sweep_with_an_invalid_variant_exits_1_and_runs_nothing(make_config, tmp_path):
    import yaml

    base = make_config({})
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(base), "output_dir": "out",
                                     "variants": [{"name": "bad", "set": {"train.clm_weight": 2}}]}))
    res = lmfuse("sweep", sweep)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "problem(s) in the sweep" in res.stderr and "variant 'bad'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "runs").exists()
