"""Baselines: ensembles of probabilities and parameter merges, and their refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmfuse import baselines
from lmfuse.baselines import ensemble_model, merge_models
from lmfuse.config import FuseConfig
from lmfuse.errors import LmfuseError
from lmfuse.evaluate import block_nll
from lmfuse.pipeline import build_merges
from lmfuse.testing import make_tiny_model

TEXTS = ["Hello world! The quick brown fox.", "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "a": make_tiny_model(root / "a", "bpe", seed=0),
        "b": make_tiny_model(root / "b", "bpe", seed=1),
        "spm": make_tiny_model(root / "spm", "spm"),
        "wide": make_tiny_model(root / "wide", "bpe", seed=2, hidden=64),
    }


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def test_ensemble_of_model_with_itself_equals_model(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["a"])
    m = _load(tiny["a"])
    single = block_nll(m, tok, TEXTS, 2, "cpu")
    both = block_nll(ensemble_model([m, m]), tok, TEXTS, 2, "cpu")
    for x, y in zip(single, both, strict=True):
        assert y[1:] == x[1:]
        assert y[0] == pytest.approx(x[0], rel=1e-5)


def test_ensemble_averages_probabilities(tiny):
    a, b = _load(tiny["a"]), _load(tiny["b"])
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        out = ensemble_model([a, b], weights=[3, 1])(input_ids=ids).logits
        ref = 0.75 * torch.softmax(a(ids).logits, -1) + 0.25 * torch.softmax(b(ids).logits, -1)
    torch.testing.assert_close(out.exp(), ref, rtol=1e-5, atol=1e-7)


def test_ensemble_refuses_different_tokenizers(tiny):
    from lmfuse.config import ModelSpec

    specs = [ModelSpec(name="a", path=str(tiny["a"])), ModelSpec(name="s", path=str(tiny["spm"]))]
    with pytest.raises(LmfuseError, match="different vocabularies") as e:
        baselines.check_same_tokenizer(specs, "ensemble")
    assert "share a tokenizer" in str(e.value)


def test_merge_model_with_itself_is_identity(tiny, tmp_path):
    out = merge_models([tiny["a"], tiny["a"]], tmp_path / "m", weights=[0.3, 0.7])
    ref, got = load_file(tiny["a"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny["a"]).get_vocab()
    _load(out)  # a normal HF directory


def test_linear_merge_is_weighted_average(tiny, tmp_path):
    out = merge_models([tiny["a"], tiny["b"]], tmp_path / "m", weights=[1, 3])
    a, b = load_file(tiny["a"] / "model.safetensors"), load_file(tiny["b"] / "model.safetensors")
    got = load_file(out / "model.safetensors")
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(got[k], 0.25 * a[k] + 0.75 * b[k])


def test_task_arithmetic_weight_zero_returns_base(tiny, tmp_path):
    out = merge_models([tiny["b"]], tmp_path / "ta", weights=[0.0], method="task_arithmetic", base=tiny["a"])
    ref, got = load_file(tiny["a"] / "model.safetensors"), load_file(out / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    # Weight 1 on one model gives that model back.
    one = merge_models([tiny["b"]], tmp_path / "ta1", weights=[1.0], method="task_arithmetic", base=tiny["a"])
    sd = load_file(one / "model.safetensors")
    for k, v in load_file(tiny["b"] / "model.safetensors").items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6)


def test_merge_refuses_different_architectures(tiny, tmp_path):
    with pytest.raises(LmfuseError, match="different architectures"):
        merge_models([tiny["a"], tiny["spm"]], tmp_path / "x")
    with pytest.raises(LmfuseError, match="shapes differ") as e:
        merge_models([tiny["a"], tiny["wide"]], tmp_path / "y")
    assert "one architecture" in str(e.value)
    assert not (tmp_path / "y").exists()


def test_config_driven_baselines(tiny, tmp_path):
    cfg = FuseConfig.model_validate({
        "output_dir": str(tmp_path / "run"),
        "target": {"name": "a", "path": str(tiny["a"])},
        "sources": [{"name": "b", "path": str(tiny["b"])}, {"name": "s", "path": str(tiny["spm"])}],
        "corpus": {"path": "x.jsonl"},
        "baselines": {"ensemble": [["a", "b"]],
                      "merge": [{"models": ["a", "b"]},
                                {"models": ["b"], "method": "task_arithmetic", "base": "a", "weights": [0.5]}]},
    })
    outs = build_merges(cfg)
    assert [p.name for p in outs] == ["merge-a-b", "ta-a-b"] and outs[0].parent == tmp_path / "run" / "merge"
    mtime = (outs[0] / "model.safetensors").stat().st_mtime_ns
    build_merges(cfg)  # current: not rebuilt
    assert (outs[0] / "model.safetensors").stat().st_mtime_ns == mtime
    labels = [m.label for m in baselines.eval_models(cfg)]
    assert labels == ["ensemble-a-b", "merge-a-b", "ta-a-b"]

    bad = cfg.model_copy(update={"baselines": cfg.baselines.model_copy(update={"merge": [{"models": ["a", "s"]}]})})
    with pytest.raises(LmfuseError, match="cannot merge"):
        build_merges(bad)


def test_a_merge_is_an_artifact_reused_when_current_and_rebuilt_when_stale(tiny, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from lmfuse.artifacts import read_manifest

    b_dir = tmp_path / "b"
    shutil.copytree(tiny["b"], b_dir)

    def cfg_with(weights):
        return FuseConfig.model_validate({
            "output_dir": str(tmp_path / "run"), "corpus": {"path": "x.jsonl"},
            "target": {"name": "a", "path": str(tiny["a"])}, "sources": [{"name": "b", "path": str(b_dir)}],
            "baselines": {"merge": [{"models": ["a", "b"], "weights": weights}]}})

    cfg = cfg_with([1.0, 1.0])
    [out] = build_merges(cfg, log=lambda m: None)
    assert out == tmp_path / "run" / "merge" / "merge-a-b"
    man = read_manifest(out)
    assert man["stage"] == "merge" and "model.safetensors" in man["files"]
    assert set(man["inputs"]) == {"model/a", "model/b"}
    assert [m.spec.path for m in baselines.eval_models(cfg)] == [str(out)]
    assert not list(out.glob("*stamp*"))

    def built():
        return (out / "model.safetensors").stat().st_mtime_ns, read_manifest(out)["created"]

    first = built()
    said = []
    build_merges(cfg, log=said.append)  # current: reused
    assert built() == first and not said
    # Other weights in the config: rebuilt.
    build_merges(cfg_with([3.0, 1.0]), log=said.append)
    assert said and read_manifest(out)["weights"] == [3.0, 1.0]
    # New weights saved over model b at the same path: stale, rebuilt with them.
    said.clear()
    wb = load_file(str(b_dir / "model.safetensors"))
    wb = {k: v + 1.0 for k, v in wb.items()}
    save_file(wb, str(b_dir / "model.safetensors"), metadata={"format": "pt"})
    build_merges(cfg, log=said.append)
    assert said
    wa, merged = load_file(str(tiny["a"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    k = next(k for k in wa if wa[k].is_floating_point())
    torch.testing.assert_close(merged[k], (wa[k] + wb[k]) / 2)
    # Killed after the merged directory was written, before its manifest: built again.
    (out / "manifest.json").unlink()
    said.clear()
    build_merges(cfg, log=said.append)
    assert said and read_manifest(out) is not None
    # A byte changed in the merged weights (same size: only the checksum sees it): built again, saying so.
    good = (out / "model.safetensors").read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(flipped))
    said.clear()
    build_merges(cfg, log=said.append)
    assert any("is damaged (model.safetensors: contents changed" in line for line in said), said
    assert (out / "model.safetensors").read_bytes() == good


def test_config_validation_of_baselines():
    from pydantic import ValidationError

    base = {"output_dir": "r", "target": {"name": "a", "path": "x"}, "sources": [{"name": "b", "path": "y"}],
            "corpus": {"path": "c"}}
    with pytest.raises(ValidationError, match="base"):
        FuseConfig.model_validate({**base, "baselines": {"merge": [{"models": ["a"], "method": "task_arithmetic"}]}})
    with pytest.raises(ValidationError, match="weights"):
        FuseConfig.model_validate({**base, "baselines": {"merge": [{"models": ["a", "b"], "weights": [1]}]}})
    with pytest.raises(ValidationError, match="two or more"):
        FuseConfig.model_validate({**base, "baselines": {"ensemble": [["a"]]}})
