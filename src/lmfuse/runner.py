"""The one runner: builds the graph's artifacts, evaluates, reports, verifies.

This is the only module that takes a run's lock (`lock.run_lock`), checks inputs, claims a
directory, writes shards and their stats, and finishes an artifact. For one node (`build`):

1. complete, current and undamaged → returned as it is (unless `overwrite`);
2. lock the run directory;
3. each input must be complete and made for this config (its key is the one the graph computes),
   and its files must match their checksums (unless the stage reads them through verified reads);
4. the stage reads what it needs first (`Stage.open`), then the directory is claimed
   (`ArtifactDir.begin`: overwrite, a stale partial artifact, damage, temp files);
5. the missing shards are written, each shard's stats first and the shard last, so a shard on
   disk always has its stats (under `accelerate launch` ranks split the shards);
6. none may be missing; the manifest is written with the stage's summary and every file's checksum.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmfuse.artifacts import (
    ArtifactDir,
    atomic_write_bytes,
    atomic_write_json,
    check_artifact,
    damage,
    read_json,
    read_manifest,
)
from lmfuse.errors import LmfuseError
from lmfuse.graph import (
    KINDS,
    Graph,
    Node,
    artifact_labels,
    input_key,
    input_label,
    rebuild_command,
)
from lmfuse.lock import run_lock
from lmfuse.parallel import barrier, is_main, my_shards
from lmfuse.stage import Build, stats_path

Log = Callable[[str], Any]


def _check_input(node: Node, ref: str, full: bool) -> None:
    """An input must be complete, made for this config, and (with `full`) intact byte for byte."""
    graph = node.graph
    up = graph[ref.partition("#")[0]]
    path = graph.cfg.run_dir / up.label
    if full:
        manifest = check_artifact(path, up.kind, full=True)
    else:
        manifest = read_manifest(path)
        if manifest is None:
            raise LmfuseError(f"no complete {up.kind} artifact at {path}", where=str(path),
                              fix=f"run `{up.command.replace(' --overwrite', '')}` first (or `lmfuse run CONFIG`)")
    derived = ref.partition("#")[2]
    have = (manifest.get(f"{derived}_key") if derived else None) or manifest.get("key")
    want = graph.key(ref)
    if have != want:
        raise LmfuseError(f"{up.label} was made from another config or other inputs (key {have}; this config "
                          f"needs {want}), so {node.label} cannot use it", where=str(path),
                          fix=f"rebuild it first: `{up.command}` (or `lmfuse run CONFIG`)")


def _reusable(node: Node, art: ArtifactDir, log: Log) -> bool:
    if not art.is_complete():
        if node.stage.verify_on_reuse and art.state() == "stale":
            art.overwrite = True  # a merge of other models or weights: made again (it is cheap)
        return False
    if node.stage.verify_on_reuse:
        problems = damage(art.path, read_manifest(art.path), full=True)
        if problems:
            log(f"{node.kind}: {art.path} is damaged ({'; '.join(problems[:3])}); building it again")
            art.overwrite = True
            return False
    return True


def build(node: Node, overwrite: bool = False, log: Log = print) -> dict:
    """Build one artifact (resuming, repairing or regenerating it); return its manifest.

    Args:
        node: The node (`Graph(cfg)[label]`).
        overwrite: Delete whatever is there and build it again.
        log: Where progress lines go.
    """
    st, cfg = node.stage, node.graph.cfg
    st.validate()
    art = node.artifact(overwrite)
    if _reusable(node, art, log):
        st.on_complete(art)
        return read_manifest(art.path)
    with run_lock(cfg.run_dir):
        for ref in st.inputs().values():
            _check_input(node, ref, full=st.checks_inputs)
        b = Build(art, {name: cfg.run_dir / lab for name, lab in node.inputs.items()}, log)
        st.open(b)
        if is_main():
            art.begin(log=log)
        barrier()
        count = st.n_shards(b)
        mine = range(count) if st.all_ranks else my_shards(count)
        todo = [i for i in mine if not st.shard_done(b, i)]
        if todo:
            for i, table, stats in st.write(b, todo):
                if st.shard_stats:  # stats first, shard last: a shard on disk always has its stats
                    atomic_write_json(stats_path(art, i), stats or {})
                if table is not None:
                    art.write_shard(i, table)
        barrier()
        manifest: dict = {}
        if is_main():
            missing = [i for i in range(count) if not st.shard_done(b, i)]
            if missing:
                raise LmfuseError(f"shards {missing[:5]} of {node.label} are missing after the run",
                                  where=str(art.path), fix="rerun the same command: it resumes")
            st.before_finish(b)
            stats = [read_json(stats_path(art, i)) or {} for i in range(count)] if st.shard_stats else []
            derived = {f"{k}_key": v for k, v in node.keys.items() if k}
            manifest = art.finish(**st.summary(b, stats), **derived)
            st.after_finish(b, manifest)
        barrier()
    return manifest or read_manifest(art.path) or {}


def build_label(cfg, label: str, overwrite: bool = False, log: Log = print) -> dict:
    """Build the artifact `label` of a config (`extract/tgt`, `train/clm`, ...)."""
    return build(Graph(cfg)[label], overwrite=overwrite, log=log)


# -- the whole run -------------------------------------------------------------------------------
def _outcome(art: ArtifactDir, state: str, overwrite: bool) -> tuple[str, str]:
    if state == "complete" and not overwrite:
        return "skipped", f"complete and current (key {art.key})"
    if overwrite:
        return "re-ran", "--overwrite; building it again"
    return {
        "partial": ("resumed", "an earlier run stopped part-way; continuing it"),
        "damaged": ("repaired", f"damaged ({'; '.join(art.problems[:3])}); rebuilding those files"),
        "stale": ("re-ran", "its config or inputs changed; replacing the old artifact"),
    }.get(state, ("ran", ""))


TAGS = {"skipped": "[skip]  ", "re-ran": "[rerun] ", "resumed": "[resume]", "repaired": "[repair]", "ran": "[run]   "}


def _line(node: Node, what: str, why: str) -> str:
    return f"{TAGS[what]} {node.label}: {why}" if why else f"{TAGS[what]} {node.label}"


def build_all(graph: Graph, overwrite: bool = False, log: Log = print, kinds: Sequence[str] | None = None,
              line: Callable[[Node, str, str], str | None] = _line) -> dict[str, str]:
    """Build every node in order; return {label: skipped | ran | resumed | re-ran | repaired}.

    `line(node, outcome, why)` gives the progress line said before each node (None: nothing).
    """
    outcome: dict[str, str] = {}
    for node in graph:
        if kinds is not None and node.kind not in kinds:
            continue
        art = node.artifact(False)
        state = art.state()
        what, why = _outcome(art, state, overwrite)
        said = line(node, what, why)
        if said is not None:
            log(said)
        outcome[node.label] = what
        if what == "skipped":
            continue
        t0 = time.time()
        build(node, overwrite=overwrite or state == "stale", log=log)
        log(f"         {node.label} done in {time.time() - t0:.1f} s")
    return outcome


def run_all(graph: Graph, overwrite: bool = False, log: Log = print, report: bool = True) -> dict[str, str]:
    """`lmfuse run`: every artifact in order, then eval and the report, under the run's lock."""
    from lmfuse.baselines import preflight

    cfg = graph.cfg
    preflight(cfg)
    with run_lock(cfg.run_dir):
        atomic_write_bytes(cfg.run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode())
        # Merges are built by `evaluate`, which reads them (a merge of `fused` needs it trained).
        outcome = build_all(graph, overwrite=overwrite, log=log, kinds=[k for k in KINDS if k != "merge"])
        if report:
            evaluate(graph, log=log)
            path = write_report(cfg.run_dir)
            log(f"report: {path.with_suffix('.html')} (and {path.name})")
    return outcome


