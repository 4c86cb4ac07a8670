"""`vocab-map`: map every source token id to a target token id.

All methods compare what tokens stand for (`tokentext.TokenTable`), never token strings
with their `Ġ`/`▁`/`##` markers. Every method first maps

- special tokens by role (source EOS -> target EOS, then BOS, UNK, PAD), `how` = 4;
- tokens whose bytes equal a target token's bytes, `how` = 1 (among target tokens with the
  same bytes one of the same kind is preferred -- byte-fallback `<0xHH>` to byte-fallback,
  ordinary to ordinary -- then an ordinary one, then the smallest id);

and then the rest by its own rule:

- `exact`: nothing more (the rest stays unmapped, `how` = 0).
- `mined` (the paper's MinED): the target token at minimum Levenshtein distance over the
  `token_texts` strings, `how` = 2. Ties: smallest distance, then smallest length difference,
  then ordinary before byte-fallback tokens, then smallest target id.
- `retokenize` (**beyond**): the first token of the target tokenizer's own encoding of the
  source token's text in mid-text position (encoded after a newline, so tokenizers that
  prepend a space to a string's start do not), `how` = 3. A source token that is not valid
  UTF-8 (part of a multi-byte character) maps to the longest target token whose bytes
  start it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np

from lmfuse.artifacts import atomic_write_bytes, read_manifest
from lmfuse.errors import LmfuseError
from lmfuse.hashing import hash_obj
from lmfuse.registry import Registry
from lmfuse.stage import Build, Stage
from lmfuse.tokentext import BYTE, NORMAL, SPECIAL, TokenTable, token_table

UNMAPPED, EXACT, MINED, RETOKENIZE, SPECIAL_HOW = 0, 1, 2, 3, 4
HOW_NAMES = {UNMAPPED: "unmapped", EXACT: "exact", MINED: "mined", RETOKENIZE: "retokenize",
             SPECIAL_HOW: "special"}

# fn(src_tok, tgt_tok, src_table, tgt_table, tgt_id, how, workers) fills the unmapped rows in place.
MethodFn = Callable[..., None]
METHODS: Registry[MethodFn] = Registry("vocab-map method")


# -- pure helpers -------------------------------------------------------------------------------
def target_index(tgt: TokenTable, kind: int | None = None) -> dict[bytes, int]:
    """bytes -> the preferred target id standing for them (ordinary before byte-fallback, then smallest id).

    With `kind`, only target tokens of that kind are indexed.
    """
    index: dict[bytes, int] = {}
    for i in np.lexsort((np.arange(len(tgt)), tgt.kind != NORMAL)):  # ordinary first, then by id
        i = int(i)
        b = tgt.bytes[i]
        if kind is not None and tgt.kind[i] != kind:
            continue
        if b and tgt.kind[i] != SPECIAL and b not in index:
            index[b] = i
    return index


def candidate_order(tgt: TokenTable) -> np.ndarray:
    """Target ids that `mined` may choose, in tie-break order (ordinary first, then by id), one per text.

    Returns:
        int64 [C] target ids.
    """
    return np.fromiter(sorted(target_index(tgt).values(), key=lambda i: (tgt.kind[i] == BYTE, i)), dtype=np.int64)


def min_edit_distance(queries: list[str], choices: list[str], workers: int = -1,
                      max_cells: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the choice at minimum Levenshtein distance.

    Ties go to the smallest length difference, then to the earliest choice in `choices`.
    Exact and fast: choices are bucketed by length and scanned in order of growing length
    difference |Δ|; since distance >= |Δ|, a query stops as soon as its best distance is
    <= the next |Δ|. Distances are computed by rapidfuzz (C++, bit-parallel) with `workers`
    threads and a score cutoff at the best distance so far.

    Args:
        queries: [Q] non-empty strings.
        choices: [C] non-empty strings, in tie-break order.
        workers: Threads for rapidfuzz (-1 = all cores).
        max_cells: Largest distance matrix computed at once (memory bound).

    Returns:
        (index int64 [Q] into `choices`, distance int32 [Q]); -1 / large where `choices` is empty.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    Q = len(queries)
    best_i = np.full(Q, -1, dtype=np.int64)
    best_d = np.full(Q, np.iinfo(np.int32).max, dtype=np.int64)
    best_lvl = np.full(Q, -1, dtype=np.int64)  # the |Δ| at which the best was found
    if Q == 0 or not choices:
        return best_i, best_d.astype(np.int32)
    qlen = np.fromiter((len(q) for q in queries), dtype=np.int64, count=Q)
    clen = np.fromiter((len(c) for c in choices), dtype=np.int64, count=len(choices))
    max_len = int(max(qlen.max(), clen.max()))
    buckets = [np.flatnonzero(clen == n) for n in range(max_len + 1)]
    bucket_str: dict[int, list[str]] = {}
    for L in np.unique(qlen):
        active = np.flatnonzero(qlen == L)
        delta = 0
        while len(active) and (L - delta >= 0 or L + delta <= max_len):
            # Both lengths L - delta and L + delta have the same |Δ|: ties between them go to the
            # earlier choice, so each is scanned on its own and the results merged by position.
            for n in {L + delta, L - delta}:
                if not (0 <= n <= max_len) or not len(buckets[n]):
                    continue
                cand = buckets[n]
                if n not in bucket_str:
                    bucket_str[n] = [choices[j] for j in cand]
                step = max(1, max_cells // len(cand))
                for s in range(0, len(active), step):
                    rows = active[s:s + step]
                    worst = int(best_d[rows].max())
                    cutoff = None if worst >= np.iinfo(np.int32).max else worst
                    D = process.cdist([queries[q] for q in rows], bucket_str[n], scorer=Levenshtein.distance,
                                      dtype=np.int32, workers=workers, score_cutoff=cutoff)
                    a = D.argmin(axis=1)  # first minimum = earliest choice in this bucket
                    m = D[np.arange(len(rows)), a].astype(np.int64)
                    c = cand[a]
                    # Strictly better distance, or (same |Δ| bucket pair) equal distance and earlier choice.
                    better = (m < best_d[rows]) | ((m == best_d[rows]) & (delta > 0) & (c < best_i[rows])
                                                   & (best_lvl[rows] == delta))
                    best_d[rows[better]] = m[better]
                    best_i[rows[better]] = c[better]
                    best_lvl[rows[better]] = delta
            # Remaining choices are at |Δ| >= delta + 1, hence at distance >= delta + 1.
            active = active[best_d[active] > delta + 1]
            delta += 1
    return best_i, best_d.astype(np.int32)


def _roles(src_tok, tgt_tok, src: TokenTable, tgt: TokenTable, tgt_id: np.ndarray, how: np.ndarray) -> None:
    for attr in ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id"):
        s, t = getattr(src_tok, attr, None), getattr(tgt_tok, attr, None)
        if s is None or t is None or not (0 <= s < len(src)) or not (0 <= t < len(tgt)):
            continue
        if src.kind[s] == SPECIAL and how[s] == UNMAPPED:
            tgt_id[s], how[s] = t, SPECIAL_HOW


# -- methods -------------------------------------------------------------------------------------
@METHODS.register("exact")
def _exact(src_tok, tgt_tok, src: TokenTable, tgt: TokenTable, tgt_id, how, workers: int) -> None:
    """Exact byte matches only (done before every method)."""


@METHODS.register("mined")
def _mined(src_tok, tgt_tok, src: TokenTable, tgt: TokenTable, tgt_id, how, workers: int) -> None:
    todo = np.flatnonzero((how == UNMAPPED) & (src.kind != SPECIAL))
    todo = np.array([i for i in todo if src.texts[i]], dtype=np.int64)
    cands = candidate_order(tgt)
    idx, _ = min_edit_distance([src.texts[i] for i in todo], [tgt.texts[j] for j in cands], workers)
    ok = idx >= 0
    tgt_id[todo[ok]] = cands[idx[ok]]
    how[todo[ok]] = MINED


def _mid_text_first_tokens(tgt_tok, texts: list[str], special: np.ndarray) -> list[int]:
    """First target token of each text as the tokenizer would split it in running text (-1 if none)."""
    backend = tgt_tok.backend_tokenizer
    ctx = "\n"
    ctx_ids = backend.encode(ctx, add_special_tokens=False).ids
    with_ctx = backend.encode_batch([ctx + t for t in texts], add_special_tokens=False)
    out, retry = [], []
    for n, e in enumerate(with_ctx):
        ids = e.ids
        if ids[:len(ctx_ids)] == ctx_ids and len(ids) > len(ctx_ids):
            out.append(ids[len(ctx_ids)])
        else:  # the text merged into the context: encode it alone
            out.append(-1)
            retry.append(n)
    if retry:
        alone = backend.encode_batch([texts[n] for n in retry], add_special_tokens=False)
        for n, e in zip(retry, alone, strict=True):
            out[n] = e.ids[0] if e.ids else -1
    return [i if 0 <= i < len(special) and not special[i] else -1 for i in out]


@METHODS.register("retokenize")
def _retokenize(src_tok, tgt_tok, src: TokenTable, tgt: TokenTable, tgt_id, how, workers: int) -> None:
    todo = [i for i in np.flatnonzero((how == UNMAPPED) & (src.kind != SPECIAL)) if src.bytes[i]]
    valid, partial = [], []
    for i in todo:
        try:
            valid.append((i, src.bytes[i].decode("utf-8")))
        except UnicodeDecodeError:
            partial.append(i)
    if valid:
        firsts = _mid_text_first_tokens(tgt_tok, [t for _, t in valid], tgt.special)
        for (i, _), j in zip(valid, firsts, strict=True):
            if j >= 0:
                tgt_id[i], how[i] = j, RETOKENIZE
    index = target_index(tgt)
    for i in partial:
        b = src.bytes[i]
        for n in range(len(b), 0, -1):
            j = index.get(b[:n])
            if j is not None:
                tgt_id[i], how[i] = j, RETOKENIZE
                break


# -- the pure entry point ------------------------------------------------------------------------
def map_vocab(src_tok, tgt_tok, method: str = "retokenize", workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Map every source token id to a target token id.

    Args:
        src_tok: Source fast tokenizer (vocabulary size V_src).
        tgt_tok: Target fast tokenizer.
        method: A name in `METHODS` (`exact`, `mined`, `retokenize`).
        workers: Threads for `mined` (-1 = all cores).

    Returns:
        (tgt_id int32 [V_src], -1 = unmapped; how int8 [V_src]: 0 unmapped, 1 exact, 2 mined,
        3 retokenize, 4 special). Target ids are the target tokenizer's (< `len(tgt_tok)`), never
        a padded output id of a target model wider than its tokenizer.
    """
    fn = METHODS.get(method)
    src, tgt = token_table(src_tok), token_table(tgt_tok)
    tgt_id = np.full(len(src), -1, dtype=np.int32)
    how = np.zeros(len(src), dtype=np.int8)
    _roles(src_tok, tgt_tok, src, tgt, tgt_id, how)
    index = target_index(tgt)
    byte_index = target_index(tgt, kind=BYTE)
    for i, b in enumerate(src.bytes):
        if how[i] == UNMAPPED and b and src.kind[i] != SPECIAL:
            # A byte-fallback token maps to a byte-fallback token when there is one (identity
            # for identical tokenizers), an ordinary token to an ordinary one.
            j = byte_index.get(b) if src.kind[i] == BYTE else None
            j = index.get(b) if j is None else j
            if j is not None:
                tgt_id[i], how[i] = j, EXACT
    fn(src_tok, tgt_tok, src, tgt, tgt_id, how, workers)
    return tgt_id, how


