"""`lmfuse sweep`: variants of one config × seeds, sharing every artifact two runs have in common.

A sweep file names a base config, the seeds (`train.seed`) and the variants (a grid over dotted
config keys, or a list of named variants). Every (variant, seed) is a full lmfuse run in its own
directory, `OUT/runs/<variant>-s<seed>/`, but each of its artifact directories is a symbolic link
into `OUT/store/<stage>/<artifact key>/`. The key (`ArtifactDir.key`) covers the config fields
that change the artifact and the keys of its inputs, so two runs whose artifacts have the same
key share one directory: extraction, vocabulary maps and alignment are made once, the λ = 1
control once per distinct control key (fusion options do not enter it), and the per-model eval
cache (`RUN/eval/cache/`) is one directory for the whole sweep, so a model already scored on
the same blocks is not scored again.

Resuming needs nothing of its own: a stage that was stopped part-way is resumed through its
link (each stage resumes), a finished run (`runs/<run>/sweep_run.json` matches its current
config and artifact keys) is skipped, and a run whose variant changed is re-linked to the
artifacts its new config needs; the store keeps the old ones.

The sweep's table (`OUT/sweep.md`, `sweep.json`, `sweep.html` with PNG plots) gives held-out
bits per byte per domain of each variant and of the control, the difference variant − control
paired by seed with a 95% paired bootstrap interval over held-out blocks
(`lmfuse.stats.paired_bootstrap` on the per-block figures `lmfuse eval` keeps), mean ± std
over seeds, and each variant − the best source of each domain.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lmfuse import runner
from lmfuse.artifacts import atomic_write_bytes, atomic_write_json, read_json
from lmfuse.errors import LmfuseError
from lmfuse.graph import KINDS, Graph
from lmfuse.hashing import hash_obj
from lmfuse.sweep_file import (  # noqa: F401 (the sweep file's API, also reached through lmfuse.sweep)
    RESERVED,
    Sweep,
    Variant,
    _duplicates,
    _problems_error,
    _variants,
    grid_variants,
    key_problem,
    load_parts,
    load_sweep,
    set_dotted,
)
from lmfuse.sweep_store import link, store_counts, unlink_others
from lmfuse.sweep_tables import _settings, summarize_sweep, write_outputs

MARKER = "sweep_run.json"
RUN_REF = "run:"  # a model path `run:<run>/<clm|fused>`: the model another run of the sweep trains


@dataclasses.dataclass
class Run:
    """One (variant, seed): its directory and its validated config."""

    variant: Variant
    seed: int
    cfg: Any  # FuseConfig
    refs: dict[str, str] = dataclasses.field(default_factory=dict)  # {model's place: the run that trains it}

    @property
    def name(self) -> str:
        return f"{self.variant.name}-s{self.seed}"

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir



# -- building and checking the runs ------------------------------------------------------------
def _run_data(sweep: Sweep, variant: Variant | None, seed: int,
              names: set[str]) -> tuple[dict, list[str], dict[str, str]]:
    """The raw config dict of one run (the base and `set:` alone when `variant` is None), the
    problems of its dotted keys, each named by where the key was set, and its references to
    other runs' models ({`sources[0]`: run name}, `run:` paths resolved)."""
    data = copy.deepcopy(sweep.base)
    problems = []
    scopes = [("set", sweep.common)]
    if variant is not None:
        scopes.append((f"variant {variant.name!r}: set", variant.overrides))
    for scope, overrides in scopes:
        for key, value in overrides.items():
            why = key_problem(key) or set_dotted(data, key, value)
            if why:
                problems.append(f"{scope}: {key}: {why}")
    name = "base" if variant is None else f"{variant.name}-s{seed}"
    data["output_dir"] = str(sweep.out_dir / "runs" / name)
    train = data.get("train")
    if not isinstance(train, dict):
        train = data["train"] = {}
    train["seed"] = seed
    train["control"] = True
    refs, ref_problems = _run_refs(sweep, data, names, name)
    scope = "set" if variant is None else f"variant {variant.name!r}"
    return data, problems + [f"{scope}: {p}" for p in ref_problems], refs


