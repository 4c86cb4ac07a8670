"""Paired bootstrap confidence intervals for differences in bits per byte.

Two models scored on the same held-out blocks give, per block, a summed NLL (nats) and the
UTF-8 bytes that NLL scores. Their bits per byte are ratios of sums (Σ nll / (ln 2 · Σ bytes)),
so the difference of two models is not a mean of per-block differences, and its uncertainty
comes from which blocks happened to be held out. `paired_bootstrap` resamples blocks with
replacement (the same blocks for both models: the pairing) and recomputes the difference of
the two ratios of sums on every resample; the interval is the percentile interval.

`scipy.stats.bootstrap` could compute the same thing (`paired=True`, a vectorised statistic of
four samples), but scipy is not a dependency of lmfuse, its default BCa interval is undefined
(NaN and a warning) for the zero-width case of two identical models, and the twenty lines
below are cheaper than a dependency; tests check both give the same interval.

Leaf module: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

LN2 = math.log(2.0)
#: Elements of the `[resamples, blocks]` index matrix drawn at once (bounds memory to ~32 MB).
CHUNK_ELEMENTS = 1 << 22


class Interval(NamedTuple):
    """A point estimate with its confidence interval; unpacks as `(diff, lo, hi)`."""

    diff: float
    lo: float
    hi: float

    @property
    def includes_zero(self) -> bool:
        """True when the interval does not tell the two models apart (it contains 0, or is NaN)."""
        return not (self.lo > 0.0 or self.hi < 0.0)


def bits_per_byte(nll: float | Sequence[float] | np.ndarray, nbytes: float | Sequence[float] | np.ndarray,
                  axis: int | None = None) -> float | np.ndarray:
    """Pooled bits per byte, Σ nll / (ln 2 · Σ bytes): the one formula lmfuse uses.

    A ratio of sums, not a mean of per-block ratios: long blocks weigh more.

    Args:
        nll: Summed NLL in nats: one total, or `[..., N]` per block.
        nbytes: Scored UTF-8 bytes, the same shape as `nll`.
        axis: The axis summed over; None sums everything and returns a float.

    Returns:
        Bits per byte: a float, or with `axis` an array without that axis; NaN where no bytes
        were scored.
    """
    total = np.sum(np.asarray(nbytes, dtype=np.float64), axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total > 0, np.sum(np.asarray(nll, dtype=np.float64), axis=axis) / (LN2 * total), np.nan)
    return float(out) if axis is None else out


def _column(x: Sequence[float], name: str, n: int | None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} blocks, expected {n}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def paired_bootstrap(a_nll: Sequence[float], b_nll: Sequence[float], nbytes: Sequence[float],
                     b_nbytes: Sequence[float] | None = None, n_boot: int = 10_000, seed: int = 0,
                     alpha: float = 0.05) -> Interval:
    """Difference in bits per byte between two models on the same blocks, with a bootstrap CI.

    The statistic is `bpb(a) - bpb(b)`, each a ratio of sums over the blocks. Every resample
    draws `N` block indices with replacement and applies them to both models (paired), so what
    varies is the choice of blocks, not the models. The interval is the `alpha/2` and
    `1 - alpha/2` percentiles of `n_boot` resampled differences.

    Args:
        a_nll: `[N]` summed NLL (nats) of model A per block.
        b_nll: `[N]` summed NLL (nats) of model B on the same blocks, same order.
        nbytes: `[N]` scored bytes per block (for A, and for B unless `b_nbytes` is given).
        b_nbytes: `[N]` scored bytes per block for B when its tokenizer scores a different span
            (e.g. one model's first token is a BOS and the other's is text).
        n_boot: Number of resamples.
        seed: Seed of the numpy Generator; the same inputs and seed give the same interval.
        alpha: 1 - confidence level (0.05: a 95% interval).

    Returns:
        `Interval(diff, lo, hi)` in bits per byte; negative means A is better (fewer bits). With
        a single block there is nothing to resample: `lo` and `hi` are NaN.

    Raises:
        ValueError: On empty, mismatched or non-finite inputs, zero total bytes, or bad
            `n_boot`/`alpha`.
    """
    a = _column(a_nll, "a_nll", None)
    n = a.shape[0]
    if n == 0:
        raise ValueError("no blocks to resample")
    b = _column(b_nll, "b_nll", n)
    ab = _column(nbytes, "nbytes", n)
    bb = ab if b_nbytes is None else _column(b_nbytes, "b_nbytes", n)
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if ab.sum() <= 0 or bb.sum() <= 0:
        raise ValueError("the blocks score no bytes")

    diff = (a.sum() / ab.sum() - b.sum() / bb.sum()) / LN2
    if n == 1:
        return Interval(float(diff), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    cols = (a, ab, b, bb)
    stats = np.empty(n_boot, dtype=np.float64)
    step = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, step):
        m = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))  # (m, N) block indices, with replacement
        sa, sab, sb, sbb = (c[idx].sum(axis=1) for c in cols)  # each (m,)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[start:start + m] = (sa / sab - sb / sbb) / LN2
    stats = stats[np.isfinite(stats)]  # a resample of only zero-byte blocks has no ratio
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(diff), float(lo), float(hi))