def coverage(how: np.ndarray) -> dict[str, float]:
    """Fraction of the source vocabulary mapped by each `how`."""
    n = max(len(how), 1)
    return {name: round(float(np.sum(how == k)) / n, 6) for k, name in HOW_NAMES.items()}


# -- the stage -----------------------------------------------------------------------------------
class VocabMapStage(Stage):
    """`vocab_map/<source>`: each source token id's target id, and how it was matched.

    Its hash covers both tokenizers (their files' contents) and the method; it has no input
    artifact. Its one "shard" is `map.npz`.
    """

    kind = "vocab_map"

    def __init__(self, cfg, source_name: str):
        super().__init__(f"vocab_map/{source_name}")
        self.cfg, self.source_name = cfg, source_name
        self.src = cfg.model(source_name)

    def config_hash(self) -> str:
        from lmfuse.fingerprint import model_fingerprint

        src, tgt = self.src, self.cfg.target
        return hash_obj(["vocab_map", [src.path, src.revision, model_fingerprint(src, tokenizer_only=True)],
                         [tgt.path, tgt.revision, model_fingerprint(tgt, tokenizer_only=True)],
                         self.cfg.vocab_map.model_dump(exclude={"workers"})])

    def shard_done(self, b: Build, i: int) -> bool:
        return (b.art.path / "map.npz").exists()

    def write(self, b: Build, todo: list[int]):
        from lmfuse.models import load_tokenizer

        src_tok, tgt_tok = load_tokenizer(self.src), load_tokenizer(self.cfg.target)
        t0 = time.time()
        tgt_id, how = map_vocab(src_tok, tgt_tok, self.cfg.vocab_map.method, self.cfg.vocab_map.workers)
        b.state.update(seconds=time.time() - t0)
        buf = io.BytesIO()
        np.savez(buf, tgt_id=tgt_id, how=how)
        atomic_write_bytes(b.art.path / "map.npz", buf.getvalue())
        return iter(())

    def summary(self, b: Build, stats: list[dict]) -> dict:
        from lmfuse.models import load_tokenizer

        src_tok, tgt_tok = load_tokenizer(self.src), load_tokenizer(self.cfg.target)
        with np.load(b.art.path / "map.npz") as z:
            how = z["how"]
        return dict(
            source=self.source_name, target=self.cfg.target.name, method=self.cfg.vocab_map.method,
            source_fingerprint=token_table(src_tok).fingerprint, target_fingerprint=token_table(tgt_tok).fingerprint,
            source_vocab_size=len(src_tok), target_vocab_size=len(tgt_tok), coverage=coverage(how),
            map_seconds=round(b.state.get("seconds", 0.0), 3),
        )

    def after_finish(self, b: Build, manifest: dict) -> None:
        b.log(f"vocab-map {self.source_name} -> {self.cfg.target.name} ({self.cfg.vocab_map.method}): "
              + ", ".join(f"{k} {v:.1%}" for k, v in manifest["coverage"].items() if v) + f" -> {b.art.path}")


