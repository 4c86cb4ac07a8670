"""`prepare`: read a corpus and cut it into text blocks that every model's tokenizer fits.

Blocks are cut on clean boundaries (paragraphs, then lines, then whitespace; characters only
as a last resort) so that every model's tokenization of a block, special tokens included,
has at most `block_size` tokens. The train/validation split is by document within each
domain, deterministic in the seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from lmfuse.artifacts import load_complete
from lmfuse.errors import LmfuseError
from lmfuse.fingerprint import model_fingerprint
from lmfuse.hashing import file_hash, hash_obj
from lmfuse.stage import Build, Stage

ROWS_PER_SHARD = 50_000
# The share of a domain's non-blank characters that `prepare` may drop in blocks shorter than
# `prepare.min_block_chars` before it refuses. The ordinary loss is the odd document tail shorter
# than that: at most 0.2% per domain on real corpora (measured with the SmolLM2 and Gemma-3
# tokenizers on the demo and cross-architecture corpora, block_size 64 to 256), up to 1.6% on the
# tests' toy corpus of 200-character documents. A block_size too small for the text's words loses
# 6% to 100% (88% of each document in issue 26). 2% lies between the two. A constant, not an
# option: `min_block_chars: 1` keeps every non-blank character, so the refusal always has a fix.
MAX_DROPPED_FRACTION = 0.02


# -- reading ----------------------------------------------------------------------------------
def _fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hash_obj([[str(p.relative_to(path) if path.is_dir() else p.name), file_hash(p)] for p in files])


def read_corpus(path: str | Path, text_field: str = "text", domain_field: str = "domain",
                split_field: str | None = None) -> list[dict]:
    """Documents as `{"text", "domain"}` dicts (+ `"split"` with `split_field`), in file order.

    Accepts a `.txt` file (domain = file name), a folder of `.txt` files (domain = the
    sub-folder name, or the file name for files at the top), `.jsonl`, `.parquet`, or a saved
    HF dataset folder. With `split_field`, every record must say `train` or `validation` there
    (plain-text corpora have no fields, so it does not apply to them).
    """
    path = Path(path)
    if not path.exists():
        raise LmfuseError(f"corpus {path} does not exist", where="corpus.path", fix="check the path in the config")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        docs = list(_read_hf(path, text_field, domain_field, split_field))
    elif path.is_dir():
        if split_field:
            raise LmfuseError("corpus.split_field is set, but a folder of .txt files has no fields", where=str(path),
                              fix="use a .jsonl/.parquet corpus with a split field, or remove corpus.split_field")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise LmfuseError(f"folder {path} holds no .txt files", where="corpus.path",
                              fix="point at .txt files, a .jsonl/.parquet file or a saved HF dataset")
        docs = []
        for f in files:
            rel = f.relative_to(path)
            domain = rel.parts[0] if len(rel.parts) > 1 else f.stem
            docs.append({"text": _read_text(f), "domain": domain})
    elif path.suffix == ".txt":
        if split_field:
            raise LmfuseError("corpus.split_field is set, but a .txt file has no fields", where=str(path),
                              fix="use a .jsonl/.parquet corpus with a split field, or remove corpus.split_field")
        docs = [{"text": _read_text(path), "domain": path.stem}]
    elif path.suffix in (".jsonl", ".json"):
        docs = list(_read_jsonl(path, text_field, domain_field, split_field))
    elif path.suffix == ".parquet":
        docs = list(_read_table(path, text_field, domain_field, split_field))
    else:
        raise LmfuseError(f"unsupported corpus format {path.suffix!r}", where=str(path),
                          fix="use .txt, a folder of .txt, .jsonl, .parquet or a saved HF dataset folder")
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise LmfuseError("the corpus is empty (no document with non-blank text)", where=str(path),
                          fix=f"check that the documents have text in the {text_field!r} field")
    return docs


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmfuseError(f"file is not valid UTF-8 text (byte {e.start})", where=str(f),
                          fix="convert the file to UTF-8 or remove it from the corpus") from e
    except OSError as e:
        raise LmfuseError(f"cannot read file: {e.strerror}", where=str(f), fix="check its permissions") from e


SPLITS = ("train", "validation")


def _check_unicode(text: str, field: str, where: str) -> None:
    """Refuse a lone surrogate (JSON's `\\ud800` escapes make one): it is not text, and no tokenizer,
    Arrow column or UTF-8 file can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LmfuseError(f"field {field!r} holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                          f"{e.start}), which is not Unicode text", where=where,
                          fix="remove it, or replace it with U+FFFD (e.g. re-encode with errors='replace')") from e


