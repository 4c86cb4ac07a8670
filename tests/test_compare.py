"""lmfuse.compare: reading eval records, paired comparisons over blocks and seeds, and the number formats."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from lmfuse.compare import (
    best_source,
    bpb,
    cell,
    compare,
    compare_domains,
    first_of_kind,
    mean_std,
    outcome,
    signed,
)
from lmfuse.evaluate import per_block, summarize
from lmfuse.stats import LN2, bits_per_byte


def _record(kind: str, blocks: list[tuple[int, str, float, int]], shift: float, rng: random.Random) -> dict:
    """An eval record as `lmfuse eval` writes it: summaries and per-block figures."""
    rows = [((1.0 + shift + h) * LN2 * nb + rng.gauss(0, 0.5), nb // 4, nb) for _, _, h, nb in blocks]
    rec = summarize(rows, [d for _, d, _, _ in blocks])
    rec["kind"] = kind
    rec["per_block"] = per_block(rows, [{"block_id": i, "domain": d} for i, d, _, _ in blocks])
    return rec


def _blocks(n: int = 30, seed: int = 0) -> list[tuple[int, str, float, int]]:
    rng = random.Random(seed)
    return [(i, "a" if i % 2 else "b", rng.gauss(0, 0.1), rng.randint(200, 400)) for i in range(n)]


# -- the number formats --------------------------------------------------------------------------
def test_a_difference_that_rounds_to_zero_keeps_its_sign():
    # The report and the sweep share this rule: `[−0.0000, +0.0012]` shows that the interval holds zero.
    assert signed(-0.00001) == "\u22120.0000" and signed(0.00001) == "+0.0000"
    assert signed(0.0) == "+0.0000"  # an exact zero (two identical models)
    assert signed(-0.00123) == "\u22120.0012" and signed(0.01234, 3) == "+0.012"
    assert signed(math.nan) == "–"


def test_cells_write_what_is_finite():
    assert cell(-0.00123, lo=-0.0035, hi=0.001) == "\u22120.0012 [\u22120.0035,\u00a0+0.0010]"
    assert cell(-0.00123, -0.003, 0.0005, 0.0008) == "\u22120.0012 ± 0.0008 [\u22120.0030,\u00a0+0.0005]"
    assert cell(-0.00123, lo=math.nan, hi=math.nan) == "\u22120.0012"  # one block: no interval
    assert cell(1.23456, std=0.00123, sign=False) == "1.2346 ± 0.0012"
    assert cell(1.23456, sign=False) == "1.2346" and cell(math.nan, std=0.1, sign=False) == "–"


def test_outcome_and_spread():
    assert [outcome(-0.2, -0.1), outcome(0.1, 0.2), outcome(-0.1, 0.1), outcome(math.nan, math.nan)] == [
        "better", "worse", "noise", "none"]
    assert outcome(-0.1, 0.0) == "noise"  # an interval that touches zero holds it
    s = mean_std([1.0, 3.0, math.nan])
    assert (s.mean, s.n) == (2.0, 2) and s.std == pytest.approx(math.sqrt(2))
    assert math.isnan(mean_std([1.0]).std) and mean_std([]).n == 0


# -- reading records -----------------------------------------------------------------------------
def test_bits_per_byte_is_one_formula():
    assert bits_per_byte(10.5, 7) == 10.5 / (LN2 * 7)  # what eval's summaries hold, to the bit
    assert math.isnan(bits_per_byte(3.0, 0))
    nll, nb = np.random.default_rng(0).random((5, 4)), np.arange(1.0, 21.0).reshape(5, 4)
    assert bits_per_byte(nll, nb) == pytest.approx(nll.sum() / (LN2 * nb.sum()), rel=1e-15)
    assert np.array_equal(bits_per_byte(nll, nb, axis=1), nll.sum(1) / (LN2 * nb.sum(1)))


def test_the_model_of_a_kind_and_the_best_source():
    models = {"fused@best": {"kind": "fused"}, "zz": {"kind": "clm"}, "fused": {"kind": "fused"},
              "b-clm": {"kind": "clm"}}
    assert first_of_kind(models, "fused") == "fused"  # labelled as its kind, wherever it stands
    assert first_of_kind(models, "clm") == "b-clm"  # else the first label
    assert first_of_kind(models, "target") is None
    src = {"kind": "source", "overall": {"bpb": 0.9}, "domains": {"a": {"bpb": 1.2}, "b": {"bpb": None}}}
    other = {"kind": "source", "overall": {"bpb": 1.0}, "domains": {"a": {"bpb": 1.1}, "b": {"bpb": 0.7}}}
    models = {"s1": src, "s2": other, "t": {"kind": "target", "overall": {"bpb": 0.1}, "domains": {}}}
    assert [best_source(models, g) for g in ("overall", "a", "b")] == ["s1", "s2", "s2"]  # null: not scored
    assert math.isnan(bpb(src, "b")) and math.isnan(bpb(src, "c")) and bpb(src, "overall") == 0.9


# -- comparing -----------------------------------------------------------------------------------
def test_a_seed_independent_model_is_one_record_or_one_per_seed():
    rng = random.Random(1)
    blocks = _blocks()
    f0, f1 = _record("fused", blocks, -0.01, rng), _record("fused", blocks, -0.02, rng)
    src = _record("source", blocks, 0.05, rng)
    assert compare([f0, f1], [src], "a") == compare([f0, f1], [src, src], "a")
    nan = compare([f0], [src], "no such domain")
    assert all(math.isnan(x) for x in nan)


def test_the_average_of_domains_resamples_blocks_within_each_domain():
    rng = random.Random(2)
    blocks = _blocks(40)
    a, b = _record("fused", blocks, -0.03, rng), _record("clm", blocks, 0.0, rng)
    got = compare_domains([a], [b], ["a", "b"], n_boot=2000, seed=3)
    assert got["a"] == compare([a], [b], "a", n_boot=2000, seed=3)
    # The same resamples written out: per domain, blocks drawn with replacement, both models alike.
    draw = np.random.default_rng(3)
    acc = np.zeros(2000)
    for d in ("a", "b"):
        keep = [i for i, x in enumerate(a["per_block"]["domain"]) if x == d]
        na, ba, nb, bb = (np.asarray([r["per_block"][k][i] for i in keep], float)
                          for r, k in ((a, "nll"), (a, "bytes"), (b, "nll"), (b, "bytes")))
        idx = draw.integers(0, len(na), size=(2000, len(na)))
        acc += (na[idx].sum(1) / (LN2 * ba[idx].sum(1)) - nb[idx].sum(1) / (LN2 * bb[idx].sum(1))) / 2
    lo, hi = np.percentile(acc, [2.5, 97.5])
    avg = got["average"]
    assert avg.diff == pytest.approx((got["a"].diff + got["b"].diff) / 2, abs=1e-15)
    assert avg.lo == pytest.approx(lo, abs=1e-12) and avg.hi == pytest.approx(hi, abs=1e-12)
    assert avg.lo < avg.diff < avg.hi < 0
    bare = {k: v for k, v in a.items() if k != "per_block"}
    with pytest.raises(ValueError, match="no per-block figures"):
        compare_domains([bare], [b], ["a"])


def test_the_report_and_the_sweep_write_a_near_zero_difference_alike():
    from lmfuse.report import verdict
    from lmfuse.sweep_tables import _ci_cell

    rng = random.Random(4)
    blocks = _blocks()
    clm = _record("clm", blocks, 0.0, rng)
    fused = {**clm, "kind": "fused", "per_block": dict(clm["per_block"])}
    # 0.00002 bits/byte better on every block: a difference that rounds to −0.0000.
    fused["per_block"]["nll"] = [n - 2e-5 * LN2 * b for n, b in zip(clm["per_block"]["nll"], clm["per_block"]["bytes"])]
    results = {"domains": ["a", "b"], "models": {"fused": fused, "clm": clm}}
    _, head, rows = verdict(results, n_boot=200)
    iv = compare([fused], [clm], "overall", n_boot=200)
    assert rows[0][head.index("overall")] == cell(*iv)
    assert rows[0][head.index("overall")].startswith("\u22120.0000 [\u22120.0000,")
    assert _ci_cell({"diff": iv.diff, "lo": iv.lo, "hi": iv.hi}) == rows[0][head.index("overall")]
