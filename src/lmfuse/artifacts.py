"""Artifact directories: manifests, config-hash guards, atomic sharded Arrow writes.

A stage writes `stage.json` first (what config made it), complete shards one by one (each
written to a temp file and renamed, so a shard file on disk is always whole), and
`manifest.json` last. A rerun skips the shards that exist, so a killed stage resumes and the
result is byte-identical to an uninterrupted run. A directory made by a different config is
refused instead of being mixed into.

The manifest records every file of the artifact (relative path, size, sha256), so damage is
found instead of used: sizes are checked whenever an artifact's state is read (a stat per
file), contents when a stage starts on an artifact (`open_artifact`, `check_artifact`) and by
`lmfuse verify`. A damaged artifact is reported with the file and the command that rebuilds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from lmfuse import __version__
from lmfuse.errors import LmfuseError
from lmfuse.hashing import hash_obj, sha256_file

MANIFEST = "manifest.json"
STAGE = "stage.json"
# The manifest's checksum of its own other fields: an edit of the manifest (valid JSON, a changed
# value) is damage like any other, not a new truth.
SELF_HASH = "manifest_sha256"
# Files an artifact may hold that are not part of its content (they change legitimately).
UNCHECKED = (MANIFEST, STAGE, "log.jsonl")


def os_error(e: OSError, path: str | Path, doing: str = "write") -> LmfuseError:
    """An operating-system error on a path, as an `LmfuseError` that says what to do about it.

    Args:
        e: The error (its `errno` picks the advice).
        path: The file or directory concerned.
        doing: What lmfuse was doing, e.g. "write", "create the run directory".
    """
    reason = e.strerror or str(e)
    fixes = {
        errno.ENOSPC: "free disk space (or point output_dir at a larger disk), then rerun: finished shards are kept",
        errno.EDQUOT: "free space within your disk quota, then rerun: finished shards are kept",
        errno.EROFS: "the file system is read-only: set output_dir to a writable directory",
        errno.EACCES: "make the directory writable for you, or set output_dir to one that is",
        errno.EPERM: "make the directory writable for you, or set output_dir to one that is",
        errno.ENOTDIR: "a part of this path is a file, not a directory: set output_dir to a directory path",
        errno.EEXIST: "a file is in the way of a directory: move it, or set output_dir elsewhere",
        errno.EIO: "the disk reported an I/O error: check the device, then rerun",
    }
    return LmfuseError(f"cannot {doing}: {reason}", where=str(getattr(e, "filename", None) or path),
                       fix=fixes.get(e.errno, "check the path and its permissions, then rerun"))


def wrapped_os_error(e: Exception) -> OSError | None:
    """The OS error inside a library's own exception, or None.

    Rust libraries (safetensors, tokenizers) report a full disk as their own exception whose text
    ends in Rust's `(os error 28)`, not as an `OSError`.
    """
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m is None:
        return None
    path = re.search(r'at path "([^"]+)"', str(e))
    code = int(m.group(1))
    return OSError(code, os.strerror(code), path.group(1) if path else None)


@contextmanager
def writing_to(path: str | Path, doing: str) -> Iterator[None]:
    """Turn an OS error met inside the block (also one a Rust library wraps) into an `LmfuseError`
    that names `path` when the error itself names no file (a library's save often does not).

    Args:
        path: The directory or file being written.
        doing: What is being written, e.g. "write the best checkpoint".
    """
    try:
        yield
    except LmfuseError:
        raise
    except Exception as e:
        inner = wrapped_os_error(e)
        if inner is None:
            raise
        raise os_error(inner, path, doing) from e


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
    """Write a file whole or not at all (temp file + rename), with an ordinary file's mode.

    Raises:
        LmfuseError: the file cannot be written (full disk, read-only or missing directory...);
            no partial file is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise os_error(e, path) from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; open() would give 0644 under umask 022
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_error(e, path) from e
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
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
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
    """Memory-map Arrow stream files as one `datasets.Dataset`.

    Raises:
        LmfuseError: a file is not a readable Arrow stream (it names the file).
    """
    from datasets import Dataset, concatenate_datasets

    parts = []
    for p in paths:
        try:
            parts.append(Dataset.from_file(str(p)))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise LmfuseError(f"cannot read shard {Path(p).name}: {e}", where=str(p),
                              fix=f"rebuild the artifact: `{regenerate_command(Path(p).parent.parent)}`") from e
    if not parts:
        raise LmfuseError("artifact holds no shards")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _generic_command(path: Path, stage: str | None) -> str:
    return f"rebuild {path} with the stage that makes it"


_rebuild: list = [_generic_command]  # set by `lmfuse.graph` (`set_rebuild_command`), which knows the commands


def set_rebuild_command(fn) -> None:
    """Say how the command that rebuilds an artifact is found: `fn(path, stage) -> command`.

    The storage layer names that command in its errors but does not know the command line; the
    stage graph (`lmfuse.graph`, loaded by every entry point) registers its table here.
    """
    _rebuild[0] = fn


def regenerate_command(path: str | Path, stage: str | None = None) -> str:
    """The command that rebuilds the artifact at `path` (`RUN/<stage>[/<name>]`), for error messages."""
    return _rebuild[0](Path(path), stage)


def build_command(path: str | Path, stage: str | None = None) -> str:
    """The command that builds the artifact at `path` when it is missing."""
    return regenerate_command(path, stage).replace(" --overwrite", "")


def content_files(path: str | Path) -> list[Path]:
    """The files that make up an artifact's content: all but the manifest, stage record, logs,
    dot files (lock, temp files) and temp files."""
    path = Path(path)
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or f.name.endswith(".tmp"):
            continue
        if f.is_file() and str(rel) not in UNCHECKED:
            out.append(f)
    return out


def file_records(path: str | Path, files: Iterable[str | Path] | None = None) -> dict[str, dict]:
    """{relative path: {size, sha256}} of an artifact's content files (`content_files`), or of
    just `files` (paths inside `path`)."""
    path = Path(path)
    chosen = content_files(path) if files is None else [path / f for f in files]
    return {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in chosen}


def record_hash(record: dict, key: str = SELF_HASH) -> str:
    """sha256 of a JSON record's fields other than `key` (its own checksum), as JSON would store them."""
    fields = {k: v for k, v in record.items() if k != key}
    text = json.dumps(_finite(fields), sort_keys=True, default=str, allow_nan=False)
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_hash(manifest: dict) -> str:
    """sha256 of a manifest's fields other than `SELF_HASH`, as JSON would store them."""
    return record_hash(manifest, SELF_HASH)


def manifest_problem(manifest: dict) -> str | None:
    """Why a manifest cannot be trusted (edited after it was written), or None.

    Manifests of older lmfuse versions hold no checksum of themselves and are taken as they are.
    """
    if SELF_HASH in manifest and manifest[SELF_HASH] != manifest_hash(manifest):
        return f"{MANIFEST}: edited after it was written (its checksum of its own fields differs)"
    return None


def damage(path: str | Path, manifest: dict, full: bool = False) -> list[str]:
    """What is wrong with a complete artifact's files: missing, resized or (with `full`) changed.

    Args:
        path: The artifact directory.
        manifest: Its manifest (`files` records; none in manifests of older lmfuse versions, which
            cannot be checked and give no problems).
        full: Also compare each file's sha256 (reads every byte); otherwise sizes only (a stat).

    Returns:
        One line per damaged file, e.g. `shards/shard-00001.arrow: 1200 bytes, expected 4096`.
    """
    path = Path(path)
    edited = manifest_problem(manifest)
    if edited:  # its records cannot be trusted, so neither can the files they vouch for
        return [edited]
    problems = []
    for rel, rec in sorted((manifest.get("files") or {}).items()):
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != rec.get("size"):
            problems.append(f"{rel}: {size} bytes, expected {rec.get('size')}")
        elif full and sha256_file(f) != rec.get("sha256"):
            problems.append(f"{rel}: contents changed (sha256 differs from the manifest's)")
    return problems


class ArtifactDir:
    """One stage's output directory.

    Args:
        path: The directory.
        stage: Stage name (`prepare`, `extract`, ...).
        config_hash: Hash of the config fields that change this stage's output.
        inputs: Upstream artifacts' config hashes, by name.
        overwrite: Regenerate: delete the artifact (complete, partial, or made by another
            config) when the stage begins. Until then `is_complete()` is False, so every stage
            that asks it rebuilds.
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
        self._begun = False
        self.problems: list[str] = []  # the damage found by the last `state()`

    @property
    def key(self) -> str:
        """Hash of the config hash and the inputs' keys: it changes when anything upstream does.

        Downstream artifacts record this (not the bare config hash) as their input, so a change
        to, say, `prepare.block_size` invalidates every artifact below `prepare`.
        """
        return hash_obj([self.config_hash, self.inputs])

    # -- state ---------------------------------------------------------------------------
    def state(self) -> str:
        """`missing`, `complete`, `damaged` (complete and current, but a file is missing or has
        another size than the manifest records: see `problems`), `partial` (same config,
        unfinished) or `stale` (made by another config or from other inputs)."""
        self.problems = []
        if self.path.exists() and not self.path.is_dir():
            raise LmfuseError(f"{self.path} is a file, not an artifact directory", where=str(self.path),
                              fix="move the file away (or set output_dir to another directory), then rerun")
        try:
            manifest = read_manifest(self.path)
        except LmfuseError as e:  # not JSON any more: damage like any other, the whole artifact goes
            self.problems = [f"{MANIFEST}: unreadable ({e.what})"]
            return "damaged"
        if manifest is not None and manifest_problem(manifest):  # before trusting its config hash
            self.problems = [manifest_problem(manifest)]
            return "damaged"
        try:
            stage = read_json(self.path / STAGE) if manifest is None else None
        except LmfuseError:
            stage = {"config_hash": None}  # an unfinished artifact of unknown config: replaced by `begin`
        if manifest is None and stage is None:
            return "missing"
        rec = manifest or stage
        if rec.get("config_hash") != self.config_hash or rec.get("inputs", {}) != self.inputs:
            return "stale"
        if manifest is None:
            return "partial"
        self.problems = damage(self.path, manifest)
        return "damaged" if self.problems else "complete"

    def is_complete(self) -> bool:
        """Complete, current and undamaged, and not to be regenerated (`overwrite`)."""
        if self.overwrite and not self._begun:
            return False
        return self.state() == "complete"

    def _remove(self) -> None:
        if self.path.is_symlink():  # a sweep links artifacts into its store: drop the link, keep the entry
            self.path.unlink()
        elif self.path.exists():
            shutil.rmtree(self.path)

    def begin(self, log=print) -> None:
        """Claim the directory for this config, so the stage can write its missing files.

        - `overwrite`: whatever is there is deleted (a complete artifact too: it is rebuilt);
        - a partial artifact of another config (a failed or killed run) is replaced, with a line
          in the log; a complete one of another config is refused unless `overwrite`;
        - a damaged one loses its manifest and its damaged files, so the stage rewrites just those
          (an edited manifest vouches for nothing: the whole artifact is rebuilt);
        - temp files a killed write left behind are removed.
        """
        state = self.state()
        manifest = read_manifest(self.path) if state in ("stale", "complete") else None
        if self.overwrite and state != "missing":
            log(f"{self.stage}: --overwrite: deleting {self.path} and building it again")
            self._remove()
            state = "missing"
        elif state == "stale" and manifest is None:
            log(f"{self.stage}: {self.path} holds an unfinished artifact of another config; replacing it")
            self._remove()
        elif state == "stale":
            raise LmfuseError(
                f"{self.path} holds a '{manifest.get('stage', '?')}' artifact made from a different "
                f"config (config hash {manifest.get('config_hash')}, inputs {manifest.get('inputs')}; "
                f"this run has {self.config_hash}, inputs {self.inputs})",
                where=str(self.path),
                fix="use another output directory, or pass --overwrite to delete it and start again",
            )
        elif state == "damaged" and self.problems[0].startswith(f"{MANIFEST}:"):
            log(f"{self.stage}: {self.path} is damaged ({self.problems[0]}); building it again")
            self._remove()
            state = "missing"
        elif state == "damaged":
            log(f"{self.stage}: {self.path} is damaged ({'; '.join(self.problems[:3])}); rebuilding the damaged files")
            (self.path / MANIFEST).unlink()
            for line in self.problems:
                (self.path / line.split(": ", 1)[0]).unlink(missing_ok=True)
        elif state == "complete":
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, self.path, "create the artifact directory") from e
        for tmp in self.path.rglob("*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
        if state in ("missing", "stale"):
            atomic_write_json(self.path / STAGE, {
                "stage": self.stage, "config_hash": self.config_hash, "inputs": self.inputs, "key": self.key,
                "lmfuse_version": __version__,
            })
        self._begun = True

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
        """The artifact's rows as one memory-mapped `datasets.Dataset` (file sizes checked)."""
        state = self.state()
        if state == "damaged":
            raise LmfuseError(f"the {self.stage} artifact is damaged: {'; '.join(self.problems[:3])}",
                              where=str(self.path), fix=f"rebuild it: `{regenerate_command(self.path, self.stage)}`")
        if state != "complete":
            raise LmfuseError(f"{self.stage} artifact at {self.path} is not complete",
                              where=str(self.path), fix=f"build it first: `{build_command(self.path, self.stage)}`")
        return load_arrow_dataset(self.shard_paths())

    # -- finish --------------------------------------------------------------------------
    def finish(self, **extra: Any) -> dict:
        """Write the manifest, with every content file's size and sha256; the artifact is
        complete from then on."""
        for tmp in self.path.rglob("*.tmp"):  # a killed write's leftovers are no part of it
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
        manifest = {
            "stage": self.stage,
            "lmfuse_version": __version__,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "key": self.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self._t0, 3),
            **extra,
            "files": file_records(self.path),
        }
        manifest[SELF_HASH] = manifest_hash(manifest)
        atomic_write_json(self.path / MANIFEST, manifest)
        self._begun = True
        return manifest


