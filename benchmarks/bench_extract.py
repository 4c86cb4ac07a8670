"""Extraction throughput against a bare forward pass of the same model, and stored bytes per token.

Both run over the same blocks in the same process, alternating, best of `--repeats`; the ratio
is what to read (absolute seconds on a shared machine mean little).

    python benchmarks/bench_extract.py --json out.json
    python benchmarks/bench_extract.py --model gemma3-270m --blocks 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmfuse.artifacts import write_arrow
from lmfuse.config import ModelSpec
from lmfuse.extract import encode_blocks, extract_shard
from lmfuse.models import PULLABLE, load_model, load_tokenizer, pull

SHARED = Path("/work/shared/corpora")


def load_texts(corpus: Path | None, n: int, chars: int) -> list[str]:
    if corpus is None:
        corpus = SHARED if SHARED.exists() else Path(__file__).parents[1] / "src/lmfuse/data/demo_corpus.jsonl"
    files = sorted(corpus.glob("*.jsonl")) if corpus.is_dir() else [corpus]
    docs = [json.loads(line)["text"] for f in files for line in f.open()][: n * 8]
    texts = [d[:chars] for d in docs if len(d) >= chars]
    return texts[:n]


def bare_forward(model, tok, texts: list[str], batch_size: int) -> int:
    encs = encode_blocks(tok, texts)
    order = sorted(range(len(texts)), key=lambda i: (-len(encs[i]["input_ids"]), i))
    n = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lens = [len(encs[i]["input_ids"]) for i in idx]
        ids = torch.zeros((len(idx), max(lens)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : lens[r]] = torch.tensor(encs[i]["input_ids"])
            mask[r, : lens[r]] = 1
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask).logits.sum()  # the logits are materialised
        n += sum(lens)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help=f"a pullable name ({', '.join(PULLABLE)}) or an HF model dir")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--chars", type=int, default=1000, help="characters per block (~250 tokens)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    path = str(pull(a.model, quiet=True)) if a.model in PULLABLE else a.model
    spec = ModelSpec(name="bench", path=path, dtype=a.dtype)
    tok, model = load_tokenizer(spec), load_model(spec)
    texts = load_texts(a.corpus, a.blocks, a.chars)
    ids = list(range(len(texts)))
    bare_forward(model, tok, texts[:2], a.batch_size)  # warm-up
    t_bare, t_ext = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        n_tok = bare_forward(model, tok, texts, a.batch_size)
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        table = extract_shard(model, tok, ids, texts, a.top_k, a.batch_size, "cpu")
        t_ext.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        write_arrow(Path(d) / "s.arrow", table)
        size = (Path(d) / "s.arrow").stat().st_size
    res = {
        "model": a.model,
        "tokens": n_tok,
        "top_k": a.top_k,
        "bare_forward_tok_per_s": round(n_tok / min(t_bare), 1),
        "extract_tok_per_s": round(n_tok / min(t_ext), 1),
        "extract_time_ratio_to_bare_forward": round(min(t_ext) / min(t_bare), 3),
        "stored_bytes_per_token": round(size / n_tok, 2),
        "stored_bytes_per_token_topk_columns": round(
            sum(table.column(c).nbytes for c in ("topk_ids", "topk_logprobs")) / n_tok, 2),
    }
    for k, v in res.items():
        print(f"{k:40} {v}")
    print(f"\noverhead of extraction over a bare forward pass: {100 * (res['extract_time_ratio_to_bare_forward'] - 1):+.1f}% "
          f"(goal <= +10%); stored {res['stored_bytes_per_token']} bytes/token (goal <= 64 at k = 10)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
