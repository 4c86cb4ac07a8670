"""`align`: bring one source's distributions into the target's positions and vocabulary.

Two methods (registry `METHODS`) give, for every target position, the source position whose
distribution it takes (or -1):

- `offsets` (**beyond**, the default): exact and linear. Target position i and source position
  j are aligned when both tokens end at the same character and that end is a real token
  boundary: the next token does not start before it. (Byte-level BPE and byte-fallback
  tokenizers split one multi-byte character into several tokens that all carry the
  character's offsets; only the last of them ends at the character's end.) When several
  source positions end at the same place (BOS and a zero-width token), the last one is used:
  it is the one whose next token starts there.
- `dtw` (the paper's): dynamic time warping over the two token-text sequences with the
  Levenshtein distance as cost; a target position matched to exactly one source position
  takes it. Banded and compiled with numba; with a band covering the whole matrix it returns
  exactly what the paper's reference code (a Python double loop) returns, ties included.

The source's top-k ids are then mapped into the target vocabulary (`map_topk`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numba import njit

from lmfuse.artifacts import ArtifactDir, atomic_write_json, hash_obj, read_json, read_manifest
from lmfuse.errors import LmfuseError
from lmfuse.extract import dist_arrays, list_array
from lmfuse.registry import Registry

SCHEMA = pa.schema([
    ("block_id", pa.int64()),
    ("aligned", pa.list_(pa.uint8())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float16())),
    ("token_ce", pa.list_(pa.float32())),
    ("span_nll", pa.list_(pa.float32())),
    ("seq_ce", pa.float32()),
    ("nll_per_byte", pa.float32()),
])


# -- offsets ------------------------------------------------------------------------------------
def boundary_ends(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Each token's end offset where it ends at a real boundary, else -1.

    A token ends at a boundary when the next token does not start before its end (the last
    token always does). Tokens that hold part of a multi-byte character share its offsets,
    so all but the last of them fail this test.

    Args:
        start: int [T] character start offsets.
        end: int [T] character end offsets (non-decreasing).

    Returns:
        int64 [T].
    """
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    ok = np.ones(len(end), dtype=bool)
    if len(end) > 1:
        ok[:-1] = start[1:] >= end[:-1]
    return np.where(ok, end, -1)


def align_offsets(tgt_end: np.ndarray, src_end: np.ndarray) -> np.ndarray:
    """Source position for each target position whose end offsets coincide.

    Negative ends (see `boundary_ends`) never align. Among source positions with the same
    end the last one is taken. Both lists are sorted, so this is a merge (done here as a
    vectorized binary search).

    Args:
        tgt_end: int [T] target end offsets, non-decreasing apart from -1 entries.
        src_end: int [S] source end offsets, non-decreasing apart from -1 entries.

    Returns:
        int64 [T] source index or -1.
    """
    tgt_end = np.asarray(tgt_end, dtype=np.int64)
    src_end = np.asarray(src_end, dtype=np.int64)
    out = np.full(len(tgt_end), -1, dtype=np.int64)
    keep = np.flatnonzero(src_end >= 0)
    if not len(keep) or not len(tgt_end):
        return out
    ends = src_end[keep]
    pos = np.searchsorted(ends, tgt_end, side="right") - 1  # last source end <= target end
    hit = (pos >= 0) & (tgt_end >= 0)
    hit[hit] = ends[pos[hit]] == tgt_end[hit]
    out[hit] = keep[pos[hit]]
    return out


