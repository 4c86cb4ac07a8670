"""Models as evaluation and the baselines see them: an entry to score, a trained model's directory,
a cheap fingerprint for caches.

A leaf below `evaluate` and `baselines`, which both need these (before, `baselines` imported them
from `evaluate` and `evaluate` imported `baselines`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmfuse.artifacts import hash_obj
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


def fingerprint(spec: ModelSpec) -> str:
    """A cheap fingerprint of a model: where it really is, its dtype, config + weight files' names,
    sizes and mtimes (the dtype matters: without `eval.dtype` each model is scored in its own)."""
    p = Path(spec.path).expanduser()
    p = p.resolve() if p.exists() else p
    parts: list[Any] = [str(p) if p.exists() else spec.path, spec.revision, spec.dtype]
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and (f.suffix in (".safetensors", ".gguf", ".json", ".bin", ".model")):
                st = f.stat()
                parts.append([f.name, st.st_size, st.st_mtime_ns])
    elif p.is_file():
        st = p.stat()
        parts.append([p.name, st.st_size, st.st_mtime_ns])
    return hash_obj(parts)


def safe_name(label: str) -> str:
    """A label as a file or folder name (`[A-Za-z0-9_.-]`, starting with a letter or digit)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "model"
    return s if s[0].isalnum() else "m" + s
