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
        if m is not None:
            assert damage(run / lab, m, full=True) == [], lab


# -- 1. SIGKILL at seeded moments, then resume ---------------------------------------------------
# Per stage, chains of kill points: each chain kills the stage once per point, in order (each
# rerun resuming the last), then runs it to the end and compares it with the reference.
CHAINS = {
    "prepare": [["torn", "replace", "replace"]],
    "extract": [["replace", "torn", "torn", "replace"]],
    "vocab_map": [["torn", "replace"]],
    "align": [["replace", "torn", "replace"]],
    # checkpoint save (safetensors, torch.save of the optimizer, the rename), cleanup (rmtree)
    "train_fused": [["save_file", "rmtree"], ["torch_save", "replace"], ["rmtree"]],
    "train_clm": [["replace", "save_file"],
                  # Counted from the end of a fresh run: the final cleanup of the checkpoints before
                  # the manifest (issue 9.5's moment), and the removal of `.final/` after it.
                  ["rmtree@-5"], ["rmtree@-2"]],
    "eval": [["save_file", "replace", "torn"]],
}
KILL_SEED = 9


def kill_plan() -> list[tuple[str, int, list[str]]]:
    return [(stage, i, chain) for stage, chains in CHAINS.items() for i, chain in enumerate(chains)]


def test_the_plan_kills_at_least_twenty_moments_in_every_stage():
    assert sum(len(c) for _, _, c in kill_plan()) >= 20
    assert {p.partition("@")[0] for _, _, c in kill_plan() for p in c} == {"replace", "torn", "rmtree", "save_file",
                                                                          "torch_save"}
    assert set(CHAINS) == set(STAGES)