# -- dtw ----------------------------------------------------------------------------------------
def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token texts as flat code points + offsets, for the compiled kernels.

    Returns:
        (code points int32 [N], offsets int64 [len(texts) + 1]).
    """
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    off = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    cp = np.frombuffer("".join(texts).encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return cp.astype(np.int32), off


@njit(cache=True, nogil=True)
def _levenshtein(a, a0, a1, b, b0, b1, buf):
    n, m = a1 - a0, b1 - b0
    if n == 0:
        return m
    if m == 0:
        return n
    for j in range(m + 1):
        buf[j] = j
    for i in range(1, n + 1):
        prev = buf[0]
        buf[0] = i
        ai = a[a0 + i - 1]
        for j in range(1, m + 1):
            cur = buf[j]
            v = prev + (0 if ai == b[b0 + j - 1] else 1)
            if cur + 1 < v:
                v = cur + 1
            if buf[j - 1] + 1 < v:
                v = buf[j - 1] + 1
            buf[j] = v
            prev = cur
    return buf[m]


@njit(cache=True, nogil=True)
def _dtw_kernel(s_cp, s_off, t_cp, t_off, w):
    S, T = len(s_off) - 1, len(t_off) - 1
    out = np.full(T, -1, dtype=np.int64)
    if S == 0 or T == 0:
        return out
    lo = np.empty(S, dtype=np.int64)
    hi = np.empty(S, dtype=np.int64)
    for i in range(S):
        c = 0 if S == 1 else (2 * i * (T - 1) + (S - 1)) // (2 * (S - 1))  # round(i * (T-1) / (S-1))
        lo[i] = max(0, c - w)
        hi[i] = min(T - 1, c + w)
    W = min(2 * w + 1, T)
    inf = np.inf
    D = np.full((S, W), inf)
    maxlen = 0
    for i in range(T):
        maxlen = max(maxlen, t_off[i + 1] - t_off[i])
    buf = np.empty(maxlen + 1, dtype=np.int64)
    for i in range(S):
        for j in range(lo[i], hi[i] + 1):
            cost = _levenshtein(s_cp, s_off[i], s_off[i + 1], t_cp, t_off[j], t_off[j + 1], buf)
            if i == 0 and j == 0:
                best = 0.0
            else:
                best = inf
                if i > 0 and lo[i - 1] <= j <= hi[i - 1]:
                    best = min(best, D[i - 1, j - lo[i - 1]])
                if j > lo[i]:
                    best = min(best, D[i, j - 1 - lo[i]])
                if i > 0 and j > 0 and lo[i - 1] <= j - 1 <= hi[i - 1]:
                    best = min(best, D[i - 1, j - 1 - lo[i - 1]])
            D[i, j - lo[i]] = cost + best
    # Backtrack as the paper's reference code does: first minimum of (diagonal, up, left).
    cnt = np.zeros(T, dtype=np.int64)
    i, j = S - 1, T - 1
    while i > 0 or j > 0:
        cnt[j] += 1
        out[j] = i
        diag = D[i - 1, j - 1 - lo[i - 1]] if (i > 0 and j > 0 and lo[i - 1] <= j - 1 <= hi[i - 1]) else inf
        up = D[i - 1, j - lo[i - 1]] if (i > 0 and lo[i - 1] <= j <= hi[i - 1]) else inf
        left = D[i, j - 1 - lo[i]] if (j > 0 and j - 1 >= lo[i]) else inf
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    cnt[0] += 1
    out[0] = 0
    for t in range(T):
        if cnt[t] != 1:
            out[t] = -1
    return out


def align_dtw(tgt_texts: list[str], src_texts: list[str], band: int = 64) -> np.ndarray:
    """The paper's DTW alignment of two token-text sequences, banded.

    Rows are source tokens, columns target tokens; cell (i, j) may be used only when j lies
    within `band` of the diagonal's column for row i (widened to at least ceil(T/S) + 1 so a
    path always exists). `band <= 0` means no band.

    Args:
        tgt_texts: [T] target token texts.
        src_texts: [S] source token texts.
        band: Band half-width in target positions.

    Returns:
        int64 [T]: the source index matched to each target position when it is matched to
        exactly one, else -1.
    """
    S, T = len(src_texts), len(tgt_texts)
    if S == 0 or T == 0:
        return np.full(T, -1, dtype=np.int64)
    w = T if band <= 0 else min(T, max(int(band), -(-T // S) + 1))
    s_cp, s_off = encode_texts(src_texts)
    t_cp, t_off = encode_texts(tgt_texts)
    return _dtw_kernel(s_cp, s_off, t_cp, t_off, w)


# -- top-k mapping ------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _map_topk_kernel(src_ids, src_lp, src_index, vmap, out_ids, out_lp):
    T, k = out_ids.shape
    V = len(vmap)
    ids = np.empty(k, dtype=np.int64)
    lps = np.empty(k, dtype=np.float64)
    for t in range(T):
        s = src_index[t]
        if s < 0:
            continue
        n = 0
        for r in range(src_ids.shape[1]):
            sid = src_ids[s, r]
            lp = src_lp[s, r]
            if sid < 0 or sid >= V or not np.isfinite(lp):
                continue
            tid = vmap[sid]
            if tid < 0:
                continue
            q = 0
            while q < n and ids[q] != tid:
                q += 1
            if q < n:  # duplicate target id: log-sum-exp
                m = max(lps[q], lp)
                lps[q] = m + np.log(np.exp(lps[q] - m) + np.exp(lp - m))
            else:
                ids[n] = tid
                lps[n] = lp
                n += 1
        # Insertion sort: log-prob descending, then id ascending.
        for a in range(1, n):
            ci, cl = ids[a], lps[a]
            b = a - 1
            while b >= 0 and (lps[b] < cl or (lps[b] == cl and ids[b] > ci)):
                ids[b + 1] = ids[b]
                lps[b + 1] = lps[b]
                b -= 1
            ids[b + 1] = ci
            lps[b + 1] = cl
        for a in range(n):
            out_ids[t, a] = ids[a]
            out_lp[t, a] = lps[a]


def map_topk(src_ids: np.ndarray, src_logprobs: np.ndarray, src_index: np.ndarray,
             vocab_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source top-k rows, taken at the aligned positions and mapped into the target vocabulary.

    Unmapped ids are dropped; ids that map to the same target id are merged by log-sum-exp;
    rows are sorted by log-prob (descending, then id) and padded with -1 / -inf.

    Args:
        src_ids: int32 [S, k] source top-k ids (-1 = padding).
        src_logprobs: float16/float32 [S, k] their log-probs.
        src_index: int [T] source position for each target position, -1 = none.
        vocab_map: int32 [V_src] source id -> target id, -1 = unmapped.

    Returns:
        (ids int32 [T, k], logprobs float16 [T, k]); rows with `src_index` -1 are all padding.
    """
    src_ids = np.ascontiguousarray(src_ids, dtype=np.int64)
    src_lp = np.ascontiguousarray(src_logprobs, dtype=np.float64)
    src_index = np.ascontiguousarray(src_index, dtype=np.int64)
    k = src_ids.shape[1] if src_ids.ndim == 2 else 0
    out_ids = np.full((len(src_index), k), -1, dtype=np.int64)
    out_lp = np.full((len(src_index), k), -np.inf, dtype=np.float64)
    if k and len(src_index):
        _map_topk_kernel(src_ids, src_lp, src_index, np.ascontiguousarray(vocab_map, dtype=np.int64),
                         out_ids, out_lp)
    return out_ids.astype(np.int32), out_lp.astype(np.float16)


