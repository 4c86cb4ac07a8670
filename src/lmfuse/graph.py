"""The stage graph: every artifact of a run, where it lives, its key, and what rebuilds it.

    prepare ──► extract/<model> ─┬─► align/<source> ──► train/fused ──► merge/<label> ──► eval ──► report
    vocab_map/<source> ──────────┘   extract/<target>#tokens ──► train/clm ──┘

`Graph(cfg)` lists the nodes in build order (inputs before consumers). A node's key is the
hash of its stage's config hash and its inputs' keys, computed once, top-down and memoised, so
every key (and so every place in a sweep's store) is known before anything runs (a merge of
the run's trained models is keyed by their keys, not their files). `lmfuse run`, every stage
command, `verify`, the report's timings and the sweep read this module; nothing else lists
stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmfuse.artifacts import ArtifactDir, set_rebuild_command
from lmfuse.errors import LmfuseError
from lmfuse.hashing import hash_obj
from lmfuse.stage import Stage

# Where each kind of artifact lives under a run directory, in build order; `eval` and `report`
# are written last by the runner from the artifacts above them.
KINDS = ("prepare", "extract", "vocab_map", "align", "train", "merge")
SINGLE = ("prepare", "eval")  # one directory, not one per model
VERIFIED = (*KINDS, "eval")  # what `lmfuse verify` checks


def stages(cfg) -> list[Stage]:
    """Every stage definition of a config, inputs before consumers."""
    from lmfuse.align import AlignStage
    from lmfuse.baselines import MergeStage
    from lmfuse.extract import ExtractStage
    from lmfuse.prepare import PrepareStage
    from lmfuse.train import TrainStage
    from lmfuse.vocabmap import VocabMapStage

    out: list[Stage] = [PrepareStage(cfg)]
    out += [ExtractStage(cfg, m.name) for m in cfg.models]
    out += [VocabMapStage(cfg, s.name) for s in cfg.sources]
    out += [AlignStage(cfg, s.name) for s in cfg.sources]
    if cfg.fuses:
        out.append(TrainStage(cfg, control=False))
    if cfg.train.control or not cfg.fuses:  # a run without sources trains the CLM-only model
        out.append(TrainStage(cfg, control=True))
    out += [MergeStage(cfg, i) for i in range(len(cfg.baselines.merge))]
    return out


@dataclass
class Node:
    """One artifact of a run: its stage definition, its inputs and (once asked) its keys."""

    stage: Stage
    path: Path
    graph: Graph = field(repr=False)
    _keys: dict[str, str] | None = field(default=None, repr=False)
    _input_keys: dict[str, str] | None = field(default=None, repr=False)
    _config_hash: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.stage.label

    @property
    def kind(self) -> str:
        return self.stage.kind

    @property
    def command(self) -> str:
        """The command that rebuilds this artifact."""
        return rebuild_command(Path(self.label), self.kind)

    @property
    def inputs(self) -> dict[str, str]:
        """{manifest input name: input label} (the edges of the graph)."""
        return {name: ref.partition("#")[0] for name, ref in self.stage.inputs().items()}

    @property
    def config_hash(self) -> str:
        if self._config_hash is None:
            self._config_hash = self.stage.config_hash()
        return self._config_hash

    @property
    def input_keys(self) -> dict[str, str]:
        """{manifest input name: the key of that input} (`label#tokens`: its tokens key)."""
        if self._input_keys is None:
            keys = {name: self.graph.key(ref) for name, ref in self.stage.inputs().items()}
            self._input_keys = {**keys, **self.stage.input_values()}
        return self._input_keys

    @property
    def key(self) -> str:
        return self.keys[""]

    @property
    def keys(self) -> dict[str, str]:
        """"": the artifact's key (`ArtifactDir.key`); others: its derived keys (`tokens`)."""
        if self._keys is None:
            key = hash_obj([self.config_hash, self.input_keys])
            self._keys = {"": key, **self.stage.derived_keys(key, self.input_keys)}
        return self._keys

    def artifact(self, overwrite: bool = False) -> ArtifactDir:
        return ArtifactDir(self.path, self.kind, self.config_hash, self.input_keys, overwrite,
                           compression=self.stage.compression)