def evaluate(graph: Graph, models: Sequence[Any] | None = None, log: Log = print, **kwargs: Any) -> dict:
    """`lmfuse eval`: the trained models checked, the merges built, then `evaluate.run_eval`."""
    from lmfuse.evaluate import check_trained, run_eval

    cfg = graph.cfg
    with run_lock(cfg.run_dir):
        if kwargs.get("corpus") is not None:
            _prepare_corpus(cfg, kwargs["corpus"], log)
        if models is None:
            check_trained(cfg)  # before a merge or eval reads the trained weights
            for node in graph.of_kind("merge"):
                build(node, log=log)
        return run_eval(cfg, models, log=log, **kwargs)


def _prepare_corpus(cfg, given: str | Path, log: Log) -> None:
    """Prepare an `eval --corpus` once; say how many blocks it gave (it has no split to report)."""
    from lmfuse.evaluate import corpus_config

    data_cfg = corpus_config(cfg, given)
    try:
        manifest = build(Graph(data_cfg)["prepare"], log=lambda *a, **k: None)
    except LmfuseError as e:
        if e.where in ("corpus.path", str(data_cfg.corpus.path)):  # the flag, not the config, named it
            raise LmfuseError(e.what, where=f"--corpus {given}", fix=e.fix) from e
        raise
    log(f"eval --corpus: {manifest.get('n_blocks', '?')} blocks from {manifest.get('n_docs', '?')} documents "
        f"of {given} (all scored) -> {data_cfg.run_dir}")