# -- per-position source quality ----------------------------------------------------------------
def span_nll(tgt_end: np.ndarray, src_end: np.ndarray, src_token_ce: np.ndarray) -> np.ndarray:
    """NLL the source gives to the text of each next target token.

    `span_nll[i]` sums the source's NLL of the source tokens whose end offset lies in
    `(tgt_end[i], tgt_end[i+1]]`. Source token m's NLL is `src_token_ce[m-1]`; the source's
    first token is never scored, so a span that contains it is NaN.

    Args:
        tgt_end: int [T] target end offsets (non-decreasing).
        src_end: int [S] source end offsets (non-decreasing).
        src_token_ce: float [S-1] source per-token CE.

    Returns:
        float32 [T-1].
    """
    tgt_end = np.asarray(tgt_end, dtype=np.int64)
    src_end = np.asarray(src_end, dtype=np.int64)
    T = len(tgt_end)
    if T < 2:
        return np.zeros(0, dtype=np.float32)
    nll = np.zeros(len(src_end), dtype=np.float64)
    nll[1:] = np.asarray(src_token_ce, dtype=np.float64)[: max(len(src_end) - 1, 0)]
    cum = np.concatenate([[0.0], np.cumsum(nll)])
    lo = np.searchsorted(src_end, tgt_end[:-1], side="right")
    hi = np.searchsorted(src_end, tgt_end[1:], side="right")
    out = cum[hi] - cum[lo]
    out[(lo == 0) & (hi > 0)] = np.nan
    return out.astype(np.float32)


