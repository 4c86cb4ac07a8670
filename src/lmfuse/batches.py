"""The one padded forward pass: token sequences batched longest first, right-padded, with a mask.

Extraction, evaluation and the extraction benchmark all run a model over many blocks of
different lengths; sorting by length first keeps padding (wasted compute) small, and the order
(longest first, ties by position in the input) is fixed, so every run batches alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def padded_batches(seqs: Sequence[Sequence[int]], batch_size: int, pad: int,
                   todo: Sequence[int] | None = None) -> Iterator[tuple[list[int], list[int], Any, Any]]:
    """Batches of token sequences, longest first, right-padded.

    Args:
        seqs: `N` token-id sequences.
        batch_size: Sequences per batch.
        pad: The id padded positions get (masked out).
        todo: The indices to batch (default: all).

    Yields:
        `(idx, lens, input_ids [B, T] long, attention_mask [B, T] long)`: the batch's indices
        into `seqs`, their lengths, and the padded tensors on the CPU (T = the longest length).
    """
    import torch

    order = sorted(range(len(seqs)) if todo is None else todo, key=lambda i: (-len(seqs[i]), i))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lens = [len(seqs[i]) for i in idx]
        ids = torch.full((len(idx), max(lens)), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), max(lens)), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : lens[r]] = torch.tensor(seqs[i])
            mask[r, : lens[r]] = 1
        yield idx, lens, ids, mask
