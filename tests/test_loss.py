"""sparse_fusion_loss / fused_clm_loss on hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmfuse.errors import LmfuseError
from lmfuse.loss import fused_clm_loss, sparse_fusion_loss


def _rand(B=2, T=5, V=11, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T, K), generator=g)
    probs = torch.rand(B, T, K, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    return logits, ids, probs, mask


def test_one_hot_target_equals_plain_ce():
    logits, _, _, mask = _rand(K=1)
    gold = torch.randint(0, 11, mask.shape)
    ids = torch.cat([gold[..., None], torch.full_like(gold[..., None], -1)], -1)
    probs = torch.tensor([1.0, 0.7]).expand(*gold.shape, 2)  # padding prob is ignored
    got = sparse_fusion_loss(logits, ids, probs, mask)
    want = F.cross_entropy(logits[mask], gold[mask])
    assert torch.allclose(got, want, atol=1e-6)


def test_hand_computed_value_and_masking():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])  # q = [.25, .75] at t=0
    ids = torch.tensor([[[0, 1], [0, 1]]])
    probs = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    mask = torch.tensor([[True, False]])
    got = sparse_fusion_loss(logits, ids, probs, mask)
    want = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert got.item() == pytest.approx(want, abs=1e-6)
    # A masked position's value does not matter.
    logits2 = logits.clone()
    logits2[0, 1] = torch.tensor([-50.0, 50.0])
    assert sparse_fusion_loss(logits2, ids, probs, mask).item() == pytest.approx(want, abs=1e-6)


def test_duplicate_ids_add_up():
    logits, _, _, mask = _rand(K=1)
    ids = torch.full((*mask.shape, 3), 4)
    probs = torch.tensor([0.2, 0.3, 0.5]).expand(*mask.shape, 3)
    one = sparse_fusion_loss(logits, ids[..., :1], torch.ones(*mask.shape, 1), mask)
    assert torch.allclose(sparse_fusion_loss(logits, ids, probs, mask), one, atol=1e-6)


def test_kl_minus_ce_is_minus_entropy():
    logits, ids, probs, mask = _rand()
    ids[..., 1] = torch.where(ids[..., 1] == ids[..., 0], (ids[..., 0] + 1) % 11, ids[..., 1])
    ids[..., 2] = -1
    probs = probs.clone()
    probs[..., 2] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    ce = sparse_fusion_loss(logits, ids, probs, mask, kind="ce")
    kl = sparse_fusion_loss(logits, ids, probs, mask, kind="kl")
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    assert torch.allclose(kl - ce, -ent[mask].mean(), atol=1e-5)
    assert kl.item() >= -1e-6


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_chunked_equals_unchunked_values_and_grads(chunk):
    logits, ids, probs, mask = _rand(T=7)
    labels = torch.randint(0, 11, mask.shape)
    labels[1, 2] = -100
    outs, grads = [], []
    for cs in (None, chunk):
        x = logits.clone().requires_grad_(True)
        total, clm, fus, _ = fused_clm_loss(x, labels, ids, probs, mask, 0.3, "kl", cs)
        total.backward()
        outs.append(torch.stack([total, clm, fus]).detach())
        grads.append(x.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fused_clm_combination():
    logits, ids, probs, mask = _rand()
    labels = torch.randint(0, 11, mask.shape)
    total, clm, fus, _ = fused_clm_loss(logits, labels, ids, probs, mask, 0.25)
    assert torch.allclose(clm, F.cross_entropy(logits[mask], labels[mask]), atol=1e-6)
    assert torch.allclose(fus, sparse_fusion_loss(logits, ids, probs, mask), atol=1e-6)
    assert torch.allclose(total, 0.25 * clm + 0.75 * fus, atol=1e-6)
    # λ = 1 (the control) ignores the targets.
    total1, clm1, fus1, _ = fused_clm_loss(logits, labels, ids, probs, mask, 1.0)
    assert torch.allclose(total1, clm) and fus1.item() == 0.0
    t0, _, _, _ = fused_clm_loss(logits, labels, None, None, mask, 0.5)
    assert torch.allclose(t0, clm)


def test_bf16_logits_and_empty_mask():
    logits, ids, probs, mask = _rand()
    got = sparse_fusion_loss(logits.bfloat16(), ids, probs, mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got, sparse_fusion_loss(logits.bfloat16().float(), ids, probs, mask))
    assert sparse_fusion_loss(logits, ids, probs, torch.zeros_like(mask)).item() == 0.0


def test_unknown_kind():
    logits, ids, probs, mask = _rand()
    with pytest.raises(LmfuseError, match="kind"):
        sparse_fusion_loss(logits, ids, probs, mask, kind="js")


# -- the rest bucket ------------------------------------------------------------------------------
def test_rest_bucket_hand_computed_value_and_gradient():
    # q = softmax([0, log 2, log 3, log 4]) = [.1, .2, .3, .4]; stored ids {1, 2} with p = .3/.2,
    # rest r = .5 is matched by the student's mass outside {1, 2}: .1 + .4 = .5.
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0), math.log(4.0)]]], requires_grad=True)
    ids = torch.tensor([[[1, 2, -1]]])
    probs = torch.tensor([[[0.3, 0.2, 0.0]]])
    rest = torch.tensor([[0.5]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = sparse_fusion_loss(logits, ids, probs, mask, target_rest=rest)
    want = -(0.3 * math.log(0.2) + 0.2 * math.log(0.3) + 0.5 * math.log(0.5))
    assert got.item() == pytest.approx(want, abs=1e-6)
    got.backward()
    # d/dz_v of −Σ p_k log q_k − r log(1 − q_1 − q_2) = q_v·(Σp + r) − p_v − r·q_v·[v ∉ S]/(1 − q_S)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p = torch.tensor([0.0, 0.3, 0.2, 0.0])
    outside = torch.tensor([1.0, 0.0, 0.0, 1.0])
    grad = q * 1.0 - p - 0.5 * q * outside / 0.5
    assert torch.allclose(logits.grad[0, 0], grad, atol=1e-6)
    # The student that matches the teacher's bucketed distribution has zero gradient there:
    # teacher (p on {1, 2}, r elsewhere) vs student q with q_1 = .3, q_2 = .2, q_0 + q_3 = .5.
    z = torch.log(torch.tensor([[[0.25, 0.3, 0.2, 0.25]]])).requires_grad_(True)
    sparse_fusion_loss(z, ids, probs, mask, target_rest=rest).backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-6)


def test_rest_bucket_kl_is_ce_minus_entropy_and_zero_rest_changes_nothing():
    logits, ids, probs, mask = _rand()
    ids[..., 1] = torch.where(ids[..., 1] == ids[..., 0], (ids[..., 0] + 1) % 11, ids[..., 1])
    ids[..., 2] = -1
    probs = probs.clone()
    probs[..., 2] = 0.0
    probs = probs / probs.sum(-1, keepdim=True) * 0.6
    rest = torch.full(mask.shape, 0.4)
    ce = sparse_fusion_loss(logits, ids, probs, mask, target_rest=rest)
    kl = sparse_fusion_loss(logits, ids, probs, mask, kind="kl", target_rest=rest)
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1) - 0.4 * math.log(0.4)
    assert torch.allclose(kl - ce, -ent[mask].mean(), atol=1e-5)
    assert kl.item() >= -1e-6
    no_rest = sparse_fusion_loss(logits, ids, probs, mask)
    assert torch.allclose(sparse_fusion_loss(logits, ids, probs, mask, target_rest=torch.zeros_like(rest)), no_rest)


def test_rest_bucket_row_without_ids_has_finite_gradient():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    ids = torch.tensor([[[-1, -1], [0, 1]]])
    probs = torch.tensor([[[0.0, 0.0], [0.2, 0.2]]])
    rest = torch.tensor([[1.0, 0.6]])
    loss = sparse_fusion_loss(logits, ids, probs, torch.ones(1, 2, dtype=torch.bool), target_rest=rest)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# -- the span term ----------------------------------------------------------------------------------
def test_span_term_hand_computed_and_weighted():
    # q(gold = 2) = .3; teacher text probability s = .6: −(.6 log .3 + .4 log .7).
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0), math.log(4.0)],
                            [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[2, 1]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    span = torch.tensor([[0.6, float("nan")]])  # no span target at the second position
    total, clm, fus, sp = fused_clm_loss(logits, labels, None, None, mask, 1.0, span_target=span, span_weight=0.5)
    want = -(0.6 * math.log(0.3) + 0.4 * math.log(0.7))
    assert sp.item() == pytest.approx(want, abs=1e-6)
    assert clm.item() == pytest.approx(-(math.log(0.3) + math.log(0.25)) / 2, abs=1e-6)
    assert total.item() == pytest.approx(clm.item() + 0.5 * want, abs=1e-6)
    # Gradient w.r.t. the gold logit: d/dz_g = −s(1 − q) + (1 − s)·q(1 − q)/(1 − q)·... = q − s.
    (sp).backward()
    assert logits.grad[0, 0, 2].item() == pytest.approx(0.3 - 0.6, abs=1e-6)
    assert torch.all(logits.grad[0, 1] == 0)


def test_span_term_is_zero_at_the_teachers_likelihood_in_kl_and_off_without_weight():
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]))
    labels = torch.tensor([[3]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    span = torch.tensor([[0.4]])
    _, _, _, sp = fused_clm_loss(logits, labels, None, None, mask, 1.0, "kl", span_target=span, span_weight=1.0)
    assert sp.item() == pytest.approx(0.0, abs=1e-6)
    total, clm, _, sp0 = fused_clm_loss(logits, labels, None, None, mask, 1.0, span_target=span, span_weight=0.0)
    assert sp0.item() == 0.0 and total.item() == pytest.approx(clm.item())


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_rest_and_span_equal_unchunked(chunk):
    logits, ids, probs, mask = _rand(T=7)
    labels = torch.randint(0, 11, mask.shape)
    rest = torch.rand(mask.shape) * 0.3
    span = torch.rand(mask.shape)
    span[0, 1] = float("nan")
    outs, grads = [], []
    for cs in (None, chunk):
        x = logits.clone().requires_grad_(True)
        res = fused_clm_loss(x, labels, ids, probs * 0.7, mask, 0.4, "ce", cs, rest, span, 0.3)
        res[0].backward()
        outs.append(torch.stack(res).detach())
        grads.append(x.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
