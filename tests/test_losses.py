"""Loss values on known tensors, centring, and the combination of the four terms."""

from __future__ import annotations

import math

import pytest
import torch

from dagman_components.losses import DAGMaNLoss, DistillationCrossEntropy, masked_l1


def test_cross_entropy_matches_hand_computation():
    ce = DistillationCrossEntropy(out_dim=2, student_temp=0.1)
    s = torch.tensor([[0.1, 0.0]])
    t = torch.tensor([[0.0, 0.04 * math.log(3.0)]])  # teacher probabilities (1/4, 3/4) at tau_t = 0.04
    p_t = torch.tensor([0.25, 0.75])
    log_p_s = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)
    expected = -(p_t * log_p_s).sum()
    assert ce(s, t, teacher_temp=0.04).item() == pytest.approx(expected.item(), rel=1e-5)


def test_centre_is_subtracted_and_updated_explicitly():
    ce = DistillationCrossEntropy(out_dim=3, center_momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    ce(torch.zeros(2, 3), t, 0.04)
    assert torch.equal(ce.center, torch.zeros(1, 3))  # forward never touches the centre
    ce.update_center(t)
    assert torch.allclose(ce.center, torch.full((1, 3), 0.2))  # 0.9*0 + 0.1*mean = 0.1*2
    ce.update_center(t)
    assert torch.allclose(ce.center, torch.full((1, 3), 0.38))  # 0.9*0.2 + 0.1*2
    # a centre equal to the teacher logit makes the target uniform
    ce.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.allclose(ce.targets(t[:1], 0.04), torch.full((1, 3), 1 / 3))


def test_patch_centre_averages_over_tokens():
    ce = DistillationCrossEntropy(out_dim=2, center_momentum=0.0)
    ce.update_center(torch.tensor([[[0.0, 4.0], [2.0, 0.0]]]))  # (B=1, N=2, K=2)
    assert torch.allclose(ce.center, torch.tensor([[1.0, 2.0]]))


def test_masked_l1():
    pred = torch.zeros(1, 1, 2, 2, 1)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2, 1)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
    assert masked_l1(pred, target, mask).item() == pytest.approx(5.0 / (2 + 1e-5))
    assert masked_l1(pred, target, torch.zeros(1, 2, 2, 1)).item() == 0.0


def _outputs(k: int, n: int, b: int = 2, seed: int = 0, recon: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = {
        "cls_logits": torch.randn(b, k, generator=g),
        "patch_logits": torch.randn(b, n, k, generator=g),
        "global_logits": torch.randn(b, k, generator=g),
    }
    if recon:
        out["recon"] = torch.rand(b, 1, 4, 4, 4, generator=g)
    return out


def test_dagman_loss_terms_and_weights():
    k, n = 6, 8
    su, sv = _outputs(k, n, seed=1), _outputs(k, n, seed=2)
    tu, tv = _outputs(k, n, seed=3, recon=False), _outputs(k, n, seed=4, recon=False)
    cm = (torch.rand(2, n) > 0.5, torch.rand(2, n) > 0.5)
    vm = (torch.rand(2, 4, 4, 4) > 0.5, torch.rand(2, 4, 4, 4) > 0.5)
    imgs = (torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4))
    loss = DAGMaNLoss(out_dim=k)
    total, parts = loss((su, sv), (tu, tv), cm, vm, imgs, teacher_temp=0.04)
    ce = DistillationCrossEntropy(k)
    aitd = 0.5 * (ce(su["cls_logits"], tv["cls_logits"], 0.04).mean() + ce(sv["cls_logits"], tu["cls_logits"], 0.04).mean())
    assert parts["aitd"].item() == pytest.approx(aitd.item(), rel=1e-6)
    per = ce(su["patch_logits"], tu["patch_logits"], 0.04)  # (B, N): same view
    m = cm[0].float()
    ampd_u = ((per * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    per_v = ce(sv["patch_logits"], tv["patch_logits"], 0.04)
    mv = cm[1].float()
    ampd_v = ((per_v * mv).sum(1) / mv.sum(1).clamp_min(1)).mean()
    assert parts["ampd"].item() == pytest.approx(0.5 * (ampd_u + ampd_v).item(), rel=1e-6)
    amip = 0.5 * (masked_l1(su["recon"], imgs[0], vm[0]) + masked_l1(sv["recon"], imgs[1], vm[1]))
    assert parts["amip"].item() == pytest.approx(amip.item(), rel=1e-6)
    expected = parts["amip"] + 0.1 * (parts["ampd"] + parts["aitd"] + parts["gitd"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # a zero weight removes the term from the total but it is still reported
    total2, parts2 = DAGMaNLoss(out_dim=k, weights={"amip": 0.0})((su, sv), (tu, tv), cm, vm, imgs, 0.04)
    assert total2.item() == pytest.approx((total - parts["amip"]).item(), rel=1e-5)
    assert parts2["amip"].item() == pytest.approx(parts["amip"].item())


def test_dagman_loss_rejects_unknown_terms():
    with pytest.raises(ValueError, match="unknown loss weight"):
        DAGMaNLoss(out_dim=4, weights={"ampd": 0.1, "mim": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        DAGMaNLoss(out_dim=4, weights={"ampd": -1.0})


def test_update_centers_uses_both_views():
    loss = DAGMaNLoss(out_dim=2, center_momentum=0.0)
    tu = {"cls_logits": torch.tensor([[0.0, 2.0]]), "patch_logits": torch.zeros(1, 3, 2), "global_logits": torch.ones(1, 2)}
    tv = {"cls_logits": torch.tensor([[2.0, 0.0]]), "patch_logits": torch.ones(1, 3, 2), "global_logits": torch.ones(1, 2)}
    loss.update_centers((tu, tv))
    assert torch.allclose(loss.cls_ce.center, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(loss.patch_ce.center, torch.full((1, 2), 0.5))
