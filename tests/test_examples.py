"""examples/fuse.yaml shows every config key with its default, and says where it differs.

The keys are enumerated from the pydantic models, so a field added to `FuseConfig` (or to any of
its sections) fails this test until the example shows it.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from lmfuse.config import FuseConfig, validate_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fuse.yaml"
MARK = "# not the default:"


def _model_of(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model a field holds, whether it holds a list of them) or (None, False)."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        inner = typing.get_args(annotation)[0]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, BaseModel) else (None, False)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return (models[0], False) if models else (None, False)
    return (annotation, False) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else (None, False)


def _nodes(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    return {k.value: (k, v) for k, v in node.value}


def _problems(model: type[BaseModel], node: yaml.Node, data, where: str, lines: list[str]) -> list[str]:
    """Every field of `model` missing from `data`, or set to a non-default value without saying so."""
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        return [f"{where or 'top level'}: expected a mapping of the {model.__name__} fields"]
    problems = []
    nodes = _nodes(node)
    for name, field in model.model_fields.items():
        loc = f"{where}.{name}" if where else name
        if name not in data:
            problems.append(f"{loc}: missing")
            continue
        key_node, value_node = nodes[name]
        sub, is_list = _model_of(field.annotation)
        if sub is not None:
            if is_list:
                if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                    problems.append(f"{loc}: expected a list with at least one entry")
                    continue
                for i, (item_node, item) in enumerate(zip(value_node.value, data[name], strict=True)):
                    problems += _problems(sub, item_node, item, f"{loc}[{i}]", lines)
            else:
                problems += _problems(sub, value_node, data[name], loc, lines)
            continue
        if field.is_required():
            continue  # no default to compare with
        default = field.get_default(call_default_factory=True)
        line = lines[key_node.start_mark.line]
        marked = MARK in line
        if data[name] == default and marked:
            problems.append(f"{loc}: equals the default but says it is not the default")
        elif data[name] != default and not marked:
            problems.append(f"{loc}: {data[name]!r} is not the default {default!r}; mark the line `{MARK} ...`")
        elif marked:
            stated = line.split(MARK, 1)[1].strip()
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            if not stated.startswith(shown):
                problems.append(f"{loc}: the comment should state the default `{MARK} {shown}`")
    return problems


def test_example_shows_every_key_with_its_default():
    text = EXAMPLE.read_text()
    problems = _problems(FuseConfig, yaml.compose(text), yaml.safe_load(text), "", text.splitlines())
    assert not problems, "examples/fuse.yaml:\n" + "\n".join(problems)


def test_example_validates():
    assert validate_config(EXAMPLE) == []


def test_the_check_catches_a_missing_key_and_an_unmarked_change(tmp_path):
    text = EXAMPLE.read_text().replace("  seed: 0\nextract:", "extract:", 1)  # drop prepare.seed
    text = text.replace("  samples: 64 ", "  samples: 12 ", 1)
    text = text.replace("grad_accum: 8                          # not the default: 1",
                        "grad_accum: 1                          # not the default: 1")
    problems = _problems(FuseConfig, yaml.compose(text), yaml.safe_load(text), "", text.splitlines())
    assert "prepare.seed: missing" in problems
    assert any(p.startswith("extract.samples: 12 is not the default 64") for p in problems)
    assert "train.grad_accum: equals the default but says it is not the default" in problems