@pytest.mark.parametrize("stage,i,chain", kill_plan(), ids=[f"{s}-{i}" for s, i, _ in kill_plan()])
def test_sigkill_then_resume_gives_the_uninterrupted_result(ref, stage, i, chain):
    rng = random.Random(f"{KILL_SEED}-{stage}-{i}")
    config, run = ref.copy(f"kill-{stage}-{i}", drop=DOWNSTREAM[stage])
    fresh = ref.counts[stage]
    left = 1.0  # the share of a fresh run's calls still to come
    moments = []
    for point in chain:
        point, _, back = point.partition("@")
        if back:  # a fixed moment, counted from the end
            n = fresh[point] + 1 + int(back)
        else:  # a seeded moment among the calls still to come (halved after a kill: resuming redoes some)
            avail = max(1, int(fresh[point] * left))
            n = rng.randint(1, max(1, avail // 2) if moments else avail)
        res = drive(run, [cmd(stage, config)], kill=(point, n))
        moments.append((point, n))
        assert res.returncode == -9, f"{stage}: no kill at {point}#{n} (rc {res.returncode}): {res.stderr[-2000:]}"
        assert_never_complete_and_broken(run, stage)
        left = max(0.0, left - n / fresh[point])
    res = drive(run, [cmd(stage, config)])
    assert res.returncode == 0, f"{stage} after kills at {moments}: {res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr
    assert_same_as_reference(ref, run, stage)


def test_a_killed_eval_leaves_no_temp_files(ref):
    config, run = ref.copy("kill-eval-tmp", drop=DOWNSTREAM["eval"])
    last = ref.counts["eval"]["torn"]  # the last atomic write of eval: its manifest, in eval/
    assert drive(run, [cmd("eval", config)], kill=("torn", last)).returncode == -9
    assert list((run / "eval").glob(".manifest.json*.tmp"))
    assert drive(run, [cmd("eval", config)]).returncode == 0
    assert not list((run / "eval").rglob("*.tmp"))


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


def cli(argv: list[str], capsys, stream: str = "err") -> tuple[int, str]:
    """Run `lmfuse ARGV` in this process: (exit code, its stderr or stdout)."""
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
    return code, getattr(capsys.readouterr(), stream)


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

    from lmfuse.artifacts import wrapped_os_error

    e = wrapped_os_error(SafetensorError('Error while serializing: I/O error: No space left on device '
                                         '(os error 28) at path "/run/x.safetensors"'))
    assert e.errno == 28 and e.filename == "/run/x.safetensors"
    assert wrapped_os_error(ValueError("a plain error")) is None


# -- 3. corruption of every artifact kind: detected, never used ----------------------------------
def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a checksum can tell
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete(f: Path) -> None:
    f.unlink()


def _swap(f: Path) -> None:  # another shard of the same artifact: valid Arrow, wrong blocks
    f.write_bytes((f.parent / "shard-00001.arrow").read_bytes())


def _edit(key: str, value):
    def edit(f: Path) -> None:
        doc = json.loads(f.read_text())
        node = doc
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        assert node[last] != value
        node[last] = value  # still valid JSON, one value changed
        f.write_text(json.dumps(doc, indent=2))
    return edit


MUTATIONS = {"flip": _flip, "truncate": _truncate, "delete": _delete, "swap": _swap}
# The consumer of each artifact (the command that reads it) and what must go first so that it runs.
CONSUMER = {
    "prepare": (["extract", "CONFIG", "-m", "src_spm"], ["extract/src_spm"]),
    "extract/src_spm": (["align", "CONFIG", "-s", "src_spm"], ["align/src_spm"]),
    "vocab_map/src_wp": (["align", "CONFIG", "-s", "src_wp"], ["align/src_wp"]),
    "align/src_spm": (["train", "CONFIG"], ["train/fused"]),
    "train/fused": (["eval", "CONFIG"], ["eval"]),
    "merge/mix": (["eval", "CONFIG"], ["eval"]),
    "eval": (["report", "RUN"], []),
}
# (artifact label, file in it, mutation, None | "rebuild" (the reader rebuilds it, saying so) |
#  the reason it is not detected today: xfail)
CORRUPTIONS = [
    ("prepare", "shards/shard-00000.arrow", "flip", None),
    ("prepare", "shards/shard-00000.arrow", "truncate", None),
    ("prepare", "shards/shard-00000.arrow", "delete", None),
    ("prepare", "manifest.json", ("edit", "n_blocks", 75), None),
    ("prepare", "manifest.json", "truncate", None),
    ("extract/src_spm", "shards/shard-00002.arrow", "flip", None),
    ("extract/src_spm", "shards/shard-00002.arrow", "truncate", None),
    ("extract/src_spm", "shards/shard-00000.arrow", "swap", None),
    ("extract/src_spm", "stats/stats-00000.json", "delete", None),
    ("extract/src_spm", "manifest.json", ("edit", "mass_kept", 0.99), None),
    ("extract/src_spm", "manifest.json", "delete", None),
    ("vocab_map/src_wp", "map.npz", "flip", None),
    ("vocab_map/src_wp", "map.npz", "delete", None),
    ("vocab_map/src_wp", "manifest.json", ("edit", "coverage.exact", 1.0), None),
    ("align/src_spm", "shards/shard-00003.arrow", "flip", None),
    ("align/src_spm", "shards/shard-00000.arrow", "swap", None),
    ("align/src_spm", "shards/shard-00001.arrow", "delete", None),
    ("align/src_spm", "manifest.json", ("edit", "aligned_fraction", 0.99), None),
    ("train/fused", "model.safetensors", "flip", None),
    ("train/fused", "model.safetensors", "truncate", None),
    ("train/fused", "config.json", ("edit", "n_layer", 1), None),
    ("train/fused", "best/model.safetensors", "flip", None),
    ("train/fused", "manifest.json", ("edit", "metrics.final_train_loss", 0.0), None),
    ("merge/mix", "model.safetensors", "flip", "rebuild"),
    ("merge/mix", "model.safetensors", "truncate", "rebuild"),
    ("eval", "results.json", ("edit", "blocks", 1), None),
    ("eval", "cache/CACHE", ("edit", "overall.bpb", 0.5), None),
    ("eval", "manifest.json", ("edit", "seconds", 0.5), None),
]


def _case_id(c) -> str:
    how = c[2] if isinstance(c[2], str) else f"edit-{c[2][1]}"
    return f"{c[0]}:{c[1]}:{how}"


def _params():
    out = []
    for c in CORRUPTIONS:
        marks = [pytest.mark.xfail(strict=True, reason=c[3])] if c[3] not in (None, "rebuild") else []
        out.append(pytest.param(*c[:3], c[3] == "rebuild", marks=marks, id=_case_id(c)))
    return out


@pytest.mark.parametrize("label,rel,how,rebuilds", _params())
def test_corruption_is_reported_by_verify_and_by_the_stage_that_reads_it(ref, label, rel, how, rebuilds, capsys,
                                                                          one_thread):
    config, run = ref.copy(f"corrupt-{_case_id((label, rel, how)).replace('/', '_').replace(':', '-')}")
    if rel == "cache/CACHE":
        rel = "cache/" + sorted(p.name for p in (run / "eval" / "cache").glob("fused-*.json"))[0]
    target = run / label / rel
    (MUTATIONS[how] if isinstance(how, str) else _edit(how[1], how[2]))(target)
    name = Path(rel).name

    # `lmfuse verify` names the artifact, the file and the command that rebuilds it.
    rc, out = cli(["verify", str(run)], capsys, stream="out")
    assert rc == 2, f"verify found nothing wrong: {out}"
    line = next((x for x in out.splitlines() if [w.rstrip(":") for w in x.split()[1:2]] == [label]), "")
    assert line.split()[0] in ("damaged", "incomplete"), out
    assert (name in line or "manifest.json" in line) and "(fix: `" in line, line

    # The stage that reads it refuses it, naming the file and the fix; never uses it.
    argv, drop = CONSUMER[label]
    for lab in drop:
        shutil.rmtree(run / lab)
    argv = [str(config) if a == "CONFIG" else str(run) if a == "RUN" else a for a in argv]
    if rebuilds:  # the reader builds it again, says so, and the result is the reference's
        rc, out = cli(argv, capsys, stream="out")
        assert rc == 0 and f"building {Path(label).name}" in out, out[-2000:]
        wa, wb = weights(ref.run / label), weights(run / label)
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
        return
    rc, err = cli(argv, capsys)
    assert rc == 2, f"`lmfuse {' '.join(argv)}` used the damaged {label}/{rel} (exit {rc})"
    assert "Traceback" not in err and f"{label}" in err and ("lmfuse " in err.split("fix:")[-1]), err[-2000:]
    assert name in err or "manifest.json" in err or "no complete" in err, err[-2000:]


def test_run_repairs_what_its_size_check_finds_and_the_printed_command_repairs_the_rest(ref, capsys, one_thread):
    config, run = ref.copy("repair")
    _flip(run / "extract/src_spm/shards/shard-00002.arrow")  # same size: only verify's checksums see it
    _truncate(run / "align/src_wp/shards/shard-00001.arrow")
    _delete(run / "vocab_map/src_wp/map.npz")
    _edit("metrics.final_train_loss", 0.0)(run / "train/clm/manifest.json")

    rc, out = cli(["run", str(config)], capsys, stream="out")
    assert rc == 0, out[-3000:]
    for lab in ("vocab_map/src_wp", "align/src_wp", "train/clm"):
        assert f"[repair] {lab}: damaged" in out, out[-3000:]
    assert "[skip]   extract/src_spm" in out

    rc, out = cli(["verify", str(run)], capsys, stream="out")
    (line,) = [x for x in out.splitlines() if x.startswith("damaged")]
    fix = line.split("(fix: `")[1].rstrip("`)")
    assert fix == "lmfuse extract CONFIG --model src_spm --overwrite", line
    rc, err = cli([str(config) if a == "CONFIG" else a for a in fix.split()[1:]], capsys)
    assert rc == 0, err[-3000:]
    rc, out = cli(["verify", str(run)], capsys, stream="out")
    assert rc == 0 and "ok         eval: " in out, out
    assert_same_as_reference(ref, run, "extract")
    assert_same_as_reference(ref, run, "train_clm")
    for lab in ("vocab_map/src_wp", "align/src_wp"):
        assert manifest(run / lab)["files"] == manifest(ref.run / lab)["files"], lab