def _run_refs(sweep: Sweep, data: dict, names: set[str], me: str) -> tuple[dict[str, str], list[str]]:
    """Resolve the `run:<run>/<clm|fused>` model paths of a raw config in place (to that run's
    trained model); return {`target` or `sources[i]`: run name} and the problems."""
    refs, problems = {}, []
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    for loc, m in [("target", data.get("target")), *((f"sources[{i}]", m) for i, m in enumerate(sources))]:
        path = m.get("path") if isinstance(m, dict) else None
        if not (isinstance(path, str) and path.startswith(RUN_REF)):
            continue
        name, _, kind = path.removeprefix(RUN_REF).partition("/")
        if kind not in ("clm", "fused"):
            problems.append(f"{loc}.path: {path!r}: write `run:<run>/clm` or `run:<run>/fused`, where <run> is "
                            "`<variant>-s<seed>`")
        elif name not in names or name == me:
            problems.append(f"{loc}.path: {path!r}: no other run {name!r} in this sweep file (its runs: "
                            f"{', '.join(sorted(names - {me})) or 'none'})")
        else:
            m["path"] = str(sweep.out_dir / "runs" / name / "train" / kind)
            refs[loc] = name
    return refs, problems


def _config_problems(data: dict, base_dir: Path, refs: dict[str, str]) -> tuple[Any, list[str]]:
    """A run's config and every problem in it: the config's own, the training's, the baselines'.

    A model another run trains (`refs`) need not exist yet: its path and the baselines that read
    it are checked when the run starts (`run_one`)."""
    from lmfuse.baselines import preflight
    from lmfuse.config import parse_config
    from lmfuse.train import check_train_config

    cfg, problems = parse_config(data, base_dir)
    problems = [p for p in problems if not any(p.startswith(f"{loc}.path:") for loc in refs)]
    if cfg is not None and not problems:
        for check in (lambda c: check_train_config(c, not c.fuses), None if refs else preflight):
            try:
                if check is not None:
                    check(cfg)
            except LmfuseError as e:
                problems.append(" ".join(e.what.split()) + (f" ({e.where})" if e.where else ""))
    return cfg, problems


def run_names(sweep: Sweep) -> set[str]:
    """The names of a sweep's runs, `<variant>-s<seed>`."""
    return {f"{v.name}-s{seed}" for v in sweep.variants for seed in sweep.seeds}


def build_runs(sweep: Sweep, names: set[str] | None = None) -> list[Run]:
    """Every (variant, seed) run with its validated config, seed by seed (all variants of seed 0 first).

    Each variant's config is checked in full (`lmfuse.config.parse_config`, the training options,
    the baselines) before anything runs. A problem of the base config that every variant keeps
    is reported once, as the base config's; the others name their variant and key.

    Args:
        sweep: The sweep.
        names: Every run a `run:` model path may name (default: this sweep's own).

    Raises:
        LmfuseError: Listing every problem.
    """
    if not sweep.variants:
        raise _problems_error(["variants: none"], sweep.source or sweep.out_dir)
    names = names if names is not None else run_names(sweep)
    data, common, refs = _run_data(sweep, None, sweep.seeds[0], names)  # problems of `set:` are named once
    _, base_problems = _config_problems(data, sweep.base_dir, refs)
    found: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    runs: dict[tuple[str, int], Run] = {}
    for v in sweep.variants:
        for seed in sweep.seeds:
            data, key_problems, refs = _run_data(sweep, v, seed, names)
            if seed == sweep.seeds[0]:  # the seed changes nothing but train.seed: check the rest once
                cfg, found[v.name] = _config_problems(data, sweep.base_dir, refs)
                keys[v.name] = [p for p in key_problems if p not in common]
            else:
                from lmfuse.config import parse_config

                cfg, _ = parse_config(data, sweep.base_dir)
            runs[(v.name, seed)] = Run(v, seed, cfg, refs)
    shared = [p for p in base_problems if all(p in f for f in found.values())]
    problems = common + [f"base config {sweep.base_label}: {p}" for p in shared]
    for name, ps in found.items():
        problems += keys[name] + [f"variant {name!r}: {p}" for p in ps if p not in shared]
    if problems:
        raise _problems_error(problems, sweep.source or sweep.out_dir)
    return [runs[(v.name, seed)] for seed in sweep.seeds for v in sweep.variants]


