"""A sweep's store: each run's artifact paths are links into `OUT/store/<stage>/<key>/`.

Only links are made or removed here; the artifacts themselves are the runner's to build.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmfuse.artifacts import read_json
from lmfuse.errors import LmfuseError
from lmfuse.graph import KINDS


def link(link: Path, target: Path) -> None:
    """Make `link` a relative symbolic link to the directory `target` (created if missing).

    A link to somewhere else is replaced (the variant changed; the store keeps the old entry).
    A real directory is refused: it is not the sweep's, and deleting it is the user's call.
    """
    target.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
    elif link.exists():
        raise LmfuseError(f"{link} is a directory, not a link into the sweep's store",
                          where=str(link), fix="move or delete it (the sweep makes this path itself), then rerun")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, link)  # atomic: the path is always a whole link


def store_counts(out_dir: str | Path) -> dict[str, int]:
    """Complete artifacts in a sweep's store, per stage (`train` split into fused and control)."""
    store = Path(out_dir) / "store"
    counts: dict[str, int] = {}
    for kind in KINDS:
        for d in sorted((store / kind).glob("*/manifest.json")):
            name = kind
            if kind == "train":
                name = "train/clm" if (read_json(d) or {}).get("control") else "train/fused"
            counts[name] = counts.get(name, 0) + 1
    counts["eval records"] = len(list((store / "eval_cache").glob("*.json")))
    return counts


def unlink_others(run_dir: Path, labels: set[str]) -> None:
    """Remove the run's links to artifacts its config no longer has (a variant dropped a source).

    Only the links go (the store keeps the artifacts); the report would otherwise still list them.
    """
    for kind in KINDS:
        for p in sorted((run_dir / kind).glob("*")):
            if p.is_symlink() and f"{kind}/{p.name}" not in labels:
                p.unlink()
