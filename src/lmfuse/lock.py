"""One writer per run directory: an exclusive `flock` on `RUN_DIR/.lmfuse.lock`.

Two processes writing one run directory would interleave shards, logs and checkpoints. The
lock is an advisory `fcntl.flock`, so the kernel releases it when its holder exits, however it
exits (SIGKILL included): a lock file left behind with no holder is harmless and is simply taken
by the next process. The holder writes its pid, host, command and start time into the file so
that a second process can say who holds the directory and since when.

Re-entrant within a process (`lmfuse run` holds it while it calls each stage, which takes it
again); under a data-parallel launcher only rank 0 takes it (the ranks of one job write
disjoint shards of the same artifact).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lmfuse.errors import LmfuseError

LOCK_FILE = ".lmfuse.lock"

_held: dict[str, list] = {}  # resolved run dir -> [open file, depth]


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return (f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`), "
            f"since {info.get('started')}")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str | None = None, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold the run directory's lock for the body; fail at once if another process holds it.

    Args:
        run_dir: The run directory (created if missing).
        command: What this process is doing, for the other process's error message
            (default: its command line).
        name: The lock file's name in `run_dir` (a sweep locks its store with its own).

    Raises:
        LmfuseError: another process holds the lock (the message names it and since when), or
            the directory cannot be created.
    """
    from lmfuse.artifacts import os_error

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, run_dir, "create the run directory") from e
    except ValueError as e:  # a NUL or a lone surrogate in output_dir: no file system takes that name
        raise LmfuseError(f"cannot create the run directory: its name is not a valid path ({e})",
                          where=repr(str(run_dir)), fix="set output_dir to a path of ordinary characters") from e
    key = str((run_dir / name).resolve())
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    if _rank() != 0:
        yield
        return
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = run_dir / name
    try:
        f = open(path, "a+")  # noqa: SIM115 (held open for the body; closed below)
    except OSError as e:
        raise os_error(e, path, "create the run directory's lock file") from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise LmfuseError(f"another lmfuse process is writing to {run_dir}: {_holder(path)}",
                          where=str(path),
                          fix="wait for it to finish (or stop it: every stage resumes when rerun); "
                              "a lock file whose process has ended is taken over automatically") from e
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        f.flush()
    except OSError:
        pass  # the lock holds without the note
    _held[key] = [f, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
