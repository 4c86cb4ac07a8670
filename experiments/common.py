"""What the experiment drivers share: corpus picking, logging, the held-out comparisons.

The drivers (`domain_experts/run.py`, `cross_arch/run.py`) read the development corpora in
../shared/corpora and run lmfuse on them; lmfuse itself never reads ../shared. Held-out figures
come from `lmfuse eval`'s per-block records (`per_block`: block ids, domains, NLL in nats,
UTF-8 bytes), compared and written by `lmfuse.compare` as the sweep's table does, so every
difference here is paired over the same held-out blocks.
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmfuse.compare import bpb, compare_domains
from lmfuse.stats import Interval

Log = Callable[[str], Any]


class Problem(Exception):
    """A problem the user can fix; printed without a traceback."""


class Tee(io.TextIOBase):
    """A stream that also writes to the log file (progress-bar redraws, which hold `\\r`, stay out)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, s: str) -> int:
        self.stream.write(s)
        if "\r" not in s:
            self.file.write(s)
            self.file.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def read_settings(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A settings file's keys, with `extends: FILE` (relative to it) resolved.

    The file's keys override the base file's: a mapping (`fusion_train`, `eval`, …) key by key,
    anything else (lists included) whole. Bases may extend further bases.
    """
    path = path.resolve()
    if path in seen:
        raise SystemExit(f"{seen[-1]}: `extends` makes a cycle through {path}; remove one of them")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: a settings file is a mapping of keys, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base_file = path.parent / str(parent)
    if not base_file.is_file():
        raise SystemExit(f"{path}: `extends: {parent}` names no file ({base_file}); the path is relative "
                         f"to the settings file")
    merged = read_settings(base_file, (*seen, path))
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def log_line(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_domain(corpora: Path, domain: str, limit: int | None) -> list[dict]:
    path = corpora / f"{domain}.jsonl"
    if not path.exists():
        raise Problem(f"no corpus for domain {domain!r}: {path} does not exist (use --corpora DIR)")
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
                if limit and len(docs) >= limit:
                    break
    return docs


def ntok(tok, texts: Sequence[str]) -> list[int]:
    from lmfuse.prepare import count_tokens

    return [int(x) for x in count_tokens([tok], list(texts))] if texts else []


class Picker:
    """Takes documents in a seeded order for one domain; each document goes to one set only.

    A document is cut into pieces at paragraph, line, sentence and word boundaries
    (`lmfuse.prepare.split_document`, the cutting lmfuse's prepare uses), and a few of its pieces,
    chosen at random, go to the set: no document dominates a set, and the held-out, expert and
    fusion sets never share a document.
    """

    def __init__(self, docs: list[dict], tok, rng: random.Random, min_tokens: int):
        self.docs, self.tok, self.rng, self.min_tokens = docs, tok, rng, min_tokens
        self.order = list(range(len(docs)))
        rng.shuffle(self.order)
        self.pos = 0

    def pieces(self, i: int, size: int) -> tuple[list[str], list[int]]:
        from lmfuse.prepare import split_document

        texts = [p for p in split_document(self.docs[i]["text"], [self.tok], size) if p.strip()]
        counts = ntok(self.tok, texts)
        keep = [(p, n) for p, n in zip(texts, counts) if n >= self.min_tokens]
        return [p for p, _ in keep], [n for _, n in keep]

    def take(self, size: int, per_doc: int, *, blocks: int | None = None, at_least: int | None = None,
             at_most: int | None = None) -> list[dict]:
        """Pieces of at most `size` tokens until `blocks` pieces, or ≥ `at_least` / ≤ `at_most` tokens."""
        chosen: list[dict] = []
        total = 0

        def done() -> bool:
            if blocks is not None:
                return len(chosen) >= blocks
            if at_least is not None:
                return total >= at_least
            return at_most - total < self.min_tokens

        while not done() and self.pos < len(self.order):
            i = self.order[self.pos]
            self.pos += 1
            texts, counts = self.pieces(i, size)
            if not texts:
                continue
            picks = sorted(self.rng.sample(range(len(texts)), min(per_doc, len(texts))))
            for j in picks:
                if done():
                    break
                if at_most is not None and total + counts[j] > at_most:
                    continue
                doc = self.docs[i]
                chosen.append({"domain": doc["domain"], "source": f"{doc.get('source', i)}#{j}",
                               "text": texts[j], "tokens": counts[j]})
                total += counts[j]
        if not done():
            raise Problem(f"domain {self.docs[0]['domain']!r}: ran out of documents after {len(self.docs)} "
                          f"({len(chosen)} pieces, {total} tokens); lower the budgets or raise max_docs_per_domain")
        return chosen


def block_stats(docs: list[dict], tok, block_size: int) -> dict:
    """Blocks and tokens per domain and split, as lmfuse's prepare will cut them (one tokenizer:
    the experts share the base's)."""
    from lmfuse.config import PrepareConfig
    from lmfuse.prepare import make_blocks

    table = make_blocks([{"text": d["text"], "domain": d["domain"], "split": d["split"]} for d in docs], [tok],
                        PrepareConfig(block_size=block_size, min_validation_blocks=0))
    counts = ntok(tok, table["text"].to_pylist())
    out: dict[str, dict[str, dict[str, int]]] = {}
    for dom, split, n in zip(table["domain"].to_pylist(), table["split"].to_pylist(), counts):
        s = out.setdefault(dom, {}).setdefault(split, {"blocks": 0, "tokens": 0, "predicted_tokens": 0})
        s["blocks"] += 1
        s["tokens"] += n
        s["predicted_tokens"] += n - 1
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def domain_bpb(rec: dict, domains: Sequence[str]) -> dict[str, float]:
    """Bits per byte per domain and their mean over the domains (the paper's average)."""
    out = {d: bpb(rec, d) for d in domains}
    out["average"] = float(np.mean([out[d] for d in domains]))
    return out


def same_blocks(a: dict, b: dict) -> None:
    """Raise unless two eval records were scored on the same held-out blocks, in the same order."""
    if a["per_block"]["block_id"] != b["per_block"]["block_id"]:
        raise Problem("two eval records were scored on different held-out blocks; the runs' prepare differs")


def diff_ci(a: Sequence[dict], b: Sequence[dict], domains: Sequence[str]) -> dict[str, Interval]:
    """bpb(A) − bpb(B) per domain and on their average, with 95% paired bootstrap intervals.

    `lmfuse.compare.compare_domains` (as `lmfuse sweep`, so per-domain intervals equal the sweep's)
    on records that must share their held-out blocks.

    Args:
        a: Model A's eval records, one per seed (several: the interval of the seed-averaged difference).
        b: Model B's, one per seed, or one for a model that does not depend on the seed.
        domains: The domains, averaged in `average`.
    """
    for other in [*a[1:], *b]:
        same_blocks(a[0], other)
    return compare_domains(a, b, domains)


def score_best(run_dir: Path, kind: str, cache_dir: Path, log: Log) -> dict | None:
    """Held-out per-block figures of `RUN/train/<kind>/best/` (lmfuse eval does not score it).

    Scored with `lmfuse.evaluate.block_nll` on the run's own prepared validation blocks, in the
    run's `eval.dtype`; cached under `cache_dir` by the model's fingerprint and the blocks.
    """
    from lmfuse.artifacts import read_json
    from lmfuse.config import ModelSpec, load_config
    from lmfuse.evaluate import (
        block_nll,
        load_blocks,
        per_block,
        select_blocks,
        summarize,
    )
    from lmfuse.fingerprint import model_fingerprint as fingerprint
    from lmfuse.hashing import hash_obj
    from lmfuse.models import load_model, load_tokenizer
    from lmfuse.parallel import device

    best = (run_dir / "train" / kind / "best").resolve()
    if not (best / "config.json").exists():
        return None
    cfg = load_config(run_dir / "config.yaml")
    dtype = cfg.eval.dtype or "float32"
    spec = ModelSpec(name=f"{kind}-best", path=str(best), dtype=dtype)
    blocks, data_hash = load_blocks(cfg)
    chosen = select_blocks(blocks, cfg.eval.split)
    key = hash_obj([fingerprint(spec), data_hash, cfg.eval.split, dtype, [b["block_id"] for b in chosen]])
    cache = cache_dir / f"{kind}-best-{key}.json"
    rec = read_json(cache)
    if rec is None:
        t0 = time.time()
        dev = device()
        model = load_model(spec, dtype=dtype, device=dev)
        rows = block_nll(model, load_tokenizer(spec), [b["text"] for b in chosen], cfg.eval.batch_size, dev)
        del model
        state = read_json(best / "best_state.json") or {}
        rec = {**summarize(rows, [b["domain"] for b in chosen]), "kind": f"{kind}-best", "path": [str(best)],
               "step": state.get("step"), "eval_loss": state.get("eval_loss"), "seconds": round(time.time() - t0, 1),
               "per_block": per_block(rows, chosen)}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rec))
        log(f"table: scored {run_dir.name}/train/{kind}/best (step {rec['step']}): "
            f"{rec['overall']['bpb']:.4f} bits/byte ({rec['seconds']} s)")
    return rec


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.floating):
        return float(x)
    return x



