"""`lmfuse sweep`: shared artifacts, resume, the table, and up-front validation of every variant."""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from lmfuse.artifacts import ArtifactDir, atomic_write_json, read_manifest
from lmfuse.compare import compare as compare_blocks
from lmfuse.errors import LmfuseError
from lmfuse.evaluate import per_block, summarize
from lmfuse.pipeline import verify_run
from lmfuse.stats import paired_bootstrap
from lmfuse.sweep import (
    grid_variants,
    key_problem,
    load_sweep,
    run_sweep_file,
    set_dotted,
    store_counts,
)
from lmfuse.sweep_store import link, unlink_others

TWO = [{"name": "minCE"}, {"name": "avgCE", "set": {"train.fusion": "avgCE"}}]


def _write_sweep(tmp_path: Path, variants, name: str = "sweep.yaml", **extra) -> Path:
    path = tmp_path / name
    data = {"base": "config.yaml", "output_dir": "sweep", "seeds": [0, 1], "variants": variants, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _ran(lines: list[str]) -> list[str]:
    """The stages a sweep ran, as `run:label` (from its log)."""
    out = []
    for line in lines:
        s = line.strip()
        if s.startswith("[run]") or s.startswith("[resume]"):
            out.append(s.split()[1])
    return out


def _runs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((out / "runs").iterdir())}


