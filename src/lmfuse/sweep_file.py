"""The sweep file: reading it (`extends:`, `parts:`), its variants (a list or a grid), dotted keys.

Everything here reads and checks; nothing runs (`lmfuse.sweep` runs what this returns). The
format is in docs/sweep.md.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmfuse.errors import LmfuseError

#: Names of variants (and so of run directories): path-safe, no separators.
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$"
#: Keys the sweep sets itself in every run's config.
RESERVED = {"output_dir": "the sweep sets each run's output_dir to its run directory",
            "train.seed": "the sweep's `seeds:` set train.seed",
            "train.control": "the sweep always trains the λ = 1 control"}
#: `base:` values that name the embedded demo's config instead of a file.
DEMO_BASES = {"lmfuse:demo": False, "lmfuse:demo-quick": True}


# -- the sweep file ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Variant(_Strict):
    """One variant: a name and the config keys it sets (dotted key → value)."""

    name: str = Field(pattern=VARIANT_NAME, description="the run directories are `<name>-s<seed>`")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value, on top of the base config")


class Part(_Strict):
    """One named part of a sweep file: its own variants (and seeds, settings, base), its own table."""

    base: str | None = Field(None, description="default: the file's base config (relative to the sweep file)")
    seeds: list[int] | None = Field(None, min_length=1, description="default: the file's seeds")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value, after the file's `set`")
    variants: Any = Field(description="{grid: {dotted.key: [values]}} or a list of {name, set}")


class TableOptions(_Strict):
    """What the sweep's tables show beside the domains and `overall`."""

    average: list[str] | None = Field(None, min_length=1, description=(
        "domains whose mean is an `average` column, every domain alike (a paper's average); "
        "default: none"))


class SweepFile(_Strict):
    """The sweep file; `variants` is checked by hand (a grid or a list) for plainer messages.

    `extends: OTHER.yaml` (relative to this file) starts from another sweep file: mappings merge
    key by key, anything else replaces. `parts:` instead of `variants:` names several parts that
    share the runs and the store, each with its own table (`OUT/parts/<part>/sweep.md`).
    """

    base: str | None = Field(None, description="the base config (relative to the sweep file), or "
                                               "lmfuse:demo[-quick]; every part must then give its own")
    output_dir: str = Field(description="where runs/ and store/ go (relative to the sweep file)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="values of train.seed")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set",
                                      description="dotted config key → value applied to every variant")
    variants: Any = Field(None, description="{grid: {dotted.key: [values]}} or a list of {name, set}")
    parts: dict[str, Part] | None = Field(None, description="named parts, each with its own variants and table")
    table: TableOptions = Field(default_factory=lambda: TableOptions(), description="what the tables show")


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
    average: list[str] | None = None  # domains averaged into the tables' `average` column

    @property
    def table_dir(self) -> Path:
        """Where this sweep's table goes: OUT/, or OUT/parts/<part>/ for a part."""
        return self.out_dir / "parts" / self.part if self.part else self.out_dir



def _format_errors(e: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "(top level)")
        out.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return out


def _value_name(v: Any) -> str:
    """A config value as written in a variant's name and settings: `0.5`, `true`, `["a","b"]`."""
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
    if seen:  # a parent's paths: relative to the parent (the file's own stay as given)
        places = [(data, "base"), (data, "output_dir")]
        places += [(p, "base") for p in (data.get("parts") or {}).values() if isinstance(p, dict)] \
            if isinstance(data.get("parts"), dict) else []
        for where, key in places:
            if isinstance(where.get(key), str) and where[key] not in DEMO_BASES:
                where[key] = str(_resolve(where[key], here))
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
    seeds = data.get("seeds")
    if isinstance(seeds, list) and len({json.dumps(x) for x in seeds}) != len(seeds):
        problems.append(f"seeds: repeated values in {seeds}")
    out_dir = _resolve(spec.output_dir, here) if spec is not None else here
    bases = {}
    for name, (_, part) in part_variants.items():
        base_name = part.base if part is not None and part.base else data.get("base")
        where = f"parts.{name}.base" if part is not None and part.base else "base"
        if base_name is None and spec is not None:
            problems.append(f"{where}: no base config; give `base:` (for the file or for this part)")
        elif isinstance(base_name, str) and base_name not in bases:
            bases[base_name] = _load_base(base_name, here, out_dir, where, problems)
    if problems:
        raise _problems_error(problems, path)
    assert spec is not None
    out = {}
    for name, (vs, part) in part_variants.items():
        seeds = list(part.seeds) if part is not None and part.seeds else list(spec.seeds)
        common = {**spec.overrides, **(part.overrides if part is not None else {})}
        label = part.base if part is not None and part.base else spec.base
        base, base_dir = bases[label]
        out[name] = Sweep(base=base, base_dir=base_dir, base_label=label, out_dir=out_dir, seeds=seeds,
                          variants=vs, common=common, source=path, part=name, average=spec.table.average)
    _same_names_same_settings(out, path)
    return out


def _load_base(name: str, here: Path, out_dir: Path, where: str, problems: list[str]) -> tuple[dict, Path]:
    """A base config as a raw dict and the folder its relative paths are relative to."""
    from lmfuse.config import read_yaml

    if name in DEMO_BASES:
        from lmfuse.demo import demo_config

        return demo_config(out_dir / "runs" / "base", quick=DEMO_BASES[name]), here
    base_path = _resolve(name, here)
    if not base_path.is_file():
        problems.append(f"{where}: the config {name!r} does not exist (paths are relative to the sweep "
                        f"file; lmfuse:demo and lmfuse:demo-quick name the demo's config)")
        return {}, here
    try:
        return read_yaml(base_path), base_path.parent
    except LmfuseError as e:
        problems.append(f"{where}: {e.what}")
        return {}, here


def _same_names_same_settings(sweeps: dict[str, Sweep], path: Path) -> None:
    """A variant named in two parts is one set of runs: it must set the same keys there."""
    seen: dict[str, tuple[str, dict]] = {}
    problems = []
    for part, sw in sweeps.items():
        for v in sw.variants:
            settings = {"base": sw.base_label, **sw.common, **v.overrides}
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
    from lmfuse.config import ConfigError  # the CLI exits 1 for it


    return ConfigError(list(problems), str(where), subject="the sweep",
                       fix="correct the entries named above; nothing has been run")


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
