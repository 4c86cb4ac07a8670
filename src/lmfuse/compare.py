"""Two models' held-out bits per byte compared, over blocks and seeds, and how the numbers are written.

`lmfuse eval` keeps, for every model, an eval record (one entry of `results.json`'s `models`):
summaries (`overall`, `domains`, each with `bpb`) and `per_block` figures (`block_id`, `domain`,
`nll` in nats, scored UTF-8 `bytes`, one entry per held-out block). Two models are compared on
the blocks both scored, paired by `block_id`, each with its own bytes (tokenizers score different
spans): `compare` gives bpb(A) − bpb(B) with a 95% paired bootstrap interval over which blocks
were held out (`lmfuse.stats.paired_bootstrap`). With several seeds, each side's per-block NLL and
bytes are first averaged over its records, so the interval is that of the seed-averaged
difference; the spread over seeds is `mean_std` of the per-seed differences.

The run report, the sweep's table and the experiment drivers compare and write numbers only
through this module, so the same records give the same interval and the same text everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from lmfuse.stats import Interval, bits_per_byte, paired_bootstrap

N_BOOT = 10_000  # resamples per interval, as every committed table was made with
BOOT_SEED = 0  # fixed, so the same results give the same tables
ALPHA = 0.05  # 95% intervals
OVERALL = "overall"  # the group of all blocks, beside the domains
MINUS = "\u2212"
DASH = "–"  # a number that does not exist (NaN)


class Spread(NamedTuple):
    """Mean and sample standard deviation (NaN with fewer than two values) of `n` finite values."""

    mean: float
    std: float
    n: int


# -- reading eval records ------------------------------------------------------------------------
def bpb(rec: dict, group: str) -> float:
    """A record's bits per byte on a domain or `overall` (from its summaries); NaN when not scored."""
    m = rec.get("overall") if group == OVERALL else rec.get("domains", {}).get(group)
    v = (m or {}).get("bpb")
    return float(v) if v is not None else math.nan  # null in results.json: NaN weights or logits


def first_of_kind(models: Mapping[str, dict], kind: str) -> str | None:
    """The model of a kind (`fused`, `clm`, `target`): the one labelled as its kind if any, else the first label.

    `lmfuse eval` labels the trained models by their kind; `fused@best` is of kind `fused` too, and
    results.json keeps no order, hence the label rule and then sorted labels.
    """
    if models.get(kind, {}).get("kind") == kind:
        return kind
    return next((label for label, rec in sorted(models.items()) if rec.get("kind") == kind), None)


def best_source(models: Mapping[str, dict], group: str = OVERALL) -> str | None:
    """The source with the lowest bits per byte on `group` (ties: the first label), or None."""
    scored = [(bpb(rec, group), label) for label, rec in models.items()
              if rec.get("kind") == "source" and math.isfinite(bpb(rec, group))]
    return min(scored)[1] if scored else None


def _columns(recs: Sequence[dict], group: str) -> tuple[list[int], list[float], list[float]] | None:
    """Block ids, and per-block NLL and bytes averaged over `recs`, on the blocks every record scored.

    None when a record has no per-block figures (written by an older lmfuse).
    """
    pbs = [r.get("per_block") for r in recs]
    if not all(pbs):
        return None
    where = [{b: i for i, b in enumerate(pb["block_id"])} for pb in pbs]
    first = pbs[0]
    ids = [b for i, b in enumerate(first["block_id"]) if (group == OVERALL or first["domain"][i] == group)
           and all(b in w for w in where)]
    nll = [sum(pb["nll"][w[b]] for pb, w in zip(pbs, where)) / len(pbs) for b in ids]
    nbytes = [sum(pb["bytes"][w[b]] for pb, w in zip(pbs, where)) / len(pbs) for b in ids]
    return ids, nll, nbytes


def _paired(a: Sequence[dict], b: Sequence[dict], group: str) -> list[list[float]] | None:
    """`[a_nll, b_nll, a_bytes, b_bytes]`, each `[N]` over the blocks both sides scored (A's order)."""
    ca, cb = _columns(a, group), _columns(b, group)
    if ca is None or cb is None:
        return None
    where_b = {bid: k for k, bid in enumerate(cb[0])}
    pairs = [(k, where_b[bid]) for k, bid in enumerate(ca[0]) if bid in where_b]
    return [[ca[1][i] for i, _ in pairs], [cb[1][j] for _, j in pairs],
            [ca[2][i] for i, _ in pairs], [cb[2][j] for _, j in pairs]]