# -- the whole thing on tiny models ------------------------------------------------------------
def test_sweep_shares_artifacts_skips_finished_runs_and_runs_only_new_variants(make_config, tmp_path):
    make_config({"train.max_steps": 2, "eval.batch_size": 16})
    sweep_file = _write_sweep(tmp_path, TWO)
    out = tmp_path / "sweep"
    lines: list[str] = []
    doc = run_sweep_file(sweep_file, log=lines.append)

    # Extraction, vocab maps and alignment ran once for the 4 runs; the control once per seed.
    ran = _ran(lines)
    for label in ("prepare", "extract/tgt", "extract/src_spm", "extract/src_wp", "vocab_map/src_spm",
                  "vocab_map/src_wp", "align/src_spm", "align/src_wp"):
        assert ran.count(label) == 1, (label, ran)
    assert ran.count("train/clm") == 2 and ran.count("train/fused") == 4
    assert store_counts(out) == {"prepare": 1, "extract": 3, "vocab_map": 2, "align": 2, "train/fused": 4,
                                 "train/clm": 2, "eval records": 3 + 4 + 2}
    runs = _runs(out)
    assert set(runs) == {"minCE-s0", "minCE-s1", "avgCE-s0", "avgCE-s1"}
    created = {name: read_manifest(r / "extract" / "tgt")["created"] for name, r in runs.items()}
    assert len(set(created.values())) == 1  # one artifact, seen from every run
    assert len({(r / "align" / "src_spm").resolve() for r in runs.values()}) == 1
    clm = {name: (r / "train" / "clm").resolve() for name, r in runs.items()}
    assert clm["minCE-s0"] == clm["avgCE-s0"] != clm["minCE-s1"] == clm["avgCE-s1"]
    assert len({(r / "train" / "fused").resolve() for r in runs.values()}) == 4
    # Each run is a full run: its config, eval results and report, with the control in them.
    for r in runs.values():
        assert yaml.safe_load((r / "config.yaml").read_text())["output_dir"] == str(r)
        assert {"tgt", "src_spm", "src_wp", "fused", "clm"} <= set(json.loads((r / "eval" / "results.json").read_text())["models"])
        assert (r / "report" / "report.html").exists()
    # The shared control was scored once per seed: the second variant found it in the cache.
    assert sum("clm: " in x and "(cached)" in x for x in lines) == 2

    # The table: a row per variant and per (variant, seed), the control, CIs, mean ± std.
    md = (out / "sweep.md").read_text()
    domains = doc["domains"]
    assert domains and doc["groups"] == [*domains, "overall"]
    assert "| `minCE` | 0 |" in md and "| `avgCE` | 1 |" in md and "**mean ± std**" in md
    assert "control (λ = 1)" in md and "inside the noise" in md and "[" in md
    for v in doc["variants"]:
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        for g in doc["groups"]:
            for r in v["runs"]:
                c = r["vs_control"][g]
                assert c["diff"] == pytest.approx(r["fused"][g] - r["control"][g], abs=1e-9)
                assert c["lo"] <= c["diff"] <= c["hi"]
            m = v["vs_control"][g]
            assert m["mean"] == pytest.approx(sum(r["vs_control"][g]["diff"] for r in v["runs"]) / 2)
            assert math.isfinite(m["std"]) and m["lo"] <= m["hi"]
        assert set(v["vs_best_source"]) == set(doc["groups"])
    assert len(doc["controls"]) == 1 and doc["controls"][0]["variants"] == ["minCE", "avgCE"]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["variants"][0]["name"] == "minCE"
    html = (out / "sweep.html").read_text()
    assert 'src="sweep_vs_control.png"' in html and (out / "sweep_vs_control.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sweep_vs_best_source.png").exists()

    # Rerunning skips everything: no stage, no eval, no report is run again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "sweep." not in p.name
              and not p.name.startswith("sweep_") and p.name != ".sweep.lock"}
    lines.clear()
    again = run_sweep_file(sweep_file, log=lines.append)
    assert _ran(lines) == []
    assert sum("finished earlier and current; skipped" in x for x in lines) == 4
    assert not any(x.startswith("eval:") for x in lines)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [v["vs_control"] for v in again["variants"]] == [v["vs_control"] for v in doc["variants"]]

    # A new variant: only its fused trainings run (λ is a fusion option: the controls are shared).
    sweep_file = _write_sweep(tmp_path, [*TWO, {"name": "lam05", "set": {"train.clm_weight": 0.5}}])
    lines.clear()
    third = run_sweep_file(sweep_file, log=lines.append)
    assert _ran(lines) == ["train/fused", "train/fused"]
    assert sum("finished earlier and current; skipped" in x for x in lines) == 4
    assert [v["name"] for v in third["variants"]] == ["minCE", "avgCE", "lam05"]
    assert store_counts(out)["train/clm"] == 2 and store_counts(out)["train/fused"] == 6
    assert "| `lam05` | 0 |" in (out / "sweep.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished runs were not touched

    # Another top_k: every extraction and alignment runs again, and the fused models; the controls
    # read only the target's token ids (the extraction's tokens_key), so they are shared.
    topk = {"name": "top3", "set": {"extract.top_k": 3}}
    sweep_file = _write_sweep(tmp_path, [*TWO, topk])
    lines.clear()
    run_sweep_file(sweep_file, log=lines.append)
    assert sorted(_ran(lines)) == sorted(["extract/tgt", "extract/src_spm", "extract/src_wp", "align/src_spm",
                                          "align/src_wp", "train/fused", "train/fused"])
    assert store_counts(out)["train/clm"] == 2 and store_counts(out)["extract"] == 6
    top3 = _runs(out)["top3-s0"]
    assert (top3 / "train" / "clm").resolve() == clm["minCE-s0"]
    tgt_top3, tgt_top5 = read_manifest(top3 / "extract" / "tgt"), read_manifest(runs["minCE-s0"] / "extract" / "tgt")
    assert tgt_top3["key"] != tgt_top5["key"] and tgt_top3["tokens_key"] == tgt_top5["tokens_key"]
    assert read_manifest(clm["minCE-s0"])["inputs"] == {"extract/tgt": tgt_top3["tokens_key"]}
    assert {c.label: c.status for c in verify_run(top3)}["train/clm"] == "ok"

    # Dropping a variant leaves its runs on disk and out of the table.
    sweep_file = _write_sweep(tmp_path, TWO[:1])
    lines.clear()
    fourth = run_sweep_file(sweep_file, log=lines.append)
    assert [v["name"] for v in fourth["variants"]] == ["minCE"]
    assert any("not in the sweep any more" in x and "avgCE-s0" in x for x in lines)
    assert (out / "runs" / "avgCE-s0" / "eval" / "results.json").exists()


def test_sweep_table_compares_both_arms_at_their_best_checkpoints(make_config, tmp_path):
    """With `train.keep_best`, the table also gives fused@best − control@best per seed and pooled."""
    make_config({"train.max_steps": 4, "train.eval_every": 1, "train.keep_best": True, "train.learning_rate": 3e-2,
                 "eval.batch_size": 16})
    out = tmp_path / "sweep"
    doc = run_sweep_file(_write_sweep(tmp_path, TWO[:1]), log=lambda *a: None)
    v = doc["variants"][0]
    for r in v["runs"]:
        results = json.loads((Path(r["run_dir"]) / "eval" / "results.json").read_text())["models"]
        for g in doc["groups"]:
            c = r["vs_control_best"][g]
            # The best checkpoints' own figures, not the final weights'.
            fb = results["fused@best"]["overall" if g == "overall" else "domains"]
            cb = results["clm@best"]["overall" if g == "overall" else "domains"]
            fb, cb = (fb, cb) if g == "overall" else (fb[g], cb[g])
            assert r["fused_best"][g] == pytest.approx(fb["bpb"]) and r["control_best"][g] == pytest.approx(cb["bpb"])
            assert c["diff"] == pytest.approx(fb["bpb"] - cb["bpb"], abs=1e-9)
            assert c["lo"] <= c["diff"] <= c["hi"]
    for g in doc["groups"]:
        m = v["vs_control_best"][g]
        assert m["mean"] == pytest.approx(sum(r["vs_control_best"][g]["diff"] for r in v["runs"]) / 2)
        assert m["lo"] <= m["hi"] and m["seeds_better"] + m["seeds_worse"] <= 2
    assert doc["controls"][0]["bpb_best"] == v["control_best"]
    md = (out / "sweep.md").read_text()
    assert "The same, both at their best checkpoints" in md
    assert "## Variant − control, both at their best checkpoints" in md
    assert "| `minCE` @best | its best checkpoint |" in md and "| control (λ = 1) @best | its best checkpoint |" in md
    assert (out / "sweep_vs_control_best.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_table_without_best_checkpoints_has_no_best_section(make_config, tmp_path):
    make_config({"train.max_steps": 2, "eval.batch_size": 16})
    doc = run_sweep_file(_write_sweep(tmp_path, TWO[:1], seeds=[0]), log=lambda *a: None)
    assert "vs_control_best" not in doc["variants"][0] and "vs_control_best" not in doc["variants"][0]["runs"][0]
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "best checkpoints" not in md and not (tmp_path / "sweep" / "sweep_vs_control_best.png").exists()

def test_a_half_finished_run_resumes_where_it_stopped(make_config, tmp_path):
    make_config({"train.max_steps": 1, "eval.batch_size": 16})
    sweep_file = _write_sweep(tmp_path, [{"name": "only"}], seeds=[0])
    run_sweep_file(sweep_file, log=lambda *a: None)
    out = tmp_path / "sweep"
    run = out / "runs" / "only-s0"
    # As if killed during the control's training and in the middle of the target's extraction.
    (run / "train" / "clm" / "manifest.json").unlink()
    ext = run / "extract" / "tgt"
    (ext / "manifest.json").unlink()
    shards = sorted((ext / "shards").glob("*.arrow"))
    assert len(shards) > 1
    kept = shards[0].read_bytes()
    for p in shards[1:]:
        p.unlink()
    lines: list[str] = []
    run_sweep_file(sweep_file, log=lines.append)
    assert [x.strip().split()[1] for x in lines if x.strip().startswith("[resume]")] == ["extract/tgt", "train/clm"]
    assert shards[0].read_bytes() == kept
    assert read_manifest(ext) is not None and read_manifest(run / "train" / "clm") is not None


# -- checks before any work --------------------------------------------------------------------
def test_invalid_variants_are_reported_all_at_once_before_any_work(make_config, tmp_path):
    make_config({"train.max_steps": 2})
    sweep_file = _write_sweep(tmp_path, [
        {"name": "ok"},
        {"name": "typo", "set": {"train.fusionn": "avgCE"}},
        {"name": "lam2", "set": {"train.clm_weight": 2}},
        {"name": "nofusion", "set": {"train.fusion": "maxCE"}},
        {"name": "seeded", "set": {"train.seed": 3}},
    ])
    with pytest.raises(LmfuseError) as e:
        run_sweep_file(sweep_file, log=lambda *a: None)
    msg = str(e.value)
    assert "variant 'typo': set: train.fusionn: no config key 'train.fusionn'; did you mean fusion?" in msg
    assert "variant 'lam2': train.clm_weight: λ (clm_weight) must lie in [0, 1]" in msg
    assert "variant 'nofusion': train.fusion: unknown" in msg
    assert "variant 'seeded': set: train.seed: cannot be set in a sweep" in msg
    assert "'ok'" not in msg
    assert "nothing has been run" in msg and e.value.where == str(sweep_file)
    assert not (tmp_path / "sweep").exists()


def test_a_problem_of_the_base_config_is_reported_once(make_config, tmp_path):
    make_config({"train.max_steps": 2, "corpus.path": str(tmp_path / "missing.jsonl")})
    sweep_file = _write_sweep(tmp_path, {"grid": {"train.fusion": ["minCE", "avgCE"]}})
    with pytest.raises(LmfuseError) as e:
        run_sweep_file(sweep_file, log=lambda *a: None)
    msg = str(e.value)
    assert msg.count("does not exist") == 1 and "base config config.yaml: corpus.path" in msg


def test_sweep_file_problems_are_listed_together(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "nope.yaml", "seeds": [1, 1], "colour": "red",
                                    "variants": [{"name": "a b"}, {"name": "x", "sett": {}}]}))
    with pytest.raises(LmfuseError) as e:
        load_sweep(path)
    msg = str(e.value)
    for part in ("output_dir: Field required", "colour: Extra inputs are not permitted", "variants[0].name",
                 "variants[1].sett", "seeds: repeated values", "base: the config 'nope.yaml' does not exist"):
        assert part in msg, part
    path.write_text(yaml.safe_dump({"base": "lmfuse:demo", "output_dir": "o", "variants": {"grid": {"train.fusion": []}}}))
    with pytest.raises(LmfuseError, match="variants.grid.train.fusion: expected a non-empty list"):
        load_sweep(path)


