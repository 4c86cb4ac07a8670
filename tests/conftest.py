"""Shared fixtures: tiny models of three tokenizer families, a tiny corpus, a config writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{kind: HF model dir} for kinds bpe (GPT-2), spm (Llama, BOS) and wordpiece (GPT-NeoX)."""
    from lmfuse.testing import KINDS, make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {k: make_tiny_model(root / k, k, seed=i) for i, k in enumerate(KINDS)}


@pytest.fixture()
def tiny_corpus(tmp_path) -> Path:
    from lmfuse.testing import write_tiny_corpus

    return write_tiny_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture()
def make_config(tmp_path, tiny_models, tiny_corpus):
    """Write a config (target bpe, sources spm and wordpiece) with overrides; return its path."""

    def make(overrides: dict | None = None, name: str = "config.yaml") -> Path:
        data = {
            "output_dir": str(tmp_path / "run"),
            "target": {"name": "tgt", "path": str(tiny_models["bpe"]), "dtype": "float32"},
            "sources": [
                {"name": "src_spm", "path": str(tiny_models["spm"]), "dtype": "float32"},
                {"name": "src_wp", "path": str(tiny_models["wordpiece"]), "dtype": "float32"},
            ],
            "corpus": {"path": str(tiny_corpus)},
            "prepare": {"block_size": 48, "validation_fraction": 0.2},
            "extract": {"top_k": 5, "batch_size": 3, "shard_size": 4},
            "train": {"max_steps": 4, "batch_size": 2, "precision": "float32", "learning_rate": 1e-3},
        }
        for key, val in (overrides or {}).items():
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            if val is None:
                node.pop(last, None)
            else:
                node[last] = val
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make
