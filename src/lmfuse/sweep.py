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
import difflib
import itertools
import json
import os
import re
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmfuse import runner
from lmfuse.artifacts import atomic_write_bytes, atomic_write_json, read_json
from lmfuse.errors import LmfuseError
from lmfuse.graph import KINDS, Graph
from lmfuse.hashing import hash_obj
from lmfuse.sweep_tables import _settings, _value_name, summarize_sweep, write_outputs

#: Names of variants (and so of run directories): path-safe, no separators.
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$"
#: Keys the sweep sets itself in every run's config.
RESERVED = {"output_dir": "the sweep sets each run's output_dir to its run directory",
            "train.seed": "the sweep's `seeds:` set train.seed",
            "train.control": "the sweep always trains the λ = 1 control"}
#: `base:` values that name the embedded demo's config instead of a file.
DEMO_BASES = {"lmfuse:demo": False, "lmfuse:demo-quick": True}
MARKER = "sweep_run.json"


# -- the sweep file ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Variant(_Strict):
    """One variant: a name and the config keys it sets (dotted key → value)."""

    name: str = Field(pattern=VARIANT_NAME, description="the run directories are `<name>-s<seed>`")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value, on top of the base config")


class Part(_Strict):
    """One named part of a sweep file: its own variants (and seeds, settings), its own table."""

    seeds: list[int] | None = Field(None, min_length=1, description="default: the file's seeds")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value, after the file's `set`")
    variants: Any = Field(description="{grid: {dotted.key: [values]}} or a list of {name, set}")


class SweepFile(_Strict):
    """The sweep file; `variants` is checked by hand (a grid or a list) for plainer messages.

    `extends: OTHER.yaml` (relative to this file) starts from another sweep file: mappings merge
    key by key, anything else replaces. `parts:` instead of `variants:` names several parts that
    share the runs and the store, each with its own table (`OUT/parts/<part>/sweep.md`).
    """

    base: str = Field(description="the base config (relative to the sweep file), or lmfuse:demo[-quick]")
    output_dir: str = Field(description="where runs/ and store/ go (relative to the sweep file)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="values of train.seed")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value applied to every variant")
    variants: Any = Field(None, description="{grid: {dotted.key: [values]}} or a list of {name, set}")
    parts: dict[str, Part] | None = Field(None, description="named parts, each with its own variants and table")


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
    part: str = ""  # the part of the sweep file ("" for a file without parts)

    @property
    def table_dir(self) -> Path:
        """Where this sweep's table goes: OUT/, or OUT/parts/<part>/ for a part."""
        return self.out_dir / "parts" / self.part if self.part else self.out_dir


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


def _merge_files(parent: Any, child: Any) -> Any:
    """`extends:`: mappings merge key by key (the child's win), anything else is replaced."""
    if isinstance(parent, dict) and isinstance(child, dict):
        return {**parent, **{k: _merge_files(parent.get(k), v) for k, v in child.items()}}
    return child


