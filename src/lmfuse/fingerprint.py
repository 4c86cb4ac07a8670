"""Fingerprints of the files a stage reads: a model's weights, config and tokenizer, by content.

An artifact's key must change when a model's files change at the same path (a fine-tuned
checkpoint saved over the old one), so keys hash file contents, not paths (`hashing.cached_sha256`
remembers each file's hash). This is the one fingerprint of a model: extraction keys, the eval
cache and merges all use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmfuse.hashing import cached_sha256

# Files of a model directory that change what it computes. Anything else (README, logs, a
# training run's checkpoints/) is left out, so a model card edit does not invalidate extractions.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
CONFIG_NAMES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece",
                      "sentencepiece", "chat_template")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a model directory is part of its tokenizer."""
    return name.startswith(TOKENIZER_PREFIXES) or name.endswith(TOKENIZER_SUFFIXES)


def _model_files(folder: Path, tokenizer_only: bool) -> list[Path]:
    out = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        tok = is_tokenizer_file(f.name)
        model = f.name in CONFIG_NAMES or f.name.endswith(WEIGHT_SUFFIXES)
        if tok or (model and not tokenizer_only):
            out.append(f)
    if tokenizer_only and not out:  # a GGUF holds its tokenizer inside the weights file
        out = [f for f in sorted(folder.glob("*.gguf")) if f.is_file()]
    return out


def files_fingerprint(folder: str | Path, files: list[Path]) -> str:
    """sha256 over (name relative to `folder`, content sha256) of each file."""
    folder = Path(folder)
    parts = [[str(f.relative_to(folder)), cached_sha256(f)] for f in files]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def model_fingerprint(spec, tokenizer_only: bool = False) -> str:
    """A content fingerprint of the files a model entry loads from.

    Args:
        spec: A config model entry (`path`, `revision`).
        tokenizer_only: Only the tokenizer's files (what `prepare` and `vocab-map` read), so new
            weights under the same tokenizer leave those stages alone.

    Returns:
        16 hex digits. A local directory: its weight, config and tokenizer files (by name
        pattern, top level, as `from_pretrained` reads them); a `.gguf` file: its bytes; a
        `pull:NAME` model: the pulled directory (pulled first if it is not there); a hub id:
        the id and revision (no local files to read: pin `revision` to pin the weights).
    """
    p = spec.path
    if p.startswith("pull:"):
        from lmfuse.models import PULLABLE, pull, pulled_dir

        name = p[5:]
        if name not in PULLABLE:
            return hashlib.sha256(json.dumps(["unknown", p]).encode()).hexdigest()[:16]
        folder = pulled_dir(name)
        if not (folder / "config.json").exists():
            folder = Path(pull(name))
        return files_fingerprint(folder, _model_files(folder, tokenizer_only))
    path = Path(p).expanduser()
    if path.is_file():
        return files_fingerprint(path.parent, [path])
    if path.is_dir():
        return files_fingerprint(path, _model_files(path, tokenizer_only))
    return hashlib.sha256(json.dumps(["hub", p, spec.revision]).encode()).hexdigest()[:16]
