"""What a stage is: the definition each stage module gives, and what the runner hands it.

A stage definition knows its own config section, its inputs (by role) and how to write one
shard; it knows nothing of the graph (which computes its key from its inputs' keys) or of the
runner (which locks, claims, writes shards atomically, keeps per-shard stats and finishes).
The model is datatrove's pipeline step and mergekit's graph node: the executor calls the step,
never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from lmfuse.artifacts import ArtifactDir


@dataclass
class Build:
    """One artifact being built: what the runner gives a stage's `n_shards`, `write`, `summary`.

    Attributes:
        art: The artifact directory (claimed: `begin` has run on the main process).
        inputs: {role: the input artifact's directory}.
        log: Where progress lines go.
        state: Scratch space a stage fills in `n_shards` and reads in `write`/`summary`.
    """

    art: ArtifactDir
    inputs: dict[str, Path]
    log: Callable[[str], Any] = print
    state: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One artifact's definition (subclasses in prepare.py, extract.py, vocabmap.py, align.py,
    train.py, baselines.py).

    Class attributes:
        kind: The stage's name (`extract`); the artifact lives at `RUN/<label>`.
        compression: Arrow IPC compression of its shards (None: memory-mappable).
        shard_stats: The runner writes `stats/stats-XXXXX.json` (what `write` yields beside each
            shard) before the shard, so a shard on disk always has its stats; `summary` gets them.
        all_ranks: Every process runs `write` (training), not only the owner of each shard.
        checks_inputs: The runner checks every input's files against their checksums before it
            claims the directory (False: the stage reads them through verified reads itself).
        verify_on_reuse: A complete artifact is checked by content (not only sizes) before it is
            reused, and rebuilt whole if damaged or stale (a merge: eval reads it as an input).
    """

    kind: ClassVar[str] = ""
    compression: ClassVar[str | None] = None
    shard_stats: ClassVar[bool] = False
    all_ranks: ClassVar[bool] = False
    checks_inputs: ClassVar[bool] = True
    verify_on_reuse: ClassVar[bool] = False

    def __init__(self, label: str):
        self.label = label

    @property
    def name(self) -> str:
        """The part of the label after the stage (`tgt` in `extract/tgt`; "" for `prepare`)."""
        return self.label.partition("/")[2]

    def inputs(self) -> dict[str, str]:
        """{name the manifest gives an input: the input's label, `#tokens` for its tokens key}."""
        return {}

    def input_values(self) -> dict[str, str]:
        """Inputs that are not artifacts of the run: {name: value} (a merge's models' fingerprints)."""
        return {}

    def config_hash(self) -> str:
        """Hash of this stage's config section and the files it reads (not its inputs)."""
        raise NotImplementedError  # every stage defines it; not reachable from a user's choice

    def derived_keys(self, key: str, input_keys: dict[str, str]) -> dict[str, str]:
        """More keys this artifact offers its consumers (`#tokens`), recorded in its manifest."""
        return {}

    def validate(self) -> None:
        """Raise every problem of the config found without reading anything (before any work)."""

    def open(self, b: Build) -> None:
        """Read what must be read before the directory is claimed (training reads its inputs)."""

    def n_shards(self, b: Build) -> int:
        """How many shards it has; called once the inputs are checked and the directory claimed."""
        return 1

    def shard_done(self, b: Build, i: int) -> bool:
        done = b.art.shard_done(i)
        return done and (not self.shard_stats or stats_path(b.art, i).exists())

    def write(self, b: Build, todo: list[int]) -> Iterator[tuple[int, pa.Table | None, dict | None]]:
        """Make the given shards: yield (index, table, stats); the runner writes them."""
        raise NotImplementedError  # every stage defines it

    def summary(self, b: Build, stats: list[dict]) -> dict:
        """The manifest's fields, once every shard is there (`stats`: each shard's, in order)."""
        return {}

    def on_complete(self, art: ArtifactDir) -> None:
        """Called when the artifact is found complete (train drops a leftover `.final/`)."""

    def before_finish(self, b: Build) -> None:
        """Called on the main process after the last shard, before the manifest."""

    def after_finish(self, b: Build, manifest: dict) -> None:
        """Called on the main process after the manifest is written (log lines, cleanup)."""



def stats_path(art: ArtifactDir, i: int) -> Path:
    """Where the runner keeps shard i's stats."""
    return art.path / "stats" / f"stats-{i:05d}.json"