def store_lock(out_dir: str | Path):
    """A sweep's lock on its store (`OUT/.sweep.lock`): two sweeps on one store would build the
    same artifact twice."""
    return run_lock(out_dir, name=".sweep.lock")


def write_report(run_dir: str | Path) -> Path:
    """`lmfuse report`: the run report, under the run's lock."""
    from lmfuse.report import write_report as _write

    with run_lock(run_dir):
        return _write(run_dir)


# -- verify ----------------------------------------------------------------------------------------
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


def verify_run(run_dir: str | Path) -> list[Check]:
    """Check every artifact of a run directory: files against checksums, keys against inputs.

    Per artifact: a manifest is there (else `incomplete`); every file it records has its size
    and sha256 (else `damaged`); each input's current key is the one it was made from (else
    `stale`: an input was rebuilt from other data after it, so it must be rebuilt too). Manifests
    of older lmfuse versions have no checksums: `unchecked`, said as such.

    Args:
        run_dir: The run directory (`output_dir`).

    Returns:
        One `Check` per artifact directory, in build order.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmfuseError(f"{run_dir} is not a directory", where=str(run_dir),
                          fix="give the run's output directory (output_dir in its config)")
    labels = artifact_labels(run_dir)
    if not labels:
        raise LmfuseError(f"{run_dir} holds no artifacts", where=str(run_dir),
                          fix="give the run's output directory (output_dir in its config)")
    manifests, unreadable = {}, {}
    for lab in labels:
        try:
            manifests[lab] = read_manifest(run_dir / lab)
        except LmfuseError as e:
            manifests[lab], unreadable[lab] = None, e.what
    return [_check(run_dir, lab, manifests, unreadable) for lab in labels]


def _check(run_dir: Path, lab: str, manifests: dict, unreadable: dict) -> Check:
    cmd = rebuild_command(run_dir / lab, lab.partition("/")[0])
    m = manifests[lab]
    if lab in unreadable:
        return Check(lab, "damaged", f"manifest.json: unreadable ({unreadable[lab]})", cmd)
    if m is None:
        what = "unfinished (stage.json without manifest.json)" if (run_dir / lab / "stage.json").exists() \
            else "no manifest.json"
        return Check(lab, "incomplete", what, cmd)
    problems = damage(run_dir / lab, m, full=True)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return Check(lab, "damaged", "; ".join(problems[:3]) + more, cmd)
    stale = []
    for name, key in (m.get("inputs") or {}).items():
        if name.startswith(("model/", "base/")):
            continue  # a merge's inputs are model files' fingerprints: rechecked before reuse
        up = input_label(name, m)
        upm = manifests.get(up)
        if upm is None:
            stale.append(f"its input {up} is missing or unfinished")
            continue
        now = input_key(m, upm)
        if key not in (now, upm.get("config_hash")):
            stale.append(f"made from another {up} (key {key}, now {now})")
    if stale:
        return Check(lab, "stale", "; ".join(stale), cmd)
    if "files" not in m:
        return Check(lab, "unchecked", "no checksums (made by an older lmfuse): rebuild it to check it", cmd)
    return Check(lab, "ok", f"{len(m['files'])} file{'' if len(m['files']) == 1 else 's'}")
