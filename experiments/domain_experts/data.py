"""Domain experts (the paper's Table 7 at small scale), the data: expert corpora and a fusion corpus.

For each of four domains, from documents used nowhere else: 32 held-out pieces, about 5,500
fusion training tokens, and an expert corpus of at least 60,000 tokens. Writes
OUT/data/experts.jsonl (every domain's expert corpus; each expert reads its own with
`corpus.domains`), OUT/data/fusion.jsonl, OUT/data/stats.json, and OUT/sweep.yaml, the committed
sweep file (sweep.yaml here: the experts, then the fusion runs beside the control, the ensemble and
the merges of the experts) bound to this data:

    python experiments/domain_experts/data.py --out runs/domain_experts
    lmfuse sweep runs/domain_experts/sweep.yaml

`--sweep lr1e-4.yaml` binds the lr 1e-4 series instead (its own --out); `--tiny` uses lmfuse's tiny
test model. This script reads ../shared/corpora; lmfuse does not.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/common.py

from common import (  # noqa: E402
    Log,
    Picker,
    Problem,
    bind_sweep,
    block_stats,
    build_once,
    data_parser,
    log_line,
    main_of,
    read_domain,
    settings_of,
    tiny_model,
    write_jsonl,
)


class Settings(BaseModel):
    """The data's knobs (data.yaml, data-tiny.yaml)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="the base model, whose tokenizer counts tokens: an lmfuse model path or `tiny`")
    domains: list[str] = Field(min_length=2)
    seed: int = Field(0, description="seed of the data split (documents and pieces)")
    max_docs_per_domain: int | None = Field(None, ge=3, description="read only the first N documents")
    block_size: int = Field(256, ge=16)
    heldout_blocks: int = Field(32, ge=1, description="held-out blocks per domain")
    heldout_piece_tokens: int = Field(128, ge=8, description="held-out blocks are at most this long")
    heldout_pieces_per_doc: int = Field(2, ge=1)
    expert_tokens: int = Field(60_000, ge=1, description="tokens of each expert corpus, at least")
    expert_pieces_per_doc: int = Field(4, ge=1)
    expert_validation_blocks: int = Field(4, ge=1, description="blocks of each expert's own documents held out")
    fusion_tokens: int = Field(22_000, ge=1, description="training tokens of the fusion corpus, at most")
    fusion_tokens_max: int = Field(30_000, ge=1, description="hard cap, checked on the prepared blocks")
    fusion_pieces_per_doc: int = Field(2, ge=1)


def build(s: Settings, tok, corpora: Path, log: Log, tmp: Path) -> dict:
    """Pick every domain's held-out, fusion and expert pieces into tmp/; return the stats."""
    margin = max(1, s.block_size // 32)  # prepare may re-cut a piece that needs every last token
    min_tokens = max(2, min(s.block_size, s.heldout_piece_tokens) // 4)
    fusion_rows: list[dict] = []
    expert_rows: list[dict] = []
    stats: dict = {"domains": {}}
    problems = []
    for domain in s.domains:
        docs = read_domain(corpora, domain, s.max_docs_per_domain)
        for d in docs:
            d["domain"] = domain
        pick = Picker(docs, tok, random.Random(f"{s.seed}/{domain}"), min_tokens)
        heldout = pick.take(min(s.heldout_piece_tokens, s.block_size), s.heldout_pieces_per_doc,
                            blocks=s.heldout_blocks)
        fusion = pick.take(s.block_size - margin, s.fusion_pieces_per_doc, at_most=s.fusion_tokens // len(s.domains))
        expert = pick.take(s.block_size - margin, s.expert_pieces_per_doc, at_least=s.expert_tokens)
        # lmfuse's train needs validation blocks (it reports a validation loss at the end)
        expert_val = pick.take(s.block_size - margin, s.expert_pieces_per_doc, blocks=s.expert_validation_blocks)
        fusion_rows += [{**r, "split": "validation"} for r in heldout] + [{**r, "split": "train"} for r in fusion]
        rows = [{**r, "split": "train"} for r in expert] + [{**r, "split": "validation"} for r in expert_val]
        expert_rows += rows
        eb = block_stats(rows, tok, s.block_size)[domain]
        stats["domains"][domain] = {"documents_read": len(docs), "documents_used": pick.pos,
                                    "expert": {"pieces": len(expert), **eb["train"]},
                                    "expert_validation": {"pieces": len(expert_val), **eb.get("validation", {})}}
        if eb["train"]["tokens"] < s.expert_tokens:
            problems.append(f"{domain}: expert corpus {eb['train']['tokens']} tokens < {s.expert_tokens}")
        log(f"data: {domain}: {len(heldout)} held-out pieces, fusion {sum(r['tokens'] for r in fusion)} tokens, "
            f"expert {sum(r['tokens'] for r in expert)} tokens from {pick.pos} of {len(docs)} documents")
    write_jsonl(tmp / "fusion.jsonl", [{k: r[k] for k in ("domain", "source", "split", "text")} for r in fusion_rows])
    write_jsonl(tmp / "experts.jsonl", expert_rows)
    fb = block_stats(fusion_rows, tok, s.block_size)
    for domain, d in stats["domains"].items():
        d.update(heldout=fb[domain].get("validation", {}), fusion_train=fb[domain].get("train", {}))
        if d["heldout"].get("blocks", 0) < s.heldout_blocks:
            problems.append(f"{domain}: {d['heldout'].get('blocks', 0)} held-out blocks < {s.heldout_blocks}")
    total = {f"{name}_{what}": sum(d[name].get(what, 0) for d in stats["domains"].values())
             for name in ("fusion_train", "heldout") for what in ("tokens", "blocks")}
    if total["fusion_train_tokens"] > s.fusion_tokens_max:
        problems.append(f"fusion corpus {total['fusion_train_tokens']} training tokens > {s.fusion_tokens_max}")
    if problems:
        raise Problem("the data does not meet its budgets: " + "; ".join(problems))
    log(f"data: fusion {total['fusion_train_tokens']} training tokens ({total['fusion_train_blocks']} blocks), "
        f"{total['heldout_blocks']} held-out blocks ({total['heldout_tokens']} tokens)")
    return {**stats, "totals": total}


def main(argv: list[str] | None = None) -> int:
    p = data_parser(__doc__, HERE.parents[1].parent / "shared" / "corpora")
    p.add_argument("--sweep", type=Path, help="the sweep file to bind (default: sweep.yaml, tiny.yaml with --tiny)")
    args = p.parse_args(argv)
    s = settings_of(Settings, args.settings or HERE / ("data-tiny.yaml" if args.tiny else "data.yaml"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def run() -> None:
        from lmfuse.config import ModelSpec
        from lmfuse.models import load_tokenizer

        base = tiny_model(out, "base", "spm") if s.base == "tiny" else s.base
        tok = load_tokenizer(ModelSpec(name="base", path=base))
        build_once(out, s.model_dump(), lambda tmp: build(s, tok, args.corpora.resolve(), log_line, tmp), log_line)
        sweep = args.sweep or HERE / ("tiny.yaml" if args.tiny else "sweep.yaml")
        binding = {"corpus.path": str(out / "data" / "fusion.jsonl"), **({"target.path": base} if s.base == "tiny" else {})}
        # the experts' part reads the expert corpora (each expert its own domain: `corpus.domains`)
        bind_sweep(out, sweep, binding, log_line, parts={"experts": {"corpus.path": str(out / "data" / "experts.jsonl")}})

    return main_of(run)


if __name__ == "__main__":
    raise SystemExit(main())
