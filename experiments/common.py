"""What the experiments' data builders share: picking pieces of documents, block counts, binding a
sweep file to the data it runs on.

An experiment is a data builder (`<experiment>/data.py`: text picked from the development corpora
in ../shared/corpora, which lmfuse itself never reads) and committed sweep files run by
`lmfuse sweep`; the builder writes `OUT/sweep.yaml`, which extends a committed sweep file with the
places of this data, so the runs, the shared artifacts and every table are lmfuse's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

Log = Callable[[str], Any]


class Problem(Exception):
    """A problem the user can fix; printed without a traceback."""


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


def build_once(out: Path, key: dict, build: Callable[[Path], dict], log: Log) -> dict:
    """OUT/data/ built once by `build(tmp_dir)` (which returns the stats) and moved into place whole.

    Data made with other settings is refused: the runs were made from it."""
    final = out / "data"
    if (final / "stats.json").exists():
        stats = json.loads((final / "stats.json").read_text())
        if stats["settings"] != json.loads(json.dumps(key)):
            raise Problem(f"{final} was made with other data settings ({stats['settings']}); delete it (and the "
                          "sweep made from it) or use another --out")
        log(f"data: complete ({final})")
        return stats
    t0 = time.time()
    tmp = out / ".data-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = {"settings": key, **build(tmp), "seconds": round(time.time() - t0, 1)}
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the data appears whole or not at all
    log(f"data: written to {final} in {stats['seconds']} s")
    return stats


def bind_sweep(out: Path, sweep_file: Path, settings: dict[str, Any], log: Log,
               parts: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write OUT/sweep.yaml: the committed sweep file, its runs under OUT/sweep, `settings` set
    (dotted key → value: the corpus and model paths of this data), and `parts` ({part: settings})
    merged into those parts' own `set`."""
    data = {"extends": str(sweep_file.resolve()), "output_dir": "sweep", "set": settings}
    if parts:
        data["parts"] = {p: {"set": v} for p, v in parts.items()}
    text = yaml.safe_dump(data, sort_keys=False)
    path = out / "sweep.yaml"
    if not path.exists() or path.read_text() != text:
        path.write_text("# Written by the experiment's data builder: its sweep file bound to this data.\n" + text)
    log(f"sweep file: {path}; run it with `lmfuse sweep {path}` (`--part NAME` for one part)")
    return path


def data_parser(doc: str, default_corpora: Path) -> argparse.ArgumentParser:
    """The command line every data builder shares (`--out`, `--tiny`, `--settings`, `--corpora`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (what is there is reused)")
    p.add_argument("--tiny", action="store_true", help="lmfuse's tiny test models, small budgets: tests the chain")
    p.add_argument("--settings", type=Path, help="data settings (default: data.yaml, data-tiny.yaml with --tiny)")
    p.add_argument("--corpora", type=Path, default=default_corpora, help=f"default: {default_corpora}")
    return p


def main_of(build: Callable[[], Any]) -> int:
    """Run a builder; a problem the user can fix ends with exit code 2 and no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        build()
    except Problem as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def tiny_model(out: Path, which: str, kind: str) -> str:
    """lmfuse's tiny test model `kind` (bpe, spm) under OUT/models/<which>."""
    from lmfuse.testing import make_tiny_model

    return str(make_tiny_model(out / "models" / which, kind))


def settings_of(model: type, path: Path):
    return model.model_validate(yaml.safe_load(path.read_text()) or {})  # a builder's settings from YAML