def test_dry_run_lists_the_runs_and_runs_nothing(make_config, tmp_path):
    from typer.testing import CliRunner

    from lmfuse.cli import app

    make_config({"train.max_steps": 2})
    sweep_file = _write_sweep(tmp_path, {"grid": {"train.fusion": ["minCE", "avgCE"], "train.clm_weight": [0.9, 0.5]}})
    res = CliRunner().invoke(app, ["sweep", str(sweep_file), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "4 variant(s) × 2 seed(s) = 8 run(s)" in res.output
    assert "fusion=avgCE+clm_weight=0.5-s1" in res.output and res.output.count("to run") == 8
    assert not (tmp_path / "sweep" / "runs").exists()


def test_demo_base_needs_no_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "lmfuse:demo-quick", "output_dir": "o", "seeds": [0],
                                    "set": {"train.eval_every": 0},
                                    "variants": [{"name": "base"}, {"name": "gold", "set": {"train.outside_topk": "gold"}}]}))
    sweep = load_sweep(path)
    assert sweep.base["target"]["path"] == "pull:smollm2-135m-instruct"
    from lmfuse.sweep import build_runs

    runs = build_runs(sweep)
    assert [r.name for r in runs] == ["base-s0", "gold-s0"]
    assert runs[1].cfg.train.outside_topk == "gold" and runs[1].cfg.train.eval_every == 0
    assert runs[1].cfg.run_dir == tmp_path / "o" / "runs" / "gold-s0"


