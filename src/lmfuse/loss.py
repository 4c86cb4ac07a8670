"""The fusion loss on sparse targets, and the combined λ·CLM + (1 − λ)·fusion loss.

Targets are at most K entries per position (K = Σ k over the candidates); they are never
expanded to the vocabulary. The loss gathers the model's log-probabilities at those ids:

    L_fusion = mean over masked positions of  −Σ_k p_k · log q[id_k]  −  r · log(1 − Σ_k q[id_k])
    KL variant:                                 Σ_k p_k · (log p_k − log q[id_k]) + r · (log r − log(1 − Σ_k q[id_k]))

where q = softmax(logits) and r is the optional *rest* mass: the teacher probability outside
the stored ids, matched by the student's probability of "any other token" (the ghost bucket of
random-sampling KD, arXiv 2503.16870). Without r (r = 0) the targets are assumed to sum to 1.

The span term matches likelihoods of text instead of token distributions: where a teacher scored
exactly the text of the gold next token (both of its boundaries are teacher token boundaries),
`s` = the teacher's probability of that text, and the student's probability of the gold token
q[gold] is matched to it as a two-outcome distribution (the text, or anything else):

    L_span = mean over positions with a span target of  −s · log q[gold] − (1 − s) · log(1 − q[gold])

(the binarised likelihood matching of aligned chunks, arXiv 2503.20083; `kl` subtracts the
binary entropy of s, same gradient).

With `chunk_size`, the sequence is processed in chunks of that many positions and each chunk's
fp32 log-softmax is recomputed in the backward pass (activation checkpointing), so a
`[B, T, V]` fp32 tensor (1 GiB for B=1, T=1024, V=262k) never exists at once.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and for very negative x (float64 inside)."""
    x = x.double().clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _entropy_terms(p: torch.Tensor) -> torch.Tensor:
    """p · log p with 0 · log 0 = 0."""
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-38)), 0.0)


def _chunk_sums(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    mask: torch.Tensor,
    kind: str,
    target_rest: torch.Tensor | None = None,
    span_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums (not means) of the CLM, fusion and span losses over the masked positions of one chunk.

    Args:
        logits: [B, t, V] any float dtype.
        labels: [B, t] int64 gold next token, `IGNORE` where none; or None.
        target_ids: [B, t, K] int64, −1 = padding; or None. With `target_rest`, the ids of a
            row must be distinct.
        target_probs: [B, t, K] float, 0 at padding.
        mask: [B, t] bool, positions that count.
        kind: "ce" or "kl".
        target_rest: [B, t] float teacher mass outside the row's ids, or None (= 0).
        span_target: [B, t] float teacher probability of the gold token's text, NaN = none;
            or None. Needs `labels`.

    Returns:
        (clm_sum, fusion_sum, span_sum, span_count), fp32 scalars.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, t, V] fp32, one chunk only
    zero = logp.new_zeros(())
    clm = fusion = span = n_span = zero
    gold_lq = None
    if labels is not None:
        gold = labels.clamp_min(0).unsqueeze(-1)  # [B, t, 1]
        gold_lq = logp.gather(-1, gold).squeeze(-1)  # [B, t]
        clm = torch.where(mask & (labels != IGNORE), -gold_lq, zero).sum()
    if target_ids is not None:
        valid = target_ids >= 0  # [B, t, K]
        p = torch.where(valid, target_probs.float(), 0.0)
        lq = logp.gather(-1, target_ids.clamp_min(0))  # [B, t, K]
        per_pos = (-p * lq).sum(-1)  # [B, t]
        if kind == "kl":
            per_pos = per_pos + _entropy_terms(p).sum(-1)
        if target_rest is not None:
            r = target_rest.float().clamp(0.0, 1.0)  # [B, t]
            # log of the student's mass outside the stored ids: log(1 − Σ_k q[id_k]).
            # A row without ids would give logsumexp(−inf…) = −inf and NaN gradients: its
            # student rest mass is 1 (log 1 = 0), computed from a finite stand-in.
            any_id = valid.any(-1, keepdim=True)
            lq_in = torch.logsumexp(torch.where(valid, lq, torch.where(any_id, float("-inf"), 0.0)), dim=-1)
            lq_rest = torch.where(any_id.squeeze(-1), _log1mexp(lq_in).float(), 0.0)
            rest_term = torch.where(r > 0, -r * lq_rest, 0.0)
            if kind == "kl":
                rest_term = rest_term + _entropy_terms(r)
            per_pos = per_pos + rest_term
        fusion = torch.where(mask, per_pos, zero).sum()
    if span_target is not None and gold_lq is not None:
        has = mask & (labels != IGNORE) & torch.isfinite(span_target)
        s = torch.where(has, span_target.float(), 0.0).clamp(0.0, 1.0)
        per_pos = -(s * gold_lq) - (1.0 - s) * _log1mexp(gold_lq).float()
        if kind == "kl":
            per_pos = per_pos + _entropy_terms(s) + _entropy_terms(1.0 - s)
        span = torch.where(has, per_pos, zero).sum()
        n_span = has.sum().to(span.dtype)
    return clm, fusion, span, n_span


