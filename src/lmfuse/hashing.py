"""Hashes: of JSON-able objects (config keys), of files' bytes (checksums), remembered by stat.

A content hash of a multi-GB weights file takes seconds, so `cached_sha256` remembers each
file's sha256 by (resolved path, size, mtime_ns, ctime_ns, inode): in memory, and for files of
1 MiB or more in `$LMFUSE_HOME/hashes/`, so a model is hashed once, not on every `lmfuse run`.
Any write to a file changes its ctime (even one that puts the mtime back), and a file replaced by
a rename has a new inode, so a changed file is never taken for the old one.

The bottom layer (standard library only): artifacts, fingerprints and stages all use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

PERSIST_MIN_BYTES = 1 << 20  # smaller files are hashed again (faster than a cache lookup on disk)



def cache_home() -> Path:
    """Where pulled and converted models and remembered hashes live (`$LMFUSE_HOME`, default
    `~/.cache/lmfuse`)."""
    return Path(os.environ.get("LMFUSE_HOME", Path.home() / ".cache" / "lmfuse")).expanduser()


def hash_obj(obj: Any) -> str:
    """A short stable hash of any JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """The first 16 hex digits of a file's sha256."""
    return sha256_file(path)[:16]


_MEMO: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _hashes_dir() -> Path:
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