class logged:  # noqa: N801 (used as `with logged(out):`, like contextlib's lower-case helpers)
    """Copy the terminal's output to `OUT/run.log` (appended) while the block runs."""

    def __init__(self, out: Path):
        self.path = out / "run.log"

    def __enter__(self) -> None:
        self.file = self.path.open("a", encoding="utf-8")
        self.old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(self.old[0], self.file), Tee(self.old[1], self.file)

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self.old
        self.file.close()


def train_steps(train: dict, blocks: int) -> int:
    """Optimizer steps of an lmfuse training run on one process (as lmfuse.train.run_train)."""
    if train.get("max_steps"):
        return int(train["max_steps"])
    g = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1))
    return max(1, math.ceil(float(train.get("epochs", 1.0)) * blocks / g))


def driver_parser(doc: str, steps: Sequence[str], default_corpora: Path):
    """The command line every driver shares (`--out`, `--tiny`, `--settings`, `--corpora`, `--steps-only`,
    `--estimate`); a driver adds its own flags to it."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (resumes what is there)")
    p.add_argument("--tiny", action="store_true", help="tiny models and budgets (tiny.yaml): tests the chain")
    p.add_argument("--settings", type=Path, help="settings file (default: real.yaml, or tiny.yaml with --tiny)")
    p.add_argument("--corpora", type=Path, default=default_corpora, help=f"default: {default_corpora}")
    p.add_argument("--steps-only", choices=steps, action="append",
                   help="run only this step (repeatable); default: every step in order")
    p.add_argument("--estimate", action="store_true", help="print the wall-time estimate from OUT/data and exit")
    return p


def run_steps(title: str, out: Path, steps: Sequence[tuple[str, Callable[[], Any]]]) -> int:
    """Run the steps in order with OUT/run.log; a problem the user can fix ends with exit code 2."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmfuse.errors import LmfuseError

    with logged(out):
        t0 = time.time()
        log_line(f"{title}: steps {', '.join(name for name, _ in steps)} -> {out}")
        try:
            for name, fn in steps:
                t = time.time()
                fn()
                log_line(f"step {name} done in {time.time() - t:.1f} s")
        except Problem as e:
            log_line(f"error: {e}")
            return 2
        except LmfuseError as e:
            log_line(f"lmfuse error: {e}")
            return 2
        log_line(f"done in {time.time() - t0:.1f} s")
    return 0


def existing_data(final: Path, data_key: dict, made_from_it: str, log: Log) -> dict | None:
    """The stats of a data step made earlier with the same settings, None when there is none yet."""
    stats_path = final / "stats.json"
    if not stats_path.exists():
        return None
    stats = json.loads(stats_path.read_text())
    if stats["settings"] != json.loads(json.dumps(data_key)):
        raise Problem(f"{final} was made with other data settings ({stats['settings']}); delete it (and the "
                      f"{made_from_it} made from it) or use another --out")
    log(f"data: complete ({stats_path})")
    return stats