def test_the_example_sweep_checks_out():
    from lmfuse.sweep import build_runs

    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"
    sweep = load_sweep(example)
    runs = build_runs(sweep)
    assert len(runs) == 7 * 2 and sweep.out_dir == example.parents[1] / "lmfuse-sweep"
    assert {r.cfg.train.eval_every for r in runs} == {0}


def test_the_demo_defaults_sweep_checks_out():
    """experiments/demo_defaults/sweep.yaml: the demo's config with the cross-architecture winner's options."""
    from lmfuse.sweep import build_runs

    path = Path(__file__).resolve().parents[1] / "experiments" / "demo_defaults" / "sweep.yaml"
    (run,) = build_runs(load_sweep(path))
    t = run.cfg.train
    assert (t.clm_weight, t.outside_topk, t.include_target, t.epochs, t.keep_best) == (0.5, "rest", False, 2, True)
    assert run.cfg.extract.top_k == 64 and run.cfg.target.path == "pull:smollm2-135m-instruct"


# -- pieces ------------------------------------------------------------------------------------
def test_grid_variants_are_the_product_named_by_their_values():
    vs = grid_variants({"train.fusion": ["minCE", "avgCE"], "train.clm_weight": [0.9, 0.5],
                        "align.token_rule": ["map"]})
    assert [v.name for v in vs] == ["fusion=minCE+clm_weight=0.9+token_rule=map",
                                    "fusion=minCE+clm_weight=0.5+token_rule=map",
                                    "fusion=avgCE+clm_weight=0.9+token_rule=map",
                                    "fusion=avgCE+clm_weight=0.5+token_rule=map"]
    assert vs[3].overrides == {"train.fusion": "avgCE", "train.clm_weight": 0.5, "align.token_rule": "map"}
    same_end = grid_variants({"train.seed": [1], "prepare.seed": [2]})  # keys that end alike keep their section
    assert same_end[0].name == "train.seed=1+prepare.seed=2"


