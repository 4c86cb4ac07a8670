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
        total, clm, fus = fused_clm_loss(x, labels, ids, probs, mask, 0.3, "kl", cs)
        total.backward()
        outs.append(torch.stack([total, clm, fus]).detach())
        grads.append(x.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fused_clm_combination():
    logits, ids, probs, mask = _rand()
    labels = torch.randint(0, 11, mask.shape)
    total, clm, fus = fused_clm_loss(logits, labels, ids, probs, mask, 0.25)
    assert torch.allclose(clm, F.cross_entropy(logits[mask], labels[mask]), atol=1e-6)
    assert torch.allclose(fus, sparse_fusion_loss(logits, ids, probs, mask), atol=1e-6)
    assert torch.allclose(total, 0.25 * clm + 0.75 * fus, atol=1e-6)
    # λ = 1 (the control) ignores the targets.
    total1, clm1, fus1 = fused_clm_loss(logits, labels, ids, probs, mask, 1.0)
    assert torch.allclose(total1, clm) and fus1.item() == 0.0
    t0, _, _ = fused_clm_loss(logits, labels, None, None, mask, 0.5)
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
