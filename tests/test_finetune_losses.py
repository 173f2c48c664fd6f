"""The fine-tuning losses against direct hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from normscore.finetune import (
    ProjectionHead,
    class_prior,
    clustering_loss,
    logit_adjusted_ce,
    outlier_exposure_loss,
    rna_loss,
    separation_loss,
)

S2 = 1.0 / math.sqrt(2.0)


def _lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def test_class_prior():
    p = class_prior([6, 3, 1])
    assert torch.allclose(p, torch.tensor([0.6, 0.3, 0.1]))
    with pytest.raises(ValueError, match="positive"):
        class_prior([3, 0, 1])


def test_logit_adjusted_ce_by_hand():
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    y = [0, 2]
    prior = [0.5, 0.3, 0.2]
    for tau in (0.0, 1.0, 2.5):
        ref = 0.0
        for row, t in zip(logits, y):
            adj = [a + tau * math.log(p) for a, p in zip(row, prior)]
            ref += -adj[t] + _lse(adj)
        ref /= 2
        got = logit_adjusted_ce(torch.tensor(logits), torch.tensor(y), torch.tensor(prior), tau)
        assert got.item() == pytest.approx(ref, abs=1e-6)
    # tau = 0 is the plain cross-entropy; tau > 0 penalises head classes
    plain = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y))
    assert logit_adjusted_ce(torch.tensor(logits), torch.tensor(y), torch.tensor(prior), 0.0).item() == pytest.approx(
        plain.item()
    )
    with pytest.raises(ValueError, match="prior"):
        logit_adjusted_ce(torch.tensor(logits), torch.tensor(y), torch.tensor([0.5, 0.5]))


def test_rna_loss_without_projection_by_hand():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    ref = -(math.log(6.0) + math.log(1.0) + math.log(2.0)) / 3
    assert rna_loss(z, None).item() == pytest.approx(ref, abs=1e-6)


def test_rna_loss_uses_the_projection_output():
    g = ProjectionHead(2, hidden_dim=2, out_dim=1)
    assert [type(m).__name__ for m in g.net] == ["Linear", "ReLU", "Linear"]
    with torch.no_grad():
        g.net[0].weight.copy_(torch.eye(2))
        g.net[0].bias.zero_()
        g.net[2].weight.copy_(torch.tensor([[2.0, -1.0]]))
        g.net[2].bias.fill_(0.5)
    z = torch.tensor([[1.0, 3.0], [-2.0, 1.0]], requires_grad=True)
    # h = 2 relu(z1) - relu(z2) + 0.5: row 0 -> 2 - 3 + 0.5 = -0.5, row 1 -> 0 - 1 + 0.5 = -0.5
    ref = -(math.log(1.5) + math.log(1.5)) / 2
    loss = rna_loss(z, g)
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    loss.backward()
    assert g.net[2].weight.grad is not None and z.grad is not None  # trained jointly


def test_projection_head_shapes_default_to_paper():
    g = ProjectionHead(512)
    assert (g.net[0].in_features, g.net[0].out_features, g.net[2].out_features) == (512, 512, 128)


def test_outlier_exposure_by_hand():
    lg = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    ref0 = math.log(3.0)
    ref1 = -(2.0 - _lse([1.0, 2.0, 3.0]))
    assert outlier_exposure_loss(lg).item() == pytest.approx((ref0 + ref1) / 2, abs=1e-6)
    # it is the cross-entropy to the uniform distribution
    ce_u = -(torch.log_softmax(lg, 1).mean(1)).mean()
    assert outlier_exposure_loss(lg).item() == pytest.approx(ce_u.item(), abs=1e-6)


def _w():
    return torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], requires_grad=True)


def test_separation_loss_by_hand_and_detached_weights():
    w = _w()
    z = torch.tensor([[5.0, 0.0], [1.0, 1.0]], requires_grad=True)
    # z^1 = (1,0): |1| + |0| + |1/sqrt2|;  z^2 = (s, s): s + s + 1   with s = 1/sqrt2
    ref = ((1.0 + 0.0 + S2) + (S2 + S2 + 1.0)) / 2
    loss = separation_loss(z, w)
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    assert separation_loss(z, w, per_class=True).item() == pytest.approx(ref / 3, abs=1e-6)
    loss.backward()
    assert w.grad is None, "gradient flowed into the class weights"
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # scale invariance of both features and weights
    assert separation_loss(3 * z.detach(), 7 * w.detach()).item() == pytest.approx(ref, abs=1e-6)


def test_separation_loss_gradient_by_hand():
    # one OOD feature z = (1, 1) against one weight (1, 0): L = |z1| / ||z||
    # dL/dz1 = 1/||z|| - z1^2/||z||^3 = s - s^3 * 1 ; dL/dz2 = -z1 z2 / ||z||^3
    z = torch.tensor([[1.0, 1.0]], requires_grad=True)
    separation_loss(z, torch.tensor([[1.0, 0.0]])).backward()
    n = math.sqrt(2.0)
    assert z.grad[0, 0].item() == pytest.approx(1 / n - 1 / n**3, abs=1e-6)
    assert z.grad[0, 1].item() == pytest.approx(-1 / n**3, abs=1e-6)


def test_clustering_loss_by_hand_and_detached_weights():
    w = _w()
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([2, 0, 1])
    # (1,0).(s,s) = s ; (s,s).(1,0) = s ; (0,1).(0,1) = 1   (ground-truth labels)
    ref = -(S2 + S2 + 1.0) / 3
    loss = clustering_loss(z, y, w)
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    loss.backward()
    assert w.grad is None, "gradient flowed into the class weights"
    assert z.grad is not None
    # a feature exactly on its class weight has zero gradient (maximum cosine)
    assert torch.allclose(z.grad[2], torch.zeros(2), atol=1e-7)


def test_feature_losses_accept_conv_head_weights():
    w = _w().detach()
    z = torch.tensor([[1.0, 2.0]])
    w4 = w[:, :, None, None]  # a 1x1 conv head's weight [C, D, 1, 1]
    assert separation_loss(z, w4).item() == pytest.approx(separation_loss(z, w).item())
    assert clustering_loss(z, torch.tensor([1]), w4).item() == pytest.approx(
        clustering_loss(z, torch.tensor([1]), w).item()
    )
