"""Models as evaluation and the baselines see them: an entry to score, a trained model's directory.

A leaf below `evaluate` and `baselines`, which both need these (before, `baselines` imported them
from `evaluate` and `evaluate` imported `baselines`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmfuse.config import ModelSpec


@dataclass
class EvalModel:
    """One entry of the evaluation: a label, how to load it, and what its cache key covers."""

    label: str
    kind: str  # the model's role: target | source | fused | clm | ensemble | merge | model
    spec: ModelSpec | None = None  # None for ensembles
    members: list[ModelSpec] = field(default_factory=list)  # ensemble members

    def specs(self) -> list[ModelSpec]:
        return self.members or [self.spec]  # type: ignore[list-item]


def dir_spec(name: str, path: str | Path) -> ModelSpec:
    """A model entry for an HF directory lmfuse wrote (trained, merged): float32 weights."""
    return ModelSpec(name=name, path=str(path), dtype="float32")


def hf_model_dir(path: str | Path) -> Path | None:
    """`path` when it holds an HF model (a `config.json`), else None."""
    path = Path(path)
    return path if (path / "config.json").exists() else None


def safe_name(label: str) -> str:
    """A label as a file or folder name (`[A-Za-z0-9_.-]`, starting with a letter or digit)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "model"
    return s if s[0].isalnum() else "m" + s
