"""Throughput of `evaluate.block_nll` (batched, longest first) against a one-block-at-a-time loop.

Also reports bits per byte per domain, so a real model's numbers can be checked against known ones.

    python benchmarks/bench_eval.py                                   # tiny model, built-in text
    python benchmarks/bench_eval.py --model ~/.cache/lmfuse/models/smollm2-135m-instruct \\
        --corpus /work/shared/corpora/legal.jsonl --blocks 16 --chars 1500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def load_texts(corpora: list[str], blocks: int, chars: int) -> tuple[list[str], list[str]]:
    texts, domains = [], []
    per = max(1, blocks // max(len(corpora), 1))
    for path in corpora:
        n = 0
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            t = rec["text"]
            for i in range(0, len(t) - chars // 2, chars):
                texts.append(t[i:i + chars])
                domains.append(rec.get("domain", Path(path).stem))
                n += 1
                if n >= per:
                    break
            if n >= per:
                break
    return texts, domains


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmfuse.evaluate import block_nll, summarize
    from lmfuse.testing import TRAIN_TEXT, make_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model dir (default: a tiny random GPT-2)")
    ap.add_argument("--corpus", action="append", default=[], help="JSONL with text/domain (repeatable)")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--chars", type=int, default=1200, help="characters per block")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="write a flat {name: value} object here")
    ap.add_argument("--quick", action="store_true", help="8 blocks of 400 characters (CI: the benchmark runs)")
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.chars = min(args.blocks, 8), min(args.chars, 400)

    if args.corpus:
        texts, domains = load_texts(args.corpus, args.blocks, args.chars)
    else:
        base = " ".join(TRAIN_TEXT)
        texts = [(base * 20)[i * 37:i * 37 + args.chars // (1 + i % 3)] for i in range(args.blocks)]
        domains = ["builtin"] * len(texts)
    model_dir = args.model or str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "bpe"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    n_tok = sum(len(x) for x in tok(texts)["input_ids"])

    t = time.perf_counter()
    loop = [block_nll(model, tok, [x], 1, "cpu")[0] for x in texts]  # baseline: one block per forward
    t_loop = time.perf_counter() - t
    t = time.perf_counter()
    batched = block_nll(model, tok, texts, args.batch_size, "cpu")
    t_batch = time.perf_counter() - t

    max_rel = max(abs(a[0] - b[0]) / max(abs(a[0]), 1e-9) for a, b in zip(loop, batched, strict=True))
    s = summarize(batched, domains)
    res = {
        "blocks": len(texts), "tokens": n_tok,
        "loop_seconds": round(t_loop, 3), "batched_seconds": round(t_batch, 3),
        "batched_tokens_per_s": round(n_tok / t_batch, 1), "loop_tokens_per_s": round(n_tok / t_loop, 1),
        "speedup_vs_loop": round(t_loop / t_batch, 3), "max_rel_diff_nll": max_rel,
        "overall_bpb": round(s["overall"]["bpb"], 5),
        **{f"bpb_{d}": round(m["bpb"], 5) for d, m in s["domains"].items()},
    }
    print(f"model {model_dir} ({args.dtype}), {len(texts)} blocks, {n_tok} tokens, batch {args.batch_size}")
    print(f"one block per forward: {t_loop:.2f} s ({n_tok / t_loop:.0f} tok/s)")
    print(f"block_nll batched:     {t_batch:.2f} s ({n_tok / t_batch:.0f} tok/s)  "
          f"ratio {t_loop / t_batch:.2f}x; max rel. NLL difference {max_rel:.1e}")
    for d, m in s["domains"].items():
        print(f"  {d:12s} {m['bpb']:.4f} bits/byte  ppl {m['ppl']:.2f}  ({m['blocks']} blocks)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
