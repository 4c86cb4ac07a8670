"""The library's entry points: the whole run, or one stage, each through the one runner.

Each artifact's key covers the config fields that change it, the contents of the model files
it reads and its inputs' keys, so after an edit to the config (or new weights at a model's path)
only the stages it touches, and those below them, run again. An interrupted stage resumes where
it stopped; a damaged one rebuilds its damaged files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmfuse import runner
from lmfuse.graph import Graph

Log = Callable[[str], Any]


def run_pipeline(cfg, overwrite: bool = False, log: Log = print, report: bool = True) -> dict[str, str]:
    """Run all stages; return {artifact label: "skipped" | "ran" | "resumed" | "re-ran" | "repaired"}.

    Holds the run directory's lock throughout (`lmfuse.lock`): a second writer fails at once.

    Args:
        cfg: The run's config.
        overwrite: Regenerate every artifact, complete and current ones too.
        log: Where progress lines go.
        report: Evaluate and write the report at the end.
    """
    return runner.run_all(Graph(cfg), overwrite=overwrite, log=log, report=report)


def run_prepare(cfg, overwrite: bool = False, log: Log = print) -> dict:
    """`lmfuse prepare`: cut the corpus into blocks; return the manifest."""
    return runner.build_label(cfg, "prepare", overwrite, log)


def run_extract(cfg, model_name: str, overwrite: bool = False, log: Log = print, progress: bool = True) -> dict:
    """`lmfuse extract`: one model's distributions over the prepared blocks (`progress`: a bar)."""
    node = Graph(cfg)[f"extract/{model_name}"]
    node.stage.progress = progress
    return runner.build(node, overwrite=overwrite, log=log)


def run_vocab_map(cfg, source_name: str, overwrite: bool = False, log: Log = print) -> dict:
    """`lmfuse vocab-map`: one source's vocabulary mapped into the target's."""
    return runner.build_label(cfg, f"vocab_map/{source_name}", overwrite, log)


def run_align(cfg, source_name: str, overwrite: bool = False, log: Log = print) -> dict:
    """`lmfuse align`: one source's distributions in the target's positions and vocabulary."""
    return runner.build_label(cfg, f"align/{source_name}", overwrite, log)


def run_train(cfg, control: bool = False, overwrite: bool = False, log: Log = print) -> dict:
    """`lmfuse train`: the fused model (or the λ = 1 control; a run without sources has only that)."""
    return runner.build_label(cfg, f"train/{'clm' if control or not cfg.fuses else 'fused'}", overwrite, log)


def run_eval(cfg, models: Sequence[tuple[str, Any]] | None = None, log: Log = print, **kwargs: Any) -> dict:
    """`lmfuse eval`: bits per byte of the run's models (see `evaluate.run_eval` for the options)."""
    return runner.evaluate(Graph(cfg), models, log=log, **kwargs)


def write_report(run_dir: str | Path) -> Path:
    """`lmfuse report`: the run's report (Markdown and HTML)."""
    return runner.write_report(run_dir)


def verify_run(run_dir: str | Path) -> list[runner.Check]:
    """`lmfuse verify`: every artifact of a run against its checksums and its inputs' keys."""
    return runner.verify_run(run_dir)


def artifact(cfg, label: str, overwrite: bool = False):
    """The `ArtifactDir` of one artifact of a config (`prepare`, `extract/tgt`, `train/clm`, ...)."""
    return Graph(cfg)[label].artifact(overwrite)


def build_merges(cfg, overwrite: bool = False, log: Log = print) -> list[Path]:
    """Every configured merge baseline built (or reused); their directories, in config order."""
    graph = Graph(cfg)
    nodes = graph.of_kind("merge")
    for node in nodes:
        runner.build(node, overwrite=overwrite, log=log)
    return [node.path for node in nodes]
