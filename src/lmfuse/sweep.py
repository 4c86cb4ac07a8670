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

import contextlib
import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmfuse.artifacts import atomic_write_bytes, atomic_write_json, hash_obj, read_json
from lmfuse.document import Document
from lmfuse.errors import LmfuseError
from lmfuse.stats import Interval, paired_bootstrap

#: Names of variants (and so of run directories): path-safe, no separators.
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$"
#: Keys the sweep sets itself in every run's config.
RESERVED = {"output_dir": "the sweep sets each run's output_dir to its run directory",
            "train.seed": "the sweep's `seeds:` set train.seed",
            "train.control": "the sweep always trains the λ = 1 control"}
#: `base:` values that name the embedded demo's config instead of a file.
DEMO_BASES = {"lmfuse:demo": False, "lmfuse:demo-quick": True}
MARKER = "sweep_run.json"
N_BOOT = 10_000
BOOT_SEED = 0
MINUS = "\u2212"


# -- the sweep file ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Variant(_Strict):
    """One variant: a name and the config keys it sets (dotted key → value)."""

    name: str = Field(pattern=VARIANT_NAME, description="the run directories are `<name>-s<seed>`")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value, on top of the base config")


class SweepFile(_Strict):
    """The sweep file; `variants` is checked by hand (a grid or a list) for plainer messages."""

    base: str = Field(description="the base config (relative to the sweep file), or lmfuse:demo[-quick]")
    output_dir: str = Field(description="where runs/ and store/ go (relative to the sweep file)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="values of train.seed")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value applied to every variant")
    variants: Any = Field(description="{grid: {dotted.key: [values]}} or a list of {name, set}")


@dataclasses.dataclass
class Sweep:
    """A sweep, ready to run: the base config as a dict and the variants in order."""

    base: dict  # raw config (as in a YAML file); its relative paths are relative to base_dir
    base_dir: Path
    base_label: str  # how to name the base in tables: a path or lmfuse:demo
    out_dir: Path
    seeds: list[int]
    variants: list[Variant]
    common: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: Path | None = None  # the sweep file, when there is one


@dataclasses.dataclass
class Run:
    """One (variant, seed): its directory and its validated config."""

    variant: Variant
    seed: int
    cfg: Any  # FuseConfig

    @property
    def name(self) -> str:
        return f"{self.variant.name}-s{self.seed}"

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir


def _format_errors(e: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "(top level)")
        out.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return out


