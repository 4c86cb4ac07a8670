"""The paired bootstrap: hand-built cases, determinism, and agreement with scipy's bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmfuse.stats import bits_per_byte, paired_bootstrap


def _blocks(n=40, seed=0):
    rng = np.random.default_rng(seed)
    nbytes = rng.integers(200, 900, size=n).astype(float)
    nll = nbytes * math.log(2) * rng.uniform(0.8, 1.2, size=n)  # about one bit per byte, varying by block
    return nll, nbytes


def test_identical_models_give_zero_with_zero_width():
    nll, nbytes = _blocks()
    r = paired_bootstrap(nll, nll.copy(), nbytes, n_boot=2000, seed=1)
    assert r == (0.0, 0.0, 0.0)
    assert r.includes_zero


def test_constant_shift_per_byte_is_recovered_exactly_and_excludes_zero():
    nll, nbytes = _blocks()
    shift = 0.01  # bits per byte
    b = nll + shift * math.log(2) * nbytes
    diff, lo, hi = paired_bootstrap(nll, b, nbytes, n_boot=2000, seed=0)
    assert diff == pytest.approx(-shift, abs=1e-12)
    assert lo == pytest.approx(-shift, abs=1e-12) and hi == pytest.approx(-shift, abs=1e-12)
    assert hi < 0


def test_noisy_shift_excludes_zero_and_small_noise_does_not():
    nll, nbytes = _blocks(n=60)
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 0.02, size=nll.shape) * math.log(2) * nbytes
    worse = nll + 0.02 * math.log(2) * nbytes + noise
    r = paired_bootstrap(nll, worse, nbytes, seed=0)
    assert r.hi < 0 and not r.includes_zero
    assert r.lo < r.diff < r.hi
    same = paired_bootstrap(nll, nll + noise, nbytes, seed=0)
    assert same.includes_zero


def test_point_estimate_is_the_difference_of_pooled_ratios_with_own_bytes():
    nll, nbytes = _blocks()
    b_bytes = nbytes - 3  # the other tokenizer does not score the first token's bytes
    b = nll * 1.05
    r = paired_bootstrap(nll, b, nbytes, b_nbytes=b_bytes, n_boot=200)
    assert r.diff == pytest.approx(bits_per_byte(nll, nbytes) - bits_per_byte(b, b_bytes), rel=1e-12)


def test_deterministic_in_seed():
    nll, nbytes = _blocks()
    b = nll * np.random.default_rng(2).uniform(0.95, 1.05, size=nll.shape)
    assert paired_bootstrap(nll, b, nbytes, seed=3) == paired_bootstrap(nll, b, nbytes, seed=3)
    assert paired_bootstrap(nll, b, nbytes, seed=3) != paired_bootstrap(nll, b, nbytes, seed=4)


def test_chunking_does_not_change_the_result(monkeypatch):
    from lmfuse import stats

    nll, nbytes = _blocks(n=50)
    b = nll * np.random.default_rng(2).uniform(0.9, 1.1, size=nll.shape)
    whole = paired_bootstrap(nll, b, nbytes, n_boot=300, seed=7)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 50 * 7)  # 7 resamples per chunk
    # The same Generator stream drawn in several calls: integers() of (m, N) shapes concatenate.
    assert paired_bootstrap(nll, b, nbytes, n_boot=300, seed=7) == whole


def test_agrees_with_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    nll, nbytes = _blocks(n=80)
    b = nll * np.random.default_rng(9).uniform(0.9, 1.08, size=nll.shape)
    ours = paired_bootstrap(nll, b, nbytes, n_boot=20_000, seed=0)

    def stat(a, ab, b_, bb, axis=-1):
        return (a.sum(axis) / ab.sum(axis) - b_.sum(axis) / bb.sum(axis)) / math.log(2)

    ref = scipy_stats.bootstrap((nll, nbytes, b, nbytes), stat, paired=True, vectorized=True,
                                n_resamples=20_000, method="percentile", rng=np.random.default_rng(1))
    width = ours.hi - ours.lo
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)


def test_one_block_has_no_interval():
    r = paired_bootstrap([2.0], [1.0], [10])
    assert r.diff == pytest.approx(1.0 / (10 * math.log(2)))
    assert math.isnan(r.lo) and math.isnan(r.hi)
    assert r.includes_zero  # nothing tells the two apart


@pytest.mark.parametrize("kwargs,match", [
    ({"a_nll": [], "b_nll": [], "nbytes": []}, "no blocks"),
    ({"a_nll": [1.0, 2.0], "b_nll": [1.0], "nbytes": [1, 1]}, "b_nll has 1 blocks"),
    ({"a_nll": [1.0], "b_nll": [1.0], "nbytes": [0]}, "no bytes"),
    ({"a_nll": [float("nan")], "b_nll": [1.0], "nbytes": [1]}, "non-finite"),
    ({"a_nll": [1.0], "b_nll": [1.0], "nbytes": [1], "alpha": 1.5}, "alpha"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(**kwargs)
