"""Cross-architecture fusion, the data: Gemma-3-270M's knowledge into SmolLM2-135M-Instruct.

Writes OUT/data/fusion.jsonl (for each of four domains about 3,000 training tokens and 32
held-out pieces, from documents used nowhere else; a fifth domain, fortunes from Debian's
`fortunes` package, held out only), OUT/data/stats.json, and OUT/sweep.yaml, the committed sweep
file (sweep.yaml here: the parts of the experiment) bound to this data:

    python experiments/cross_arch/data.py --out runs/cross_arch
    lmfuse sweep runs/cross_arch/sweep.yaml --part screen        # one part; without --part: all

`--settings data-24k.yaml --sweep fusion24k.yaml`: the 24,000-token variant (its own --out); `--tiny`:
lmfuse's tiny test models. Reads ../shared/corpora and Debian's `fortunes` package; lmfuse does not.
"""

from __future__ import annotations

import random
import shutil
import subprocess
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

FORTUNE_SKIP = {"art", "ascii-art"}  # pictures drawn in characters, not text


class Settings(BaseModel):
    """The data's knobs (data.yaml, data-tiny.yaml, data-24k.yaml)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="the target whose tokenizer counts tokens: an lmfuse model path or `tiny`")
    domains: list[str] = Field(min_length=1, description="domains with training text and held-out blocks")
    unseen: str | None = Field("fortunes", description="a held-out-only domain (`fortunes`: Debian's package)")
    seed: int = Field(0, description="seed of the data split")
    max_docs_per_domain: int | None = Field(None, ge=3)
    block_size: int = Field(256, ge=16)
    heldout_blocks: int = Field(32, ge=1)
    heldout_piece_tokens: int = Field(128, ge=8)
    heldout_pieces_per_doc: int = Field(2, ge=1)
    fusion_tokens: int = Field(12_000, ge=1, description="training tokens of the fusion corpus, at most")
    fusion_pieces_per_doc: int = Field(2, ge=1)


def fortunes_corpus(out: Path, log: Log) -> Path:
    """Debian's `fortunes` package as JSONL, one document per 20 fortunes of one file (fetched with
    `apt-get download`, unpacked with `dpkg-deb`: no root, nothing installed)."""
    dest = out / "downloads" / "fortunes.jsonl"
    if dest.exists():
        return dest
    work = out / "downloads" / "fortunes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        subprocess.run(["apt-get", "download", "fortunes"], cwd=work, check=True, capture_output=True, text=True)
        deb = next(work.glob("fortunes_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise Problem(f"could not fetch Debian's `fortunes` package ({detail.strip()[:300]}); on a Debian-like "
                      "system with package access `apt-get download fortunes` must work, or set `unseen: null`") from e
    rows = []
    for f in sorted((work / "x" / "usr" / "share" / "games" / "fortunes").iterdir()):
        if f.suffix or f.is_symlink() or f.name in FORTUNE_SKIP:
            continue  # .dat indexes, .u8 links
        items = [x.strip("\n") for x in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [x for x in items if x.strip()]
        rows += [{"domain": "fortunes", "source": f"fortunes/{f.name}#{i // 20}", "text": "\n\n".join(items[i:i + 20])}
                 for i in range(0, len(items), 20)]
    random.Random(0).shuffle(rows)  # fixed order, as the development corpora
    write_jsonl(dest.with_suffix(".tmp"), rows)
    dest.with_suffix(".tmp").replace(dest)
    log(f"data: fortunes: {len(rows)} documents -> {dest}")
    return dest


def build(s: Settings, tok, corpora: Path, out: Path, log: Log, tmp: Path) -> dict:
    """Pick the held-out and training pieces of every domain into tmp/fusion.jsonl; return the stats."""
    margin = max(1, s.block_size // 32)  # prepare may re-cut a piece that needs every last token
    min_tokens = max(2, min(s.block_size, s.heldout_piece_tokens) // 4)
    rows: list[dict] = []
    for domain in [*s.domains, *([s.unseen] if s.unseen else [])]:
        if domain == s.unseen == "fortunes":
            docs = read_domain(fortunes_corpus(out, log).parent, "fortunes", s.max_docs_per_domain)
        else:
            docs = read_domain(corpora, domain, s.max_docs_per_domain)
        for d in docs:
            d["domain"] = domain
        pick = Picker(docs, tok, random.Random(f"{s.seed}/{domain}"), min_tokens)
        heldout = pick.take(min(s.heldout_piece_tokens, s.block_size), s.heldout_pieces_per_doc,
                            blocks=s.heldout_blocks)
        rows += [{**r, "split": "validation"} for r in heldout]
        if domain != s.unseen:
            fusion = pick.take(s.block_size - margin, s.fusion_pieces_per_doc, at_most=s.fusion_tokens // len(s.domains))
            rows += [{**r, "split": "train"} for r in fusion]
        log(f"data: {domain}: {len(heldout)} held-out pieces; {pick.pos} of {len(docs)} documents used")
    write_jsonl(tmp / "fusion.jsonl", [{k: r[k] for k in ("domain", "source", "split", "text")} for r in rows])
    blocks = block_stats(rows, tok, s.block_size)
    short = [f"{d}: {b.get('validation', {}).get('blocks', 0)} held-out blocks < {s.heldout_blocks}"
             for d, b in blocks.items() if b.get("validation", {}).get("blocks", 0) < s.heldout_blocks]
    if short:
        raise Problem("the data does not meet its budgets: " + "; ".join(short))
    total = {f"{name}_{what}": sum(b.get(split, {}).get(what, 0) for b in blocks.values())
             for name, split in (("fusion_train", "train"), ("heldout", "validation")) for what in ("tokens", "blocks")}
    log(f"data: {total['fusion_train_tokens']} training tokens ({total['fusion_train_blocks']} blocks), "
        f"{total['heldout_blocks']} held-out blocks ({total['heldout_tokens']} tokens)")
    return {"domains": blocks, "totals": total}


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

        paths = {"target": tiny_model(out, "target", "bpe"), "source": tiny_model(out, "source", "spm")} \
            if s.target == "tiny" else {"target": s.target}
        tok = load_tokenizer(ModelSpec(name="target", path=paths["target"]))
        build_once(out, s.model_dump(), lambda tmp: build(s, tok, args.corpora.resolve(), out, log_line, tmp),
                   log_line)
        binding = {"corpus.path": str(out / "data" / "fusion.jsonl")}
        if s.target == "tiny":
            binding.update({"target.path": paths["target"], "sources.0.path": paths["source"]})
        bind_sweep(out, args.sweep or HERE / ("tiny.yaml" if args.tiny else "sweep.yaml"), binding, log_line)

    return main_of(run)


if __name__ == "__main__":
    raise SystemExit(main())
