"""`run`: every stage in order, skipping artifacts that are complete and current.

Each stage's artifact carries the hash of the config fields that change it and the hashes of
its inputs, so after an edit to the config only the stages it touches (and those after them)
run again. An interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmfuse.artifacts import atomic_write_bytes


@dataclass
class Step:
    label: str
    artifact: Callable  # (overwrite) -> ArtifactDir
    run: Callable  # (overwrite) -> manifest


def plan(cfg) -> list[Step]:
    """The pipeline's steps for a config, in order."""
    from lmfuse import align, extract, prepare, train, vocabmap

    steps = [Step("prepare", lambda o: prepare.artifact(cfg, overwrite=o),
                  lambda o: prepare.run_prepare(cfg, overwrite=o))]
    for m in cfg.models:
        steps.append(Step(f"extract/{m.name}", lambda o, n=m.name: extract.artifact(cfg, n, overwrite=o),
                          lambda o, n=m.name: extract.run_extract(cfg, n, overwrite=o)))
    for s in cfg.sources:
        steps.append(Step(f"vocab_map/{s.name}", lambda o, n=s.name: vocabmap.artifact(cfg, n, overwrite=o),
                          lambda o, n=s.name: vocabmap.run_vocab_map(cfg, n, overwrite=o)))
    for s in cfg.sources:
        steps.append(Step(f"align/{s.name}", lambda o, n=s.name: align.artifact(cfg, n, overwrite=o),
                          lambda o, n=s.name: align.run_align(cfg, n, overwrite=o)))
    steps.append(Step("train/fused", lambda o: train.artifact(cfg, control=False, overwrite=o),
                      lambda o: train.run_train(cfg, control=False, overwrite=o)))
    if cfg.train.control:
        steps.append(Step("train/clm", lambda o: train.artifact(cfg, control=True, overwrite=o),
                          lambda o: train.run_train(cfg, control=True, overwrite=o)))
    return steps


def run_pipeline(cfg, overwrite: bool = False, log: Callable = print, report: bool = True) -> dict:
    """Run all stages; return {step label: "skipped" | "ran" | "resumed" | "re-ran"}.

    Args:
        cfg: The run's config.
        overwrite: Also re-run artifacts that are complete and current.
        log: Where progress lines go.
        report: Evaluate and write the report at the end.
    """
    from lmfuse.baselines import preflight
    from lmfuse.evaluate import run_eval
    from lmfuse.report import write_report

    preflight(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode())
    outcome: dict[str, str] = {}
    for step in plan(cfg):
        art = step.artifact(False)
        state = art.state()
        if state == "complete" and not overwrite:
            log(f"[skip]   {step.label}: complete and current (config hash {art.config_hash})")
            outcome[step.label] = "skipped"
            continue
        if state == "partial":
            log(f"[resume] {step.label}: an earlier run stopped part-way; continuing it")
            outcome[step.label] = "resumed"
        elif state == "stale" or (state == "complete" and overwrite):
            why = "--overwrite" if state == "complete" else "its config or inputs changed"
            log(f"[rerun]  {step.label}: {why}; replacing the old artifact")
            outcome[step.label] = "re-ran"
        else:
            log(f"[run]    {step.label}")
            outcome[step.label] = "ran"
        t0 = time.time()
        step.run(state in ("stale", "complete"))
        log(f"         {step.label} done in {time.time() - t0:.1f} s")
    if report:
        run_eval(cfg)
        path = write_report(run_dir)
        log(f"report: {path.with_suffix('.html')} (and {path.name})")
    return outcome
