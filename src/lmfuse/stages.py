"""The stage graph (which artifact feeds which, where each lives) and the one stage runner.

Every artifact lives at `RUN/<label>` (`prepare`, `extract/<model>`, `vocab_map/<source>`,
`align/<source>`, `train/fused`, `train/clm`); `graph(cfg)` lists them in an order where every
input comes before its consumers, each with the names its manifest gives its inputs. `lmfuse run`
(`pipeline.plan`), `lmfuse verify` and the CLI read it; the stage modules compute their inputs'
keys from it, so an artifact's key covers everything upstream.

`run_stage` owns the loop every sharded stage used to write by hand (datatrove's executor is the
model): complete and current? → lock the run, check the inputs' contents, claim the directory →
write the missing shards → check none is missing → write the manifest with checksums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmfuse.artifacts import (
    ArtifactDir,
    check_artifact,
    damage,
    read_manifest,
    regenerate_command,
)
from lmfuse.errors import LmfuseError
from lmfuse.lock import run_lock

STAGES = ("prepare", "extract", "vocab_map", "align", "train")
# What `lmfuse verify` checks: the stages' artifacts, the merge baselines and the eval results.
VERIFIED = (*STAGES, "merge", "eval")
SINGLE = ("prepare", "eval")  # one artifact directory, not one per model


@dataclass(frozen=True)
class Node:
    """One artifact of a run.

    Args:
        label: Its path under the run directory, e.g. `extract/tgt`.
        stage: The stage that makes it.
        inputs: {name its manifest gives the input: the input's label}.
        artifact: `(overwrite) -> ArtifactDir` (its key covers the config and the inputs' keys).
        run: `(overwrite) -> manifest`: build it (resuming, or regenerating with overwrite).
    """

    label: str
    stage: str
    inputs: dict[str, str] = field(default_factory=dict)
    artifact: Callable[[bool], ArtifactDir] | None = None
    run: Callable[[bool], dict] | None = None

    @property
    def command(self) -> str:
        """The command that rebuilds this artifact."""
        return regenerate_command(Path(self.label), self.stage)


def input_labels(cfg, label: str) -> dict[str, str]:
    """{manifest input name: label} of one artifact's inputs (the edges of the graph)."""
    stage, _, name = label.partition("/")
    if stage == "prepare" or stage == "vocab_map":
        return {}  # they read the corpus and the tokenizers only (fingerprinted in their keys)
    if stage == "extract":
        return {"prepare": "prepare"}
    if stage == "align":
        return {"extract_target": f"extract/{cfg.target.name}", "extract_source": f"extract/{name}",
                "vocab_map": f"vocab_map/{name}"}
    if stage == "train":
        ins = {f"extract/{cfg.target.name}": f"extract/{cfg.target.name}"}
        if name == "fused":
            ins.update({f"align/{s.name}": f"align/{s.name}" for s in cfg.sources})
        return ins
    raise ValueError(f"no stage {stage!r}")


def graph(cfg) -> list[Node]:
    """Every artifact of a run, inputs before consumers (the order `lmfuse run` builds them)."""
    from lmfuse import align, extract, prepare, train, vocabmap

    def node(label: str, artifact, run) -> Node:
        return Node(label, label.partition("/")[0], input_labels(cfg, label), artifact, run)

    nodes = [node("prepare", lambda o: prepare.artifact(cfg, overwrite=o),
                  lambda o: prepare.run_prepare(cfg, overwrite=o))]
    for m in cfg.models:
        nodes.append(node(f"extract/{m.name}", lambda o, n=m.name: extract.artifact(cfg, n, overwrite=o),
                          lambda o, n=m.name: extract.run_extract(cfg, n, overwrite=o)))
    for s in cfg.sources:
        nodes.append(node(f"vocab_map/{s.name}", lambda o, n=s.name: vocabmap.artifact(cfg, n, overwrite=o),
                          lambda o, n=s.name: vocabmap.run_vocab_map(cfg, n, overwrite=o)))
    for s in cfg.sources:
        nodes.append(node(f"align/{s.name}", lambda o, n=s.name: align.artifact(cfg, n, overwrite=o),
                          lambda o, n=s.name: align.run_align(cfg, n, overwrite=o)))
    nodes.append(node("train/fused", lambda o: train.artifact(cfg, control=False, overwrite=o),
                      lambda o: train.run_train(cfg, control=False, overwrite=o)))
    if cfg.train.control:
        nodes.append(node("train/clm", lambda o: train.artifact(cfg, control=True, overwrite=o),
                          lambda o: train.run_train(cfg, control=True, overwrite=o)))
    return nodes


def input_keys(cfg, label: str) -> dict[str, str]:
    """{manifest input name: the input artifact's key} for the current config."""
    from lmfuse import align, extract, prepare, train, vocabmap

    def key(lab: str) -> str:
        stage, _, name = lab.partition("/")
        if stage == "prepare":
            return prepare.artifact(cfg).key
        if stage == "extract":
            return extract.artifact(cfg, name).key
        if stage == "vocab_map":
            return vocabmap.artifact(cfg, name).key
        if stage == "align":
            return align.artifact(cfg, name).key
        return train.artifact(cfg, control=name == "clm").key

    return {n: key(lab) for n, lab in input_labels(cfg, label).items()}


# -- the runner ----------------------------------------------------------------------------------
def run_stage(cfg, label: str, art: ArtifactDir, n_shards: int | Callable[[], int],
              write: Callable[[list[int]], None], summary: Callable[[], dict], *,
              done: Callable[[int], bool] | None = None, log: Callable = print) -> dict:
    """Build one artifact: skip it if complete, else write its missing shards and finish it.

    The steps every stage shares: (1) a complete, current, undamaged artifact is returned as it
    is (unless `art.overwrite`); (2) the run directory is locked (`lock.run_lock`); (3) each input
    artifact's files are checked against its manifest's checksums, so damaged data is never
    used; (4) the directory is claimed (`ArtifactDir.begin`: overwrite, a stale partial
    artifact, damage, temp files); (5) this rank's missing shards are written; (6) none may be
    missing; (7) the manifest is written with `summary()`'s fields and every file's checksum.
    Under `accelerate launch` ranks split the shards; only rank 0 claims and finishes.

    Args:
        cfg: The run's config (for the run directory and the inputs).
        label: The artifact's label in `graph(cfg)`.
        art: Its `ArtifactDir`.
        n_shards: How many shards it has (or a function giving it, called after the claim).
        write: Writes the given shard indices (each whole, with `art.write_shard` or atomically).
        summary: Manifest fields, called once every shard is there (rank 0 only).
        done: Whether shard i is written (default `art.shard_done`).
        log: Where progress lines go.

    Returns:
        The manifest (`{}` on ranks other than 0).
    """
    from lmfuse.parallel import barrier, is_main, my_shards

    if art.is_complete():
        return read_manifest(art.path)
    with run_lock(cfg.run_dir):
        for lab in input_labels(cfg, label).values():
            path = cfg.run_dir / lab
            check_artifact(path, lab.partition("/")[0], full=True)
        if is_main():
            art.begin(log=log)
        barrier()
        count = n_shards() if callable(n_shards) else n_shards
        done = done or art.shard_done
        todo = [i for i in my_shards(count) if not done(i)]
        if todo:
            write(todo)
        barrier()
        if not is_main():
            return {}
        missing = [i for i in range(count) if not done(i)]
        if missing:
            raise LmfuseError(f"shards {missing[:5]} of {label} are missing after the run",
                              where=str(art.path), fix="rerun the same command: it resumes")
        return art.finish(**summary())


# -- verify ------------------------------------------------------------------------------------
@dataclass
class Check:
    """The result of checking one artifact of a run."""

    label: str
    status: str  # ok | damaged | stale | incomplete | unchecked
    detail: str = ""
    command: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unchecked")

    def line(self) -> str:
        text = f"{self.status:<10} {self.label}"
        if self.detail:
            text += f": {self.detail}"
        if self.command and not self.ok:
            text += f" (fix: `{self.command}`)"
        return text


def _artifact_dirs(run_dir: Path) -> list[str]:
    labels = []
    for stage in VERIFIED:
        if stage in SINGLE:
            if (run_dir / stage).is_dir():
                labels.append(stage)
            continue
        for p in sorted((run_dir / stage).glob("*")):
            if p.is_dir() and not p.name.startswith("."):
                labels.append(f"{stage}/{p.name}")
    return labels


def _input_label(name: str, manifest: dict) -> str:
    """The label of an input from the name a manifest gives it."""
    if name == "extract_target":
        return f"extract/{manifest.get('target')}"
    if name == "extract_source":
        return f"extract/{manifest.get('source')}"
    if name == "vocab_map":
        return f"vocab_map/{manifest.get('source')}"
    return name  # `prepare`, `extract/<m>`, `align/<s>`


def verify_run(run_dir: str | Path) -> list[Check]:
    """Check every artifact of a run directory: files against checksums, keys against inputs.

    Per artifact: a manifest is there (else `incomplete`); every file it records has its size
    and sha256 (else `damaged`); each input's current key is the one it was made from (else
    `stale`: an input was rebuilt from other data after it, so it must be rebuilt too). Manifests
    of older lmfuse versions have no checksums: `unchecked`, said as such.

    Args:
        run_dir: The run directory (`output_dir`).

    Returns:
        One `Check` per artifact directory, in pipeline order.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmfuseError(f"{run_dir} is not a directory", where=str(run_dir),
                          fix="give the run's output directory (output_dir in its config)")
    labels = _artifact_dirs(run_dir)
    if not labels:
        raise LmfuseError(f"{run_dir} holds no artifacts", where=str(run_dir),
                          fix="give the run's output directory (output_dir in its config)")
    manifests, unreadable = {}, {}
    for lab in labels:
        try:
            manifests[lab] = read_manifest(run_dir / lab)
        except LmfuseError as e:
            manifests[lab], unreadable[lab] = None, e.what
    checks = []
    for lab in labels:
        stage = lab.partition("/")[0]
        cmd = regenerate_command(run_dir / lab, stage)
        m = manifests[lab]
        if lab in unreadable:
            checks.append(Check(lab, "damaged", f"manifest.json: unreadable ({unreadable[lab]})", cmd))
            continue
        if m is None:
            what = "unfinished (stage.json without manifest.json)" if (run_dir / lab / "stage.json").exists() \
                else "no manifest.json"
            checks.append(Check(lab, "incomplete", what, cmd))
            continue
        problems = damage(run_dir / lab, m, full=True)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            checks.append(Check(lab, "damaged", "; ".join(problems[:3]) + more, cmd))
            continue
        stale = []
        for name, key in (m.get("inputs") or {}).items():
            if name.startswith(("model/", "base/")):
                continue  # a merge's inputs are model files' fingerprints: eval rechecks them (merge_artifact)
            up = _input_label(name, m)
            upm = manifests.get(up)
            if upm is None:
                stale.append(f"its input {up} is missing or unfinished")
                continue
            # The control is keyed on the target extraction's tokens_key (train.artifact); an
            # extraction made by an older lmfuse has none, and the control then records its key.
            now = (upm.get("tokens_key") if m.get("control") else None) or upm.get("key")
            if key not in (now, upm.get("config_hash")):
                stale.append(f"made from another {up} (key {key}, now {now})")
        if stale:
            checks.append(Check(lab, "stale", "; ".join(stale), cmd))
        elif "files" not in m:
            checks.append(Check(lab, "unchecked", "no checksums (made by an older lmfuse): rebuild it to check it",
                                cmd))
        else:
            checks.append(Check(lab, "ok", f"{len(m['files'])} file{'' if len(m['files']) == 1 else 's'}"))
    return checks
