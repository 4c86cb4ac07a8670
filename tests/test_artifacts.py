"""Artifact directories: checksums, damage, overwrite, stale partial artifacts, OS errors, the lock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from lmfuse.artifacts import ArtifactDir, atomic_write_bytes, open_artifact
from lmfuse.errors import LmfuseError
from lmfuse.lock import run_lock
from lmfuse.pipeline import verify_run

QUIET = {"log": lambda *a: None}


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"block_id": pa.array(range(start, start + n), pa.int64()),
                     "text": pa.array([f"block {i} " * 20 for i in range(start, start + n)])})


def _make(run, stage="extract", name="m", config_hash="h1", inputs=None, shards=2, **kw) -> ArtifactDir:
    art = ArtifactDir(run / stage / name, stage, config_hash, inputs or {}, **kw)
    art.begin(**QUIET)
    for i in range(shards):
        art.write_shard(i, _table(4, 4 * i))
    art.finish(n=shards)
    return art


def test_manifest_records_every_content_file_and_a_truncated_shard_is_damage_not_a_pyarrow_error(tmp_path):
    art = _make(tmp_path)
    files = json.loads((art.path / "manifest.json").read_text())["files"]
    assert set(files) == {"shards/shard-00000.arrow", "shards/shard-00001.arrow"}
    assert files["shards/shard-00000.arrow"]["size"] == art.shard_path(0).stat().st_size
    shard = art.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:40])
    assert art.state() == "damaged" and not art.is_complete()
    for read in (lambda: art.load(), lambda: open_artifact(art.path, "extract")):
        with pytest.raises(LmfuseError) as e:
            read()
        msg = str(e.value)
        assert "shards/shard-00001.arrow" in msg and "lmfuse extract CONFIG --model m --overwrite" in msg


def test_a_flipped_byte_is_found_by_the_content_check(tmp_path):
    art = _make(tmp_path)
    shard = art.shard_path(0)
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert art.state() == "complete"  # same size: only the content check sees it
    open_artifact(art.path, "extract", full=False)
    with pytest.raises(LmfuseError, match="shard-00000.arrow: contents changed"):
        open_artifact(art.path, "extract")


def test_a_damaged_artifact_rebuilds_only_its_damaged_files(tmp_path):
    art = _make(tmp_path)
    good = art.shard_path(0).stat().st_mtime_ns
    art.shard_path(1).write_bytes(b"junk")
    again = ArtifactDir(art.path, "extract", "h1", {})
    lines = []
    again.begin(log=lines.append)
    assert "damaged" in lines[0] and not (art.path / "manifest.json").exists()
    assert not art.shard_done(1) and art.shard_path(0).stat().st_mtime_ns == good


def test_overwrite_rebuilds_a_complete_artifact(tmp_path):
    _make(tmp_path)
    art = ArtifactDir(tmp_path / "extract" / "m", "extract", "h1", {}, overwrite=True)
    assert not art.is_complete()  # so every stage that asks rebuilds it
    art.begin(**QUIET)
    assert art.shard_paths() == [] and art.state() == "partial"


def test_a_partial_artifact_of_another_config_is_replaced_a_complete_one_refused(tmp_path):
    path = tmp_path / "prepare"
    failed = ArtifactDir(path, "prepare", "old", {})
    failed.begin(**QUIET)  # a run that failed before its manifest
    (path / "shards").mkdir()
    (path / "shards" / ".shard-00000.arrow.x.tmp").write_bytes(b"half a shard")
    lines = []
    ArtifactDir(path, "prepare", "new", {}).begin(log=lines.append)
    assert "unfinished artifact of another config" in lines[0]
    assert json.loads((path / "stage.json").read_text())["config_hash"] == "new"
    assert not list(path.rglob("*.tmp"))
    _make(tmp_path, "extract", "m", "h1")
    with pytest.raises(LmfuseError, match="different config"):
        ArtifactDir(tmp_path / "extract" / "m", "extract", "h2", {}).begin(**QUIET)


def test_stale_temp_files_are_removed_when_a_stage_begins(tmp_path):
    art = ArtifactDir(tmp_path / "align" / "s", "align", "h", {})
    art.begin(**QUIET)
    left = art.path / "stats" / ".stats-00000.json.abc.tmp"
    left.parent.mkdir()
    left.write_text("{")
    ArtifactDir(art.path, "align", "h", {}).begin(**QUIET)
    assert not left.exists()


def test_begin_on_a_linked_artifact_unlinks_the_link_and_keeps_the_store_entry(tmp_path):
    store = tmp_path / "store" / "extract" / "k1"
    _make(tmp_path / "store", "extract", "k1", "h1")
    link = tmp_path / "run" / "extract" / "m"
    link.parent.mkdir(parents=True)
    os.symlink(store, link)
    ArtifactDir(link, "extract", "h2", {}, overwrite=True).begin(**QUIET)
    assert not link.is_symlink() and link.is_dir()
    assert (store / "manifest.json").exists()


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "free disk space"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "writable")])
def test_write_errors_say_what_and_how_to_fix(tmp_path, monkeypatch, code, advice):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(LmfuseError) as e:
        atomic_write_bytes(tmp_path / "x" / "f.bin", b"data")
    assert advice in str(e.value) and str(tmp_path / "x" / "f.bin") in str(e.value)
    assert not list((tmp_path / "x").iterdir())  # no temp file left behind


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),  # no file named
                                   ValueError("I/O error: No space left on device (os error 28)")])  # Rust's
def test_a_model_save_that_fills_the_disk_names_the_directory_being_written(tmp_path, error):
    from lmfuse.checkpoint import BEST_DIR, save_best

    class Full:
        def save_pretrained(self, out, **k):
            raise error

    with pytest.raises(LmfuseError) as e:
        save_best(Full(), Full(), tmp_path, step=7, eval_loss=1.0)
    text = str(e.value)
    assert "best weights (step 7)" in text and "free disk space" in text
    assert f"where: {tmp_path / ('.tmp-' + BEST_DIR)}" in text
    assert not (tmp_path / BEST_DIR).exists()  # nothing half-written took the best model's place


def test_an_artifact_path_that_is_a_file_is_reported(tmp_path):
    (tmp_path / "prepare").write_text("not a directory")
    with pytest.raises(LmfuseError, match="is a file"):
        ArtifactDir(tmp_path / "prepare", "prepare", "h", {}).state()


# -- lmfuse verify --------------------------------------------------------------------------------
def test_verify_reports_damage_staleness_and_old_manifests(tmp_path):
    run = tmp_path / "run"
    prep = _make(run, "prepare", "", "p1", shards=1)
    ext = _make(run, "extract", "m", "e1", {"prepare": prep.key})
    _make(run, "extract", "n", "e1", {"prepare": prep.key})
    assert [c.status for c in verify_run(run)] == ["ok", "ok", "ok"]

    ext.shard_path(0).write_bytes(b"x")
    # prepare rebuilt from other data: both extractions are now stale.
    _make(run, "prepare", "", "p2", shards=1, overwrite=True)
    m = json.loads((run / "extract" / "n" / "manifest.json").read_text())
    m.pop("files")
    m.pop("manifest_sha256")  # an older lmfuse wrote neither
    (run / "extract" / "n" / "manifest.json").write_text(json.dumps(m))
    checks = {c.label: c for c in verify_run(run)}
    assert checks["prepare"].status == "ok"
    assert checks["extract/m"].status == "damaged" and "shard-00000.arrow" in checks["extract/m"].detail
    assert "lmfuse extract CONFIG --model m --overwrite" in checks["extract/m"].line()
    assert checks["extract/n"].status == "stale" and "made from another prepare" in checks["extract/n"].detail


def test_verify_holds_the_control_to_the_target_extractions_tokens_key(tmp_path):
    """The control (train/clm) is made from the extraction's tokens_key, the fused model from its key."""
    run = tmp_path / "run"

    def made(stage, name, config_hash, inputs, overwrite=False, **fields):
        art = ArtifactDir(run / stage / name, stage, config_hash, inputs, overwrite=overwrite)
        art.begin(**QUIET)
        art.write_shard(0, _table(4, 0))
        art.finish(**fields)
        return art

    prep = made("prepare", "", "p1", {})
    ext = made("extract", "tgt", "e-top64", {"prepare": prep.key}, tokens_key="t1")
    made("train", "clm", "c", {"extract/tgt": "t1"}, control=True)
    made("train", "fused", "f", {"extract/tgt": ext.key}, control=False)
    assert {c.label: c.status for c in verify_run(run)} == {
        "prepare": "ok", "extract/tgt": "ok", "train/clm": "ok", "train/fused": "ok"}

    # Another top_k: a new key, the same token ids. The control is current, the fused model is not.
    made("extract", "tgt", "e-top256", {"prepare": prep.key}, overwrite=True, tokens_key="t1")
    checks = {c.label: c for c in verify_run(run)}
    assert checks["train/clm"].status == "ok"
    assert checks["train/fused"].status == "stale" and "made from another extract/tgt" in checks["train/fused"].detail

    # Other token ids (another tokenizer, other blocks): the control is stale too, and says which key.
    made("extract", "tgt", "e-top256", {"prepare": prep.key}, overwrite=True, tokens_key="t2")
    checks = {c.label: c for c in verify_run(run)}
    assert checks["train/clm"].status == "stale" and "(key t1, now t2)" in checks["train/clm"].detail
    # A fused model never matches on the tokens_key.
    made("train", "fused", "f", {"extract/tgt": "t2"}, overwrite=True, control=False)
    assert {c.label: c.status for c in verify_run(run)}["train/fused"] == "stale"


