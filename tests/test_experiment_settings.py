"""The experiment drivers' settings files: every one loads, and `extends` merges as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
DRIVERS = ("domain_experts", "cross_arch")
sys.path.insert(0, str(EXPERIMENTS))  # experiments/common.py, as the drivers import it


def _driver(name: str):
    spec = importlib.util.spec_from_file_location(f"lmfuse_experiment_{name}", EXPERIMENTS / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the Settings annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", DRIVERS)
def test_every_settings_file_loads(name):
    driver = _driver(name)
    files = sorted((EXPERIMENTS / name).glob("*.yaml"))
    assert files, f"no settings files in experiments/{name}"
    for f in files:
        settings = driver.load_settings(f)
        assert isinstance(settings, driver.Settings), f


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    from common import read_settings

    (tmp_path / "a.yaml").write_text("seeds: [0, 1, 2]\nfusion_train: {learning_rate: 2.0e-5, epochs: 1}\n"
                                     "domains: [code, docs]\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nseeds: [0]\nfusion_train: {learning_rate: 1.0e-4}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("extends: ../b.yaml\ndomains: [legal]\n")
    got = read_settings(tmp_path / "sub" / "c.yaml")
    assert got == {"seeds": [0], "fusion_train": {"learning_rate": 1.0e-4, "epochs": 1}, "domains": ["legal"]}


def test_the_real_confirm_is_the_screen_with_three_seeds():
    driver = _driver("domain_experts")
    screen = driver.load_settings(EXPERIMENTS / "domain_experts" / "lr1e-4-screen.yaml")
    confirm = driver.load_settings(EXPERIMENTS / "domain_experts" / "lr1e-4.yaml")
    real = driver.load_settings(EXPERIMENTS / "domain_experts" / "real.yaml")
    assert screen.expert_train == {**real.expert_train, "learning_rate": 1.0e-4}
    assert confirm.seeds == [0, 1, 2] and screen.seeds == [0]
    a, b = screen.model_dump(), confirm.model_dump()
    assert {k for k in a if a[k] != b[k]} == {"seeds", "variants"}


@pytest.mark.parametrize("text, says", [
    ("extends: missing.yaml\n", "names no file"),
    ("extends: loop.yaml\n", "cycle"),
    ("- a list\n", "mapping"),
])
def test_bad_extends_says_what_and_where(tmp_path, text, says):
    from common import read_settings

    f = tmp_path / "loop.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit, match=says) as err:
        read_settings(f)
    assert str(f) in str(err.value)
