"""The experiments' committed files: every sweep file loads (with its base configs and parts) once
bound to an output directory, and every dotted key it sets names a config field; every data
builder's settings file loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SETTINGS = sorted(p for p in EXPERIMENTS.glob("*/data*.yaml"))
SWEEPS = sorted(p for p in EXPERIMENTS.glob("*/*.yaml")
                if p not in SETTINGS and "parts" in (yaml.safe_load(p.read_text()) or {}))
sys.path.insert(0, str(EXPERIMENTS))  # experiments/common.py, as the builders import it


def _builder(folder: Path):
    spec = importlib.util.spec_from_file_location(f"lmfuse_experiment_{folder.name}", folder / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the Settings annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_data_settings_file_loads(path):
    from common import settings_of

    builder = _builder(path.parent)
    assert isinstance(settings_of(builder.Settings, path), builder.Settings)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_sweep_file_loads_and_sets_real_keys(path, tmp_path):
    from lmfuse.sweep import key_problem, load_parts

    bound = tmp_path / "sweep.yaml"  # what a data builder writes
    bound.write_text(yaml.safe_dump({"extends": str(path), "output_dir": "out"}))
    parts = load_parts(bound)
    assert parts and all(sw.variants for sw in parts.values())
    for sw in parts.values():
        keys = [*sw.common, *(k for v in sw.variants for k in v.overrides)]
        assert not [k for k in keys if key_problem(k)], [(k, key_problem(k)) for k in keys if key_problem(k)]


def test_the_experiments_are_these_sweep_files():
    names = {f"{p.parent.name}/{p.name}" for p in SWEEPS}
    assert {"cross_arch/sweep.yaml", "cross_arch/fusion24k.yaml", "cross_arch/tiny.yaml",
            "domain_experts/sweep.yaml", "domain_experts/lr1e-4.yaml", "domain_experts/tiny.yaml"} <= names