def load_complete(path: str | Path, stage: str):
    """A complete artifact's rows as one memory-mapped `datasets.Dataset` (file sizes checked).

    For a stage reading an input the runner has already checked against its checksums.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise LmfuseError(f"{stage} artifact at {path} is not complete", where=str(path),
                          fix=f"build it first: `{build_command(path, stage)}`")
    problems = damage(path, manifest)
    if problems:
        raise LmfuseError(f"the {stage} artifact is damaged: {'; '.join(problems[:3])}",
                          where=str(path), fix=f"rebuild it: `{regenerate_command(path, stage)}`")
    return load_arrow_dataset(sorted((path / "shards").glob("shard-*.arrow")))


def check_artifact(path: str | Path, stage: str, full: bool = True) -> dict:
    """The manifest of a complete, undamaged artifact; raise naming the damage otherwise.

    Args:
        path: The artifact directory.
        stage: The stage it must hold (`prepare`, `extract`, ...).
        full: Compare contents (sha256, reads every byte) as well as sizes: what a stage does
            once with each artifact it starts on.

    Raises:
        LmfuseError: no complete artifact of that stage there, or a file is missing, resized or
            changed (the message names the files and the command that rebuilds the artifact).
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except LmfuseError as e:
        raise LmfuseError(f"the {stage} artifact is damaged: {MANIFEST} is unreadable ({e.what})",
                          where=str(path / MANIFEST), fix=f"rebuild it: `{regenerate_command(path, stage)}`") from e
    if manifest is None:
        raise LmfuseError(f"no complete {stage} artifact at {path}", where=str(path),
                          fix=f"build it first: `{build_command(path, stage)}` (or the whole run)")
    if manifest.get("stage") != stage:
        raise LmfuseError(f"{path} holds a '{manifest.get('stage')}' artifact, not '{stage}'",
                          where=str(path), fix="point at the right directory")
    problems = damage(path, manifest, full=full)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LmfuseError(f"the {stage} artifact is damaged: {'; '.join(problems[:3])}{more}",
                          where=str(path), fix=f"rebuild it: `{regenerate_command(path, stage)}` "
                                               "(or run the whole run again, which rebuilds damaged files)")
    return manifest


def open_artifact(path: str | Path, stage: str, full: bool = True) -> tuple[dict, Any]:
    """Read a complete upstream artifact: (manifest, dataset or None if it has no shards).

    Its files are checked first (`check_artifact`; contents too unless `full=False`), so damaged
    data is reported, never used.
    """
    path = Path(path)
    manifest = check_artifact(path, stage, full=full)
    shards = sorted((path / "shards").glob("shard-*.arrow"))
    return manifest, (load_arrow_dataset(shards) if shards else None)
