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
    assert model_path_problem(ModelSpec(name="a", path="org/model")) is None


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
