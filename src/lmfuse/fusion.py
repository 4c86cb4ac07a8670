"""Fusion functions: many candidates' sparse next-token distributions → one per position.

A *candidate* is a source model's aligned distribution (or the frozen target's own). Per target
position each candidate offers a top-k list (ids in the target vocabulary, log-probs), a flag
saying whether it is aligned there, and a *quality* (lower is better: NLL per byte or the
paper's CE per token; one value per sequence or one per position).

A fusion function turns qualities into per-candidate weights; `fuse` applies the teacher
temperature, decides what happens to the probability mass outside the top-k, mixes the
candidates with those weights and merges duplicate ids. Positions where no candidate is
aligned get a one-hot on the gold next token.

How the FuseLLM reference code weighs candidates (fanqiwan/FuseLLM, commit 562c7b0,
`FuseLLM/src/utils/trainer.py`, `compute_loss`): each candidate's per-sequence CE becomes a
"reward" `1 / exp(CE)` (cast to bfloat16); MinCE takes the candidate with the largest reward
(`torch.argmax`, so ties go to the first candidate, the base model); AvgCE mixes the dense
distributions with weights `softmax(reward)` = softmax over exp(−CE). Because exp(−CE) lies
in (0, 1], those weights are close to uniform (they differ by at most a factor e). That is
the default here (`avgce_weighting="softmax_exp_neg"`); `"softmax_neg"` uses softmax over −CE,
which follows quality differences much more strongly. Unlike the reference we compute in
float64 (no bfloat16 rounding, which creates spurious ties), exclude a candidate where it is
not aligned (the reference substitutes the base model's distribution there), and support
any number of candidates and token-level quality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from lmfuse.errors import LmfuseError
from lmfuse.registry import Registry

WeightFn = Callable[[np.ndarray, np.ndarray, "FusionOptions"], np.ndarray]
FUSIONS: Registry[WeightFn] = Registry("fusion function")


@dataclass(frozen=True)
class FusionOptions:
    """Knobs of `fuse` (from the `train` config section).

    Args:
        temperature: Teacher temperature applied to the candidates' log-probs.
        outside_topk: what happens to a candidate's mass outside its stored ids (the tail
            past a top-k, and what align dropped: ids the vocab map leaves unmapped, padded
            output ids that stand for no text):
            "renormalize" (stored probs rescaled to sum to 1, as the paper), "gold" (it goes to
            the gold next token) or "rest" (it stays a separate bucket, matched in the loss by
            the student's mass outside the stored ids). A sampled distribution keeps no tail,
            so on it the three differ only in what align dropped.
        avgce_weighting: "softmax_exp_neg" (reference code: softmax over exp(−quality)) or
            "softmax_neg" (softmax over −quality).
    """

    temperature: float = 1.0
    outside_topk: Literal["renormalize", "gold", "rest"] = "renormalize"
    avgce_weighting: Literal["softmax_exp_neg", "softmax_neg"] = "softmax_exp_neg"


@FUSIONS.register("minCE")
def min_ce(quality: np.ndarray, usable: np.ndarray, opts: FusionOptions) -> np.ndarray:
    """All weight on the usable candidate of lowest quality value (ties: lowest index).

    Args:
        quality: [N, T] float, lower is better.
        usable: [N, T] bool.
        opts: unused.

    Returns:
        [N, T] float64 weights; a column with no usable candidate is all zero.
    """
    q = np.where(usable, quality, np.inf)
    best = np.argmin(q, axis=0)  # [T]; argmin returns the first minimum
    w = np.zeros(quality.shape, dtype=np.float64)
    w[best, np.arange(quality.shape[1])] = 1.0
    return w * usable


@FUSIONS.register("avgCE")
def avg_ce(quality: np.ndarray, usable: np.ndarray, opts: FusionOptions) -> np.ndarray:
    """Weights = softmax over the usable candidates of exp(−quality) (reference) or −quality.

    Args:
        quality: [N, T] float, lower is better.
        usable: [N, T] bool.
        opts: `avgce_weighting` picks the score.

    Returns:
        [N, T] float64 weights summing to 1 over the usable candidates of each column (0 if none).
    """
    q = quality.astype(np.float64)
    if opts.avgce_weighting == "softmax_exp_neg":
        score = np.exp(-q)
    elif opts.avgce_weighting == "softmax_neg":
        score = -q
    else:
        raise LmfuseError(f"unknown avgCE weighting {opts.avgce_weighting!r}", where="train.avgce_weighting",
                          fix="use 'softmax_exp_neg' or 'softmax_neg'")
    score = np.where(usable, score, -np.inf)
    top = np.max(score, axis=0, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(usable, np.exp(score - top), 0.0)
    z = e.sum(axis=0, keepdims=True)
    return np.divide(e, z, out=np.zeros_like(e), where=z > 0)


def candidate_probs(
    ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray, opts: FusionOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each candidate's sparse distribution after temperature and the outside-top-k rule.

    Args:
        ids: [N, T, K] int target ids, −1 = padding.
        logprobs: [N, T, K] float log-probs (full-vocabulary log-softmax, top-k), any value at padding.
        gold: [T] int gold next token, −1 where none (the last position).
        opts: temperature and outside_topk.

    Returns:
        (ids [N, T, K+1], probs [N, T, K+1] float64, rest [N, T] float64): the extra column
        holds the gold token's share of the outside mass ("gold"), else padding; `rest` is the
        outside mass kept as a bucket ("rest"), else 0. For a candidate with entries, probs +
        rest sum to 1.
    """
    N, T, K = ids.shape
    valid = ids >= 0
    lp = np.where(valid, logprobs.astype(np.float64) / opts.temperature, -np.inf)
    gold_b = np.broadcast_to(gold, (N, T))
    extra_ids = np.full((N, T, 1), -1, dtype=np.int64)
    extra_p = np.zeros((N, T, 1))
    rest = np.zeros((N, T))
    if opts.outside_topk == "renormalize":
        top = np.max(lp, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        e = np.exp(lp - top)
        z = e.sum(-1, keepdims=True)
        p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    elif opts.outside_topk in ("gold", "rest"):
        # exp(lp / T) are the tempered stored probs; above T = 1 they may sum past 1, then we
        # renormalize and nothing is left over.
        p = np.exp(lp)
        s = p.sum(-1, keepdims=True)
        p = np.where(s > 1.0, p / np.maximum(s, 1e-300), p)
        left = np.where(valid.any(-1), np.clip(1.0 - p.sum(-1), 0.0, 1.0), 0.0)  # [N, T]
        if opts.outside_topk == "rest":
            rest = left
        else:
            has_gold = gold_b >= 0
            extra_ids[..., 0] = np.where(has_gold, gold_b, -1)
            extra_p[..., 0] = np.where(has_gold, left, 0.0)
            # No gold token (last position): renormalize the top-k instead.
            s2 = p.sum(-1, keepdims=True)
            p = np.where(has_gold[..., None] | (s2 <= 0), p, p / np.maximum(s2, 1e-300))
    else:
        raise LmfuseError(f"unknown outside_topk rule {opts.outside_topk!r}", where="train.outside_topk",
                          fix="use 'renormalize', 'gold' or 'rest'")
    out_ids = np.concatenate([np.where(valid, ids, -1).astype(np.int64), extra_ids], axis=-1)
    return out_ids, np.concatenate([p, extra_p], axis=-1), rest


def merge_duplicates(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the probabilities of repeated ids in each row; drop padding and zero entries.

    Args:
        ids: [T, M] int, −1 = padding.
        probs: [T, M] float.

    Returns:
        (ids [T, M'] int64, probs [T, M'] float32) sorted by id within a row, padded with
        (−1, 0); M' = the most distinct ids in a row (at least 1).
    """
    T, M = ids.shape
    keep = (ids >= 0) & (probs > 0)
    rows = np.broadcast_to(np.arange(T)[:, None], (T, M))[keep]
    flat_ids = ids[keep].astype(np.int64)
    span = int(flat_ids.max(initial=0)) + 1
    key = rows.astype(np.int64) * span + flat_ids
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv.ravel(), weights=probs[keep], minlength=len(uniq))
    u_rows, u_ids = uniq // span, uniq % span
    counts = np.bincount(u_rows, minlength=T)
    width = max(1, int(counts.max(initial=0)))
    # Column of each unique entry within its row: uniq is sorted by (row, id).
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cols = np.arange(len(uniq)) - starts[u_rows]
    out_ids = np.full((T, width), -1, dtype=np.int64)
    out_p = np.zeros((T, width), dtype=np.float32)
    out_ids[u_rows, cols] = u_ids
    out_p[u_rows, cols] = sums
    return out_ids, out_p


class FusedTargets(NamedTuple):
    """The fused teacher signal of one block.

    Attributes:
        ids: [T, M] int64 target ids, −1 = padding (distinct within a row).
        probs: [T, M] float32 their probabilities, 0 at padding.
        rest: [T] float32 mass outside `ids` (the `rest` bucket; 0 unless outside_topk = "rest").
        span: [T] float32 teacher probability of the gold next token's text, NaN where no
            candidate scored exactly that text (or no span log-likelihoods were given).
    """

    ids: np.ndarray
    probs: np.ndarray
    rest: np.ndarray
    span: np.ndarray


def fuse(
    ids: np.ndarray,
    logprobs: np.ndarray,
    aligned: np.ndarray,
    quality: np.ndarray,
    gold: np.ndarray,
    fusion: str = "minCE",
    opts: FusionOptions | None = None,
    span_ll: np.ndarray | None = None,
) -> FusedTargets:
    """Fuse N candidates' sparse distributions at every position of one block.

    Args:
        ids: [N, T, K] int candidate top-k ids in the target vocabulary, −1 = padding.
        logprobs: [N, T, K] float their log-probs.
        aligned: [N, T] bool, whether candidate n offers a distribution at position t.
        quality: [N] (sequence level) or [N, T] (token level) float, lower is better; a
            non-finite value excludes the candidate there.
        gold: [T] int gold next token, −1 where none.
        fusion: name in `FUSIONS` ("minCE", "avgCE").
        opts: temperature, outside-top-k rule, avgCE weighting.
        span_ll: [N, T] float, candidate n's log-likelihood of exactly the text of the gold
            token after position t (NaN where it did not score exactly that text); the span
            target mixes them with the fusion function's weights over the candidates that have one.

    Returns:
        `FusedTargets` with M ≤ N·(K+1); each row of probs (+ rest) sums to 1 except where
        `gold` is −1 and no candidate is usable (empty row).
    """
    opts = opts or FusionOptions()
    ids = np.asarray(ids)
    N, T, K = ids.shape
    quality = np.asarray(quality, dtype=np.float64)
    if quality.ndim == 1:
        quality = np.broadcast_to(quality[:, None], (N, T))
    if quality.shape != (N, T) or aligned.shape != (N, T) or logprobs.shape != ids.shape or gold.shape != (T,) \
            or (span_ll is not None and np.shape(span_ll) != (N, T)):
        raise LmfuseError(
            f"fusion inputs disagree in shape: ids {ids.shape}, logprobs {logprobs.shape}, "
            f"aligned {aligned.shape}, quality {quality.shape}, gold {gold.shape}"
            + ("" if span_ll is None else f", span_ll {np.shape(span_ll)}"),
            fix="aligned data and the target extraction must come from the same prepared blocks")
    finite_q = np.isfinite(quality)
    q0 = np.where(finite_q, quality, 0.0)
    fn = FUSIONS.get(fusion)
    usable = np.asarray(aligned, dtype=bool) & finite_q & (ids >= 0).any(-1)
    weights = fn(q0, usable, opts)  # [N, T]
    c_ids, c_p, c_rest = candidate_probs(ids, logprobs, gold, opts)  # [N, T, K+1], [N, T]
    mixed = c_p * weights[..., None]
    # Positions with no usable candidate fall back to a one-hot on the gold token.
    none = ~usable.any(0)
    fb_ids = np.where(none & (gold >= 0), gold, -1)[:, None]
    fb_p = (none & (gold >= 0)).astype(np.float64)[:, None]
    all_ids = np.concatenate([c_ids.transpose(1, 0, 2).reshape(T, -1), fb_ids], axis=1)
    all_p = np.concatenate([mixed.transpose(1, 0, 2).reshape(T, -1), fb_p], axis=1)
    out_ids, out_p = merge_duplicates(all_ids, all_p)
    rest = (c_rest * weights).sum(0).astype(np.float32)
    span = np.full(T, np.nan, dtype=np.float32)
    if span_ll is not None:
        span_ll = np.asarray(span_ll, dtype=np.float64)
        has = finite_q & np.isfinite(span_ll) & (gold >= 0)[None, :]
        w = fn(q0, has, opts)
        s = (w * np.exp(np.where(has, np.minimum(span_ll, 0.0), -np.inf))).sum(0)
        span = np.where(has.any(0), s, np.nan).astype(np.float32)
    return FusedTargets(out_ids, out_p, rest, span)