def test_dotted_keys():
    assert key_problem("train.fusion") is None and key_problem("sources.0.dtype") is None
    assert key_problem("baselines.merge") is None and key_problem("train") is None
    assert "did you mean top_k" in key_problem("extract.topk")
    assert "index it by number" in key_problem("sources.dtype")
    assert "plain value" in key_problem("train.fusion.x")
    assert "cannot be set" in key_problem("output_dir")
    data = {"train": {"fusion": "minCE", "level": "token"}, "sources": [{"name": "a"}]}
    assert set_dotted(data, "train", {"fusion": "avgCE"}) is None
    assert data["train"] == {"fusion": "avgCE", "level": "token"}  # a mapping is merged, not replaced
    assert set_dotted(data, "sources.0.dtype", "float32") is None and data["sources"][0]["dtype"] == "float32"
    assert "no entry 3" in set_dotted(data, "sources.3.dtype", "x")
    assert set_dotted(data, "extract.top_k", 4) is None and data["extract"] == {"top_k": 4}


def _record(kind, blocks, shift, rng, bytes_shift=0):
    rows = [(( 1.0 + shift + h) * math.log(2) * (nb - bytes_shift), 10, nb - bytes_shift) for _, _, h, nb in blocks]
    rows = [(r[0] + rng.gauss(0, 0.5), r[1], r[2]) for r in rows]
    rec = summarize(rows, [d for _, d, _, _ in blocks])
    rec["kind"] = kind
    rec["per_block"] = per_block(rows, [{"block_id": i, "domain": d} for i, d, _, _ in blocks])
    return rec