def read_sweep_file(path: Path, problems: list[str], seen: tuple[Path, ...] = ()) -> dict:
    """A sweep file's data with its `extends:` chain applied; `base` and `output_dir` made
    absolute against the file that names them."""
    from lmfuse.config import read_yaml

    data = read_yaml(path)
    here = path.resolve().parent
    for key in ("base", "output_dir"):  # a parent's paths: relative to the parent (the file's own stay as given)
        if seen and isinstance(data.get(key), str) and data[key] not in DEMO_BASES:
            data[key] = str(_resolve(data[key], here))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        problems.append(f"extends: expected the path of another sweep file, got {parent!r}")
        return data
    ppath = _resolve(parent, here)
    if ppath in seen or ppath == path.resolve():
        problems.append(f"extends: {parent} extends itself (through {' -> '.join(p.name for p in seen)})")
        return data
    if not ppath.is_file():
        problems.append(f"extends: the sweep file {parent!r} does not exist (relative to {path})")
        return data
    return _merge_files(read_sweep_file(ppath, problems, (*seen, path.resolve())), data)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file without parts (see `load_parts`)."""
    sweeps = load_parts(path)
    if list(sweeps) != [""]:
        raise LmfuseError(f"the sweep file has parts ({', '.join(sweeps)})", where=str(path),
                          fix="use load_parts (or `lmfuse sweep FILE --part NAME`)")
    return sweeps[""]


def load_parts(path: str | Path) -> dict[str, Sweep]:
    """Read and check a sweep file (its shape only; `build_runs` checks every variant's config).

    Returns:
        {part name: its sweep}, in the file's order; `{"": sweep}` for a file without parts.

    Raises:
        LmfuseError: Listing every problem in the file, each with its place.
    """
    from lmfuse.config import read_yaml

    path = Path(path)
    problems: list[str] = []
    data = read_sweep_file(path, problems)
    here = path.resolve().parent
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as e:
        problems += _format_errors(e)
        spec = None
    raw_parts = data.get("parts")
    if ("variants" in data) == (raw_parts is not None):
        problems.append("give either `variants:` or `parts:` (named parts, each with its own variants)")
    part_variants: dict[str, tuple[list[Variant], Part | None]] = {}
    if "variants" in data:
        part_variants[""] = (_variants(data.get("variants"), problems), None)
    elif isinstance(raw_parts, dict):
        for name, raw in raw_parts.items():
            if not re.match(VARIANT_NAME, str(name)):
                problems.append(f"parts: {name!r} is not a valid part name (letters, digits, _ . = + -)")
            sub: list[str] = []
            vs = _variants(raw.get("variants"), sub) if isinstance(raw, dict) and "variants" in raw else []
            problems += [f"parts.{name}.{p}" for p in sub]
            part = spec.parts.get(name) if spec is not None and spec.parts else None
            _duplicates(vs, problems)
            part_variants[str(name)] = (vs, part)
    if "" in part_variants:
        _duplicates(part_variants[""][0], problems)
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
    out = {}
    for name, (vs, part) in part_variants.items():
        seeds = list(part.seeds) if part is not None and part.seeds else list(spec.seeds)
        common = {**spec.overrides, **(part.overrides if part is not None else {})}
        out[name] = Sweep(base=base, base_dir=base_dir, base_label=spec.base, out_dir=out_dir, seeds=seeds,
                          variants=vs, common=common, source=path, part=name)
    _same_names_same_settings(out, path)
    return out


def _same_names_same_settings(sweeps: dict[str, Sweep], path: Path) -> None:
    """A variant named in two parts is one set of runs: it must set the same keys there."""
    seen: dict[str, tuple[str, dict]] = {}
    problems = []
    for part, sw in sweeps.items():
        for v in sw.variants:
            settings = {**sw.common, **v.overrides}
            if v.name in seen and seen[v.name][1] != settings:
                problems.append(f"parts.{part}: variant {v.name!r} sets other keys than in part "
                                f"{seen[v.name][0]!r}; give it another name")
            seen.setdefault(v.name, (part, settings))
    if problems:
        raise _problems_error(problems, path)


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


def _config_hash(cfg) -> str:
    return hash_obj(cfg.model_dump())


def run_one(run: Run, store: Path, log: Callable[[str], Any] = print) -> str:
    """Run one (variant, seed) through every stage, its artifacts linked into the store.

    The graph knows every artifact's key before anything runs, so each of the run's artifact
    paths is first linked to `store/<stage>/<key>`; then the runner builds them in order (an
    artifact another run made is complete there and skipped). Merges stay in the run directory
    (their keys hash the trained models' files). Eval and report follow unless the run is
    finished and current.

    Returns:
        `"skipped"` (finished and current) or `"ran"`.
    """
    cfg = run.cfg
    run.dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode()
    cfg_file = run.dir / "config.yaml"
    if not cfg_file.exists() or cfg_file.read_bytes() != text:
        atomic_write_bytes(cfg_file, text)
    graph = Graph(cfg)
    nodes = [n for n in graph if n.kind != "merge"]
    keys = {n.label: n.key for n in nodes}
    for n in nodes:
        _link(run.dir / n.label, store / n.kind / n.key)
    for n in nodes:
        if n.artifact().state() == "stale":  # the entry at this key was made by another config: never replace shared data
            raise LmfuseError(f"the store entry {n.path.resolve()} does not match its key {n.key}",
                              where=str(run.dir / n.label),
                              fix="delete that store directory (it was not made by this lmfuse), then rerun")
    _unlink_others(run.dir, set(keys))
    def line(node, what: str, why: str) -> str | None:
        if what == "skipped":
            return None
        return f"  [{'resume' if what == 'resumed' else 'run'}] {node.label} -> store/{node.kind}/{node.key}"

    outcome = runner.build_all(graph, log=log, kinds=[k for k in KINDS if k != "merge"], line=line)
    ran = [label for label, what in outcome.items() if what != "skipped"]
    (run.dir / "eval").mkdir(exist_ok=True)
    _link(run.dir / "eval" / "cache", store / "eval_cache")
    marker = {"variant": run.variant.name, "seed": run.seed, "set": run.variant.overrides,
              "config_hash": _config_hash(cfg), "keys": keys}
    old = read_json(run.dir / MARKER) or {}
    if not ran and (run.dir / "eval" / "results.json").exists() and all(old.get(k) == v for k, v in marker.items()):
        return "skipped"
    runner.evaluate(graph, log=log)
    runner.write_report(run.dir)
    atomic_write_json(run.dir / MARKER, {**marker, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return "ran"


def _unlink_others(run_dir: Path, labels: set[str]) -> None:
    """Remove the run's links to artifacts its config no longer has (a variant dropped a source).

    Only the links go (the store keeps the artifacts); the report would otherwise still list them.
    """
    for kind in KINDS:
        for p in sorted((run_dir / kind).glob("*")):
            if p.is_symlink() and f"{kind}/{p.name}" not in labels:
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


def run_sweep_file(path: str | Path, log: Callable[[str], Any] = print, dry_run: bool = False,
                   parts: Sequence[str] | None = None) -> dict:
    """`lmfuse sweep SWEEP.yaml [--part NAME ...]`: load the sweep file and run it (see `run_sweep`).

    With parts, the parts asked for (default: all) run in the file's order, each writing its own
    table; every part's runs are checked before any work. Returns the last part's `sweep.json`
    object (with `dry_run`, every part's runs).
    """
    sweeps = load_parts(path)
    unknown = [p for p in parts or [] if p not in sweeps]
    if unknown:
        raise LmfuseError(f"no part {', '.join(map(repr, unknown))} in the sweep file", where=str(path),
                          fix=f"choose from: {', '.join(n for n in sweeps if n) or '(the file has no parts)'}")
    chosen = [sweeps[p] for p in (parts or list(sweeps))]
    every = {r.name for sw in sweeps.values() for r in build_runs(sw)}  # all checked before any work
    doc: dict = {}
    listing: list = []
    for sw in chosen:
        if sw.part:
            log(f"== part {sw.part}")
        doc = execute(sw, log=log, dry_run=dry_run, keep=every)
        listing += doc.get("runs", []) if dry_run else []
    return {"runs": listing} if dry_run else doc


def execute(sweep: Sweep, log: Callable[[str], Any] = print, dry_run: bool = False,
            keep: set[str] | None = None) -> dict:
    """Check every run, then run them in order and write the table (see `run_sweep`).

    `keep`: run names other parts of the sweep file have (not reported as dropped).
    """
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
    with runner.store_lock(sweep.out_dir):
        _note_dropped(sweep, {r.name for r in runs} | (keep or set()), log)
        t0 = time.time()
        for i, r in enumerate(runs, 1):
            log(f"[{i}/{len(runs)}] {r.name}: {_settings(r.variant)}")
            t = time.time()
            outcome = run_one(r, store, log)
            log(f"[{i}/{len(runs)}] {r.name}: " + ("finished earlier and current; skipped" if outcome == "skipped"
                                                  else f"done in {time.time() - t:.1f} s"))
        control_keys = {r.name: (read_json(r.dir / MARKER) or {}).get("keys", {}).get("train/clm") for r in runs}
        doc = summarize_sweep(sweep, runs, control_keys, store_counts(sweep.out_dir))
        doc["seconds"] = round(time.time() - t0, 3)
        md = write_outputs(doc, sweep.table_dir)
    log(f"sweep done in {time.time() - t0:.1f} s; table: {md} (and sweep.html, sweep.json)")
    return doc


def _note_dropped(sweep: Sweep, names: set[str], log: Callable[[str], Any]) -> None:
    """Say which run directories the sweep file no longer names (they are left as they are)."""
    root = sweep.out_dir / "runs"
    if not root.exists():
        return
    old = sorted(p.name for p in root.glob("*") if (p / MARKER).exists() and p.name not in names)
    if old:
        log(f"not in the sweep any more (kept on disk, left out of the table): {', '.join(old)}")
