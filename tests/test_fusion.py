"""minCE / avgCE on hand-built candidates, at sequence and token level."""

import math

import numpy as np
import pytest

from lmfuse.errors import LmfuseError
from lmfuse.fusion import FUSIONS, FusionOptions, candidate_probs, fuse, merge_duplicates

LOG = np.log


def _dense(ids, probs, V=20):
    """[T, M] sparse → [T, V] dense, for comparisons."""
    out = np.zeros((ids.shape[0], V))
    for t in range(ids.shape[0]):
        for i, p in zip(ids[t], probs[t], strict=True):
            if i >= 0:
                out[t, i] += p
    return out


def _cands(n, T=3, K=2):
    """Candidate n puts 0.5/0.5 (after renormalization) on ids (2n, 2n+1) at every position."""
    ids = np.stack([np.tile([2 * i, 2 * i + 1], (T, 1)) for i in range(n)])  # [N, T, K]
    lp = np.full((n, T, K), LOG(0.4))  # top-2 covers 0.8 of the mass
    return ids, lp


def test_registry_names():
    assert FUSIONS.names() == ["avgCE", "minCE"]
    with pytest.raises(LmfuseError, match="unknown fusion function"):
        FUSIONS.get("maxCE")


@pytest.mark.parametrize("n", [1, 2, 5])
def test_min_ce_sequence_level_picks_best(n):
    ids, lp = _cands(n)
    q = np.array([3.0, 1.0, 2.0, 0.5, 4.0])[:n]
    gold = np.array([7, 7, -1])
    fi, fp, *_ = fuse(ids, lp, np.ones((n, 3), bool), q, gold, "minCE")
    best = int(np.argmin(q))
    d = _dense(fi, fp)
    for t in range(3):
        assert d[t, 2 * best] == pytest.approx(0.5) and d[t, 2 * best + 1] == pytest.approx(0.5)
        assert d[t].sum() == pytest.approx(1.0)


def test_min_ce_ties_go_to_lowest_index():
    ids, lp = _cands(3, T=1)
    fi, fp, *_ = fuse(ids, lp, np.ones((3, 1), bool), np.array([2.0, 1.0, 1.0]), np.array([9]), "minCE")
    assert set(fi[0][fp[0] > 0]) == {2, 3}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_avg_ce_sequence_level_reference_weights(n):
    ids, lp = _cands(n, T=2)
    q = np.array([1.0, 2.0, 0.5, 3.0, 1.5])[:n]
    fi, fp, *_ = fuse(ids, lp, np.ones((n, 2), bool), q, np.array([0, -1]), "avgCE")
    w = np.exp(np.exp(-q)) / np.exp(np.exp(-q)).sum()  # softmax over exp(−CE), as the reference
    d = _dense(fi, fp)
    for i in range(n):
        assert d[0, 2 * i] == pytest.approx(0.5 * w[i], rel=1e-6)
        assert d[1, 2 * i + 1] == pytest.approx(0.5 * w[i], rel=1e-6)


def test_avg_ce_softmax_neg_weighting():
    ids, lp = _cands(2, T=1)
    q = np.array([1.0, 3.0])
    fi, fp, *_ = fuse(ids, lp, np.ones((2, 1), bool), q, np.array([0]), "avgCE",
                  FusionOptions(avgce_weighting="softmax_neg"))
    d = _dense(fi, fp)
    w0 = 1 / (1 + math.exp(-2.0))
    assert d[0, 0] == pytest.approx(0.5 * w0, rel=1e-6)
    assert d[0, 2] == pytest.approx(0.5 * (1 - w0), rel=1e-6)


def test_token_level_min_ce_and_avg_ce():
    # 2 candidates, 3 positions; quality per position; candidate 1 not aligned at t=2.
    ids, lp = _cands(2)
    q = np.array([[1.0, 3.0, 1.0], [2.0, 0.5, 0.1]])
    aligned = np.array([[1, 1, 1], [1, 1, 0]], bool)
    gold = np.array([5, 6, 7])
    d = _dense(*fuse(ids, lp, aligned, q, gold, "minCE")[:2])
    assert d[0, 0] == pytest.approx(0.5) and d[1, 2] == pytest.approx(0.5) and d[2, 0] == pytest.approx(0.5)
    d = _dense(*fuse(ids, lp, aligned, q, gold, "avgCE")[:2])
    for t in range(2):
        s = np.exp(np.exp(-q[:, t]))
        w = s / s.sum()
        assert d[t, 0] == pytest.approx(0.5 * w[0]) and d[t, 2] == pytest.approx(0.5 * w[1])
    assert d[2, 0] == pytest.approx(0.5) and d[2, 2] == 0.0  # unaligned candidate excluded


def test_no_candidate_aligned_gives_gold_one_hot():
    ids, lp = _cands(2)
    aligned = np.array([[0, 1, 0], [0, 0, 0]], bool)
    gold = np.array([11, 12, -1])
    fi, fp, *_ = fuse(ids, lp, aligned, np.array([1.0, 2.0]), gold, "avgCE")
    d = _dense(fi, fp)
    assert d[0, 11] == 1.0 and d[0].sum() == pytest.approx(1.0)
    assert d[1, 0] == pytest.approx(0.5)
    assert d[2].sum() == 0.0  # last position: no gold, nothing aligned → empty row