# -- comparing -----------------------------------------------------------------------------------
def compare(a: Sequence[dict], b: Sequence[dict], group: str, n_boot: int = N_BOOT,
            seed: int = BOOT_SEED) -> Interval:
    """bpb(A) − bpb(B) on `group`, with a 95% paired bootstrap interval over held-out blocks.

    Args:
        a: `S` eval records of model A (one per seed).
        b: Eval records of model B on the same blocks: one per seed, or one for a model that does
            not depend on the seed (a source, a merge).
        group: A domain name, or `overall`.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        `Interval(diff, lo, hi)` in bits per byte, negative when A is better. Without per-block
        figures: the difference of the summaries (averaged over records) and NaN bounds; NaN
        bounds with a single block; all NaN when the two share no block of `group`.
    """
    cols = _paired(a, b, group)
    if cols is None:
        diff = sum(bpb(r, group) for r in a) / len(a) - sum(bpb(r, group) for r in b) / len(b)
        return Interval(diff, math.nan, math.nan)
    if not cols[0]:
        return Interval(math.nan, math.nan, math.nan)
    a_nll, b_nll, a_bytes, b_bytes = cols
    return paired_bootstrap(a_nll, b_nll, a_bytes, b_nbytes=b_bytes, n_boot=n_boot, seed=seed, alpha=ALPHA)


def compare_domains(a: Sequence[dict], b: Sequence[dict], domains: Sequence[str], n_boot: int = N_BOOT,
                    seed: int = BOOT_SEED) -> dict[str, Interval]:
    """`compare` on each domain, and on `average`, the mean of the domains' bits per byte.

    The average weighs every domain alike (a paper's "average" column), unlike `overall`, which
    pools the blocks. Its interval resamples blocks within each domain, the same blocks for both
    models, and recomputes the mean of the per-domain differences on every resample.

    Args:
        a: Eval records of model A (see `compare`).
        b: Eval records of model B (see `compare`).
        domains: The domains averaged.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        `{domain: Interval, ..., "average": Interval}` in bits per byte.

    Raises:
        ValueError: When a domain has no block with per-block figures of both models.
    """
    out = {d: compare(a, b, d, n_boot, seed) for d in domains}
    rng = np.random.default_rng(seed)
    mean_diff = np.zeros(n_boot)  # [n_boot]
    for d in domains:
        cols = _paired(a, b, d)
        if not cols or not cols[0]:
            raise ValueError(f"no per-block figures of both models on {d}: no average to resample")
        a_nll, b_nll, a_bytes, b_bytes = (np.asarray(c, dtype=np.float64) for c in cols)
        idx = rng.integers(0, len(a_nll), size=(n_boot, len(a_nll)))  # [n_boot, N_d] blocks, with replacement
        mean_diff += (bits_per_byte(a_nll[idx], a_bytes[idx], axis=1)
                      - bits_per_byte(b_nll[idx], b_bytes[idx], axis=1)) / len(domains)
    lo, hi = np.quantile(mean_diff, [ALPHA / 2, 1 - ALPHA / 2])
    out["average"] = Interval(float(np.mean([out[d].diff for d in domains])), float(lo), float(hi))
    return out


def mean_std(xs: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of the finite values of `xs` (e.g. a difference over seeds)."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return Spread(math.nan, math.nan, 0)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return Spread(mean, std, len(xs))


def outcome(lo: float, hi: float) -> str:
    """What an interval of A − B says: `better` (below zero), `worse`, `noise` (it holds zero) or `none`."""
    if not math.isfinite(lo):
        return "none"  # a single block, or no per-block figures
    return "better" if hi < 0 else "worse" if lo > 0 else "noise"


# -- writing -------------------------------------------------------------------------------------
def signed(v: float, digits: int = 4) -> str:
    """A difference with its sign and a real minus: `+0.0012`, `−0.0034`; `–` for NaN.

    A difference that rounds to zero keeps its sign (`−0.0000`): an interval written
    `[−0.0000, +0.0012]` still shows that it holds zero (what its words say), where `+0.0000` would
    make it look wholly above zero. Only an exact zero is written `+0.0000`.
    """
    return f"{v:+.{digits}f}".replace("-", MINUS) if math.isfinite(v) else DASH


def cell(value: float, lo: float = math.nan, hi: float = math.nan, std: float = math.nan, *,
         sign: bool = True) -> str:
    """A table cell: `−0.0012 ± 0.0008 [−0.0030, +0.0005]`, each part written only when finite.

    `cell(*interval)` writes an `Interval`.

    Args:
        value: A difference (`sign=True`), or bits per byte (`sign=False`: `1.2345`).
        lo: Lower bound of its interval.
        hi: Upper bound of its interval.
        std: Its standard deviation over seeds.
        sign: Whether `value` is a difference.
    """
    if not math.isfinite(value):
        return DASH
    text = signed(value) if sign else f"{value:.4f}"
    if math.isfinite(std):
        text += f" ± {std:.4f}"
    if math.isfinite(lo):
        text += f" [{signed(lo)},\u00a0{signed(hi)}]"  # a no-break space: a narrow column wraps before it
    return text