def _sums(logits, labels, target_ids, target_probs, mask, kind, chunk_size, target_rest=None, span_target=None):
    """Chunk over the sequence; checkpoint each chunk so its fp32 log-softmax is not kept."""
    T = logits.shape[1]
    if chunk_size is None or chunk_size >= T:
        return _chunk_sums(logits, labels, target_ids, target_probs, mask, kind, target_rest, span_target)
    acc = None
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)

        def sl(x, s=s, e=e):
            return None if x is None else x[:, s:e]

        args = (sl(logits), sl(labels), sl(target_ids), sl(target_probs), sl(mask), kind, sl(target_rest),
                sl(span_target))
        if logits.requires_grad:
            out = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            out = _chunk_sums(*args)
        acc = out if acc is None else tuple(a + b for a, b in zip(acc, out))
    return acc


def _check_kind(kind: str) -> None:
    if kind not in ("ce", "kl"):
        from lmfuse.errors import LmfuseError

        raise LmfuseError(f"unknown fusion loss kind {kind!r}", where="train.loss", fix="use 'ce' or 'kl'")


def sparse_fusion_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "ce",
    chunk_size: int | None = None,
    target_rest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy (or KL) of the model's distribution against sparse target distributions.

    Position t of `logits` and of the targets both describe the token that follows token t
    (no shift here).

    Args:
        logits: [B, T, V] model logits (any float dtype; computed in fp32).
        target_ids: [B, T, K] int64 target token ids, −1 = padding.
        target_probs: [B, T, K] float probabilities (ignored at padding); duplicate ids are
            allowed and simply add up.
        mask: [B, T] bool, positions that count.
        kind: "ce" (−Σ p log q) or "kl" (Σ p (log p − log q); equals "ce" minus the target's
            entropy, same gradient).
        chunk_size: positions per chunk; None = all at once.
        target_rest: [B, T] float teacher mass outside the row's (distinct) ids, matched by
            the student's mass outside them; None = targets sum to 1.

    Returns:
        Scalar fp32: mean over masked positions (0 if none).
    """
    _check_kind(kind)
    _, fusion, _, _ = _sums(logits, None, target_ids, target_probs, mask, kind, chunk_size, target_rest)
    return fusion / mask.sum().clamp_min(1)


def fused_clm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    mask: torch.Tensor,
    clm_weight: float,
    kind: str = "ce",
    chunk_size: int | None = None,
    target_rest: torch.Tensor | None = None,
    span_target: torch.Tensor | None = None,
    span_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ·CLM + (1 − λ)·fusion + μ·span, sharing one log-softmax per chunk.

    Args:
        logits: [B, T, V] model logits.
        labels: [B, T] int64 gold *next* token at each position (already shifted),
            `-100` where there is none.
        target_ids: [B, T, K] int64 fused target ids (−1 = padding), or None for plain CLM.
        target_probs: [B, T, K] float fused target probabilities, or None.
        mask: [B, T] bool positions that count for both terms (normally `labels != -100`).
        clm_weight: λ in [0, 1].
        kind: "ce" or "kl" for the fusion and span terms.
        chunk_size: positions per chunk; None = all at once.
        target_rest: [B, T] float teacher mass outside the stored ids (the `rest` bucket), or None.
        span_target: [B, T] float teacher probability of the gold token's text (NaN = none), or None.
        span_weight: μ ≥ 0, the span term's weight (0 = off).

    Returns:
        (total, clm, fusion, span): fp32 scalars. `clm` and `fusion` are means over the masked
        positions, `span` a mean over the positions that have a span target; `fusion` is 0
        without targets (or at λ = 1), `span` is 0 without span targets (or at μ = 0).
    """
    _check_kind(kind)
    if target_ids is None or clm_weight >= 1.0:
        target_ids = target_probs = target_rest = None
    if span_weight <= 0.0:
        span_target = None
    mask = mask & (labels != IGNORE)
    n = mask.sum().clamp_min(1)
    clm, fusion, span, n_span = _sums(logits, labels, target_ids, target_probs, mask, kind, chunk_size,
                                      target_rest, span_target)
    clm, fusion, span = clm / n, fusion / n, span / n_span.clamp_min(1)
    total = clm_weight * clm + (1.0 - clm_weight) * fusion if target_ids is not None else clm
    if span_target is not None:
        total = total + span_weight * span
    return total, clm, fusion, span