def test_outside_topk_gold_and_temperature():
    ids = np.array([[[3, 4]]])
    lp = LOG(np.array([[[0.5, 0.3]]]))
    d = _dense(*fuse(ids, lp, np.ones((1, 1), bool), np.array([1.0]), np.array([4]), "minCE",
                     FusionOptions(outside_topk="gold"))[:2])
    assert d[0, 3] == pytest.approx(0.5) and d[0, 4] == pytest.approx(0.5)  # 0.3 + 0.2 outside
    d = _dense(*fuse(ids, lp, np.ones((1, 1), bool), np.array([1.0]), np.array([4]), "minCE",
                     FusionOptions(temperature=2.0))[:2])
    a, b = math.sqrt(0.5), math.sqrt(0.3)
    assert d[0, 3] == pytest.approx(a / (a + b))


def test_candidate_probs_gold_without_gold_token_renormalizes():
    ids = np.array([[[1, -1]]])
    lp = np.array([[[LOG(0.5), -np.inf]]])
    ci, cp, _ = candidate_probs(ids, lp, np.array([-1]), FusionOptions(outside_topk="gold"))
    assert cp[0, 0, 0] == pytest.approx(1.0) and cp[0, 0].sum() == pytest.approx(1.0)


def test_duplicates_merged_across_candidates():
    ids = np.array([[[1, 2]], [[2, 3]]])
    lp = LOG(np.array([[[0.5, 0.5]], [[0.5, 0.5]]]))
    fi, fp, *_ = fuse(ids, lp, np.ones((2, 1), bool), np.array([1.0, 1.0]), np.array([0]), "avgCE")
    assert list(fi[0]) == [1, 2, 3]
    assert fp[0].tolist() == pytest.approx([0.25, 0.5, 0.25])


def test_merge_duplicates_layout():
    ids = np.array([[5, -1, 5, 2], [-1, -1, -1, -1], [7, 7, 7, 1]])
    p = np.array([[0.1, 0.9, 0.2, 0.3], [1, 1, 1, 1], [0.25, 0.25, 0.0, 0.5]])
    oi, op = merge_duplicates(ids, p)
    assert oi.tolist() == [[2, 5], [-1, -1], [1, 7]]
    np.testing.assert_allclose(op, [[0.3, 0.3], [0, 0], [0.5, 0.5]], rtol=1e-6)


def test_shape_mismatch_is_a_clear_error():
    ids, lp = _cands(2)
    with pytest.raises(LmfuseError, match="shape"):
        fuse(ids, lp, np.ones((2, 4), bool), np.array([1.0, 2.0]), np.array([0, 0, 0]))


def test_rest_rule_keeps_outside_mass_as_a_bucket_mixed_by_weight():
    # Candidate 0: ids (0, 1) at .4/.4 (rest .2); candidate 1: ids (2, 3) at .3/.1 (rest .6).
    ids = np.array([[[0, 1]], [[2, 3]]])
    lp = LOG(np.array([[[0.4, 0.4]], [[0.3, 0.1]]]))
    q = np.array([1.0, 1.0])  # equal quality: avgCE gives equal weights with softmax over −q
    out = fuse(ids, lp, np.ones((2, 1), bool), q, np.array([3]), "avgCE",
               FusionOptions(outside_topk="rest", avgce_weighting="softmax_neg"))
    d = _dense(out.ids, out.probs)
    assert d[0, :4] == pytest.approx([0.2, 0.2, 0.15, 0.05])
    assert out.rest[0] == pytest.approx(0.4)
    assert d[0].sum() + out.rest[0] == pytest.approx(1.0)
    # minCE: the better candidate's rest only; no usable candidate: one-hot on gold, rest 0.
    out = fuse(ids, lp, np.array([[True], [False]]), q, np.array([3]), "minCE", FusionOptions(outside_topk="rest"))
    assert out.rest[0] == pytest.approx(0.2)
    out = fuse(ids, lp, np.zeros((2, 1), bool), q, np.array([3]), "minCE", FusionOptions(outside_topk="rest"))
    assert out.rest[0] == 0.0 and _dense(out.ids, out.probs)[0, 3] == 1.0


def test_a_sampled_distribution_is_the_same_under_every_tail_rule():
    # Counts 40/24 of 64 draws: stored probabilities sum to 1, nothing lies outside.
    ids = np.array([[[5, 7]]])
    lp = LOG(np.array([[[40 / 64, 24 / 64]]]))
    outs = [fuse(ids, lp, np.ones((1, 1), bool), np.array([1.0]), np.array([7]), "minCE",
                 FusionOptions(outside_topk=rule)) for rule in ("renormalize", "gold", "rest")]
    for o in outs:
        assert _dense(o.ids, o.probs)[0, [5, 7]] == pytest.approx([40 / 64, 24 / 64])
        assert o.rest[0] == pytest.approx(0.0, abs=1e-12)


def test_span_target_mixes_the_candidates_that_scored_the_gold_text():
    ids, lp = _cands(2, T=3)
    span_ll = LOG(np.array([[0.5, 0.5, 0.5], [0.2, np.nan, 0.9]]))  # source 1 has no exact span at t=1
    gold = np.array([1, 2, -1])  # no gold token at the last position: no span target
    q = np.array([2.0, 1.0])  # source 1 is better
    out = fuse(ids, lp, np.ones((2, 3), bool), q, gold, "minCE", span_ll=span_ll)
    assert out.span[0] == pytest.approx(0.2)  # minCE: the better candidate's text probability
    assert out.span[1] == pytest.approx(0.5)  # only candidate 0 scored the text there
    assert np.isnan(out.span[2])
    out = fuse(ids, lp, np.ones((2, 3), bool), q, gold, "avgCE", FusionOptions(avgce_weighting="softmax_neg"),
               span_ll=span_ll)
    w1 = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0))
    assert out.span[0] == pytest.approx(w1 * 0.2 + (1 - w1) * 0.5)
    assert np.isnan(fuse(ids, lp, np.ones((2, 3), bool), q, gold, "minCE").span).all()