def _value_name(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, str | int | float):
        return str(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def grid_variants(grid: dict[str, Sequence[Any]]) -> list[Variant]:
    """The product of a grid as named variants, in the grid's order (last key fastest).

    A variant is named by its values, `key=value` joined by `+`, where `key` is the last part
    of the dotted key (the whole key when two grid keys end alike), e.g. `fusion=avgCE+clm_weight=0.5`.

    Args:
        grid: Dotted config key → list of values.
    """
    keys = list(grid)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = [s if last.count(s) == 1 else k for s, k in zip(last, keys)]
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = "+".join(f"{s}={_value_name(v)}" for s, v in zip(short, combo))
        name = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", name).strip("-") or "variant"
        out.append(Variant(name=name, set=dict(zip(keys, combo))))
    return out


def _variants(raw: Any, problems: list[str]) -> list[Variant]:
    """Variants from the sweep file's `variants:` (a grid mapping or a list); problems appended."""
    if isinstance(raw, dict):
        extra = sorted(set(raw) - {"grid"})
        if extra or not isinstance(raw.get("grid"), dict) or not raw["grid"]:
            problems.append("variants: a mapping must be `grid: {dotted.key: [values, ...]}` "
                            f"(found keys: {', '.join(map(str, raw)) or 'none'})")
            return []
        grid = raw["grid"]
        bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
        for k in bad:
            problems.append(f"variants.grid.{k}: expected a non-empty list of values, got {grid[k]!r}")
        return [] if bad else grid_variants(grid)
    if isinstance(raw, list):
        if not raw:
            problems.append("variants: the list is empty; name at least one variant")
        out = []
        for i, item in enumerate(raw):
            try:
                out.append(Variant.model_validate(item))
            except ValidationError as e:
                problems += _format_errors(e, f"variants[{i}]")
        return out
    problems.append("variants: expected `grid: {dotted.key: [values]}` or a list of `{name, set}` "
                    f"entries, got {type(raw).__name__}")
    return []


def _duplicates(variants: list[Variant], problems: list[str]) -> None:
    names = [v.name for v in variants]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"variants: the name {n!r} is used {names.count(n)} times; names must be unique")


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (its shape only; `build_runs` checks every variant's config).

    Raises:
        LmfuseError: Listing every problem in the file, each with its place.
    """
    from lmfuse.config import read_yaml

    path = Path(path)
    data = read_yaml(path)
    here = path.resolve().parent
    problems: list[str] = []
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as e:
        problems += _format_errors(e)
        spec = None
    variants = _variants(data.get("variants"), problems) if "variants" in data else []
    _duplicates(variants, problems)
    # Checked on the raw values too, so a file with other problems still reports these.
    seeds, base_name = data.get("seeds"), data.get("base")
    if isinstance(seeds, list) and len({json.dumps(x) for x in seeds}) != len(seeds):
        problems.append(f"seeds: repeated values in {seeds}")
    base: dict = {}
    base_dir = here
    if isinstance(base_name, str) and base_name not in DEMO_BASES:
        base_path = _resolve(base_name, here)
        if not base_path.is_file():
            problems.append(f"base: the config {base_name!r} does not exist (paths are relative to the sweep "
                            f"file; lmfuse:demo and lmfuse:demo-quick name the demo's config)")
        else:
            try:
                base = read_yaml(base_path)
            except LmfuseError as e:
                problems.append(f"base: {e.what}")
            base_dir = base_path.parent
    if problems:
        raise _problems_error(problems, path)
    assert spec is not None
    out_dir = _resolve(spec.output_dir, here)
    if spec.base in DEMO_BASES:
        from lmfuse.demo import demo_config

        base = demo_config(out_dir / "runs" / "base", quick=DEMO_BASES[spec.base])
    return Sweep(base=base, base_dir=base_dir, base_label=spec.base, out_dir=out_dir, seeds=list(spec.seeds),
                 variants=variants, common=dict(spec.overrides), source=path)


def _resolve(p: str | Path, here: Path) -> Path:
    q = Path(p).expanduser()
    return Path(os.path.abspath(q if q.is_absolute() else here / q))  # `..` folded, links kept


def _problems_error(problems: Sequence[str], where: str | Path) -> LmfuseError:
    return LmfuseError(f"{len(problems)} problem(s) in the sweep:\n" + "\n".join(f"  - {p}" for p in problems),
                       where=str(where), fix="correct the entries named above; nothing has been run")


# -- dotted keys -------------------------------------------------------------------------------
def _sub_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model a field holds, whether in a list) or (None, False) for a plain value."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        inner = typing.get_args(annotation)[0]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, BaseModel) else (None, False)
    if origin in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return (found[0], False) if found else (None, False)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def key_problem(key: str) -> str | None:
    """Why a dotted key names no config field (`train.fusion`, `sources.0.dtype`), or None."""
    from lmfuse.config import FuseConfig

    if key in RESERVED:
        return f"cannot be set in a sweep: {RESERVED[key]}"
    model: type[BaseModel] | None = FuseConfig
    parts = key.split(".")
    where: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if model is None:
            return f"{'.'.join(where)} holds a plain value, not a section"
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; {'.'.join(where) or 'the config'} has: " \
                                                                       f"{', '.join(fields)}"
            return f"no config key {'.'.join([*where, part])!r}{hint}"
        where.append(part)
        model, is_list = _sub_model(fields[part].annotation)
        i += 1
        if is_list and i < len(parts):
            if not parts[i].isdigit():
                return f"{'.'.join(where)} is a list: index it by number, e.g. {'.'.join(where)}.0"
            where.append(parts[i])
            i += 1
    return None


def _merge(node: dict, value: Any) -> Any:
    """A mapping value is merged into a mapping (so `train: {fusion: avgCE}` keeps the rest)."""
    if isinstance(node, dict) and isinstance(value, dict):
        out = dict(node)
        for k, v in value.items():
            out[k] = _merge(out.get(k), v) if isinstance(out.get(k), dict) else copy.deepcopy(v)
        return out
    return copy.deepcopy(value)


def set_dotted(data: dict, key: str, value: Any) -> str | None:
    """Set `key` (dotted; list items by index) in a raw config dict; return a problem or None."""
    node: Any = data
    parts = key.split(".")
    for j, part in enumerate(parts):
        last = j == len(parts) - 1
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else -1
            if not 0 <= idx < len(node):
                return f"{'.'.join(parts[:j])} has {len(node)} entries; there is no entry {part}"
            if last:
                node[idx] = _merge(node[idx], value)
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            return f"{'.'.join(parts[:j])} is not a section"
        if last:
            node[part] = _merge(node.get(part), value)
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return None


# -- building and checking the runs ------------------------------------------------------------
def _run_data(sweep: Sweep, variant: Variant | None, seed: int) -> tuple[dict, list[str]]:
    """The raw config dict of one run (the base and `set:` alone when `variant` is None), and the
    problems of its dotted keys, each named by where the key was set."""
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
    return data, problems


def _config_problems(data: dict, base_dir: Path) -> tuple[Any, list[str]]:
    """A run's config and every problem in it: the config's own, the training's, the baselines'."""
    from lmfuse.baselines import preflight
    from lmfuse.config import parse_config
    from lmfuse.train import check_train_config

    cfg, problems = parse_config(data, base_dir)
    if cfg is not None and not problems:
        for check in (lambda c: check_train_config(c, False), preflight):
            try:
                check(cfg)
            except LmfuseError as e:
                problems.append(" ".join(e.what.split()) + (f" ({e.where})" if e.where else ""))
    return cfg, problems


def build_runs(sweep: Sweep) -> list[Run]:
    """Every (variant, seed) run with its validated config, seed by seed (all variants of seed 0 first).

    Each variant's config is checked in full (`lmfuse.config.parse_config`, the training options,
    the baselines) before anything runs. A problem of the base config that every variant keeps
    is reported once, as the base config's; the others name their variant and key.

    Raises:
        LmfuseError: Listing every problem.
    """
    if not sweep.variants:
        raise _problems_error(["variants: none"], sweep.source or sweep.out_dir)
    data, common = _run_data(sweep, None, sweep.seeds[0])  # problems of `set:` are named once
    _, base_problems = _config_problems(data, sweep.base_dir)
    found: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    cfgs: dict[tuple[str, int], Any] = {}
    for v in sweep.variants:
        for seed in sweep.seeds:
            data, key_problems = _run_data(sweep, v, seed)
            if seed == sweep.seeds[0]:  # the seed changes nothing but train.seed: check the rest once
                cfg, found[v.name] = _config_problems(data, sweep.base_dir)
                keys[v.name] = [p for p in key_problems if p not in common]
            else:
                from lmfuse.config import parse_config

                cfg, _ = parse_config(data, sweep.base_dir)
            cfgs[(v.name, seed)] = cfg
    shared = [p for p in base_problems if all(p in f for f in found.values())]
    problems = common + [f"base config {sweep.base_label}: {p}" for p in shared]
    for name, ps in found.items():
        problems += keys[name] + [f"variant {name!r}: {p}" for p in ps if p not in shared]
    if problems:
        raise _problems_error(problems, sweep.source or sweep.out_dir)
    return [Run(v, seed, cfgs[(v.name, seed)]) for seed in sweep.seeds for v in sweep.variants]


# -- the store ---------------------------------------------------------------------------------
def _link(link: Path, target: Path) -> None:
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


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """Hold `OUT/.sweep.lock`: two sweeps writing one store would train the same artifact twice."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise LmfuseError(f"another lmfuse sweep is writing to {out_dir}", where=str(out_dir),
                              fix="wait for it to finish (a sweep resumes: rerun it afterwards)") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store_counts(out_dir: str | Path) -> dict[str, int]:
    """Complete artifacts in a sweep's store, per stage (`train` split into fused and control)."""
    store = Path(out_dir) / "store"
    counts: dict[str, int] = {}
    for stage in ("prepare", "extract", "vocab_map", "align", "train"):
        for d in sorted((store / stage).glob("*/manifest.json")):
            name = stage
            if stage == "train":
                name = "train/clm" if (read_json(d) or {}).get("control") else "train/fused"
            counts[name] = counts.get(name, 0) + 1
    counts["eval records"] = len(list((store / "eval_cache").glob("*.json")))
    return counts