def aligned_token_ce(src_index: np.ndarray, src_token_ce: np.ndarray) -> np.ndarray:
    """The source's CE at the aligned source position of each target position (NaN if none).

    Args:
        src_index: int [T] source index per target position, -1 = none.
        src_token_ce: float [S-1].

    Returns:
        float32 [T-1].
    """
    idx = np.asarray(src_index, dtype=np.int64)[:-1]
    ce = np.asarray(src_token_ce, dtype=np.float32)
    ok = (idx >= 0) & (idx < len(ce))
    out = np.full(len(idx), np.nan, dtype=np.float32)
    out[ok] = ce[idx[ok]]
    return out


# -- methods ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockTokens:
    """One model's tokens of one block (arrays of length T)."""

    ids: np.ndarray
    start: np.ndarray
    end: np.ndarray


@dataclass(frozen=True)
class AlignContext:
    """What the methods may need beside the two blocks."""

    tgt_texts: list[str] | None = None
    src_texts: list[str] | None = None
    band: int = 64


AlignFn = Callable[[BlockTokens, BlockTokens, AlignContext], np.ndarray]
METHODS: Registry[AlignFn] = Registry("align method")


@METHODS.register("offsets")
def _offsets(tgt: BlockTokens, src: BlockTokens, ctx: AlignContext) -> np.ndarray:
    return align_offsets(boundary_ends(tgt.start, tgt.end), boundary_ends(src.start, src.end))


@METHODS.register("dtw")
def _dtw(tgt: BlockTokens, src: BlockTokens, ctx: AlignContext) -> np.ndarray:
    if ctx.tgt_texts is None or ctx.src_texts is None:
        raise LmfuseError("the `dtw` align method needs both tokenizers' token texts")
    return align_dtw([ctx.tgt_texts[i] for i in tgt.ids], [ctx.src_texts[i] for i in src.ids], ctx.band)


METHODS_NEEDING_TEXTS = {"dtw"}


def align_block(method: str, tgt: BlockTokens, src: BlockTokens, src_topk_ids: np.ndarray,
                src_topk_logprobs: np.ndarray, src_token_ce: np.ndarray, vocab_map: np.ndarray,
                ctx: AlignContext, exact: np.ndarray | None = None) -> dict:
    """Align one block: everything `align/<source>` stores for it except block-level scalars.

    Args:
        method: A name in `METHODS`.
        tgt: The target's tokens (T).
        src: The source's tokens (S).
        src_topk_ids: int32 [S, k].
        src_topk_logprobs: float16 [S, k].
        src_token_ce: float32 [S-1].
        vocab_map: int32 [V_src].
        ctx: Method context.
        exact: bool [V_src], source ids whose mapping is exact (same text); for diagnostics.

    Returns:
        dict with `src_index` int64 [T], `aligned` uint8 [T], `topk_ids` int32 [T, k],
        `topk_logprobs` float16 [T, k], `token_ce` float32 [T-1], `span_nll` float32 [T-1],
        and `mass_source`, `mass_mapped`, `mass_exact` (summed probability at aligned positions:
        of the source's top-k, after mapping, and of the top-k ids whose mapping is exact).
    """
    idx = METHODS.get(method)(tgt, src, ctx)
    ids, lps = map_topk(src_topk_ids, src_topk_logprobs, idx, vocab_map)
    rows = idx[idx >= 0]
    src_p = np.exp(src_topk_logprobs[rows].astype(np.float64))
    out_p = np.exp(lps[idx >= 0].astype(np.float64))
    ids_rows = src_topk_ids[rows]
    exact_p = src_p[(ids_rows >= 0) & exact[np.clip(ids_rows, 0, None)]] if exact is not None else src_p[:0]
    return {
        "src_index": idx,
        "aligned": (idx >= 0).astype(np.uint8),
        "topk_ids": ids,
        "topk_logprobs": lps,
        "token_ce": aligned_token_ce(idx, src_token_ce),
        "span_nll": span_nll(tgt.end, src.end, src_token_ce),
        "mass_source": float(np.nansum(src_p)),
        "mass_mapped": float(np.nansum(out_p)),
        "mass_exact": float(np.nansum(exact_p)),
    }


