"""Fault suite (issue 9): SIGKILL at seeded moments, full disk and I/O errors, corrupted artifacts.

Run with `python -m pytest -m fault -q` (CI runs it after the default suite; the default
`-m "not slow and not fault"` leaves it out). Every case starts from a copy of one uninterrupted
reference run of the whole pipeline on tiny models, made once per module, and ends compared
with it. docs/RELIABILITY.md says what is covered and what was found.

Kill moments are not times: a driver (`DRIVER`, run as `python -c`) wraps the lowest write
calls (`os.replace`, `shutil.rmtree`, `safetensors` `save_file`, `torch.save`, lmfuse's
`atomic_write_bytes`) and sends itself SIGKILL at the n-th call that touches the run directory,
so a moment is `(point, n)`, chosen by a seeded RNG among the calls the reference run made.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.fault

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}

DRIVER = r'''
import json, os, signal, sys

spec = json.loads(sys.argv[1])
root = os.path.realpath(spec["root"])
kill = spec.get("kill")  # [point, n]: SIGKILL at the n-th call of `point` that touches the run directory
counts = {}


def _under(p):
    try:
        return os.path.realpath(os.fspath(p)).startswith(root + os.sep)
    except TypeError:
        return False


def hit(point, path, torn=None):
    if not _under(path):
        return
    counts[point] = counts.get(point, 0) + 1
    if kill and kill[0] == point and counts[point] == kill[1]:
        if torn is not None:
            torn()  # leave what a write cut short leaves
        os.kill(os.getpid(), signal.SIGKILL)


def half(path, size):
    def write():
        with open(path, "wb") as f:
            f.write(b"\0" * size)
    return write


import shutil
_replace, _rmtree = os.replace, shutil.rmtree
def replace(src, dst, *a, **k):
    hit("replace", dst)  # the temp file is whole, the rename not done
    return _replace(src, dst, *a, **k)
def rmtree(path, *a, **k):
    hit("rmtree", path)  # checkpoint cleanup, moving the final model into place, overwrite
    return _rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree

import safetensors.torch as st  # patched before accelerate and transformers bind it
_save_file = st.save_file
def save_file(tensors, filename, *a, **k):
    hit("save_file", filename, torn=half(filename, 4096))  # inside a checkpoint or model save
    return _save_file(tensors, filename, *a, **k)
st.save_file = save_file

import torch
_tsave = torch.save
def tsave(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)):
        hit("torch_save", f, torn=half(f, 1024))  # optimizer / scheduler state of a checkpoint
    return _tsave(obj, f, *a, **k)
torch.save = tsave

import lmfuse.artifacts as A
_awb = A.atomic_write_bytes
def atomic_write_bytes(path, data):
    def torn():  # a temp file cut off half-way, as a kill during the write leaves it
        d, name = os.path.split(os.fspath(path))
        with open(os.path.join(d, f".{name}.torn.tmp"), "wb") as f:
            f.write(data[: len(data) // 2])
    hit("torn", path, torn=torn if os.path.isdir(os.path.dirname(os.fspath(path))) else None)
    return _awb(path, data)
A.atomic_write_bytes = atomic_write_bytes

from lmfuse import cli
rc = 0
for argv in spec["commands"]:
    counts.clear()
    sys.argv = ["lmfuse", *argv]
    try:
        cli.main()
    except SystemExit as e:
        rc = e.code or 0
    if spec.get("counts"):
        with open(spec["counts"], "a") as f:
            f.write(json.dumps({"command": argv, "counts": counts}) + "\n")
    if rc:
        break
sys.exit(rc)
'''


def drive(root: Path, commands: list[list[str]], kill: tuple[str, int] | None = None,
          counts: Path | None = None) -> subprocess.CompletedProcess:
    spec = {"root": str(root), "commands": commands, "kill": list(kill) if kill else None,
            "counts": str(counts) if counts else None}
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True,
                          env=ENV, timeout=600)


# -- the stages under test ---------------------------------------------------------------------
# key: (CLI arguments after the subcommand, with CONFIG, the artifacts it writes)
STAGES = {
    "prepare": (["prepare", "CONFIG"], ["prepare"]),
    "extract": (["extract", "CONFIG", "-m", "src_spm"], ["extract/src_spm"]),
    "vocab_map": (["vocab-map", "CONFIG", "-s", "src_wp"], ["vocab_map/src_wp"]),
    "align": (["align", "CONFIG", "-s", "src_spm"], ["align/src_spm"]),
    "train_fused": (["train", "CONFIG"], ["train/fused"]),
    "train_clm": (["train", "CONFIG", "--control"], ["train/clm"]),
    "eval": (["eval", "CONFIG"], ["merge/mix", "eval"]),
}
# What goes when a stage's artifacts are rebuilt: they and what is made from them.
DOWNSTREAM = {
    "prepare": ["prepare", "extract", "align", "train", "merge", "eval"],
    "extract": ["extract/src_spm", "align/src_spm", "train", "merge", "eval"],
    "vocab_map": ["vocab_map/src_wp", "align/src_wp", "train", "merge", "eval"],
    "align": ["align/src_spm", "train", "merge", "eval"],
    "train_fused": ["train/fused", "merge", "eval"],
    "train_clm": ["train/clm", "eval"],
    "eval": ["merge", "eval"],
}


def cmd(stage: str, config: Path) -> list[str]:
    return [str(config) if a == "CONFIG" else a for a in STAGES[stage][0]]


@dataclass
class Reference:
    run: Path  # the uninterrupted run
    counts: dict[str, dict[str, int]]  # stage -> point -> calls that touched the run directory
    data: dict  # its config
    tmp: Path

    def copy(self, name: str, drop: list[str] = ()) -> tuple[Path, Path]:
        """A copy of the reference run without `drop` (labels); returns (config path, run dir)."""
        run = self.tmp / name / "run"
        shutil.copytree(self.run, run, symlinks=True, ignore=shutil.ignore_patterns(".lmfuse.lock"))
        for lab in drop:
            shutil.rmtree(run / lab, ignore_errors=True)
        data = {**self.data, "output_dir": str(run)}
        config = self.tmp / name / "config.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        return config, run


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_models) -> Reference:
    from lmfuse.testing import write_tiny_corpus

    tmp = tmp_path_factory.mktemp("faults")
    corpus = write_tiny_corpus(tmp / "corpus.jsonl")
    data = {
        "output_dir": str(tmp / "ref" / "run"),
        "target": {"name": "tgt", "path": str(tiny_models["bpe"]), "dtype": "float32"},
        "sources": [{"name": "src_spm", "path": str(tiny_models["spm"]), "dtype": "float32"},
                    {"name": "src_wp", "path": str(tiny_models["wordpiece"]), "dtype": "float32"}],
        "corpus": {"path": str(corpus)},
        "prepare": {"block_size": 48, "validation_fraction": 0.2},
        "extract": {"top_k": 5, "batch_size": 3, "shard_size": 4},
        "train": {"max_steps": 4, "batch_size": 2, "precision": "float32", "learning_rate": 1e-3,
                  "save_every": 1, "keep_best": True, "eval_every": 2},
        "eval": {"batch_size": 8},
        "baselines": {"merge": [{"models": ["tgt", "fused"], "name": "mix"}]},
    }
    config = tmp / "ref" / "config.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    run = Path(data["output_dir"])
    commands = [["prepare", str(config)], ["extract", str(config)], ["vocab-map", str(config)],
                ["align", str(config)], ["train", str(config)], ["train", str(config), "--control"],
                ["eval", str(config)]]
    res = drive(run, commands, counts=tmp / "counts.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp / "counts.jsonl").read_text().splitlines()]
    by_cmd = {tuple(x["command"][:1] + x["command"][2:]): x["counts"] for x in lines}
    counts = {
        "prepare": by_cmd[("prepare",)],
        # Per model or source: the reference ran all of them in one command, the kills run one.
        "extract": {p: n // 3 for p, n in by_cmd[("extract",)].items()},
        "vocab_map": {p: n // 2 for p, n in by_cmd[("vocab-map",)].items()},
        "align": {p: n // 2 for p, n in by_cmd[("align",)].items()},
        "train_fused": by_cmd[("train",)],
        "train_clm": by_cmd[("train", "--control")],
        "eval": by_cmd[("eval",)],
    }
    return Reference(run, counts, data, tmp)


# -- comparisons with the reference ------------------------------------------------------------
def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_as_reference(ref: Reference, run: Path, stage: str) -> None:
    import torch

    for lab in STAGES[stage][1]:
        a, b = ref.run / lab, run / lab
        assert not [p for p in b.rglob("*.tmp")], f"temp files left in {lab}"
        if lab == "eval":
            ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
            assert set(ra["models"]) == set(rb["models"])
            for m in ra["models"]:
                assert rb["models"][m]["overall"]["bpb"] == pytest.approx(ra["models"][m]["overall"]["bpb"],
                                                                          rel=1e-6), m
            continue
        ma, mb = manifest(a), manifest(b)
        assert mb["key"] == ma["key"], lab
        if lab.startswith("train/"):
            wa, wb = weights(a), weights(b)
            assert wa.keys() == wb.keys()
            for k in wa:
                torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
            for k, v in ma["metrics"].items():
                if isinstance(v, float):
                    assert mb["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
                else:
                    assert mb["metrics"][k] == v, k
            assert not (b / "checkpoints").exists() and not (b / ".final").exists()
        else:  # byte-identical: every content file has the reference's sha256
            # (merge.json records the merged models' absolute paths, which differ between copies)
            fa, fb = ({k: v for k, v in m["files"].items() if k != "merge.json"} for m in (ma, mb))
            assert fb == fa, lab


def assert_never_complete_and_broken(run: Path, stage: str) -> None:
    """After a kill an artifact is unfinished, or finished and intact: never finished and broken."""
    from lmfuse.artifacts import damage, read_manifest

    for lab in STAGES[stage][1]:
        m = read_manifest(run / lab) if (run / lab).is_dir() else None
        if m is not None and lab != "eval":  # eval's manifest holds no checksums
            assert damage(run / lab, m, full=True) == [], lab


# -- 1. SIGKILL at seeded moments, then resume ---------------------------------------------------
# Per stage, chains of kill points: each chain kills the stage once per point, in order (each
# rerun resuming the last), then runs it to the end and compares it with the reference.
CHAINS = {
    "prepare": [["torn", "replace", "replace"]],
    "extract": [["replace", "torn"], ["torn", "replace"]],
    "vocab_map": [["torn", "replace"]],
    "align": [["replace", "torn", "replace"]],
    # checkpoint save (safetensors, torch.save of the optimizer, the rename), cleanup (rmtree)
    "train_fused": [["save_file", "rmtree"], ["torch_save", "replace"], ["rmtree"]],
    "train_clm": [["replace", "save_file"]],
    "eval": [["save_file", "replace"], ["torn"]],
}
KILL_SEED = 9


def kill_plan() -> list[tuple[str, int, list[str]]]:
    return [(stage, i, chain) for stage, chains in CHAINS.items() for i, chain in enumerate(chains)]


def test_the_plan_kills_at_least_twenty_moments_in_every_stage():
    assert sum(len(c) for _, _, c in kill_plan()) >= 20
    assert set(CHAINS) == set(STAGES)


@pytest.mark.parametrize("stage,i,chain", kill_plan(), ids=[f"{s}-{i}" for s, i, _ in kill_plan()])
def test_sigkill_then_resume_gives_the_uninterrupted_result(ref, stage, i, chain):
    rng = random.Random(f"{KILL_SEED}-{stage}-{i}")
    config, run = ref.copy(f"kill-{stage}-{i}", drop=DOWNSTREAM[stage])
    counts = dict(ref.counts[stage])
    moments = []
    for point in chain:
        # A seeded moment among the calls still to come (a resumed run makes fewer than a fresh one).
        n = rng.randint(1, max(1, counts[point] // 2 if moments else counts[point]))
        res = drive(run, [cmd(stage, config)], kill=(point, n))
        moments.append((point, n))
        assert res.returncode == -9, f"{stage}: no kill at {point}#{n} (rc {res.returncode}): {res.stderr[-2000:]}"
        assert_never_complete_and_broken(run, stage)
        counts[point] = max(1, counts[point] - n)
    res = drive(run, [cmd(stage, config)])
    assert res.returncode == 0, f"{stage} after kills at {moments}: {res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr
    assert_same_as_reference(ref, run, stage)


# -- 2. full disk and I/O errors at the lowest write layer, then rerun ---------------------------
class WriteFaults:
    """Make the n-th write that touches `root` fail with an errno, at the lowest layer lmfuse goes
    through: `os.fsync` (every atomic file write: shards, JSON, manifests), `os.replace` (every
    rename into place: files, checkpoints, the final model) and safetensors' `save_file` (model
    and checkpoint weights; it reports a full disk as `SafetensorError(... (os error 28))`)."""

    def __init__(self, monkeypatch, root: Path):
        import safetensors.torch

        self.root, self.fault, self.hits = os.path.realpath(root), None, 0
        fsync, replace, save = os.fsync, os.replace, safetensors.torch.save_file

        def fd_path(fd):
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        def f_fsync(fd):
            self.hit(fd_path(fd))
            return fsync(fd)

        def f_replace(src, dst, *a, **k):
            self.hit(dst)
            return replace(src, dst, *a, **k)

        def f_save(tensors, filename, *a, **k):
            try:
                self.hit(filename)
            except OSError as e:
                from safetensors import SafetensorError

                raise SafetensorError(f"Error while serializing: I/O error: {e.strerror} (os error {e.errno}) "
                                      f'at path "{filename}"') from None
            return save(tensors, filename, *a, **k)

        monkeypatch.setattr(os, "fsync", f_fsync)
        monkeypatch.setattr(os, "replace", f_replace)
        for mod in list(sys.modules.values()):  # every binding of save_file (`from ... import save_file`)
            for name, val in list(getattr(mod, "__dict__", {}).items()):
                if val is save:
                    monkeypatch.setattr(mod, name, f_save)

    def arm(self, code: int, n: int) -> None:
        self.fault, self.hits = (code, n), 0

    def hit(self, path) -> None:
        if not self.fault or not os.path.realpath(os.fspath(path)).startswith(self.root + os.sep):
            return
        self.hits += 1
        code, n = self.fault
        if self.hits == n:
            self.fault = None
            raise OSError(code, os.strerror(code), os.fspath(path))


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run `lmfuse ARGV` in this process: (exit code, stderr)."""
    from lmfuse import cli as lmfuse_cli

    old = sys.argv
    sys.argv = ["lmfuse", *argv]
    try:
        lmfuse_cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@pytest.fixture()
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run (OMP_NUM_THREADS=1): same float sums, same bytes
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("stage", list(STAGES))
def test_full_disk_and_io_errors_fail_clearly_and_a_rerun_recovers(ref, stage, monkeypatch, capsys, one_thread):
    import errno

    rng = random.Random(f"{KILL_SEED}-disk-{stage}")
    config, run = ref.copy(f"disk-{stage}", drop=DOWNSTREAM[stage])
    faults = WriteFaults(monkeypatch, run)
    c = ref.counts[stage]
    writes = c.get("torn", 0) + c.get("replace", 0) + c.get("save_file", 0)
    for code, advice in ((errno.ENOSPC, "free disk space"), (errno.EIO, "I/O error")):
        n = rng.randint(1, max(1, writes // 3))  # a resumed run writes less than a fresh one
        faults.arm(code, n)
        rc, err = cli(cmd(stage, config), capsys)
        assert faults.fault is None, f"{stage}: the write fault #{n} was never reached"
        assert rc == 2, f"{stage}: {os.strerror(code)} at write #{n} gave exit {rc}: {err[-2000:]}"
        assert "error: cannot" in err and advice in err and "Traceback" not in err, err
        assert_never_complete_and_broken(run, stage)
        for lab in STAGES[stage][1]:  # the artifact being written is not marked complete
            assert not (run / lab / "manifest.json").exists() or lab == "merge/mix", lab
    rc, err = cli(cmd(stage, config), capsys)
    assert rc == 0, err[-3000:]
    assert_same_as_reference(ref, run, stage)


def test_a_rust_library_s_full_disk_error_exits_2_with_advice():
    from safetensors import SafetensorError

    from lmfuse.cli import wrapped_os_error

    e = wrapped_os_error(SafetensorError('Error while serializing: I/O error: No space left on device '
                                         '(os error 28) at path "/run/x.safetensors"'))
    assert e.errno == 28 and e.filename == "/run/x.safetensors"
    assert wrapped_os_error(ValueError("a plain error")) is None
