"""Artifact directories: manifests, config-hash guards, atomic sharded Arrow writes.

A stage writes `stage.json` first (what config made it), complete shards one by one (each
written to a temp file and renamed, so a shard file on disk is always whole), and
`manifest.json` last. A rerun skips the shards that exist, so a killed stage resumes and the
result is byte-identical to an uninterrupted run. A directory made by a different config is
refused instead of being mixed into.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from lmfuse import __version__
from lmfuse.errors import LmfuseError

MANIFEST = "manifest.json"
STAGE = "stage.json"


def hash_obj(obj: Any) -> str:
    """A short stable hash of any JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file whole or not at all (temp file + rename), with an ordinary file's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; open() would give 0644 under umask 022
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """NaN and ±inf as None: JSON has no such numbers (`json.dumps` would write invalid JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically; non-finite numbers become null, so the file is always valid JSON."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmfuseError(f"cannot read {path.name}: {e}", where=str(path),
                          fix="delete the artifact directory and rerun the stage") from e


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a complete artifact, or None."""
    return read_json(Path(path) / MANIFEST)


def write_arrow(path: str | Path, table: pa.Table, compression: str | None = None, level: int | None = 6) -> None:
    """Write a table as one Arrow IPC stream file, atomically.

    With `compression="zstd"` (Arrow's own IPC compression, which every Arrow reader,
    `datasets.Dataset.from_file` included, undoes transparently) the per-token columns of
    `extract` shrink by a third or more; the price is that a reader decompresses a shard into
    memory instead of memory-mapping it, so only `extract` (the largest artifact) uses it. zstd
    output is a pure function of the input, so resumed and data-parallel runs stay byte-identical.

    Args:
        path: destination file.
        table: the rows.
        compression: `zstd`, `lz4` or None (plain, memory-mappable buffers).
        level: zstd level; 6 stores extract shards ~5% smaller than zstd's fastest level at a
            negligible cost next to the forward passes that make them.
    """
    sink = pa.BufferOutputStream()
    codec = pa.Codec(compression, compression_level=level if compression == "zstd" else None) if compression else None
    options = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def load_arrow_dataset(paths: Iterable[str | Path]):
    """Memory-map Arrow stream files as one `datasets.Dataset`."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(p)) for p in paths]
    if not parts:
        raise LmfuseError("artifact holds no shards")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


class ArtifactDir:
    """One stage's output directory.

    Args:
        path: The directory.
        stage: Stage name (`prepare`, `extract`, ...).
        config_hash: Hash of the config fields that change this stage's output.
        inputs: Upstream artifacts' config hashes, by name.
        overwrite: Delete an artifact made by another config instead of refusing.
        compression: Arrow IPC compression of the shards (`write_arrow`); None = memory-mappable.
    """

    def __init__(self, path: str | Path, stage: str, config_hash: str,
                 inputs: dict[str, str] | None = None, overwrite: bool = False, compression: str | None = None):
        self.path = Path(path)
        self.stage = stage
        self.config_hash = config_hash
        self.inputs = dict(inputs or {})
        self.overwrite = overwrite
        self.compression = compression
        self._t0 = time.time()

    @property
    def key(self) -> str:
        """Hash of the config hash and the inputs' keys: it changes when anything upstream does.

        Downstream artifacts record this (not the bare config hash) as their input, so a change
        to, say, `prepare.block_size` invalidates every artifact below `prepare`.
        """
        return hash_obj([self.config_hash, self.inputs])

    # -- state ---------------------------------------------------------------------------
    def state(self) -> str:
        """`missing`, `complete`, `partial` (same config, unfinished) or `stale`."""
        manifest = read_manifest(self.path)
        stage = read_json(self.path / STAGE)
        if manifest is None and stage is None:
            return "missing"
        rec = manifest or stage
        if rec.get("config_hash") != self.config_hash or rec.get("inputs", {}) != self.inputs:
            return "stale"
        return "complete" if manifest is not None else "partial"

    def is_complete(self) -> bool:
        return self.state() == "complete"

    def begin(self) -> None:
        """Claim the directory for this config; refuse one made by another config."""
        state = self.state()
        if state == "stale":
            if not self.overwrite:
                rec = read_manifest(self.path) or read_json(self.path / STAGE) or {}
                raise LmfuseError(
                    f"{self.path} holds a '{rec.get('stage', '?')}' artifact made from a different "
                    f"config (config hash {rec.get('config_hash')}, inputs {rec.get('inputs')}; "
                    f"this run has {self.config_hash}, inputs {self.inputs})",
                    where=str(self.path),
                    fix="use another output directory, or pass --overwrite to delete it and start again",
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if state in ("missing", "stale"):
            atomic_write_json(self.path / STAGE, {
                "stage": self.stage, "config_hash": self.config_hash, "inputs": self.inputs, "key": self.key,
                "lmfuse_version": __version__,
            })

    # -- shards --------------------------------------------------------------------------
    @property
    def shard_dir(self) -> Path:
        return self.path / "shards"

    def shard_path(self, i: int) -> Path:
        return self.shard_dir / f"shard-{i:05d}.arrow"

    def shard_done(self, i: int) -> bool:
        return self.shard_path(i).exists()

    def write_shard(self, i: int, table: pa.Table) -> None:
        write_arrow(self.shard_path(i), table, self.compression)

    def shard_paths(self) -> list[Path]:
        return sorted(self.shard_dir.glob("shard-*.arrow"))

    def load(self):
        """The artifact's rows as one memory-mapped `datasets.Dataset`."""
        if not self.is_complete():
            raise LmfuseError(f"{self.stage} artifact at {self.path} is not complete",
                              where=str(self.path), fix=f"run `lmfuse {self.stage}` first")
        return load_arrow_dataset(self.shard_paths())

    # -- finish --------------------------------------------------------------------------
    def finish(self, **extra: Any) -> dict:
        """Write the manifest; the artifact is complete from then on."""
        manifest = {
            "stage": self.stage,
            "lmfuse_version": __version__,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "key": self.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self._t0, 3),
            **extra,
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest


def open_artifact(path: str | Path, stage: str) -> tuple[dict, Any]:
    """Read a complete upstream artifact: (manifest, dataset)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise LmfuseError(f"no complete {stage} artifact at {path}", where=str(path),
                          fix=f"run `lmfuse {stage}` first (or `lmfuse run CONFIG`)")
    if manifest.get("stage") != stage:
        raise LmfuseError(f"{path} holds a '{manifest.get('stage')}' artifact, not '{stage}'",
                          where=str(path), fix="point at the right directory")
    shards = sorted((path / "shards").glob("shard-*.arrow"))
    return manifest, (load_arrow_dataset(shards) if shards else None)