def _doc(rec: dict, text_field: str, domain_field: str, where: str, default_domain: str,
         split_field: str | None = None) -> dict:
    if not isinstance(rec, dict) or text_field not in rec:
        keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
        raise LmfuseError(f"record has no {text_field!r} field (it has: {keys})", where=where,
                          fix=f"set corpus.text_field to the field holding the text, or add {text_field!r}")
    text = rec[text_field]
    if not isinstance(text, str):
        raise LmfuseError(f"field {text_field!r} is a {type(text).__name__}, not a string", where=where)
    _check_unicode(text, text_field, where)
    domain = rec.get(domain_field)
    if isinstance(domain, str):
        _check_unicode(domain, domain_field, where)
    doc = {"text": text, "domain": str(domain) if domain not in (None, "") else default_domain}
    if split_field:
        split = rec.get(split_field)
        if split not in SPLITS:
            raise LmfuseError(f"field {split_field!r} is {split!r}; it must be 'train' or 'validation'", where=where,
                              fix=f"give every record {split_field!r}: train|validation, or remove corpus.split_field")
        doc["split"] = split
    return doc


def _read_jsonl(path: Path, text_field: str, domain_field: str, split_field: str | None = None) -> Iterator[dict]:
    text = _read_text(path)
    # Records end at "\n" only: JSON strings may hold U+2028, U+2029 and U+0085 raw, which
    # `str.splitlines` would take for line breaks, cutting a valid record in two.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmfuseError(f"invalid JSON: {e.msg}", where=f"{path}, line {n}",
                              fix="each line of a .jsonl file must be one JSON object") from e
        yield _doc(rec, text_field, domain_field, f"{path}, line {n}", path.stem, split_field)