def _config_hash(cfg) -> str:
    return hash_obj(cfg.model_dump())


def run_one(run: Run, store: Path, log: Callable[[str], Any] = print) -> str:
    """Run one (variant, seed) through every stage, its artifacts linked into the store.

    The graph knows every artifact's key before anything runs, so each of the run's artifact
    paths is first linked to `store/<stage>/<key>`; then the runner builds them in order (an
    artifact another run made is complete there and skipped); eval builds the merges (through
    their links) and scores every model, and the report follows, unless the run is finished and
    current.

    Returns:
        `"skipped"` (finished and current) or `"ran"`.
    """
    cfg = run.cfg
    if run.refs:  # the models other runs trained are there now: check what could not be checked before
        from lmfuse.baselines import preflight

        for loc, name in run.refs.items():
            m = cfg.target if loc == "target" else cfg.sources[int(loc[len("sources["):-1])]
            if not (Path(m.path) / "manifest.json").exists():
                raise LmfuseError(f"{loc} is the model run {name} trains, and that run has not finished",
                                  where=str(run.dir), fix=f"run the sweep's part that holds {name} first")
        preflight(cfg)
    run.dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode()
    cfg_file = run.dir / "config.yaml"
    if not cfg_file.exists() or cfg_file.read_bytes() != text:
        atomic_write_bytes(cfg_file, text)
    graph = Graph(cfg)
    nodes = list(graph)
    keys = {n.label: n.key for n in nodes}
    for n in nodes:
        link(run.dir / n.label, store / n.kind / n.key)
    for n in nodes:
        if n.artifact().state() == "stale":  # the entry at this key was made by another config: never replace shared data
            raise LmfuseError(f"the store entry {n.path.resolve()} does not match its key {n.key}",
                              where=str(run.dir / n.label),
                              fix="delete that store directory (it was not made by this lmfuse), then rerun")
    unlink_others(run.dir, set(keys))
    def line(node, what: str, why: str) -> str | None:
        if what == "skipped":
            return None
        return f"  [{'resume' if what == 'resumed' else 'run'}] {node.label} -> store/{node.kind}/{node.key}"

    outcome = runner.build_all(graph, log=log, kinds=[k for k in KINDS if k != "merge"], line=line)
    ran = [label for label, what in outcome.items() if what != "skipped"]
    (run.dir / "eval").mkdir(exist_ok=True)
    link(run.dir / "eval" / "cache", store / "eval_cache")
    marker = {"variant": run.variant.name, "seed": run.seed, "set": run.variant.overrides,
              "config_hash": _config_hash(cfg), "keys": keys}
    old = read_json(run.dir / MARKER) or {}
    if not ran and (run.dir / "eval" / "results.json").exists() and all(old.get(k) == v for k, v in marker.items()):
        return "skipped"
    runner.evaluate(graph, log=log)
    runner.write_report(run.dir)
    atomic_write_json(run.dir / MARKER, {**marker, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return "ran"


def is_finished(run: Run) -> bool:
    """Whether a run's marker matches its config (a cheap check: the artifact keys are not recomputed)."""
    m = read_json(run.dir / MARKER)
    return bool(m) and m.get("config_hash") == _config_hash(run.cfg) and (run.dir / "eval" / "results.json").exists()


# -- running -----------------------------------------------------------------------------------
def run_sweep(base: str | Path | dict | Any, variants: dict[str, Sequence[Any]] | Sequence[Variant | dict],
              seeds: Sequence[int], out_dir: str | Path, *, common: dict[str, Any] | None = None,
              log: Callable[[str], Any] = print, dry_run: bool = False) -> dict:
    """Run every (variant, seed), sharing common artifacts; write `OUT/sweep.{md,json,html}`.

    Args:
        base: The base config: a YAML file, a `FuseConfig`, or a raw config dict (its relative
            paths relative to the working directory). Its `output_dir` is not used.
        variants: A grid (dotted config key → list of values; every combination is a variant)
            or a list of named variants (`Variant` or `{"name": ..., "set": {key: value}}`).
        seeds: Values of `train.seed`; every variant runs once per seed.
        out_dir: The sweep's directory (`runs/`, `store/`, the table).
        common: Dotted config key → value set in every variant (before its own).
        log: Where progress lines go.
        dry_run: Check every variant and list the runs; run nothing.

    Returns:
        The `sweep.json` object (with `dry_run` only `runs`).

    Raises:
        LmfuseError: A problem in a variant (every one listed, nothing run) or in a stage.
    """
    from lmfuse.config import FuseConfig, read_yaml

    problems: list[str] = []
    if isinstance(variants, dict):
        vs = _variants({"grid": dict(variants)}, problems)
    else:
        vs = _variants([v.model_dump(by_alias=True) if isinstance(v, Variant) else v for v in variants], problems)
    _duplicates(vs, problems)
    if problems:
        raise _problems_error(problems, "run_sweep(variants=...)")
    if isinstance(base, FuseConfig):
        data, base_dir, label = base.model_dump(), Path.cwd(), "(config object)"
    elif isinstance(base, dict):
        data, base_dir, label = copy.deepcopy(base), Path.cwd(), "(config dict)"
    else:
        data, base_dir, label = read_yaml(base), Path(base).resolve().parent, str(base)
    sweep = Sweep(base=data, base_dir=base_dir, base_label=label, out_dir=Path(out_dir).resolve(),
                  seeds=list(seeds), variants=vs, common=dict(common or {}))
    return execute(sweep, log=log, dry_run=dry_run)


def run_sweep_file(path: str | Path, log: Callable[[str], Any] = print, dry_run: bool = False,
                   parts: Sequence[str] | None = None) -> dict:
    """`lmfuse sweep SWEEP.yaml [--part NAME ...]`: load the sweep file and run it (see `run_sweep`).

    With parts, the parts asked for (default: all) run in the file's order, each writing its own
    table, and then the whole file's table (`OUT/sweep.md`: every finished run of every part);
    every part's runs are checked before any work. A run whose config names another run's model
    (`run:<run>/clm`) runs that one first if it has not finished. Returns the last part's
    `sweep.json` object (with `dry_run`, every part's runs).
    """
    sweeps = load_parts(path)
    unknown = [p for p in parts or [] if p not in sweeps]
    if unknown:
        raise LmfuseError(f"no part {', '.join(map(repr, unknown))} in the sweep file", where=str(path),
                          fix=f"choose from: {', '.join(n for n in sweeps if n) or '(the file has no parts)'}")
    names = set().union(*(run_names(sw) for sw in sweeps.values()))
    runs = {p: build_runs(sw, names) for p, sw in sweeps.items()}  # all checked before any work
    by_name = {r.name: r for rs in runs.values() for r in rs}
    doc: dict = {}
    listing: list = []
    for p in parts or list(sweeps):
        if p:
            log(f"== part {p}")
        doc = execute(sweeps[p], log=log, dry_run=dry_run, runs=runs[p], by_name=by_name)
        listing += doc.get("runs", []) if dry_run else []
    if dry_run:
        return {"runs": listing}
    if len(sweeps) > 1 or "" not in sweeps:
        whole = _whole_file(list(sweeps.values()))
        with runner.store_lock(whole.out_dir):
            md, _ = _table(whole, list(by_name.values()))
        log(f"the whole sweep file's table (every finished run of every part): {md}")
    return doc


def _whole_file(sweeps: Sequence[Sweep]) -> Sweep:
    """One sweep of every part's variants (a variant two parts name once), for the file's table."""
    first = sweeps[0]
    variants = list({v.name: v for sw in sweeps for v in sw.variants}.values())
    seeds = sorted({x for sw in sweeps for x in sw.seeds})
    bases = list(dict.fromkeys(sw.base_label for sw in sweeps))
    return dataclasses.replace(first, variants=variants, seeds=seeds, part="", common={},
                               base_label=", ".join(bases))


def _table(sweep: Sweep, runs: Sequence[Run], **extra: Any) -> tuple[Path, dict]:
    """Write a sweep's table from its runs' results; return the `.md` path and the `sweep.json` object."""
    runs = [r for r in runs if r.variant.name in {v.name for v in sweep.variants}]
    control_keys = {r.name: (read_json(r.dir / MARKER) or {}).get("keys", {}).get("train/clm") for r in runs}
    doc = {**summarize_sweep(sweep, runs, control_keys, store_counts(sweep.out_dir)), **extra}
    return write_outputs(doc, sweep.table_dir), doc


def execute(sweep: Sweep, log: Callable[[str], Any] = print, dry_run: bool = False,
            runs: Sequence[Run] | None = None, by_name: dict[str, Run] | None = None) -> dict:
    """Check every run, then run them in order and write the table (see `run_sweep`).

    Args:
        sweep: The sweep (or one part of a sweep file).
        log: Where progress lines go.
        dry_run: List the runs and whether each has finished; run nothing.
        runs: Its runs, checked (default: `build_runs(sweep)`).
        by_name: Every run of the sweep file by name: those a `run:` path names, and those not
            reported as dropped (default: this sweep's).
    """
    runs = list(runs if runs is not None else build_runs(sweep))
    by_name = by_name or {r.name: r for r in runs}
    store = sweep.out_dir / "store"
    log(f"sweep: {len(sweep.variants)} variant(s) × {len(sweep.seeds)} seed(s) = {len(runs)} run(s) "
        f"-> {sweep.out_dir}")
    if dry_run:
        listing = []
        for r in runs:
            state = "finished" if is_finished(r) else "to run"
            log(f"  {r.name:40} {state:9} {_settings(r.variant)}")
            listing.append({"run": r.name, "variant": r.variant.name, "seed": r.seed, "state": state})
        return {"runs": listing}
    with runner.store_lock(sweep.out_dir):
        _note_dropped(sweep, set(by_name), log)
        t0 = time.time()
        for i, r in enumerate(runs, 1):
            _run_needed(r, by_name, store, log)
            log(f"[{i}/{len(runs)}] {r.name}: {_settings(r.variant)}")
            t = time.time()
            outcome = run_one(r, store, log)
            log(f"[{i}/{len(runs)}] {r.name}: " + ("finished earlier and current; skipped" if outcome == "skipped"
                                                  else f"done in {time.time() - t:.1f} s"))
        md, doc = _table(sweep, runs, seconds=round(time.time() - t0, 3))
    log(f"sweep done in {time.time() - t0:.1f} s; table: {md} (and sweep.html, sweep.json)")
    return doc


def _run_needed(run: Run, by_name: dict[str, Run], store: Path, log: Callable[[str], Any],
                chain: tuple[str, ...] = ()) -> None:
    """Run first, if not finished, the runs whose trained models `run` reads (`run:` paths)."""
    for name in dict.fromkeys(run.refs.values()):
        if name in chain or name == run.name:
            raise LmfuseError(f"runs read each other's models: {' -> '.join((*chain, run.name, name))}",
                              where=str(run.variant.name), fix="a run may read only models of runs that do not read it")
        ref = by_name[name]
        if not is_finished(ref):
            _run_needed(ref, by_name, store, log, (*chain, run.name))
            log(f"  {run.name} reads the model {name} trains: running {name} first")
            run_one(ref, store, log)


def _note_dropped(sweep: Sweep, names: set[str], log: Callable[[str], Any]) -> None:
    """Say which run directories the sweep file no longer names (they are left as they are)."""
    root = sweep.out_dir / "runs"
    if not root.exists():
        return
    old = sorted(p.name for p in root.glob("*") if (p / MARKER).exists() and p.name not in names)
    if old:
        log(f"not in the sweep any more (kept on disk, left out of the table): {', '.join(old)}")