class Graph:
    """The nodes of one config, in build order.

    Args:
        cfg: The run's config.
        place: Where a node's artifact lives (default `RUN/<label>`); a sweep links this path
            to its store, so the stage code always reads and writes `RUN/<label>`.
    """

    def __init__(self, cfg, place: Callable[[Node], Path] | None = None):
        self.cfg = cfg
        self.nodes: dict[str, Node] = {}
        for st in stages(cfg):
            self.nodes[st.label] = Node(st, cfg.run_dir / st.label, self)
        self.place = place

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes.values()))

    def __getitem__(self, label: str) -> Node:
        if label not in self.nodes:
            raise LmfuseError(f"this config has no artifact {label!r}", where=str(self.cfg.run_dir),
                              fix=f"choose one of: {', '.join(self.nodes)}")
        return self.nodes[label]

    def key(self, ref: str) -> str:
        """The key of `label` or `label#derived`."""
        label, _, derived = ref.partition("#")
        return self[label].keys[derived]

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self if n.kind == kind]

    def upstream(self, label: str) -> list[Node]:
        """The node and everything it reads, inputs first."""
        want: set[str] = set()

        def visit(lab: str) -> None:
            if lab not in want:
                want.add(lab)
                for up in self[lab].inputs.values():
                    visit(up)

        visit(label)
        return [n for n in self if n.label in want]


# -- labels of a run directory (what `verify` and the report read) ------------------------------
def artifact_labels(run_dir: Path) -> list[str]:
    """The labels of the artifact directories a run directory holds, in build order."""
    labels = []
    for kind in VERIFIED:
        if kind in SINGLE:
            if (run_dir / kind).is_dir():
                labels.append(kind)
            continue
        for p in sorted((run_dir / kind).glob("*")):
            if p.is_dir() and not p.name.startswith("."):
                labels.append(f"{kind}/{p.name}")
    return labels


def input_label(name: str, manifest: dict) -> str:
    """The label of an input from the name a manifest gives it."""
    if name == "extract_target":
        return f"extract/{manifest.get('target')}"
    if name == "extract_source":
        return f"extract/{manifest.get('source')}"
    if name == "vocab_map":
        return f"vocab_map/{manifest.get('source')}"
    return name  # `prepare`, `extract/<m>`, `align/<s>`


def input_key(manifest: dict, input_manifest: dict) -> str | None:
    """The key an artifact recorded for an input, as the input's manifest gives it now.

    The control reads the target extraction's tokens key (`ExtractStage.derived_keys`); an
    extraction made by an older lmfuse has none, and the control then recorded its key.
    """
    return (input_manifest.get("tokens_key") if manifest.get("control") else None) or input_manifest.get("key")


# -- the command that rebuilds each kind of artifact ----------------------------------------------
def rebuild_command(path: Path, stage: str | None = None) -> str:
    """The command that rebuilds the artifact at `path` (`RUN/<stage>[/<name>]`), for error messages."""
    stage = stage or (path.name if path.name in SINGLE else path.parent.name)
    name = path.name
    commands = {
        "prepare": "lmfuse prepare CONFIG --overwrite",
        "extract": f"lmfuse extract CONFIG --model {name} --overwrite",
        "vocab_map": f"lmfuse vocab-map CONFIG --source {name} --overwrite",
        "align": f"lmfuse align CONFIG --source {name} --overwrite",
        "train": "lmfuse train CONFIG" + (" --control" if name == "clm" else "") + " --overwrite",
        # eval rebuilds a merge that is missing (not one whose manifest still vouches for it)
        "merge": f"rm -r {path} && lmfuse eval CONFIG",
        # eval rescores damaged cache entries and rewrites its results
        "eval": "lmfuse eval CONFIG",
    }
    return commands.get("eval" if path.name == "eval" else stage, "lmfuse run CONFIG --overwrite")


set_rebuild_command(rebuild_command)  # the storage layer's errors name these commands