def _config_hash(cfg) -> str:
    return hash_obj(cfg.model_dump())


def _eval_models(cfg) -> list:
    """The models `lmfuse eval` scores by default, the trained ones named by their store path.

    The eval cache keys a model by its path (and its files' sizes and times): through the store
    path, a control shared by several runs is the same model to the cache, and scored once.
    """
    from lmfuse import baselines
    from lmfuse.evaluate import check_trained, default_models

    check_trained(cfg)  # as run_eval does before building merges and listing the default models
    baselines.build_merges(cfg)
    out = []
    for m in default_models(cfg):
        if m.kind in ("fused", "clm") and m.spec is not None:
            m = dataclasses.replace(m, spec=m.spec.model_copy(update={"path": str(Path(m.spec.path).resolve())}))
        out.append(m)
    return out


def run_one(run: Run, store: Path, log: Callable[[str], Any] = print) -> str:
    """Run one (variant, seed) through every stage, its artifacts linked into the store.

    Stages run in pipeline order (`lmfuse.pipeline.plan`); each artifact's link is made just
    before its stage, because the training artifacts' keys name their inputs' keys, which exist
    only once those inputs are complete. Eval and report follow unless the run is finished and
    current.

    Returns:
        `"skipped"` (finished and current) or `"ran"`.
    """
    from lmfuse.evaluate import run_eval
    from lmfuse.pipeline import plan
    from lmfuse.report import write_report

    cfg = run.cfg
    run.dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode()
    cfg_file = run.dir / "config.yaml"
    if not cfg_file.exists() or cfg_file.read_bytes() != text:
        atomic_write_bytes(cfg_file, text)
    keys: dict[str, str] = {}
    ran = []
    for step in plan(cfg):
        art = step.artifact(False)
        _link(run.dir / step.label, store / art.stage / art.key)
        keys[step.label] = art.key
        state = art.state()
        if state == "complete":
            continue
        if state == "stale":  # the entry at this key was made by another config: never replace shared data
            raise LmfuseError(f"the store entry {art.path.resolve()} does not match its key {art.key}",
                              where=str(run.dir / step.label),
                              fix="delete that store directory (it was not made by this lmfuse), then rerun")
        log(f"  [{'resume' if state == 'partial' else 'run'}] {step.label} -> store/{art.stage}/{art.key}")
        t0 = time.time()
        step.run(False)
        ran.append(step.label)
        log(f"         {step.label} done in {time.time() - t0:.1f} s")
    _unlink_others(run.dir, set(keys))
    (run.dir / "eval").mkdir(exist_ok=True)
    _link(run.dir / "eval" / "cache", store / "eval_cache")
    marker = {"variant": run.variant.name, "seed": run.seed, "set": run.variant.overrides,
              "config_hash": _config_hash(cfg), "keys": keys}
    old = read_json(run.dir / MARKER) or {}
    if not ran and (run.dir / "eval" / "results.json").exists() and all(old.get(k) == v for k, v in marker.items()):
        return "skipped"
    run_eval(cfg, models=_eval_models(cfg), log=log)
    write_report(run.dir)
    atomic_write_json(run.dir / MARKER, {**marker, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return "ran"


def _unlink_others(run_dir: Path, labels: set[str]) -> None:
    """Remove the run's links to artifacts its config no longer has (a variant dropped a source).

    Only the links go (the store keeps the artifacts); the report would otherwise still list them.
    """
    for stage in ("extract", "vocab_map", "align", "train"):
        for p in sorted((run_dir / stage).glob("*")):
            if p.is_symlink() and f"{stage}/{p.name}" not in labels:
                p.unlink()


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


def run_sweep_file(path: str | Path, log: Callable[[str], Any] = print, dry_run: bool = False) -> dict:
    """`lmfuse sweep SWEEP.yaml`: load the sweep file and run it (see `run_sweep`)."""
    return execute(load_sweep(path), log=log, dry_run=dry_run)


def execute(sweep: Sweep, log: Callable[[str], Any] = print, dry_run: bool = False) -> dict:
    """Check every run, then run them in order and write the table (see `run_sweep`)."""
    runs = build_runs(sweep)
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
    with _lock(sweep.out_dir):
        _note_dropped(sweep, runs, log)
        t0 = time.time()
        for i, r in enumerate(runs, 1):
            log(f"[{i}/{len(runs)}] {r.name}: {_settings(r.variant)}")
            t = time.time()
            outcome = run_one(r, store, log)
            log(f"[{i}/{len(runs)}] {r.name}: " + ("finished earlier and current; skipped" if outcome == "skipped"
                                                  else f"done in {time.time() - t:.1f} s"))
        doc = summarize_sweep(sweep, runs)
        doc["seconds"] = round(time.time() - t0, 3)
        md = write_outputs(doc, sweep.out_dir)
    log(f"sweep done in {time.time() - t0:.1f} s; table: {md} (and sweep.html, sweep.json)")
    return doc


def _note_dropped(sweep: Sweep, runs: list[Run], log: Callable[[str], Any]) -> None:
    """Say which run directories the sweep file no longer names (they are left as they are)."""
    names = {r.name for r in runs}
    root = sweep.out_dir / "runs"
    if not root.exists():
        return
    old = sorted(p.name for p in root.glob("*") if (p / MARKER).exists() and p.name not in names)
    if old:
        log(f"not in the sweep any more (kept on disk, left out of the table): {', '.join(old)}")


def _settings(v: Variant) -> str:
    return ", ".join(f"{k}={_value_name(x)}" for k, x in v.overrides.items()) or "the base config"


# -- the table ---------------------------------------------------------------------------------
def _first_of_kind(models: dict, kind: str) -> str | None:
    """The model of a kind: the one labelled as the kind (`fused`, `clm`) if any, else the first."""
    if models.get(kind, {}).get("kind") == kind:
        return kind
    return next((label for label, rec in sorted(models.items()) if rec.get("kind") == kind), None)


def _bpb(rec: dict, group: str) -> float:
    m = rec["overall"] if group == "overall" else rec["domains"].get(group)
    return float(m["bpb"]) if m else math.nan


def _columns(recs: Sequence[dict], group: str) -> tuple[list[int], list[float], list[float]] | None:
    """Block ids, and per-block NLL and bytes averaged over `recs` (one model, one record per seed).

    Only blocks every record scored count; `group` is a domain or `overall`. None when a
    record has no per-block figures.
    """
    pbs = [r.get("per_block") for r in recs]
    if not all(pbs):
        return None
    maps = [{b: i for i, b in enumerate(pb["block_id"])} for pb in pbs]
    first = pbs[0]
    ids = [b for i, b in enumerate(first["block_id"]) if (group == "overall" or first["domain"][i] == group)
           and all(b in m for m in maps)]
    nll = [sum(pb["nll"][m[b]] for pb, m in zip(pbs, maps)) / len(pbs) for b in ids]
    nbytes = [sum(pb["bytes"][m[b]] for pb, m in zip(pbs, maps)) / len(pbs) for b in ids]
    return ids, nll, nbytes


def compare_blocks(a: Sequence[dict], b: Sequence[dict], group: str) -> Interval:
    """bpb(A) − bpb(B) on `group` with a 95% paired bootstrap CI over held-out blocks.

    `a` and `b` are eval records (`results.json` models) of one model each, one record per
    seed; with several seeds each side's per-block NLL and bytes are averaged over seeds before
    resampling, so the interval is that of the seed-averaged difference (what varies is which
    blocks were held out, not the seeds; the std over seeds is reported next to it). Blocks are
    paired by `block_id`; each side keeps its own scored bytes (tokenizers differ).

    Args:
        a: `S` eval records of model A (one per seed).
        b: `S` eval records of model B on the same blocks (the same record repeated for a
            model that does not depend on the seed, e.g. a source).
        group: A domain name, or `overall`.

    Returns:
        `Interval(diff, lo, hi)` in bits per byte, negative when A is better; NaN bounds without
        per-block figures or with a single block.
    """
    ca, cb = _columns(a, group), _columns(b, group)
    nan = math.nan
    if ca is None or cb is None:  # results without per-block figures: the difference only
        diffs = [_bpb(x, group) - _bpb(y, group) for x, y in zip(a, b)]
        return Interval(sum(diffs) / len(diffs) if diffs else nan, nan, nan)
    where_b = {bid: k for k, bid in enumerate(cb[0])}
    pairs = [(k, where_b[bid]) for k, bid in enumerate(ca[0]) if bid in where_b]
    if not pairs:
        return Interval(nan, nan, nan)
    return paired_bootstrap([ca[1][i] for i, _ in pairs], [cb[1][j] for _, j in pairs],
                            [ca[2][i] for i, _ in pairs], b_nbytes=[cb[2][j] for _, j in pairs],
                            n_boot=N_BOOT, seed=BOOT_SEED)


def _iv(iv: Interval) -> dict:
    return {"diff": iv.diff, "lo": iv.lo, "hi": iv.hi,
            "inside_noise": iv.includes_zero if math.isfinite(iv.lo) else None}


def _mean_std(xs: Sequence[float]) -> dict:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(xs)}


def _best_sources(models: dict, groups: Sequence[str]) -> dict[str, str]:
    """The source with the lowest bits per byte in each group (domain or overall)."""
    out = {}
    for g in groups:
        cands = [(_bpb(rec, g), label) for label, rec in models.items()
                 if rec.get("kind") == "source" and math.isfinite(_bpb(rec, g))]
        if cands:
            out[g] = min(cands)[1]
    return out


def summarize_sweep(sweep: Sweep, runs: Sequence[Run]) -> dict:
    """The `sweep.json` object: per run and per variant figures, differences with their CIs.

    Args:
        sweep: The sweep.
        runs: Its runs; those without eval results are listed under `missing`.
    """
    from lmfuse.evaluate import BEST, load_results

    results = {r.name: load_results(r.dir) for r in runs}
    done = [r for r in runs if results[r.name] and _first_of_kind(results[r.name]["models"], "fused")
            and _first_of_kind(results[r.name]["models"], "clm")]
    domains: list[str] = []
    for r in done:
        domains += [d for d in results[r.name]["domains"] if d not in domains]
    groups = [*domains, "overall"]
    doc: dict[str, Any] = {
        "sweep": str(sweep.source) if sweep.source else None, "base": sweep.base_label,
        "output_dir": str(sweep.out_dir), "seeds": sweep.seeds, "domains": domains, "groups": groups,
        "common": sweep.common, "n_boot": N_BOOT, "alpha": 0.05, "bootstrap_seed": BOOT_SEED,
        "missing": [r.name for r in runs if r not in done], "variants": [], "controls": [], "references": {},
    }
    first = results[done[0].name] if done else None
    if first:
        doc.update(split=first.get("split"), blocks=first.get("blocks"))
        for kind in ("target", "source"):  # results.json keeps no order: the target first
            for label, rec in sorted(first["models"].items()):
                if rec.get("kind") == kind:
                    doc["references"][label] = {"kind": kind, "bpb": {g: _bpb(rec, g) for g in groups}}
    controls: dict[tuple, dict] = {}  # control keys per seed → the control row
    for v in sweep.variants:
        vruns = [r for r in done if r.variant.name == v.name]
        entry: dict[str, Any] = {"name": v.name, "set": v.overrides, "runs": []}
        doc["variants"].append(entry)
        if not vruns:
            continue
        recs = []
        for r in vruns:
            models = results[r.name]["models"]
            fused, clm = models[_first_of_kind(models, "fused")], models[_first_of_kind(models, "clm")]
            best = _best_sources(models, groups)
            marker = read_json(r.dir / MARKER) or {}
            # `train.keep_best`: both arms at their lowest validation loss (`fused@best`, `clm@best`).
            fb, cb = models.get(f"fused{BEST}"), models.get(f"clm{BEST}")
            recs.append((r, models, fused, clm, best, fb, cb))
            entry["runs"].append({
                "seed": r.seed, "run": r.name, "run_dir": str(r.dir), "blocks": results[r.name].get("blocks"),
                "control_key": marker.get("keys", {}).get("train/clm"),
                "fused": {g: _bpb(fused, g) for g in groups}, "control": {g: _bpb(clm, g) for g in groups},
                "vs_control": {g: _iv(compare_blocks([fused], [clm], g)) for g in groups},
                "best_source": best,
                "vs_best_source": {g: _iv(compare_blocks([fused], [models[best[g]]], g)) for g in best},
                **({"fused_best": {g: _bpb(fb, g) for g in groups}, "control_best": {g: _bpb(cb, g) for g in groups},
                    "vs_control_best": {g: _iv(compare_blocks([fb], [cb], g)) for g in groups}}
                   if fb and cb else {}),
            })
        fuseds, clms = [x[2] for x in recs], [x[3] for x in recs]
        best = recs[0][4]
        entry["fused"] = {g: _mean_std([_bpb(f, g) for f in fuseds]) for g in groups}
        entry["control"] = {g: _mean_std([_bpb(c, g) for c in clms]) for g in groups}
        entry["vs_control"] = {g: {**_mean_std([x["vs_control"][g]["diff"] for x in entry["runs"]]),
                                   **_pooled(compare_blocks(fuseds, clms, g), entry["runs"], "vs_control", g)}
                               for g in groups}
        entry["best_source"] = best
        entry["vs_best_source"] = {
            g: {**_mean_std([x["vs_best_source"][g]["diff"] for x in entry["runs"] if g in x["vs_best_source"]]),
                **_pooled(compare_blocks(fuseds, [m[best[g]] for _, m, *_ in recs], g), entry["runs"],
                          "vs_best_source", g)}
            for g in best}
        fbs, cbs = [x[5] for x in recs], [x[6] for x in recs]
        if all(fbs) and all(cbs):  # every seed kept its best checkpoints
            entry["fused_best"] = {g: _mean_std([_bpb(f, g) for f in fbs]) for g in groups}
            entry["control_best"] = {g: _mean_std([_bpb(c, g) for c in cbs]) for g in groups}
            entry["vs_control_best"] = {
                g: {**_mean_std([x["vs_control_best"][g]["diff"] for x in entry["runs"]]),
                    **_pooled(compare_blocks(fbs, cbs, g), entry["runs"], "vs_control_best", g)}
                for g in groups}
        ckey = tuple((x["seed"], x["control_key"]) for x in entry["runs"])
        row = controls.setdefault(ckey, {"variants": [], "bpb": entry["control"],
                                         "seeds": [x["seed"] for x in entry["runs"]],
                                         "keys": [x["control_key"] for x in entry["runs"]]})
        if "control_best" in entry:
            row["bpb_best"] = entry["control_best"]
        row["variants"].append(v.name)
    doc["controls"] = list(controls.values())
    doc["store"] = store_counts(sweep.out_dir)
    return doc


def _pooled(iv: Interval, runs: Sequence[dict], what: str, g: str) -> dict:
    """The seed-averaged interval, and how many seeds' own intervals lie below / above zero."""
    per = [x[what][g] for x in runs if g in x[what]]
    return {"lo": iv.lo, "hi": iv.hi, "inside_noise": iv.includes_zero if math.isfinite(iv.lo) else None,
            "seeds_better": sum(1 for p in per if p["inside_noise"] is False and p["hi"] < 0),
            "seeds_worse": sum(1 for p in per if p["inside_noise"] is False and p["lo"] > 0)}


# -- writing -----------------------------------------------------------------------------------
def _d(v: float) -> str:
    """A signed difference with a real minus sign: `+0.0012`, `−0.0034`."""
    if not math.isfinite(v):
        return "–"
    # The sign stays on a difference that rounds to zero: it says on which side of zero the bound is.
    return f"{v:+.4f}".replace("-", MINUS)


def _ci_cell(c: dict) -> str:
    """`−0.0012 [−0.0035, +0.0010]` (no-break spaces keep the interval on one line)."""
    if not math.isfinite(c.get("lo", math.nan)):
        return _d(c["diff"] if "diff" in c else c["mean"])
    return f"{_d(c['diff'] if 'diff' in c else c['mean'])} [{_d(c['lo'])},\u00a0{_d(c['hi'])}]"


def _mean_cell(c: dict) -> str:
    """`−0.0012 ± 0.0008 [−0.0030, +0.0005]`: mean and std over seeds, CI of the seed-averaged difference."""
    std = f" ± {c['std']:.4f}" if math.isfinite(c.get("std", math.nan)) else ""
    ci = f" [{_d(c['lo'])},\u00a0{_d(c['hi'])}]" if math.isfinite(c.get("lo", math.nan)) else ""
    return f"{_d(c['mean'])}{std}{ci}"


def _bpb_cell(c: dict) -> str:
    if not math.isfinite(c["mean"]):
        return "–"
    return f"{c['mean']:.4f}" + (f" ± {c['std']:.4f}" if math.isfinite(c["std"]) else "")


def _words(cells: dict, groups: Sequence[str]) -> str:
    """Plain words for a row of intervals: where the variant is better, worse, or inside the noise."""
    better = [g for g in groups if g in cells and cells[g].get("inside_noise") is False
              and cells[g]["hi"] < 0]
    worse = [g for g in groups if g in cells and cells[g].get("inside_noise") is False
             and cells[g]["lo"] > 0]
    no_ci = [g for g in groups if g in cells and cells[g].get("inside_noise") is None]
    parts = []
    if better:
        parts.append("better on " + ", ".join(better))
    if worse:
        parts.append("worse on " + ", ".join(worse))
    rest = len([g for g in groups if g in cells]) - len(better) - len(worse) - len(no_ci)
    if rest:
        parts.append("inside the noise elsewhere" if (better or worse) else "inside the noise everywhere")
    if no_ci:
        parts.append("no interval on " + ", ".join(no_ci) + " (one block or no per-block figures)")
    return "; ".join(parts) or "–"


_REF = {"vs_control": "its control (λ = 1, same seed)", "vs_best_source": "the best source of the domain",
        "vs_control_best": "its control (both @best)"}


def plot_differences(doc: dict, what: str, out: Path) -> Path | None:
    """Per-domain difference of every variant to `what` (`vs_control`, `vs_control_best` or `vs_best_source`).

    One marker per seed (marker shape = seed, colour = variant) with its 95% CI as an error bar;
    the dash is the mean over seeds. Below zero: the variant is better.
    """
    import numpy as np
    from matplotlib.figure import Figure

    variants = [v for v in doc["variants"] if v["runs"] and v.get(what)]
    groups = doc["groups"]
    if not variants:
        return None
    colors = ["#C44E52", "#4C72B0", "#55A868", "#DD8452", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
              "#CCB974", "#64B5CD"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    n = len(variants)
    fig = Figure(figsize=(max(7.5, 1.2 + len(groups) * (0.5 + 0.28 * n)), 4.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    width = 0.8 / n
    seeds = doc["seeds"]
    for i, v in enumerate(variants):
        color = colors[i % len(colors)]
        for j, run in enumerate(v["runs"]):
            k = seeds.index(run["seed"]) if run["seed"] in seeds else j
            off = (k - (len(seeds) - 1) / 2) * width * 0.6 / max(len(seeds), 1)
            xs, ys, lo, hi = [], [], [], []
            for gi, g in enumerate(groups):
                c = run[what].get(g)
                if c is None or not math.isfinite(c["diff"]):
                    continue
                xs.append(x[gi] - 0.4 + width * (i + 0.5) + off)
                ys.append(c["diff"])
                lo.append(c["diff"] - c["lo"] if math.isfinite(c["lo"]) else 0.0)
                hi.append(c["hi"] - c["diff"] if math.isfinite(c["hi"]) else 0.0)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=markers[k % len(markers)], color=color, ms=5, capsize=2,
                        lw=0.9, label=v["name"] if j == 0 else None)
        for gi, g in enumerate(groups):
            m = v[what].get(g, {}).get("mean", math.nan)
            if math.isfinite(m):
                cx = x[gi] - 0.4 + width * (i + 0.5)
                ax.plot([cx - width * 0.4, cx + width * 0.4], [m, m], color=color, lw=2)
    for k, s in enumerate(seeds):
        ax.plot([], [], markers[k % len(markers)], color="#555555", label=f"seed {s}")
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(len(groups) - 1.5, color="#BBBBBB", lw=0.8, ls=":")
    ax.set_xticks(x, groups)
    ref = _REF[what]
    ax.set_ylabel(f"Δ bits per byte vs {ref}\n(below 0 = better)")
    ax.set_title(f"Variant − {ref}\none marker per seed, 95% CI over held-out blocks; dash: mean", fontsize=10)
    ax.legend(fontsize=8, ncols=min(n + len(seeds), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(out)
    return out


def _seed_rows(variants: Sequence[dict], what: str, groups: Sequence[str]) -> list[list[str]]:
    """A row per (variant, seed) with each difference and its CI, then a mean ± std row per variant."""
    rows = []
    for v in variants:
        for r in v["runs"]:
            rows.append([f"`{v['name']}`", str(r["seed"]), *[_ci_cell(r[what][g]) for g in groups],
                         _words(r[what], groups)])
        if len(v["runs"]) > 1:
            rows.append([f"`{v['name']}`", "**mean ± std**", *[_mean_cell(v[what][g]) for g in groups],
                         _words(v[what], groups)])
    return rows


def render(doc: dict, out_dir: Path) -> Document:
    """The sweep table as a document (plots written to `out_dir`)."""
    groups = doc["groups"]
    variants = [v for v in doc["variants"] if v["runs"]]
    d = Document()
    title = Path(doc["sweep"]).name if doc.get("sweep") else str(out_dir)
    d.h(f"lmfuse sweep: {title}", 1)
    if not variants:
        d.p("No run has finished yet.")
        return d
    def verdict(o: dict) -> str:
        said = ("inside the noise" if o.get("inside_noise") else
                "no interval" if o.get("inside_noise") is None else
                "better than the control" if o["hi"] < 0 else "worse than the control")
        return (f"{_mean_cell(o)} ({said}; {o['seeds_better']} of {o['n']} seed(s) better, "
                f"{o['seeds_worse']} worse)")

    summary = [f"`{v['name']}` {verdict(v['vs_control']['overall'])}" for v in variants]
    d.p("**Variant − control, overall bits per byte** (mean ± std over seeds [95% CI of the seed-averaged "
        "difference]; below zero, the variant is better): " + "; ".join(summary) + ".")
    at_best = [v for v in variants if v.get("vs_control_best")]
    if at_best:
        d.p("**The same, both at their best checkpoints** (`train.keep_best`: each arm's weights at its lowest "
            "validation loss): " + "; ".join(f"`{v['name']}` {verdict(v['vs_control_best']['overall'])}"
                                               for v in at_best) + ".")
    blocks = doc.get("blocks")
    per = [r.get("blocks") for v in variants for r in v["runs"]]
    d.p(f"Base config `{doc['base']}`; {len(doc['variants'])} variant(s) × {len(doc['seeds'])} seed(s) "
        f"(`train.seed` ∈ {{{', '.join(map(str, doc['seeds']))}}}); held-out "
        f"{doc.get('split', 'validation')} blocks: {blocks}"
        + (" (the variants differ in their blocks: their prepare options differ)" if len(set(per)) > 1 else "")
        + f". Bits per byte = Σ NLL / (ln 2 · Σ bytes) over the blocks; lower is better. Intervals: 95% percentile "
        f"paired bootstrap over held-out blocks ({doc['n_boot']:,} resamples, seed {doc['bootstrap_seed']}); a "
        "difference whose interval includes zero is inside the noise of which blocks were held out."
        + (f" Not finished, left out: {', '.join(doc['missing'])}." if doc["missing"] else ""))

    d.h("Held-out bits per byte")
    d.p("Mean ± std over seeds. The control is the λ = 1 continual training on the same data and budget; "
        "it does not depend on fusion options, so variants that differ only in those share it.")
    rows = []
    for v in variants:
        rows.append([f"`{v['name']}`", _settings_text(v["set"]), *[_bpb_cell(v["fused"][g]) for g in groups]])
        if "fused_best" in v:
            rows.append([f"`{v['name']}` @best", "its best checkpoint", *[_bpb_cell(v["fused_best"][g]) for g in groups]])
    many = len(doc["controls"]) > 1
    for c in doc["controls"]:
        who = f" for {', '.join(c['variants'])}" if many else ""
        rows.append([f"control (λ = 1){who}", "", *[_bpb_cell(c["bpb"][g]) for g in groups]])
        if "bpb_best" in c:
            rows.append([f"control (λ = 1){who} @best", "its best checkpoint",
                         *[_bpb_cell(c["bpb_best"][g]) for g in groups]])
    for label, ref in doc["references"].items():
        name = f"{label} (target, before training)" if ref["kind"] == "target" else f"{label} (source)"
        rows.append([name, "", *[f"{ref['bpb'][g]:.4f}" if math.isfinite(ref["bpb"][g]) else "–" for g in groups]])
    d.table(["model", "settings", *groups], rows, text=(0, 1))

    d.h("Variant − control (same seed)")
    d.p("Per seed: the difference with its 95% CI. Mean row: mean ± std over seeds, then the 95% CI of the "
        "seed-averaged difference (per-block NLL averaged over seeds, then resampled by block).")
    d.table(["variant", "seed", *groups, "in words"], _seed_rows(variants, "vs_control", groups), text=(0, 1, -1))
    p = plot_differences(doc, "vs_control", out_dir / "sweep_vs_control.png")
    if p:
        d.img(p, "Variant − its same-seed control per domain (95% CI over held-out blocks; one marker per seed)")

    if at_best:
        d.h("Variant − control, both at their best checkpoints")
        d.p("With `train.keep_best`, each arm is also scored with its weights at its lowest validation loss. A "
            "fused model that only overfits less than the control is level with it here; this is the "
            "comparison early stopping cannot explain away. Same layout as above.")
        d.table(["variant", "seed", *groups, "in words"], _seed_rows(at_best, "vs_control_best", groups),
                text=(0, 1, -1))
        p = plot_differences(doc, "vs_control_best", out_dir / "sweep_vs_control_best.png")
        if p:
            d.img(p, "Variant − its same-seed control, both at their best checkpoints (95% CI; one marker per seed)")

    if any(v.get("vs_best_source") for v in variants):
        d.h("Variant − best source of each domain")
        best = variants[0]["best_source"]
        d.p("The source with the lowest bits per byte in each domain (overall: over all domains): "
            + ", ".join(f"{g}: `{s}`" for g, s in best.items()) + ". Mean ± std over seeds [95% CI of the "
            "seed-averaged difference]; below zero, the variant beats that source.")
        rows = []
        for v in variants:
            cells = v["vs_best_source"]
            rows.append([f"`{v['name']}`", *[_mean_cell(cells[g]) if g in cells else "–" for g in groups],
                         _words(cells, groups)])
        d.table(["variant", *groups, "in words"], rows, text=(0, -1))
        p = plot_differences(doc, "vs_best_source", out_dir / "sweep_vs_best_source.png")
        if p:
            d.img(p, "Variant − best source of each domain (95% CI over held-out blocks; one marker per seed)")

    d.h("Runs")
    rows = []
    for v in variants:
        for r in v["runs"]:
            rel = os.path.relpath(Path(r["run_dir"]) / "report" / "report.html", out_dir)
            rows.append([r["run"], f"`{v['name']}`", str(r["seed"]), f"[report]({rel})"])
    d.table(["run", "variant", "seed", "report"], rows, text=(0, 1, 3))
    store = doc.get("store", {})
    d.p("Shared artifacts in `store/` (each made once, linked from every run that needs it): "
        + ", ".join(f"{k} {n}" for k, n in store.items()) + ".")
    return d


def _settings_text(s: dict) -> str:
    return ", ".join(f"`{k}={_value_name(v)}`" for k, v in s.items()) or "base"


def write_outputs(doc: dict, out_dir: str | Path) -> Path:
    """Write `sweep.json`, `sweep.md`, `sweep.html` and the PNGs; return the `.md` path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "sweep.json", doc)  # NaN written as null
    d = render(doc, out_dir)
    md = out_dir / "sweep.md"
    atomic_write_bytes(md, d.markdown().encode())
    title = f"lmfuse sweep: {Path(doc['sweep']).name if doc.get('sweep') else out_dir.name}"
    atomic_write_bytes(out_dir / "sweep.html", d.html(title, embed_images=False).encode())
    return md