def test_compare_blocks_pairs_by_block_and_averages_seeds():
    rng = random.Random(0)
    blocks = [(i, "a" if i % 2 else "b", rng.gauss(0, 0.1), rng.randint(200, 400)) for i in range(30)]
    f0, f1 = _record("fused", blocks, -0.01, rng), _record("fused", blocks, -0.02, rng)
    c0, c1 = _record("clm", blocks, 0.0, rng), _record("clm", blocks, 0.0, rng)
    src = _record("source", blocks, 0.05, rng, bytes_shift=2)
    one = compare_blocks([f0], [c0], "a")
    sel = [k for k, b in enumerate(blocks) if b[1] == "a"]
    pb0, pc0 = f0["per_block"], c0["per_block"]
    assert one == paired_bootstrap([pb0["nll"][k] for k in sel], [pc0["nll"][k] for k in sel],
                                   [pb0["bytes"][k] for k in sel], b_nbytes=[pc0["bytes"][k] for k in sel])
    # Block order does not matter: pairing is by block id.
    shuffled = json.loads(json.dumps(c0))
    order = list(range(30))
    rng.shuffle(order)
    shuffled["per_block"] = {k: [v[i] for i in order] for k, v in c0["per_block"].items()}
    assert compare_blocks([f0], [shuffled], "overall") == compare_blocks([f0], [c0], "overall")
    # Two seeds with the same bytes: the seed-averaged difference is the mean of the two.
    both = compare_blocks([f0, f1], [c0, c1], "overall")
    d0, d1 = compare_blocks([f0], [c0], "overall").diff, compare_blocks([f1], [c1], "overall").diff
    assert both.diff == pytest.approx((d0 + d1) / 2, abs=1e-12) and both.lo < both.diff < both.hi
    # Against a source with its own bytes; and without per-block figures, the difference only.
    assert compare_blocks([f0], [src], "b").diff == pytest.approx(f0["domains"]["b"]["bpb"] - src["domains"]["b"]["bpb"])
    bare = {k: v for k, v in f0.items() if k != "per_block"}
    iv = compare_blocks([bare], [c0], "overall")
    assert iv.diff == pytest.approx(f0["overall"]["bpb"] - c0["overall"]["bpb"]) and math.isnan(iv.lo)


def test_links_never_replace_a_real_directory_and_overwrite_never_deletes_the_store(tmp_path):
    target = tmp_path / "store" / "extract" / "k1"
    lnk = tmp_path / "runs" / "a-s0" / "extract" / "tgt"
    link(lnk, target)
    assert lnk.is_symlink() and lnk.resolve() == target.resolve()
    link(lnk, target)  # idempotent
    art = ArtifactDir(lnk, "extract", "h1", {"prepare": "p"})
    art.begin()
    art.finish()
    other = tmp_path / "store" / "extract" / "k2"
    link(lnk, other)  # the variant changed: re-pointed, the old entry kept
    assert lnk.resolve() == other.resolve() and read_manifest(target) is not None
    link(lnk, target)
    # `lmfuse run RUN/config.yaml --overwrite` after a config edit: the stale artifact behind the link
    # must not be deleted (it is shared); today's ArtifactDir.begin stops at the link.
    stale = ArtifactDir(lnk, "extract", "h2", {"prepare": "p"}, overwrite=True)
    with contextlib.suppress(OSError):
        stale.begin()
    assert read_manifest(target) is not None and (target / "stage.json").exists()
    # A variant that drops a source loses the run's link to its artifacts, not the artifacts.
    unlink_others(tmp_path / "runs" / "a-s0", {"prepare", "train/fused"})
    assert not lnk.is_symlink() and read_manifest(target) is not None
    real = tmp_path / "runs" / "a-s0" / "align" / "s"
    real.mkdir(parents=True)
    atomic_write_json(real / "x.json", {})
    with pytest.raises(LmfuseError, match="not a link into the sweep's store"):
        link(real, tmp_path / "store" / "align" / "k")


