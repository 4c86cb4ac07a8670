"""The fusion loss on sparse targets, and the combined λ·CLM + (1 − λ)·fusion loss.

Targets are at most K entries per position (K = Σ k over the candidates); they are never
expanded to the vocabulary. The loss gathers the model's log-probabilities at those ids:

    L_fusion = mean over masked positions of  −Σ_k p_k · log softmax(logits)[id_k]
    KL variant:                                 Σ_k p_k · (log p_k − log softmax(logits)[id_k])

With `chunk_size`, the sequence is processed in chunks of that many positions and each chunk's
fp32 log-softmax is recomputed in the backward pass (activation checkpointing), so a
`[B, T, V]` fp32 tensor (1 GiB for B=1, T=1024, V=262k) never exists at once.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_sums(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    mask: torch.Tensor,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (not means) of the CLM and fusion losses over the masked positions of one chunk.

    Args:
        logits: [B, t, V] any float dtype.
        labels: [B, t] int64 gold next token, `IGNORE` where none; or None.
        target_ids: [B, t, K] int64, −1 = padding; or None.
        target_probs: [B, t, K] float, 0 at padding.
        mask: [B, t] bool, positions that count.
        kind: "ce" or "kl".

    Returns:
        (clm_sum, fusion_sum), fp32 scalars.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, t, V] fp32, one chunk only
    zero = logp.new_zeros(())
    clm = zero
    if labels is not None:
        gold = labels.clamp_min(0).unsqueeze(-1)  # [B, t, 1]
        nll = -logp.gather(-1, gold).squeeze(-1)  # [B, t]
        clm = torch.where(mask & (labels != IGNORE), nll, zero).sum()
    fusion = zero
    if target_ids is not None:
        valid = target_ids >= 0  # [B, t, K]
        p = torch.where(valid, target_probs.float(), 0.0)
        lq = logp.gather(-1, target_ids.clamp_min(0))  # [B, t, K]
        per_entry = -p * lq
        if kind == "kl":
            # p log p with 0 log 0 = 0.
            per_entry = per_entry + torch.where(p > 0, p * torch.log(p.clamp_min(1e-38)), 0.0)
        per_pos = per_entry.sum(-1)  # [B, t]
        fusion = torch.where(mask, per_pos, zero).sum()
    return clm, fusion


def _sums(logits, labels, target_ids, target_probs, mask, kind, chunk_size):
    """Chunk over the sequence; checkpoint each chunk so its fp32 log-softmax is not kept."""
    T = logits.shape[1]
    if chunk_size is None or chunk_size >= T:
        return _chunk_sums(logits, labels, target_ids, target_probs, mask, kind)
    clm = fusion = None
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)

        def sl(x, s=s, e=e):
            return None if x is None else x[:, s:e]

        args = (sl(logits), sl(labels), sl(target_ids), sl(target_probs), sl(mask), kind)
        if logits.requires_grad:
            c, f = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            c, f = _chunk_sums(*args)
        clm = c if clm is None else clm + c
        fusion = f if fusion is None else fusion + f
    return clm, fusion


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

    Returns:
        Scalar fp32: mean over masked positions (0 if none).
    """
    _check_kind(kind)
    _, fusion = _sums(logits, None, target_ids, target_probs, mask, kind, chunk_size)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ·CLM + (1 − λ)·fusion, sharing one log-softmax per chunk.

    Args:
        logits: [B, T, V] model logits.
        labels: [B, T] int64 gold *next* token at each position (already shifted),
            `-100` where there is none.
        target_ids: [B, T, K] int64 fused target ids (−1 = padding), or None for plain CLM.
        target_probs: [B, T, K] float fused target probabilities, or None.
        mask: [B, T] bool positions that count for both terms (normally `labels != -100`).
        clm_weight: λ in [0, 1].
        kind: "ce" or "kl" for the fusion term.
        chunk_size: positions per chunk; None = all at once.

    Returns:
        (total, clm, fusion): fp32 scalars, each a mean over the masked positions; `fusion` is
        0 when no targets are given.
    """
    _check_kind(kind)
    if target_ids is None or clm_weight >= 1.0:
        target_ids = target_probs = None
    mask = mask & (labels != IGNORE)
    n = mask.sum().clamp_min(1)
    clm, fusion = _sums(logits, labels, target_ids, target_probs, mask, kind, chunk_size)
    clm, fusion = clm / n, fusion / n
    total = clm_weight * clm + (1.0 - clm_weight) * fusion if target_ids is not None else clm
    return total, clm, fusion
