"""Fingerprints of the files a stage reads: a model's weights, config and tokenizer, by content.

An artifact's key must change when a model's files change at the same path (a fine-tuned
checkpoint saved over the old one), so keys hash file contents, not paths. A content hash of a
multi-GB weights file takes seconds, so each file's sha256 is remembered by (resolved path,
size, mtime_ns, ctime_ns, inode): in memory, and for files of 1 MiB or more in
`$LMFUSE_HOME/hashes/`, so a model is hashed once, not on every `lmfuse run`. Any write to a
file changes its ctime (even one that puts the mtime back), and a file replaced by a rename
has a new inode, so a changed file is never taken for the old one.

A leaf module (standard library only at import time): every stage and `evaluate` can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PERSIST_MIN_BYTES = 1 << 20  # smaller files are hashed again (faster than a cache lookup on disk)

# Files of a model directory that change what it computes. Anything else (README, logs, a
# training run's checkpoints/) is left out, so a model card edit does not invalidate extractions.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
CONFIG_NAMES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece",
                      "sentencepiece", "chat_template")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")

_MEMO: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _hashes_dir() -> Path:
    from lmfuse.models import cache_home

    return cache_home() / "hashes"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 (hex) of a file's bytes, read now (no cache): for checking artifacts."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: str | Path) -> str:
    """A file's sha256, remembered by (resolved path, size, mtime_ns, ctime_ns, inode).

    Files of `PERSIST_MIN_BYTES` or more are remembered across processes under
    `$LMFUSE_HOME/hashes/` (one small file per entry: concurrent runs never race on a shared
    index); a cache that cannot be written is skipped silently (it only saves time).
    """
    path = Path(path)
    key = _stat_key(path)
    if key in _MEMO:
        return _MEMO[key]
    entry = None
    if key[1] >= PERSIST_MIN_BYTES:
        entry = _hashes_dir() / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32] + ".txt")
        try:
            digest = entry.read_text().strip()
            if len(digest) == 64:
                _MEMO[key] = digest
                return digest
        except OSError:
            pass
    digest = sha256_file(path)
    _MEMO[key] = digest
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(digest + "\n")
            os.replace(tmp, entry)
        except OSError:
            pass
    return digest


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