def test_verify_says_when_a_manifest_has_no_checksums(tmp_path):
    run = tmp_path / "run"
    art = _make(run, "prepare", "", "p1", shards=1)
    m = json.loads((art.path / "manifest.json").read_text())
    m.pop("files")
    m.pop("manifest_sha256")  # an older lmfuse wrote neither
    (art.path / "manifest.json").write_text(json.dumps(m))
    (c,) = verify_run(run)
    assert c.status == "unchecked" and "no checksums (made by an older lmfuse)" in c.line()


def test_verify_cli_exit_codes(tmp_path):
    run = tmp_path / "run"
    art = _make(run, "prepare", "", "p1", shards=1)
    cli = [sys.executable, "-m", "lmfuse.cli", "verify", str(run)]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "ok         prepare" in ok.stdout
    art.shard_path(0).write_bytes(b"x")
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 2 and "damaged    prepare" in bad.stdout
    assert "Traceback" not in bad.stderr


# -- one writer per run directory -------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from lmfuse.lock import run_lock
    with run_lock(sys.argv[1], command="lmfuse run holder.yaml"):
        print("locked", flush=True)
        sys.stdin.readline()  # holds the lock until the test closes this pipe
""")


def _holder(run):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(LmfuseError) as e, run_lock(run):
            pass
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and "lmfuse run holder.yaml" in msg and "since" in msg
    finally:
        proc.stdin.close()
        proc.wait()
    with run_lock(run):  # released when the holder ended
        pass


def test_a_killed_holder_leaves_no_stuck_lock_and_the_lock_is_reentrant(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    proc.kill()
    proc.wait()
    assert (run / ".lmfuse.lock").exists()  # the file stays; the kernel dropped the lock
    with run_lock(run), run_lock(run):  # `run` holds it while each stage takes it again
        child = subprocess.run([sys.executable, "-c", HOLDER, str(run)], input="", capture_output=True,
                               text=True)
        assert child.returncode != 0 and "another lmfuse process is writing" in child.stderr


def test_library_train_and_eval_take_the_lock_too(tmp_path, make_config):
    """`lmfuse.train.run_train` and `lmfuse.pipeline.run_eval`, called as a library (sweeps and the
    experiment drivers do), refuse a run directory another process writes into, before any work."""
    from lmfuse.config import load_config
    from lmfuse.pipeline import run_eval, run_train

    cfg = load_config(make_config())
    proc = _holder(cfg.run_dir)
    try:
        for call in (lambda: run_train(cfg, control=True), lambda: run_eval(cfg)):
            with pytest.raises(LmfuseError, match=f"pid {proc.pid}"):
                call()
    finally:
        proc.stdin.close()
        proc.wait()
    assert not (cfg.run_dir / "train").exists() and not (cfg.run_dir / "eval").exists()