def _read_table(path: Path, text_field: str, domain_field: str, split_field: str | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise LmfuseError(f"cannot read parquet file: {e}", where=str(path)) from e
    if text_field not in table.column_names:
        raise LmfuseError(f"no {text_field!r} column (columns: {', '.join(table.column_names)})", where=str(path),
                          fix="set corpus.text_field to the column holding the text")
    for n, rec in enumerate(table.to_pylist()):
        yield _doc(rec, text_field, domain_field, f"{path}, row {n}", path.stem, split_field)


def _read_hf(path: Path, text_field: str, domain_field: str, split_field: str | None = None) -> Iterator[dict]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    parts = list(ds.values()) if isinstance(ds, DatasetDict) else [ds]
    for part in parts:
        if text_field not in part.column_names:
            raise LmfuseError(f"no {text_field!r} column (columns: {', '.join(part.column_names)})",
                              where=str(path), fix="set corpus.text_field to the column holding the text")
        for n, rec in enumerate(part):
            yield _doc(rec, text_field, domain_field, f"{path}, row {n}", path.name, split_field)


# -- cutting into blocks ------------------------------------------------------------------------
_BOUNDARIES = [re.compile(r"(?<=\n\n)"), re.compile(r"(?<=\n)"), re.compile(r"(?<=[.!?;:])(?=\s)"),
               re.compile(r"(?<=\s)(?=\S)")]


def _pieces(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Split text into pieces of at most `max_chars`, preferring the coarsest boundary."""
    if len(text) <= max_chars:
        return [text]
    if level >= len(_BOUNDARIES):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    parts = [p for p in _BOUNDARIES[level].split(text) if p]
    out: list[str] = []
    for p in parts:
        out.extend(_pieces(p, max_chars, level + 1) if len(p) > max_chars else [p])
    return out


def count_tokens(tokenizers: list, texts: list[str]) -> np.ndarray:
    """Max over tokenizers of each text's token count, special tokens included. Shape [len(texts)].

    Counted as `extract` stores the text: special-token strings in it split as plain text
    (`models.encode_text`).
    """
    from lmfuse.models import encode_text

    counts = np.zeros(len(texts), dtype=np.int64)
    for tok in tokenizers:
        enc = encode_text(tok, texts)["input_ids"]
        counts = np.maximum(counts, [len(e) for e in enc])
    return counts


def split_document(text: str, tokenizers: list, block_size: int) -> list[str]:
    """Cut one document into blocks that every tokenizer fits into `block_size` tokens.

    Pieces (at clean boundaries) are packed greedily by their summed token counts, then each
    block is checked with a real tokenization and shrunk if the joins cost extra tokens.
    """
    n_special = int(count_tokens(tokenizers, [""])[0])
    budget = block_size - n_special
    if budget < 1:
        raise LmfuseError(f"block_size {block_size} leaves no room for text: the tokenizers add {n_special} "
                          "special token(s) to every block", where="prepare.block_size",
                          fix=f"set prepare.block_size to at least {n_special + 16}")
    pieces = _pieces(text, max(budget, 1))  # a token covers at least one character
    cost = count_tokens(tokenizers, pieces) - n_special
    # A piece that alone is too long is split further by characters until it fits.
    fixed: list[str] = []
    for p, c in zip(pieces, cost):
        fixed.extend(_shrink(p, tokenizers, budget, n_special) if c > budget else [p])
    pieces = fixed
    cost = count_tokens(tokenizers, pieces) - n_special

    blocks: list[str] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and total + cost[j] <= budget:
            total += cost[j]
            j += 1
        j = max(j, i + 1)
        # The joined text can tokenize longer than the sum of its pieces: back off until it fits.
        while j > i + 1 and count_tokens(tokenizers, ["".join(pieces[i:j])])[0] > block_size:
            j -= 1
        blocks.append("".join(pieces[i:j]))
        i = j
    return blocks


def _shrink(text: str, tokenizers: list, budget: int, n_special: int) -> list[str]:
    if len(text) <= 1 or count_tokens(tokenizers, [text])[0] - n_special <= budget:
        return [text]
    half = len(text) // 2
    return _shrink(text[:half], tokenizers, budget, n_special) + _shrink(text[half:], tokenizers, budget, n_special)


def split_train_validation(doc_domains: list[str], doc_blocks: list[int], fraction: float, min_blocks: int,
                           seed: int) -> list[np.ndarray]:
    """Per document, per block: True if the block goes to validation. Deterministic in `seed`.

    Within each domain, whole documents are taken into validation in a seeded-hash order while
    they fit the domain's quota (`fraction` of its blocks, at least `min_blocks`, always leaving
    one training block); if whole documents cannot fill it, the last blocks of one more
    document make up the rest. Whole documents keep related text out of training.
    """
    flags = [np.zeros(n, dtype=bool) for n in doc_blocks]
    for domain in sorted(set(doc_domains)):
        idx = [i for i, d in enumerate(doc_domains) if d == domain and doc_blocks[i] > 0]
        total = sum(doc_blocks[i] for i in idx)
        want = min(max(min_blocks, round(fraction * total)), total - 1)
        if want <= 0:
            continue
        order = sorted(idx, key=lambda i: hash_obj([seed, domain, i]))
        got = 0
        for i in order:
            if got + doc_blocks[i] <= want:
                flags[i][:] = True
                got += doc_blocks[i]
        if got < want:
            i = next(i for i in order if not flags[i].any())
            flags[i][doc_blocks[i] - (want - got):] = True
    return flags


_FP_CACHE: dict[tuple, str] = {}


def corpus_fingerprint(corpus: Path) -> str:
    if not corpus.exists():
        return "missing"
    st = corpus.stat()
    key = (str(corpus.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FP_CACHE:
        _FP_CACHE[key] = _fingerprint(corpus)
    return _FP_CACHE[key]


def nonblank_chars(text: str) -> int:
    """The characters of a text that are not whitespace (what `min_block_chars` counts, stripped)."""
    return sum(map(len, text.split()))


def make_blocks(docs: list[dict], tokenizers: list, pc) -> pa.Table:
    """All blocks of a corpus as a table (columns in ARCHITECTURE.md)."""
    return cut_blocks(docs, tokenizers, pc)[0]


def cut_blocks(docs: list[dict], tokenizers: list, pc) -> tuple[pa.Table, dict[str, dict]]:
    """All blocks of a corpus as a table, and what `min_block_chars` dropped, per domain.

    Returns:
        The table (columns in ARCHITECTURE.md) and `{domain: {"chars", "dropped_chars",
        "dropped_blocks", "dropped_fraction"}}`: the domain's non-blank characters read, those in
        blocks dropped for having fewer than `min_block_chars` (stripped), how many such blocks,
        and their share. Blocks beyond `max_blocks_per_domain` are left out on purpose and not
        counted.
    """
    per_doc: list[list[str]] = []
    kept_per_domain: dict[str, int] = {}
    dropped: dict[str, dict] = {}
    fixed = bool(docs) and "split" in docs[0]  # the corpus gives each document's split
    for d in docs:
        blocks = []
        loss = dropped.setdefault(d["domain"], {"chars": 0, "dropped_chars": 0, "dropped_blocks": 0})
        loss["chars"] += nonblank_chars(d["text"])
        for b in split_document(d["text"], tokenizers, pc.block_size):
            if len(b.strip()) >= pc.min_block_chars:
                blocks.append(b)
            elif b.strip():  # a blank block loses no text
                loss["dropped_chars"] += nonblank_chars(b)
                loss["dropped_blocks"] += 1
        if pc.max_blocks_per_domain is not None:
            # With given splits, the cap holds for each split of a domain (the held-out set stays as asked).
            cap_key = (d["domain"], d["split"]) if fixed else d["domain"]
            room = pc.max_blocks_per_domain - kept_per_domain.get(cap_key, 0)
            blocks = blocks[:max(room, 0)]
            kept_per_domain[cap_key] = kept_per_domain.get(cap_key, 0) + len(blocks)
        per_doc.append(blocks)
    domains = [d["domain"] for d in docs]
    if fixed:
        is_val = [np.full(len(b), d["split"] == "validation") for d, b in zip(docs, per_doc, strict=True)]
    else:
        is_val = split_train_validation(domains, [len(b) for b in per_doc], pc.validation_fraction,
                                        pc.min_validation_blocks, pc.seed)
    rows = {"block_id": [], "doc_id": [], "domain": [], "split": [], "text": []}
    for doc_id, blocks in enumerate(per_doc):
        for j, b in enumerate(blocks):
            val = bool(is_val[doc_id][j])
            rows["block_id"].append(len(rows["block_id"]))
            rows["doc_id"].append(doc_id)
            rows["domain"].append(domains[doc_id])
            rows["split"].append("validation" if val else "train")
            rows["text"].append(b)
    schema = pa.schema([("block_id", pa.int64()), ("doc_id", pa.int64()), ("domain", pa.string()),
                        ("split", pa.string()), ("text", pa.string())])
    for loss in dropped.values():
        loss["dropped_fraction"] = round(loss["dropped_chars"] / max(loss["chars"], 1), 6)
    return pa.table(rows, schema=schema), dict(sorted(dropped.items()))


def check_dropped(dropped: dict[str, dict], pc, where: str) -> None:
    """Refuse when `min_block_chars` would drop more than `MAX_DROPPED_FRACTION` of a domain's text.

    Such a loss comes from a `block_size` too small for the text (a long word, a line of
    symbols, a dense script: the pieces cut to fit are shorter than `min_block_chars`); the user
    chooses the fix, with the numbers.
    """
    over = [d for d, s in dropped.items() if s["dropped_fraction"] > MAX_DROPPED_FRACTION]
    if not over:
        return
    worst = max(dropped[d]["dropped_fraction"] for d in over)
    raise LmfuseError(
        f"prepare would drop {worst:.1%} of the text of domain(s) {', '.join(over)} ("
        + "; ".join(f"{d}: {dropped[d]['dropped_chars']:,} of {dropped[d]['chars']:,} non-blank characters, "
                    f"{dropped[d]['dropped_fraction']:.1%}, in {dropped[d]['dropped_blocks']:,} block(s)" for d in over)
        + f"): prepare.block_size {pc.block_size} cuts the text into pieces shorter than prepare.min_block_chars "
          f"({pc.min_block_chars}), which are dropped: more than the {MAX_DROPPED_FRACTION:.0%} of a domain "
          "that prepare accepts to lose",
        where=where,
        fix="raise prepare.block_size (a block of so few tokens holds only a few characters of this text) or lower "
            "prepare.min_block_chars (1 keeps every non-blank character)")


def read_documents(cfg) -> list[dict]:
    """The corpus's documents, `corpus.domains` and `corpus.max_docs_per_domain` applied."""
    docs = read_corpus(cfg.corpus.path, cfg.corpus.text_field, cfg.corpus.domain_field, cfg.corpus.split_field)
    if cfg.corpus.domains is not None:
        found = {d["domain"] for d in docs}
        missing = [d for d in cfg.corpus.domains if d not in found]
        if missing:
            raise LmfuseError(f"corpus.domains names {', '.join(map(repr, missing))}, which the corpus does not have",
                              where=str(cfg.corpus.path),
                              fix=f"choose from its domains: {', '.join(sorted(found))}")
        docs = [d for d in docs if d["domain"] in cfg.corpus.domains]
    if cfg.corpus.max_docs_per_domain:
        seen: dict[str, int] = {}
        kept = []
        for d in docs:
            seen[d["domain"]] = seen.get(d["domain"], 0) + 1
            if seen[d["domain"]] <= cfg.corpus.max_docs_per_domain:
                kept.append(d)
        docs = kept
    return docs


def split_stats(table: pa.Table) -> dict[str, dict[str, int]]:
    """{domain: {"train": blocks, "validation": blocks}}."""
    stats: dict[str, dict[str, int]] = {}
    for dom, split in zip(table["domain"].to_pylist(), table["split"].to_pylist()):
        stats.setdefault(dom, {"train": 0, "validation": 0})[split] += 1
    return stats


def check_validation(stats: dict[str, dict[str, int]], min_blocks: int, where: str) -> None:
    """Refuse a domain with fewer validation blocks than asked: eval could not score it.

    A domain of a single block cannot give one (a block is never split between train and
    validation, and one block always stays for training), so the advice is what makes more
    blocks or chooses the split, never `min_validation_blocks: 0` (eval then fails instead).
    """
    short = [d for d, s in sorted(stats.items()) if s["validation"] < min_blocks]
    if not short:
        return
    raise LmfuseError(
        f"domain(s) {', '.join(short)} would have fewer than {min_blocks} validation block(s) "
        f"({', '.join(f'{d}: {stats[d]}' for d in short)}), so they could not be evaluated",
        where=where,
        fix="add documents or text to those domains (a domain needs 2 blocks or more: one to train on, one to "
            "hold out), lower prepare.block_size so that their text makes more blocks, or choose each "
            "document's split yourself with corpus.split_field (a domain may then be held out whole)")


# -- the stage --------------------------------------------------------------------------------
class PrepareStage(Stage):
    """`prepare`: the corpus read, cut into blocks that fit every model's tokenizer, and split.

    Its hash covers the corpus's contents, the options and the contents of every model's
    tokenizer files (blocks must fit each tokenizer); it has no input artifact.
    """

    kind = "prepare"

    def __init__(self, cfg):
        super().__init__("prepare")
        self.cfg = cfg

    def config_hash(self) -> str:
        cfg = self.cfg
        data = corpus_fingerprint(Path(cfg.corpus.path))
        tokenizers = [[m.path, m.revision, model_fingerprint(m, tokenizer_only=True)] for m in cfg.models]
        unset = {"domains"} if cfg.corpus.domains is None else set()  # keys as before the option existed
        return hash_obj(["prepare", cfg.corpus.model_dump(exclude={"path", *unset}), cfg.prepare.model_dump(), data,
                         tokenizers])

    def n_shards(self, b: Build) -> int:
        # One pass makes every block; the shards are slices of it.
        from lmfuse.models import load_tokenizer

        cfg = self.cfg
        docs = read_documents(cfg)
        table, dropped = cut_blocks(docs, [load_tokenizer(m) for m in cfg.models], cfg.prepare)
        check_dropped(dropped, cfg.prepare, str(cfg.corpus.path))
        if table.num_rows == 0:
            raise LmfuseError("the corpus gave no blocks (every block was shorter than prepare.min_block_chars)",
                              where=cfg.corpus.path, fix="lower prepare.min_block_chars or add text")
        stats = split_stats(table)
        check_validation(stats, cfg.prepare.min_validation_blocks, str(cfg.corpus.path))
        b.state.update(table=table, docs=len(docs), stats=stats, dropped=dropped)
        return -(-table.num_rows // ROWS_PER_SHARD)

    def write(self, b: Build, todo: list[int]):
        for i in todo:
            yield i, b.state["table"].slice(i * ROWS_PER_SHARD, ROWS_PER_SHARD), None

    def summary(self, b: Build, stats: list[dict]) -> dict:
        s = b.state
        return dict(n_blocks=s["table"].num_rows, n_docs=s["docs"], blocks_per_domain=s["stats"],
                    block_size=self.cfg.prepare.block_size, corpus=str(self.cfg.corpus.path),
                    min_block_chars=self.cfg.prepare.min_block_chars, dropped_per_domain=s["dropped"])

    def after_finish(self, b: Build, manifest: dict) -> None:
        s = b.state
        b.log(f"prepare: {s['table'].num_rows} blocks from {s['docs']} documents -> {b.art.path}")
        for dom, st in sorted(s["stats"].items()):
            loss = s["dropped"].get(dom, {})
            lost = (f"; {loss['dropped_chars']:,} of {loss['chars']:,} characters dropped "
                    f"({loss['dropped_fraction']:.3%}, {loss['dropped_blocks']} block(s) shorter than "
                    f"min_block_chars {self.cfg.prepare.min_block_chars})" if loss.get("dropped_chars") else "")
            b.log(f"  {dom:>16}: {st['train']} train, {st['validation']} validation{lost}")


def load_blocks(cfg):
    """The prepared blocks as a memory-mapped `datasets.Dataset`."""
    return load_complete(cfg.run_dir / "prepare", "prepare")