# -- the stage ----------------------------------------------------------------------------------
def artifact(cfg, source_name: str, overwrite: bool = False) -> ArtifactDir:
    """The `align/<source>` artifact; inputs are the two extractions and the vocab map."""
    from lmfuse import extract, vocabmap

    cfg.model(source_name)
    inputs = {
        "extract_target": extract.artifact(cfg, cfg.target.name).config_hash,
        "extract_source": extract.artifact(cfg, source_name).config_hash,
        "vocab_map": vocabmap.artifact(cfg, source_name).config_hash,
    }
    h = hash_obj(["align", cfg.target.name, source_name, cfg.align.model_dump()])
    return ArtifactDir(cfg.run_dir / "align" / source_name, "align", h, inputs, overwrite)


def _check_block(bid: int, text: str, blk: dict, name: str) -> None:
    """Refuse an extraction that was not made from this block text."""
    ends = np.asarray(blk["offset_end"], dtype=np.int64)
    starts = np.asarray(blk["offset_start"], dtype=np.int64)
    where = f"block {bid}, extract/{name}"
    if len(ends) == 0:
        raise LmfuseError("the extraction holds no tokens for this block", where=where,
                          fix="rerun `lmfuse extract` with --overwrite")
    fits = int(ends.max()) <= len(text) and int(starts.min()) >= 0 and bool(np.all(np.diff(ends) >= 0))
    scored = len(text[int(ends[0]):].encode("utf-8")) if fits else -1
    if not fits or scored != int(blk["scored_bytes"]):
        raise LmfuseError(
            "the extraction does not match the block's text (its offsets or scored byte count "
            f"{blk['scored_bytes']} do not fit the {len(text)}-character text of the prepared block)",
            where=where, fix="the blocks changed after extraction: rerun `lmfuse extract` with --overwrite")


def align_shard(method: str, block_ids: list[int], texts: list[str], tgt_rows: list[dict], src_rows: list[dict],
                vocab_map: np.ndarray, k: int, ctx: AlignContext, names: tuple[str, str],
                domains: list[str] | None = None, exact: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """Align the blocks of one shard; returns the table and its diagnostics.

    Args:
        tgt_rows, src_rows: per block, the extraction's columns (ARCHITECTURE.md) as arrays.
    """
    cols: dict[str, list] = {c: [] for c in SCHEMA.names}
    stats = {"positions": 0, "aligned": 0, "mass_source": 0.0, "mass_mapped": 0.0, "mass_exact": 0.0, "domains": {}}
    for r, bid in enumerate(block_ids):
        tb, sb = tgt_rows[r], src_rows[r]
        for blk, name in ((tb, names[0]), (sb, names[1])):
            if int(blk["block_id"]) != int(bid):
                raise LmfuseError(f"extract/{name} holds block {blk['block_id']} where block {bid} belongs",
                                  where=f"extract/{name}", fix="rerun `lmfuse extract` with --overwrite")
            _check_block(int(bid), texts[r], blk, name)
        tgt = BlockTokens(np.asarray(tb["input_ids"], np.int64), np.asarray(tb["offset_start"], np.int64),
                          np.asarray(tb["offset_end"], np.int64))
        src = BlockTokens(np.asarray(sb["input_ids"], np.int64), np.asarray(sb["offset_start"], np.int64),
                          np.asarray(sb["offset_end"], np.int64))
        S = len(src.ids)
        topk_ids, topk_lp = dist_arrays(sb, S)
        ce = np.asarray(sb["token_ce"], np.float32)
        res = align_block(method, tgt, src, topk_ids, topk_lp, ce, vocab_map, ctx, exact)
        cols["block_id"].append(int(bid))
        cols["aligned"].append(res["aligned"])
        cols["topk_ids"].append(res["topk_ids"].reshape(-1))
        cols["topk_logprobs"].append(res["topk_logprobs"].reshape(-1))
        cols["token_ce"].append(res["token_ce"])
        cols["span_nll"].append(res["span_nll"])
        cols["seq_ce"].append(float(sb["seq_ce"]))
        cols["nll_per_byte"].append(float(sb["nll_sum"]) / max(int(sb["scored_bytes"]), 1))
        n_al = int(res["aligned"].sum())
        stats["positions"] += len(tgt.ids)
        stats["aligned"] += n_al
        stats["mass_source"] += res["mass_source"]
        stats["mass_mapped"] += res["mass_mapped"]
        stats["mass_exact"] += res["mass_exact"]
        if domains is not None:
            d = stats["domains"].setdefault(domains[r], [0, 0])
            d[0] += len(tgt.ids)
            d[1] += n_al
    table = pa.table({
        "block_id": pa.array(cols["block_id"], pa.int64()),
        "aligned": list_array(cols["aligned"], pa.uint8()),
        "topk_ids": list_array(cols["topk_ids"], pa.int32()),
        "topk_logprobs": list_array(cols["topk_logprobs"], pa.float16()),
        "token_ce": list_array(cols["token_ce"], pa.float32()),
        "span_nll": list_array(cols["span_nll"], pa.float32()),
        "seq_ce": pa.array(cols["seq_ce"], pa.float32()),
        "nll_per_byte": pa.array(cols["nll_per_byte"], pa.float32()),
    }, schema=SCHEMA)
    return table, stats


def read_shard_rows(path) -> list[dict]:
    """One extraction shard as a list of per-block dicts of numpy arrays (no Python lists)."""
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as src:
        table = ipc.open_stream(src).read_all()
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)
            cols[name] = (values, offsets)
        else:
            cols[name] = col.to_numpy(zero_copy_only=False)
    rows = []
    for r in range(table.num_rows):
        row = {}
        for name, c in cols.items():
            if isinstance(c, tuple):
                row[name] = c[0][c[1][r]:c[1][r + 1]]
            else:
                row[name] = c[r]
        rows.append(row)
    return rows


