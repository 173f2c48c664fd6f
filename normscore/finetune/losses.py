"""Training losses of the fine-tuning module.

Every loss is a plain function of tensors (no hooks, no model access) so that it can be
checked against a hand computation. Notation: ``z`` are penultimate features (the input of
the classifier's linear head), ``W`` (``[C, D]``) the head's weight, ``f(x)`` the logits.

* :func:`logit_adjusted_ce` - Menon et al., "Long-tail learning via logit adjustment",
  ICLR 2021, arXiv:2007.07314.
* :func:`rna_loss` and :class:`ProjectionHead` - Shin & Chung, "Representation Norm
  Amplification for Out-of-Distribution Detection in Long-Tail Learning", TMLR 2024,
  arXiv:2408.10676.
* :func:`outlier_exposure_loss` - Hendrycks et al., "Deep Anomaly Detection with Outlier
  Exposure", ICLR 2019, arXiv:1812.04606.
* :func:`separation_loss` and :func:`clustering_loss` - Wu et al., "Pursuing Feature
  Separation based on Neural Collapse for Out-of-Distribution Detection", ICLR 2025,
  arXiv:2405.17816.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ProjectionHead",
    "class_prior",
    "clustering_loss",
    "logit_adjusted_ce",
    "outlier_exposure_loss",
    "rna_loss",
    "separation_loss",
]


def class_prior(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Training-set class prior ``pi_c = n_c / sum_k n_k`` (float32 ``[C]``).

    Raises ``ValueError`` when a class has no samples (``log pi_c`` would be ``-inf``).
    """
    n = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if n.numel() == 0 or bool((n <= 0).any()):
        raise ValueError(f"class counts must all be positive, got {n.tolist()}")
    return (n / n.sum()).float()


def logit_adjusted_ce(
    logits: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021, arXiv:2007.07314).

    ``L_LA = mean_i CE(f(x_i) + tau * log(pi), y_i)`` where ``pi`` is the training class prior
    (:func:`class_prior`). The adjustment is a *training* device only: classify with the raw
    logits at test time. ``tau = 0`` gives the plain cross-entropy.
    """
    if prior.ndim != 1 or prior.shape[0] != logits.shape[1]:
        raise ValueError(f"prior has shape {tuple(prior.shape)}, expected [{logits.shape[1]}]")
    adj = logits + float(tau) * prior.to(device=logits.device, dtype=logits.dtype).log()[None, :]
    return F.cross_entropy(adj, targets)


class ProjectionHead(nn.Module):
    """RNA's 2-layer projection ``g(z) = W2 ReLU(W1 z + b1) + b2``: ``D -> hidden -> out_dim``.

    The official code uses ``hidden = D`` and ``out_dim = 128`` (512 -> 512 -> 128 for a CIFAR
    ResNet-18). It is trained jointly with the classifier and discarded after training: the
    test-time score is the norm of ``z``, not of ``g(z)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> None:
        super().__init__()
        hidden = in_dim if hidden_dim is None else hidden_dim
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), int(hidden), int(out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def rna_loss(z: torch.Tensor, projection: nn.Module | None) -> torch.Tensor:
    """Representation Norm Amplification loss (Shin & Chung, TMLR 2024, arXiv:2408.10676).

    ``L_RNA = -(1/B_in) sum_i log(1 + ||g(z_i)||_2)`` over the **ID** samples only, with ``g``
    the 2-layer :class:`ProjectionHead`. Pass ``projection=None`` for the no-projection
    ablation (``g`` = identity). The total RNA objective is ``L_LA + lambda * L_RNA``
    (``lambda = 0.5``); auxiliary OOD samples get no loss term at all.
    """
    h = z if projection is None else projection(z)
    return -torch.log1p(h.norm(dim=1)).mean()


def outlier_exposure_loss(logits_ood: torch.Tensor) -> torch.Tensor:
    """Outlier Exposure: cross-entropy to the uniform distribution on auxiliary OOD samples.

    ``L_OE = -mean_j [ (1/C) sum_k f_k(u_j) - logsumexp_k f_k(u_j) ]`` (Hendrycks et al.,
    ICLR 2019, arXiv:1812.04606). The minimum, ``log C``, is reached by a uniform softmax.
    """
    return -(logits_ood.mean(dim=1) - torch.logsumexp(logits_ood, dim=1)).mean()


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def separation_loss(z_ood: torch.Tensor, weight: torch.Tensor, *, per_class: bool = False) -> torch.Tensor:
    """Separation loss of PFS (Wu et al., ICLR 2025, arXiv:2405.17816).

    ``L_Sep = mean_j sum_c |z^_j . w^_c|`` = mean of ``||W^ z^_j||_1`` over the auxiliary OOD
    features, with ``z^ = z/||z||`` and ``w^_c = w_c/||w_c||`` (rows of the head weight). The
    class weights are **detached** (no gradient reaches the classifier through this loss); it
    drives OOD features towards the orthogonal complement of the span of the class weights.
    ``per_class=True`` multiplies by ``1/C`` (the official ImageNet recipe; CIFAR has no factor).
    """
    w = _unit(weight.detach().flatten(1).to(z_ood.dtype))
    s = (_unit(z_ood) @ w.t()).abs().sum(dim=1).mean()
    return s / w.shape[0] if per_class else s


def clustering_loss(z_id: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Clustering loss of PFS (Wu et al., ICLR 2025, arXiv:2405.17816).

    ``L_Clu = -mean_i z^_i . w^_{y_i}`` over the ID features with their **ground-truth** labels;
    ``z^``, ``w^`` L2-normalised as in :func:`separation_loss` and the weights detached.
    """
    w = _unit(weight.detach().flatten(1).to(z_id.dtype))
    return -(_unit(z_id) * w[labels]).sum(dim=1).mean()
