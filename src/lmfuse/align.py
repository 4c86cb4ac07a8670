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

The source's top-k ids are then mapped into the target vocabulary (`map_topk`). A stored id
the source tokenizer does not know (a padded output id of a model wider than its tokenizer,
in an extraction made before `extract` left them out) is mass on no token: it is dropped like
an id the vocab map leaves unmapped, and counted (`padded_mass`, `padded_candidates`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numba import njit

from lmfuse.artifacts import load_complete, read_manifest
from lmfuse.errors import LmfuseError
from lmfuse.extract import dist_arrays, list_array
from lmfuse.hashing import hash_obj
from lmfuse.registry import Registry
from lmfuse.stage import Build, Stage

SCHEMA = pa.schema([
    ("block_id", pa.int64()),
    ("aligned", pa.list_(pa.uint8())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float16())),
    ("token_ce", pa.list_(pa.float32())),
    ("span_nll", pa.list_(pa.float32())),
    ("span_exact", pa.list_(pa.uint8())),
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


# -- mapping distributions ----------------------------------------------------------------------
# What happened to a stored source entry at an aligned position (`map_topk`'s `branch` output).
KEPT, TO_GOLD, DROPPED_PREFIX, UNMAPPED_ENTRY = 0, 1, 2, 3
# Columns of `map_topk`'s stats for stored ids past the source tokenizer: their mass, their count.
PADDED_STAT, PADDED_COUNT = 5, 6


@njit(cache=True, nogil=True)
def _startswith(a, a0, a1, b, b0, b1):
    """Whether bytes a[a0:a1] start with b[b0:b1] (False when b is longer)."""
    n = b1 - b0
    if n > a1 - a0:
        return False
    for i in range(n):  # noqa: SIM110 (numba compiles loops, not generator expressions)
        if a[a0 + i] != b[b0 + i]:
            return False
    return True


@njit(cache=True, nogil=True)
def _map_kernel(src_ids, src_lp, src_index, vmap, gold, rule, unk_id,
                s_bytes, s_off, t_bytes, t_off, text, tpos, out_ids, out_lp, stats):
    T, k = out_ids.shape
    V = len(vmap)
    has_text = len(t_off) > 1
    ids = np.empty(k, dtype=np.int64)
    lps = np.empty(k, dtype=np.float64)
    for t in range(T):
        s = src_index[t]
        if s < 0:
            continue
        g = gold[t]
        # The gold token's bytes and where they sit in the block text.
        g0 = g1 = 0
        if has_text and g >= 0:
            g0, g1 = t_off[g], t_off[g + 1]
        c0, c1 = tpos[t] if has_text else 0, len(text)
        n = 0
        for r in range(src_ids.shape[1]):
            sid = src_ids[s, r]
            lp = src_lp[s, r]
            if sid < 0 or not np.isfinite(lp):
                continue
            p = np.exp(lp)
            stats[t, 0] += p  # source mass stored
            if sid >= V:
                # An id the source tokenizer does not know (a padded output row) stands for no text:
                # mass on no token, dropped like an unmapped id (it stays outside the stored ids).
                stats[t, 5] += p
                stats[t, 6] += 1
                continue
            tid = vmap[sid]
            # Mapped to a token the target would not write here: a proper, non-empty prefix of the
            # gold token's text (the target tokenizer wrote the longer gold token for this text).
            prefix_of_gold = False
            if has_text and g >= 0 and tid >= 0 and tid != g:
                b0, b1 = t_off[tid], t_off[tid + 1]
                prefix_of_gold = 0 < b1 - b0 < g1 - g0 and _startswith(t_bytes, g0, g1, t_bytes, b0, b1)
            if tid >= 0:
                stats[t, 1] += p  # mapped
                if prefix_of_gold:
                    stats[t, 2] += p  # mapped to a token the target would not write here
            if rule == 1 and has_text and g >= 0:
                a0, a1 = s_off[sid], s_off[sid + 1]
                if sid == unk_id:
                    tid = -1
                elif a1 > a0:
                    # Does the text that follows start with the candidate (as far as the block goes)?
                    m = min(a1 - a0, c1 - c0)
                    if m > 0 and _startswith(text, c0, c1, s_bytes, a0, a0 + m):
                        if tid != g:
                            stats[t, 3] += p  # moved to the gold token
                        tid = g
                    elif prefix_of_gold:
                        stats[t, 4] += p  # dropped: it would need a token the target does not write here
                        tid = -1
            if tid < 0:
                continue
            q = 0
            while q < n and ids[q] != tid:
                q += 1
            if q < n:  # duplicate target id: log-sum-exp
                mx = max(lps[q], lp)
                lps[q] = mx + np.log(np.exp(lps[q] - mx) + np.exp(lp - mx))
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


@dataclass(frozen=True)
class TextContext:
    """What the `consistent` token rule and the tokenization diagnostics need for one block.

    Attributes:
        src_bytes, src_off: source token bytes, flat uint8 [N] + offsets int64 [V_src + 1].
        tgt_bytes, tgt_off: target token bytes, flat uint8 [M] + offsets int64 [V_tgt + 1].
        text: the block's UTF-8 bytes, uint8 [B].
        tpos: int64 [T] byte offset in `text` where the text after target position t starts.
        gold: int64 [T] target gold next token (−1 at the last position).
    """

    src_bytes: np.ndarray
    src_off: np.ndarray
    tgt_bytes: np.ndarray
    tgt_off: np.ndarray
    text: np.ndarray
    tpos: np.ndarray
    gold: np.ndarray


def flat_bytes(tokens: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Token bytes as one flat uint8 array + offsets int64 [V + 1], for the compiled kernels."""
    off = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in tokens], out=off[1:])
    return np.frombuffer(b"".join(tokens), dtype=np.uint8).copy(), off


def char_byte_offsets(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the UTF-8 byte offset of every character offset."""
    cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    n = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(n, out=out[1:])
    return out


def map_topk(src_ids: np.ndarray, src_logprobs: np.ndarray, src_index: np.ndarray,
             vocab_map: np.ndarray, rule: str = "map", text_ctx: TextContext | None = None,
             unk_id: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source distributions, taken at the aligned positions and mapped into the target vocabulary.

    Unmapped ids are dropped; ids that map to the same target id are merged by log-sum-exp;
    rows are sorted by log-prob (descending, then id) and padded with -1 / -inf. Ids past the
    vocab map (padded output ids the source tokenizer does not know) stand for no text: they are
    dropped like unmapped ids (their mass is not renormalised onto the others: it stays outside
    the stored ids, where `train.outside_topk` decides what it becomes) and counted.

    With `rule="consistent"` (needs `text_ctx`), a stored source token whose bytes agree with
    the text that follows (up to the block's end) goes to the gold target token, whatever it
    maps to; otherwise a token mapped to a proper prefix of the gold token's text (a token the
    target tokenizer does not write here) is dropped, and the source's unknown token is dropped.
    See docs/alignment.md for worked examples.

    Args:
        src_ids: int [S, k] source ids (-1 = padding).
        src_logprobs: float16/float32 [S, k] their log-probs.
        src_index: int [T] source position for each target position, -1 = none.
        vocab_map: int32 [V_src] source id -> target id, -1 = unmapped; ids >= V_src are padded.
        rule: "map" or "consistent".
        text_ctx: the block's bytes and token bytes (needed by "consistent" and the diagnostics).
        unk_id: the source's unknown-token id (-1 = none).

    Returns:
        (ids int32 [T, k], logprobs float16 [T, k], stats float64 [T, 7]): rows with
        `src_index` -1 are all padding; stats per position = source mass stored, mass mapped,
        mass mapped to a token the target would not write there (a proper prefix of the gold
        token; 0 without `text_ctx`), mass moved to the gold token, mass dropped by the rule,
        mass and number of stored ids past the vocab map (`PADDED_STAT`, `PADDED_COUNT`).
    """
    if rule not in ("map", "consistent"):
        raise LmfuseError(f"unknown token rule {rule!r}", where="align.token_rule", fix="use 'map' or 'consistent'")
    if rule == "consistent" and text_ctx is None:
        raise LmfuseError("the `consistent` token rule needs the block text and both token tables")
    src_ids = np.ascontiguousarray(src_ids, dtype=np.int64)
    src_lp = np.ascontiguousarray(src_logprobs, dtype=np.float64)
    src_index = np.ascontiguousarray(src_index, dtype=np.int64)
    k = src_ids.shape[1] if src_ids.ndim == 2 else 0
    T = len(src_index)
    out_ids = np.full((T, k), -1, dtype=np.int64)
    out_lp = np.full((T, k), -np.inf, dtype=np.float64)
    stats = np.zeros((T, 7), dtype=np.float64)
    if k and T:
        c = text_ctx
        empty_u8, zero_off = np.zeros(0, np.uint8), np.zeros(1, np.int64)
        _map_kernel(src_ids, src_lp, src_index, np.ascontiguousarray(vocab_map, dtype=np.int64),
                    np.full(T, -1, np.int64) if c is None else np.ascontiguousarray(c.gold, dtype=np.int64),
                    1 if rule == "consistent" else 0, int(unk_id),
                    empty_u8 if c is None else c.src_bytes, zero_off if c is None else c.src_off,
                    empty_u8 if c is None else c.tgt_bytes, zero_off if c is None else c.tgt_off,
                    empty_u8 if c is None else c.text, np.zeros(T, np.int64) if c is None else c.tpos,
                    out_ids, out_lp, stats)
    return out_ids.astype(np.int32), out_lp.astype(np.float16), stats


# -- per-position source quality ----------------------------------------------------------------
def span_nll(tgt_end: np.ndarray, src_end: np.ndarray, src_token_ce: np.ndarray,
             src_unk: np.ndarray | None = None, src_added: np.ndarray | None = None) -> np.ndarray:
    """NLL the source gives to the text of each next target token.

    `span_nll[i]` sums the source's NLL of the source tokens whose end offset lies in
    `(tgt_end[i], tgt_end[i+1]]`. Source token m's NLL is `src_token_ce[m-1]`; the source's
    first token is never scored, and an unknown token's NLL scores text the source never
    predicted, so a span that contains either is NaN. A special token the source's tokenizer
    added (an EOS after the text) is no text: its NLL counts in no span.

    Args:
        tgt_end: int [T] target end offsets (non-decreasing).
        src_end: int [S] source end offsets (non-decreasing).
        src_token_ce: float [S-1] source per-token CE.
        src_unk: bool [S], the source's unknown tokens (None = none).
        src_added: bool [S], the special tokens the source's tokenizer added (`added_special`;
            None = none).

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
    if src_added is not None:
        nll[np.asarray(src_added, dtype=bool)] = 0.0  # not text: predicting it is no NLL of the text
    cum = np.concatenate([[0.0], np.cumsum(nll)])
    lo = np.searchsorted(src_end, tgt_end[:-1], side="right")
    hi = np.searchsorted(src_end, tgt_end[1:], side="right")
    out = cum[hi] - cum[lo]
    out[(lo == 0) & (hi > 0)] = np.nan
    if src_unk is not None and np.any(src_unk):
        n_unk = np.concatenate([[0], np.cumsum(np.asarray(src_unk, dtype=np.int64))])
        out[n_unk[hi] > n_unk[lo]] = np.nan
    return out.astype(np.float32)


def span_exact(tgt_end: np.ndarray, src_bound: np.ndarray) -> np.ndarray:
    """Whether the source scored exactly the text of each next target token.

    True at i when both ends of target token i+1 (`tgt_end[i]` and `tgt_end[i+1]`) are
    source token boundaries: then `span_nll[i]` is the source's NLL of exactly that text.

    Args:
        tgt_end: int [T] target end offsets at real boundaries (`boundary_ends`), -1 elsewhere.
        src_bound: int [S] source end offsets at real boundaries, -1 elsewhere.

    Returns:
        uint8 [T-1].
    """
    hit = align_offsets(tgt_end, src_bound) >= 0
    return (hit[:-1] & hit[1:]).astype(np.uint8)


def sequence_quality(text: str, end: np.ndarray, token_ce: np.ndarray,
                     unk: np.ndarray | None = None, added: np.ndarray | None = None) -> tuple[float, int]:
    """A model's code length of a block, charging the text hidden in unknown tokens.

    Tokens 1..S-1 are scored (token 0 has no context), each covering the text from the
    previous token's end to its own; a special token the tokenizer added (an EOS after the
    text) is not text and is not scored. An unknown token (`[UNK]`, one id for text it cannot
    spell) hides its bytes: its NLL says how likely *some* unknown text was, not this text.
    Dividing by the predicted bytes only would still compare models over different bytes, so
    every byte an unknown token covers is charged ln 256 nats (8 bits, the cost of spelling it
    with a uniform byte model) on top of the token's NLL. Without unknown tokens this is the
    plain NLL over `text[end[0]:]`.

    Args:
        text: the block text.
        end: int [S] character end offsets of the tokens (non-decreasing).
        token_ce: float [S-1] NLL of tokens 1..S-1.
        unk: bool [S] unknown tokens, or None.
        added: bool [S] special tokens the tokenizer added (`added_special`), or None.

    Returns:
        (nll_sum in nats, scored_bytes = UTF-8 bytes of `text[end[0]:]`).
    """
    ce = np.asarray(token_ce, dtype=np.float64)
    end = np.asarray(end, dtype=np.int64)
    nbytes = len(text[int(end[0]):].encode("utf-8", errors="surrogatepass")) if len(end) else 0
    if added is not None and np.any(added[1:]):
        ce = ce[~np.asarray(added[1:len(ce) + 1], dtype=bool)]
    nll = float(ce.sum())
    if unk is not None and len(end) > 1 and np.any(unk[1:]):
        b = char_byte_offsets(text)
        m = np.flatnonzero(np.asarray(unk[1:], dtype=bool)) + 1
        nll += math.log(256.0) * float(np.sum(b[end[m]] - b[end[m - 1]]))
    return nll, nbytes


def aligned_token_ce(src_index: np.ndarray, src_token_ce: np.ndarray,
                     src_added: np.ndarray | None = None) -> np.ndarray:
    """The source's CE at the aligned source position of each target position (NaN if none, or
    where the source's next token is one its tokenizer added: predicting it is no text).

    Args:
        src_index: int [T] source index per target position, -1 = none.
        src_token_ce: float [S-1].
        src_added: bool [S], the special tokens the source's tokenizer added (None = none).

    Returns:
        float32 [T-1].
    """
    idx = np.asarray(src_index, dtype=np.int64)[:-1]
    ce = np.asarray(src_token_ce, dtype=np.float32)
    if src_added is not None and np.any(src_added[1:]):
        ce = np.where(np.asarray(src_added[1:len(ce) + 1], dtype=bool), np.float32(np.nan), ce)
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
    """What the methods, the token rule and the diagnostics may need beside the two blocks.

    Attributes:
        tgt_texts, src_texts: token texts (`dtw` only).
        band: `dtw` band half-width.
        rule: the token rule, "map" or "consistent" (`map_topk`).
        src_bytes, tgt_bytes: `flat_bytes` of both token tables (the `consistent` rule and the
            tokenization diagnostics); None = not available.
        src_empty: bool [V_src], source ids that stand for no text (special tokens): one of them
            covering text is an unknown token.
        src_special, tgt_special: bool [V], each tokenizer's special ids (`TokenTable.special`):
            one of them covering no text was added by the tokenizer (`added_special`); None =
            none are told apart (no special token is left out of the scores).
    """

    tgt_texts: list[str] | None = None
    src_texts: list[str] | None = None
    band: int = 64
    rule: str = "map"
    src_bytes: tuple[np.ndarray, np.ndarray] | None = None
    tgt_bytes: tuple[np.ndarray, np.ndarray] | None = None
    src_empty: np.ndarray | None = None
    src_special: np.ndarray | None = None
    tgt_special: np.ndarray | None = None


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


def unknown_tokens(tokens: BlockTokens, empty: np.ndarray | None) -> np.ndarray:
    """bool [S]: tokens that cover text but stand for none (`[UNK]`-like ids).

    Args:
        tokens: one model's tokens of a block.
        empty: bool [V], ids that stand for no bytes (special tokens); None = no unknown tokens.
    """
    if empty is None:
        return np.zeros(len(tokens.ids), dtype=bool)
    ids = np.asarray(tokens.ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < len(empty))
    return ok & empty[np.clip(ids, 0, len(empty) - 1)] & (np.asarray(tokens.end) > np.asarray(tokens.start))


def added_special(tokens: BlockTokens, special: np.ndarray | None) -> np.ndarray:
    """bool [S]: the special tokens the tokenizer added (BOS, an EOS after the text, ...).

    Found from the stored ids and offsets, with no extra column: corpus text is encoded with
    its special-token strings split (`models.encode_text`), so a special id in a block was added
    by the tokenizer, and `extract.encode_blocks` gives it the zero-width offsets `(e, e)`. A
    special id that covers text is an unknown token (`unknown_tokens`), not an added one.

    Args:
        tokens: one model's tokens of a block.
        special: bool [V], the tokenizer's special ids; None = none are told apart (all False).
    """
    if special is None:
        return np.zeros(len(tokens.ids), dtype=bool)
    ids = np.asarray(tokens.ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < len(special))
    return ok & special[np.clip(ids, 0, len(special) - 1)] & (np.asarray(tokens.end) <= np.asarray(tokens.start))


STAT_KEYS = ("positions", "aligned", "mass_source", "mass_mapped", "mass_exact", "mass_stored", "mass_not_target_token",
             "mass_to_gold", "mass_dropped", "gold_positions", "gold_in_stored", "next_end_same", "mass_padded",
             "padded_candidates", "digit_positions", "mass_mapped_digit", "mass_not_target_token_digit")
# Above this share of not-target mass at digit positions (with `map`), align's log suggests `consistent`;
# a pair whose tokenizers split digits alike measures 0 (experiments/numerals: Gemma-3 -> SmolLM2).
NUMERAL_WARN = 0.25
# A digit position: an aligned position whose gold next target token holds an ASCII digit. Where the
# target packs digits ("2024" one token) and a source writes them one at a time, `map` puts the
# source's mass on a digit prefix of the gold token there (measured: experiments/numerals).
DIGITS = frozenset("0123456789")


def align_block(method: str, tgt: BlockTokens, src: BlockTokens, src_topk_ids: np.ndarray,
                src_topk_logprobs: np.ndarray, src_token_ce: np.ndarray, vocab_map: np.ndarray,
                ctx: AlignContext, exact: np.ndarray | None = None, text: str | None = None) -> dict:
    """Align one block: everything `align/<source>` stores for it except block-level scalars.

    A target position whose aligned source position predicts an unknown token is not aligned
    (the source never predicted that text). A special token a tokenizer added (`added_special`:
    an EOS after the text) is no text: the source's adds nothing to any span and its prediction
    is no `token_ce`; at a target position whose next token is the target's, `span_nll` is NaN.

    Args:
        method: A name in `METHODS`.
        tgt: The target's tokens (T).
        src: The source's tokens (S).
        src_topk_ids: int [S, k] the source's stored ids (-1 = padding).
        src_topk_logprobs: float [S, k] their log-probs.
        src_token_ce: float32 [S-1].
        vocab_map: int32 [V_src].
        ctx: Method, token-rule and diagnostics context.
        exact: bool [V_src], source ids whose mapping is exact (same text); for diagnostics.
        text: the block text (the `consistent` rule and the tokenization diagnostics need it).

    Returns:
        dict with `src_index` int64 [T], `aligned` uint8 [T], `topk_ids` int32 [T, k],
        `topk_logprobs` float16 [T, k], `token_ce` float32 [T-1], `span_nll` float32 [T-1],
        `span_exact` uint8 [T-1], and `stats`: sums over the block for `STAT_KEYS` (masses are
        summed probabilities at aligned positions: stored by the source, mapped by the vocab
        map, mapped exactly, stored after the token rule, mapped onto a token the target would
        not write there, moved to the gold token, dropped by the rule, on ids past the source
        tokenizer; counts of aligned positions with a gold next token, of those whose gold token
        is stored, of those whose next source token ends where the target's does, and of stored
        ids past the source tokenizer).
    """
    idx = np.asarray(METHODS.get(method)(tgt, src, ctx), dtype=np.int64).copy()
    S = len(src.ids)
    unk = unknown_tokens(src, ctx.src_empty)
    if unk.any():
        nxt = np.clip(idx + 1, 0, S - 1)
        idx[(idx >= 0) & (idx + 1 < S) & unk[nxt]] = -1
    gold = np.append(np.asarray(tgt.ids[1:], dtype=np.int64), -1)
    text_ctx = None
    if text is not None and ctx.src_bytes is not None and ctx.tgt_bytes is not None:
        tpos = char_byte_offsets(text)[np.clip(np.asarray(tgt.end, dtype=np.int64), 0, len(text))]
        text_ctx = TextContext(*ctx.src_bytes, *ctx.tgt_bytes,
                               np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8),
                               tpos, gold)
    ids, lps, st = map_topk(src_topk_ids, src_topk_logprobs, idx, vocab_map, ctx.rule, text_ctx)
    al = idx >= 0
    rows = idx[al]
    src_p = np.exp(np.asarray(src_topk_logprobs, dtype=np.float64)[rows])
    ids_rows = np.asarray(src_topk_ids)[rows]
    exact_p = src_p[:0]
    if exact is not None:  # ids past the source tokenizer (padded) are never exact
        known = (ids_rows >= 0) & (ids_rows < len(exact))
        exact_p = src_p[known][exact[ids_rows[known]]]
    src_added = added_special(src, ctx.src_special)
    sp = span_nll(tgt.end, src.end, src_token_ce, unk, src_added)
    # A target token its tokenizer added (an EOS after the text) is no text: no source scored it,
    # so it has no span NLL (not 0, which would say the source was sure of it).
    sp[added_special(tgt, ctx.tgt_special)[1:]] = np.nan
    src_bound = boundary_ends(src.start, src.end)
    exact_span = span_exact(boundary_ends(tgt.start, tgt.end), src_bound) & np.isfinite(sp)
    with_gold = al & (gold >= 0)
    digit = with_gold & _gold_has_digit(tgt, text)
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    stats.update(
        positions=len(tgt.ids), aligned=int(al.sum()), mass_source=float(st[:, 0].sum()),
        mass_mapped=float(st[:, 1].sum()), mass_exact=float(np.nansum(exact_p)),
        mass_stored=float(np.exp(lps[al].astype(np.float64)).sum()), mass_not_target_token=float(st[:, 2].sum()),
        mass_to_gold=float(st[:, 3].sum()), mass_dropped=float(st[:, 4].sum()),
        mass_padded=float(st[:, PADDED_STAT].sum()), padded_candidates=int(st[:, PADDED_COUNT].sum()),
        gold_positions=int(with_gold.sum()),
        gold_in_stored=int((ids[with_gold] == gold[with_gold][:, None]).any(-1).sum()),
        next_end_same=int(exact_span[with_gold[:-1]].sum()),
        digit_positions=int(digit.sum()), mass_mapped_digit=float(st[digit, 1].sum()),
        mass_not_target_token_digit=float(st[digit, 2].sum()),
    )
    return {
        "src_index": idx,
        "aligned": al.astype(np.uint8),
        "topk_ids": ids,
        "topk_logprobs": lps,
        "token_ce": aligned_token_ce(idx, src_token_ce, src_added),
        "span_nll": sp,
        "span_exact": exact_span.astype(np.uint8),
        "stats": stats,
    }


def _gold_has_digit(tgt: BlockTokens, text: str | None) -> np.ndarray:
    """bool [T]: whether the next target token's text holds an ASCII digit (all False without the text)."""
    T = len(tgt.ids)
    out = np.zeros(T, dtype=bool)
    if not text or T < 2:
        return out
    is_digit = np.fromiter((c in DIGITS for c in text), dtype=bool, count=len(text))
    cum = np.concatenate([[0], np.cumsum(is_digit)])
    start = np.clip(np.asarray(tgt.start, dtype=np.int64)[1:], 0, len(text))
    end = np.clip(np.asarray(tgt.end, dtype=np.int64)[1:], 0, len(text))
    out[:-1] = cum[np.maximum(end, start)] > cum[start]
    return out


# -- the stage ----------------------------------------------------------------------------------
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


def _add_stats(acc: dict, st: dict) -> None:
    for key in STAT_KEYS:
        acc[key] = acc.get(key, 0) + st.get(key, 0)


def align_shard(method: str, block_ids: list[int], texts: list[str], tgt_rows: list[dict], src_rows: list[dict],
                vocab_map: np.ndarray, ctx: AlignContext, names: tuple[str, str],
                domains: list[str] | None = None, exact: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """Align the blocks of one shard; returns the table and its diagnostics.

    Args:
        tgt_rows, src_rows: per block, the extraction's columns (ARCHITECTURE.md) as arrays.

    Returns:
        (table, stats): stats = sums of `STAT_KEYS` over the shard, and per domain under "domains".
    """
    cols: dict[str, list] = {c: [] for c in SCHEMA.names}
    stats: dict = {"domains": {}}
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
        res = align_block(method, tgt, src, topk_ids, topk_lp, ce, vocab_map, ctx, exact, texts[r])
        # Quality per byte of the whole block, the text hidden in unknown tokens charged 8 bits a byte,
        # the prediction of a token the tokenizer added (EOS) left out.
        nll, nbytes = sequence_quality(texts[r], src.end, ce, unknown_tokens(src, ctx.src_empty),
                                       added_special(src, ctx.src_special))
        cols["block_id"].append(int(bid))
        for c in ("aligned", "token_ce", "span_nll", "span_exact"):
            cols[c].append(res[c])
        cols["topk_ids"].append(res["topk_ids"].reshape(-1))
        cols["topk_logprobs"].append(res["topk_logprobs"].reshape(-1))
        cols["seq_ce"].append(float(sb["seq_ce"]))
        cols["nll_per_byte"].append(nll / nbytes if nbytes else float("nan"))
        _add_stats(stats, res["stats"])
        if domains is not None:
            _add_stats(stats["domains"].setdefault(domains[r], {}), res["stats"])
    table = pa.table({
        "block_id": pa.array(cols["block_id"], pa.int64()),
        "aligned": list_array(cols["aligned"], pa.uint8()),
        "topk_ids": list_array(cols["topk_ids"], pa.int32()),
        "topk_logprobs": list_array(cols["topk_logprobs"], pa.float16()),
        "token_ce": list_array(cols["token_ce"], pa.float32()),
        "span_nll": list_array(cols["span_nll"], pa.float32()),
        "span_exact": list_array(cols["span_exact"], pa.uint8()),
        "seq_ce": pa.array(cols["seq_ce"], pa.float32()),
        "nll_per_byte": pa.array(cols["nll_per_byte"], pa.float32()),
    }, schema=SCHEMA)
    return table, stats


def diagnostics(st: dict) -> dict[str, float]:
    """Shares that say whether a source's aligned targets can be trusted, from summed `STAT_KEYS`.

    - `aligned_fraction`: target positions with an aligned source position;
    - `next_end_same`: of the aligned positions with a gold next token, the share where the
      source's next token ends where the target's does (the source scored exactly that text);
    - `mapped_mass`: the stored source mass that the vocab map keeps (at aligned positions);
      `exact_mass`: of it, mapped to a token of the same text;
    - `not_target_token_mass`: the share of the mapped mass on tokens the target would not
      write there (a proper prefix of the gold token's text), before the token rule;
    - `to_gold_mass`, `dropped_mass`: the shares of the stored source mass the `consistent`
      rule moved to the gold token or dropped;
    - `gold_in_stored`: aligned positions whose gold token has mass in the stored distribution;
    - `padded_mass`: the share of the stored source mass on ids the source tokenizer does not
      know (padded output ids; dropped like unmapped ids), `padded_candidates`: how many such
      stored entries there were at aligned positions (a count, not a share);
    - `digit_positions`: the share of aligned positions with a gold next token whose gold token
      holds a digit; `digit_not_target_token_mass`: `not_target_token_mass` at those positions
      alone (high when the target packs digits the source writes one at a time).
    """
    src = st.get("mass_source", 0.0)

    def share(a, b):
        return round(a / b, 6) if b else math.nan

    return {
        "aligned_fraction": share(st.get("aligned", 0), st.get("positions", 0)),
        "next_end_same": share(st.get("next_end_same", 0), st.get("gold_positions", 0)),
        "mapped_mass": share(st.get("mass_mapped", 0.0), src),
        "exact_mass": share(st.get("mass_exact", 0.0), src),
        "not_target_token_mass": share(st.get("mass_not_target_token", 0.0), st.get("mass_mapped", 0.0)),
        "to_gold_mass": share(st.get("mass_to_gold", 0.0), src),
        "dropped_mass": share(st.get("mass_dropped", 0.0), src),
        "gold_in_stored": share(st.get("gold_in_stored", 0), st.get("gold_positions", 0)),
        "padded_mass": share(st.get("mass_padded", 0.0), src),
        "padded_candidates": int(st.get("padded_candidates", 0)),
        "digit_positions": share(st.get("digit_positions", 0), st.get("gold_positions", 0)),
        "digit_not_target_token_mass": share(st.get("mass_not_target_token_digit", 0.0),
                                             st.get("mass_mapped_digit", 0.0)),
    }


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


def check_ids(rows: list[dict], vocab_size: int, where: str, name: str) -> None:
    """Refuse input ids outside the tokenizer's vocabulary (a damaged or foreign extraction):
    they would index past the vocab map and the token tables. (Stored distribution ids may reach
    past the tokenizer, up to the model's output size, in extractions made before `extract` left
    padded ids out; `map_topk` drops and counts those.)

    Args:
        rows: blocks of one extraction shard (`read_shard_rows`).
        vocab_size: the tokenizer's vocabulary size (the extraction's `vocab_size`); 0 = unknown.
    """
    if vocab_size <= 0:
        return
    for r in rows:
        ids = np.asarray(r["input_ids"], dtype=np.int64)
        if len(ids) and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise LmfuseError(f"token id {bad} is outside the vocabulary of {name} (size {vocab_size})",
                              where=f"{where}, block {r.get('block_id')}",
                              fix=f"rebuild the extraction: `lmfuse extract CONFIG --model {name} --overwrite`")


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


def align_context(cfg, source_name: str) -> AlignContext:
    """Everything `align_block` needs beside the blocks: method options, token rule, token bytes."""
    from lmfuse.models import load_tokenizer
    from lmfuse.tokentext import token_table

    METHODS.get(cfg.align.method)
    src_table = token_table(load_tokenizer(cfg.model(source_name)))
    tgt_table = token_table(load_tokenizer(cfg.target))
    texts = cfg.align.method in METHODS_NEEDING_TEXTS
    return AlignContext(tgt_table.texts if texts else None, src_table.texts if texts else None, cfg.align.dtw_band,
                        cfg.align.token_rule, flat_bytes(src_table.bytes), flat_bytes(tgt_table.bytes),
                        np.array([len(b) == 0 for b in src_table.bytes], dtype=bool), src_table.special,
                        tgt_table.special)


def _fmt_share(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.1%}"


class AlignStage(Stage):
    """`align/<source>`: one source's distributions in the target's positions and vocabulary.

    Its inputs are the two extractions and the vocab map; shard i aligns shard i of both
    extractions (their shard layouts must agree), and its diagnostics are kept beside it.
    """

    kind = "align"
    shard_stats = True

    def __init__(self, cfg, source_name: str):
        super().__init__(f"align/{source_name}")
        self.cfg, self.source_name = cfg, source_name
        cfg.model(source_name)

    def inputs(self) -> dict[str, str]:
        return {"extract_target": f"extract/{self.cfg.target.name}", "extract_source": f"extract/{self.source_name}",
                "vocab_map": f"vocab_map/{self.source_name}"}

    def config_hash(self) -> str:
        return hash_obj(["align", self.cfg.target.name, self.source_name, self.cfg.align.model_dump()])

    def n_shards(self, b: Build) -> int:
        from lmfuse import vocabmap

        cfg, src = self.cfg, self.source_name
        tgt_path, src_path = b.inputs["extract_target"], b.inputs["extract_source"]
        tgt_man, src_man = read_manifest(tgt_path), read_manifest(src_path)
        check_extractions(tgt_man, src_man, cfg.target.name, src)
        vmap, how, _ = vocabmap.load_vocab_map(cfg, src, src_man.get("tokenizer_fingerprint"),
                                             tgt_man.get("tokenizer_fingerprint"))
        b.state.update(tgt_path=tgt_path, src_path=src_path, src_man=src_man, vmap=vmap, t0=time.time(),
                       exact=np.isin(how, (vocabmap.EXACT, vocabmap.SPECIAL_HOW)),
                       tgt_vocab=int(tgt_man.get("vocab_size") or 0), src_vocab=int(src_man.get("vocab_size") or 0),
                       blocks=load_complete(cfg.run_dir / "prepare", "prepare"))
        return int(src_man["n_shards"])

    def write(self, b: Build, todo: list[int]):
        tname, sname, inp = self.cfg.target.name, self.source_name, b.state
        ctx = align_context(self.cfg, sname)
        S, blocks = int(inp["src_man"]["shard_size"]), inp["blocks"]
        for i in todo:
            rows = blocks[i * S: (i + 1) * S]
            tgt_rows = read_shard_rows(inp["tgt_path"] / "shards" / f"shard-{i:05d}.arrow")
            src_rows = read_shard_rows(inp["src_path"] / "shards" / f"shard-{i:05d}.arrow")
            for rws, name, vocab in ((tgt_rows, tname, inp["tgt_vocab"]), (src_rows, sname, inp["src_vocab"])):
                if len(rws) != len(rows["block_id"]):
                    raise LmfuseError(f"shard {i} of extract/{name} holds {len(rws)} blocks, "
                                      f"the prepared blocks {len(rows['block_id'])}", where=f"extract/{name}",
                                      fix=f"rerun `lmfuse extract CONFIG --model {name} --overwrite`")
                check_ids(rws, vocab, f"extract/{name}, shard {i}", name)
            table, stats = align_shard(self.cfg.align.method, rows["block_id"], rows["text"], tgt_rows, src_rows,
                                       inp["vmap"], ctx, (tname, sname), rows["domain"], inp["exact"])
            yield i, table, stats

    def summary(self, b: Build, stats: list[dict]) -> dict:
        total: dict = {}
        domains: dict[str, dict] = {}
        for st in stats:
            _add_stats(total, st)
            for d, dst in st.get("domains", {}).items():
                _add_stats(domains.setdefault(d, {}), dst)
        diag = diagnostics(total)
        diag_dom = {d: diagnostics(v) for d, v in sorted(domains.items())}
        src_man = b.state["src_man"]
        return dict(
            source=self.source_name, target=self.cfg.target.name, method=self.cfg.align.method,
            token_rule=self.cfg.align.token_rule,
            distribution=src_man.get("distribution", "topk"), top_k=src_man.get("top_k"),
            shard_size=int(src_man["shard_size"]), n_shards=len(stats), n_blocks=len(b.state["blocks"]),
            target_positions=int(total.get("positions", 0)),
            aligned_positions=int(total.get("aligned", 0)), aligned_fraction=diag["aligned_fraction"],
            mapped_mass_fraction=diag["mapped_mass"], exact_mass_fraction=diag["exact_mass"],
            padded_mass_fraction=diag["padded_mass"], padded_candidates=diag["padded_candidates"],
            source_padded_mass=src_man.get("padded_mass"), source_vocab_size=src_man.get("vocab_size"),
            aligned_fraction_per_domain={d: v["aligned_fraction"] for d, v in diag_dom.items()},
            diagnostics=diag, diagnostics_per_domain=diag_dom, align_seconds=round(time.time() - b.state["t0"], 3),
        )

    def after_finish(self, b: Build, manifest: dict) -> None:
        diag, diag_dom = manifest["diagnostics"], manifest["diagnostics_per_domain"]
        b.log(f"align {self.source_name} -> {self.cfg.target.name} ({self.cfg.align.method}, token rule "
              f"{self.cfg.align.token_rule}): {_fmt_share(diag['aligned_fraction'])} of target positions aligned "
              f"-> {b.art.path}")
        b.log(f"  {'domain':<14} {'aligned':>8} {'next end':>9} {'mapped':>7} {'exact':>6} {'not-tgt':>8} "
              f"{'to gold':>8} {'dropped':>8} {'gold in':>8} {'padded':>7} {'digits':>7} {'not-tgt@digit':>13}")
        for name, d in [*diag_dom.items(), ("all", diag)]:
            b.log(f"  {name:<14} " + " ".join(f"{_fmt_share(d[key]):>{w}}" for key, w in (
                ("aligned_fraction", 8), ("next_end_same", 9), ("mapped_mass", 7), ("exact_mass", 6),
                ("not_target_token_mass", 8), ("to_gold_mass", 8), ("dropped_mass", 8), ("gold_in_stored", 8),
                ("padded_mass", 7), ("digit_positions", 7), ("digit_not_target_token_mass", 13))))
        dm, dp = diag.get("digit_not_target_token_mass"), diag.get("digit_positions")
        if self.cfg.align.token_rule == "map" and dm is not None and dm > NUMERAL_WARN and (dp or 0) > 0.01:
            b.log(f"  numerals: at digit positions {_fmt_share(dm)} of the mapped mass of {self.source_name} is on "
                  f"tokens {self.cfg.target.name} would not write there (a digit prefix of a multi-digit token): "
                  "the target packs digits the source writes one at a time. `align.token_rule: consistent` puts "
                  "that mass on the gold token (docs/alignment.md, \"Numerals\")")
        said = []
        if diag["padded_candidates"]:
            said.append(f"{diag['padded_candidates']} stored candidates with {_fmt_share(diag['padded_mass'])} of "
                        "the stored mass, dropped like unmapped ids")
        if manifest.get("source_padded_mass"):
            said.append(f"the extraction left out {_fmt_share(manifest['source_padded_mass'])} of the model's mass")
        if said:
            b.log(f"  padded output ids of {self.source_name} (past its {manifest.get('source_vocab_size') or '?'}-token "
                  "tokenizer; they stand for no text): " + "; ".join(said))