def _complete_extract(cfg, name: str):
    from lmfuse import extract

    art = extract.artifact(cfg, name)
    state = art.state()
    if state != "complete":
        raise LmfuseError(f"the extraction of model {name!r} is {state}", where=str(art.path),
                          fix=f"run `lmfuse extract` for {name} first (or `lmfuse run CONFIG`)")
    return art, read_manifest(art.path)


def check_extractions(tgt_manifest: dict, src_manifest: dict, tgt_name: str, src_name: str) -> None:
    """Refuse two extractions made from different block sets or shard layouts."""
    problems = []
    if tgt_manifest.get("inputs", {}).get("prepare") != src_manifest.get("inputs", {}).get("prepare"):
        problems.append(f"they were made from different prepared blocks (prepare hash "
                        f"{tgt_manifest.get('inputs', {}).get('prepare')} vs {src_manifest.get('inputs', {}).get('prepare')})")
    for key in ("n_blocks", "shard_size", "n_shards"):
        if tgt_manifest.get(key) != src_manifest.get(key):
            problems.append(f"{key} differs ({tgt_manifest.get(key)} vs {src_manifest.get(key)})")
    if problems:
        raise LmfuseError(f"extract/{tgt_name} and extract/{src_name} do not cover the same blocks: "
                          + "; ".join(problems), where=f"extract/{tgt_name}, extract/{src_name}",
                          fix="rerun `lmfuse extract` for both models on the current blocks (--overwrite)")