def check_fingerprints(manifest: dict, source_fingerprint: str, target_fingerprint: str, where: str) -> None:
    """Refuse a vocab map made for other tokenizers."""
    for role, have in (("source", source_fingerprint), ("target", target_fingerprint)):
        made = manifest.get(f"{role}_fingerprint")
        if made != have:
            raise LmfuseError(
                f"the vocab map was made for another {role} tokenizer (fingerprint {made}, "
                f"the {role} tokenizer now has {have})",
                where=where, fix="rerun `lmfuse vocab-map` with --overwrite (or delete the directory)")


def load_vocab_map(cfg, source_name: str, source_fingerprint: str | None = None,
                   target_fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read `vocab_map/<source>` and check it was made for these tokenizers.

    Fingerprints not given are computed by loading the tokenizers. A map onto ids past the
    target tokenizer (which stand for no text) is refused.

    Returns:
        (tgt_id int32 [V_src], how int8 [V_src], manifest).
    """
    from lmfuse.models import load_tokenizer, tokenizer_fingerprint

    path = cfg.run_dir / "vocab_map" / source_name
    manifest = read_manifest(path)
    if manifest is None or not (path / "map.npz").exists():
        raise LmfuseError(f"no complete vocab map for source {source_name!r}", where=str(path),
                          fix="run `lmfuse vocab-map` first (or `lmfuse run CONFIG`)")
    if source_fingerprint is None:
        source_fingerprint = tokenizer_fingerprint(load_tokenizer(cfg.model(source_name)))
    if target_fingerprint is None:
        target_fingerprint = tokenizer_fingerprint(load_tokenizer(cfg.target))
    check_fingerprints(manifest, source_fingerprint, target_fingerprint, str(path))
    with np.load(path / "map.npz") as z:
        tgt_id, how = z["tgt_id"].astype(np.int32), z["how"].astype(np.int8)
    if len(tgt_id) != manifest.get("source_vocab_size", len(tgt_id)):
        raise LmfuseError("map.npz does not match its manifest", where=str(path),
                          fix="rerun `lmfuse vocab-map` with --overwrite")
    n_tgt = manifest.get("target_vocab_size")
    if n_tgt is not None and len(tgt_id) and int(tgt_id.max()) >= int(n_tgt):
        raise LmfuseError(f"map.npz maps onto target id {int(tgt_id.max())}, outside the target's vocabulary "
                          f"(size {n_tgt})", where=str(path), fix="rerun `lmfuse vocab-map` with --overwrite")
    return tgt_id, how, manifest