# -- parts and extends ---------------------------------------------------------------------------
def _parts_files(tmp_path: Path) -> Path:
    """A shared sweep file in common/ and one in exp/ that extends it with two parts."""
    (tmp_path / "common").mkdir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "common" / "shared.yaml").write_text(yaml.safe_dump({
        "base": "../config.yaml", "output_dir": "../out", "seeds": [0],
        "set": {"train.max_steps": 2, "eval.batch_size": 16}}))
    child = tmp_path / "exp" / "parts.yaml"
    child.write_text(yaml.safe_dump({
        "extends": "../common/shared.yaml",
        "set": {"train.clm_weight": 0.5},  # merged with the parent's `set`, key by key
        "parts": {
            "screen": {"variants": [{"name": "minCE"}, {"name": "avgCE", "set": {"train.fusion": "avgCE"}}]},
            "seeds": {"seeds": [0, 1], "variants": [{"name": "minCE"}]},
        }}, sort_keys=False))
    return child


def test_extends_merges_settings_and_parts_share_runs(make_config, tmp_path):
    from lmfuse.sweep import build_runs, load_parts

    make_config()
    parts = load_parts(_parts_files(tmp_path))
    assert list(parts) == ["screen", "seeds"]
    screen, seeds = parts["screen"], parts["seeds"]
    # The parent's paths stay relative to the parent; its `set` is merged with the child's.
    assert screen.out_dir == tmp_path / "out" and seeds.table_dir == tmp_path / "out" / "parts" / "seeds"
    assert screen.common == {"train.max_steps": 2, "eval.batch_size": 16, "train.clm_weight": 0.5}
    assert [r.name for r in build_runs(screen)] == ["minCE-s0", "avgCE-s0"]
    assert [r.name for r in build_runs(seeds)] == ["minCE-s0", "minCE-s1"]
    assert build_runs(seeds)[0].cfg.train.clm_weight == 0.5
    # A part-less file is one sweep; a file with parts is not one.
    with pytest.raises(LmfuseError, match="has parts"):
        load_sweep(tmp_path / "exp" / "parts.yaml")


def test_part_problems_are_reported_before_any_work(make_config, tmp_path):
    from lmfuse.sweep import load_parts

    make_config()
    child = _parts_files(tmp_path)
    good = child.read_text()
    data = yaml.safe_load(good)
    data["parts"]["seeds"]["variants"] = [{"name": "minCE", "set": {"train.fusion": "avgCE"}}]
    child.write_text(yaml.safe_dump(data))
    with pytest.raises(LmfuseError, match="variant 'minCE' sets other keys than in part 'screen'"):
        load_parts(child)
    data["variants"] = [{"name": "x"}]
    child.write_text(yaml.safe_dump(data))
    with pytest.raises(LmfuseError, match="either `variants:` or `parts:`"):
        load_parts(child)
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"extends": "loop.yaml", "base": "config.yaml", "output_dir": "o",
                                    "variants": [{"name": "a"}]}))
    with pytest.raises(LmfuseError, match="extends itself"):
        load_parts(loop)
    child.write_text(good)
    with pytest.raises(LmfuseError, match="no part 'nope'"):
        run_sweep_file(child, parts=["nope"], log=lambda *a: None)


