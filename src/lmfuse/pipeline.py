"""`run`: every stage in order, skipping artifacts that are complete, current and undamaged.

Each artifact's key covers the config fields that change it, the contents of the model files
it reads and its inputs' keys, so after an edit to the config (or new weights at a model's path)
only the stages it touches, and those below them, run again. An interrupted stage resumes where
it stopped; a damaged one rebuilds its damaged files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmfuse.artifacts import atomic_write_bytes
from lmfuse.lock import run_lock


@dataclass
class Step:
    label: str
    artifact: Callable  # (overwrite) -> ArtifactDir
    run: Callable  # (overwrite) -> manifest


def plan(cfg) -> list[Step]:
    """The pipeline's steps for a config, in order (the stage graph, `lmfuse.stages.graph`)."""
    from lmfuse.stages import graph

    return [Step(n.label, n.artifact, n.run) for n in graph(cfg)]


def run_pipeline(cfg, overwrite: bool = False, log: Callable = print, report: bool = True) -> dict:
    """Run all stages; return {step label: "skipped" | "ran" | "resumed" | "re-ran" | "repaired"}.

    Holds the run directory's lock throughout (`lmfuse.lock`): a second writer fails at once.

    Args:
        cfg: The run's config.
        overwrite: Regenerate every artifact, complete and current ones too.
        log: Where progress lines go.
        report: Evaluate and write the report at the end.
    """
    from lmfuse.baselines import preflight
    from lmfuse.evaluate import run_eval
    from lmfuse.report import write_report

    preflight(cfg)
    run_dir = Path(cfg.output_dir)
    with run_lock(run_dir):
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode())
        outcome: dict[str, str] = {}
        for step in plan(cfg):
            art = step.artifact(False)
            state = art.state()
            if state == "complete" and not overwrite:
                log(f"[skip]   {step.label}: complete and current (key {art.key})")
                outcome[step.label] = "skipped"
                continue
            if overwrite:
                log(f"[rerun]  {step.label}: --overwrite; building it again")
                outcome[step.label] = "re-ran"
            elif state == "partial":
                log(f"[resume] {step.label}: an earlier run stopped part-way; continuing it")
                outcome[step.label] = "resumed"
            elif state == "damaged":
                log(f"[repair] {step.label}: damaged ({'; '.join(art.problems[:3])}); rebuilding those files")
                outcome[step.label] = "repaired"
            elif state == "stale":
                log(f"[rerun]  {step.label}: its config or inputs changed; replacing the old artifact")
                outcome[step.label] = "re-ran"
            else:
                log(f"[run]    {step.label}")
                outcome[step.label] = "ran"
            t0 = time.time()
            step.run(overwrite or state == "stale")
            log(f"         {step.label} done in {time.time() - t0:.1f} s")
        if report:
            run_eval(cfg)
            path = write_report(run_dir)
            log(f"report: {path.with_suffix('.html')} (and {path.name})")
    return outcome