def run_align(cfg, source_name: str, overwrite: bool = False, log=print) -> dict:
    """Align one source's extraction to the target's (resumable, data-parallel by shard)."""
    from lmfuse import prepare, vocabmap
    from lmfuse.models import load_tokenizer
    from lmfuse.parallel import barrier, is_main, my_shards
    from lmfuse.tokentext import token_table

    art = artifact(cfg, source_name, overwrite)
    if art.is_complete():
        return read_manifest(art.path)
    tname = cfg.target.name
    tgt_art, tgt_man = _complete_extract(cfg, tname)
    src_art, src_man = _complete_extract(cfg, source_name)
    check_extractions(tgt_man, src_man, tname, source_name)
    vmap, how, _ = vocabmap.load_vocab_map(cfg, source_name, src_man.get("tokenizer_fingerprint"),
                                         tgt_man.get("tokenizer_fingerprint"))
    exact = np.isin(how, (vocabmap.EXACT, vocabmap.SPECIAL_HOW))
    method = cfg.align.method
    METHODS.get(method)
    ctx = AlignContext(band=cfg.align.dtw_band)
    if method in METHODS_NEEDING_TEXTS:
        ctx = AlignContext(token_table(load_tokenizer(cfg.target)).texts,
                           token_table(load_tokenizer(cfg.model(source_name))).texts, cfg.align.dtw_band)
    blocks = prepare.artifact(cfg).load()
    k = int(src_man["top_k"])
    n_shards, S = int(src_man["n_shards"]), int(src_man["shard_size"])
    if is_main():
        art.begin()
    barrier()
    stats_dir = art.path / "stats"
    t0 = time.time()
    for i in my_shards(n_shards):
        if art.shard_done(i) and (stats_dir / f"stats-{i:05d}.json").exists():
            continue
        rows = blocks[i * S: (i + 1) * S]
        tgt_rows, src_rows = read_shard_rows(tgt_art.shard_path(i)), read_shard_rows(src_art.shard_path(i))
        for rws, name in ((tgt_rows, tname), (src_rows, source_name)):
            if len(rws) != len(rows["block_id"]):
                raise LmfuseError(f"shard {i} of extract/{name} holds {len(rws)} blocks, "
                                  f"the prepared blocks {len(rows['block_id'])}", where=f"extract/{name}",
                                  fix="rerun `lmfuse extract` with --overwrite")
        table, stats = align_shard(method, rows["block_id"], rows["text"], tgt_rows, src_rows, vmap, k, ctx,
                                   (tname, source_name), rows["domain"], exact)
        # Stats first, shard last: a shard file on disk always has its stats.
        atomic_write_json(stats_dir / f"stats-{i:05d}.json", stats)
        art.write_shard(i, table)
    barrier()
    if not is_main():
        return {}
    missing = [i for i in range(n_shards) if not art.shard_done(i)]
    if missing:
        raise LmfuseError(f"shards {missing[:5]} of align/{source_name} are missing after the run",
                          where=str(art.path), fix="rerun the same command: it resumes")
    total = {"positions": 0, "aligned": 0, "mass_source": 0.0, "mass_mapped": 0.0, "mass_exact": 0.0}
    domains: dict[str, list[int]] = {}
    for i in range(n_shards):
        st = read_json(stats_dir / f"stats-{i:05d}.json") or {}
        for key in total:
            total[key] += st.get(key, 0)
        for d, (n, a) in st.get("domains", {}).items():
            acc = domains.setdefault(d, [0, 0])
            acc[0] += n
            acc[1] += a
    aligned_fraction = total["aligned"] / max(total["positions"], 1)
    mass_fraction = total["mass_mapped"] / total["mass_source"] if total["mass_source"] else math.nan
    exact_fraction = total["mass_exact"] / total["mass_source"] if total["mass_source"] else math.nan
    manifest = art.finish(
        source=source_name, target=tname, method=method, top_k=k, shard_size=S, n_shards=n_shards,
        n_blocks=len(blocks), target_positions=total["positions"], aligned_positions=total["aligned"],
        aligned_fraction=round(aligned_fraction, 6), mapped_mass_fraction=round(mass_fraction, 6),
        exact_mass_fraction=round(exact_fraction, 6),
        aligned_fraction_per_domain={d: round(a / max(n, 1), 6) for d, (n, a) in sorted(domains.items())},
        align_seconds=round(time.time() - t0, 3),
    )
    log(f"align {source_name} -> {tname} ({method}): {aligned_fraction:.1%} of target positions aligned, "
        f"{mass_fraction:.1%} of the aligned top-{k} probability mass mapped ({exact_fraction:.1%} exactly) "
        f"-> {art.path}")
    log("  per domain: " + json.dumps(manifest["aligned_fraction_per_domain"]))
    return manifest