def test_a_part_runs_alone_and_writes_its_own_table(make_config, tmp_path):
    make_config()
    child = _parts_files(tmp_path)
    lines: list[str] = []
    doc = run_sweep_file(child, parts=["seeds"], log=lines.append)
    out = tmp_path / "out"
    assert (out / "parts" / "seeds" / "sweep.md").exists()
    assert not (out / "parts" / "screen").exists()
    # The whole file's table: every finished run of every part; the other part's are not finished yet.
    whole = json.loads((out / "sweep.json").read_text())
    assert [v["name"] for v in whole["variants"]] == ["minCE", "avgCE"] and whole["missing"] == ["avgCE-s0"]
    assert [v["name"] for v in doc["variants"]] == ["minCE"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["minCE-s0", "minCE-s1"]
    # The other part reuses minCE-s0 (the same run) and runs only what it adds.
    lines.clear()
    run_sweep_file(child, parts=["screen"], log=lines.append)
    assert sum("finished earlier and current; skipped" in x for x in lines) == 1
    assert _ran(lines).count("train/fused") == 1 and "not in the sweep any more" not in "\n".join(lines)
    assert not json.loads((out / "sweep.json").read_text())["missing"]


def test_experts_then_fusion_in_one_sweep_file(make_config, tmp_path):
    """The domain-expert recipe as one sweep file: a part whose base has no sources trains the
    experts (CLM-only runs), the fusion part names their models (`run:<run>/clm`) as sources and
    merges them; running the fusion part alone runs the experts first, each merge is made once
    for every seed (the store keys it before anything is trained), and the tables average the
    domains."""
    cfg = yaml.safe_load(make_config().read_text())
    expert = {**cfg, "sources": [], "train": {**cfg["train"], "max_steps": 2}}
    (tmp_path / "expert.yaml").write_text(yaml.safe_dump(expert))
    fusion = {**cfg, "sources": [{"name": "ex-a", "path": "run:expert-a-s0/clm", "dtype": "float32"},
                                 {"name": "ex-b", "path": "run:expert-b-s0/clm", "dtype": "float32"}],
              "train": {**cfg["train"], "max_steps": 2},
              "baselines": {"merge": [{"models": ["ex-a", "ex-b"], "name": "merge-linear"}],
                            "ensemble": [["ex-a", "ex-b"]]}}
    (tmp_path / "fusion.yaml").write_text(yaml.safe_dump(fusion))
    f = tmp_path / "de.yaml"
    f.write_text(yaml.safe_dump({
        "base": "fusion.yaml", "output_dir": "out", "seeds": [0, 1], "table": {"average": ["code", "prose"]},
        "parts": {
            "experts": {"base": "expert.yaml", "seeds": [0], "variants": [
                {"name": "expert-a", "set": {"train.learning_rate": 1e-3}},
                {"name": "expert-b", "set": {"train.learning_rate": 2e-3}}]},
            "fusion": {"variants": [{"name": "minCE"}]},
        }}, sort_keys=False))
    lines: list[str] = []
    doc = run_sweep_file(f, parts=["fusion"], log=lines.append)
    text = "\n".join(lines)
    assert "minCE-s0 reads the model expert-a-s0 trains: running expert-a-s0 first" in text
    out = tmp_path / "out"
    counts = store_counts(out)
    assert counts["merge"] == 1  # one merge of the two experts for both seeds
    assert counts["train/clm"] == 2 + 2 and counts["train/fused"] == 2  # two experts, a control and a fused per seed
    ex = json.loads((out / "runs" / "expert-a-s0" / "eval" / "results.json").read_text())
    assert set(ex["models"]) == {"tgt", "clm"}  # a run without sources
    (v,) = doc["variants"]
    assert doc["groups"] == ["code", "legal", "prose", "average", "overall"]
    assert v["fused"]["average"]["mean"] == pytest.approx((v["fused"]["code"]["mean"] + v["fused"]["prose"]["mean"]) / 2)
    assert set(v["vs_baselines"]) == {"merge-linear", "ensemble-ex-a-ex-b"}
    assert {"ex-a", "ex-b"} <= set(doc["references"])
    whole = json.loads((out / "sweep.json").read_text())
    assert [x["name"] for x in whole["variants"]] == ["expert-a", "expert-b", "minCE"] and not whole["missing"]
    assert whole["variants"][0]["no_sources"] and "(λ = 1, no sources;" in (out / "sweep.md").read_text()
    # A `run:` path must name a run of the file.
    fusion["sources"][0]["path"] = "run:expert-c-s0/clm"
    (tmp_path / "fusion.yaml").write_text(yaml.safe_dump(fusion))
    with pytest.raises(LmfuseError, match="no other run 'expert-c-s0'"):
        run_sweep_file(f, parts=["fusion"], log=lines.append)
