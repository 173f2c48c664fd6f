"""Mahalanobis with input pre-processing (Lee et al., NeurIPS 2018; pytorch-ood
``MahalanobisODIN``; OpenOOD ``mds_ensemble`` with one layer)."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..taps import BackwardSpec, CaptureSpec, Features, capture
from .constraints import Interval
from .distances import Mahalanobis, _sq_dists
from .registry import register

__all__ = ["MahalanobisODIN"]


@register
class MahalanobisODIN(Mahalanobis):
    """Mahalanobis score after an input step towards the closest class Gaussian.

    ``x~ = x - eps * sign(grad_x M(x))`` with ``M(x) = (h(x) - mu_c)^T Sigma^-1 (h(x) - mu_c) / 2``
    and ``c`` the class closest to ``h(x)``; score ``-min_c (h(x~) - mu_c)^T Sigma^-1 (h(x~) -
    mu_c)`` with the fitted class means and shared covariance of
    :class:`~normscore.detectors.distances.Mahalanobis`. Lee, Lee, Lee & Shin, "A Simple Unified
    Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018,
    arXiv:1807.03888 (input pre-processing on the penultimate features); pytorch-ood 0.4
    ``MahalanobisODIN``.

    ``noise`` (``eps``) is in the units of the model's *input*, as for ``odin``; default 0.002
    (pytorch-ood's; the paper tunes it over {0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}).
    OpenOOD's ``mds_ensemble`` divides the gradient sign by 0.5 (a nominal std) and steps in
    normalised-input units: its ``noise = m`` is ``noise = 2 m`` here when the model takes the
    normalised tensor, and ``2 m * std_c`` per channel for a model that normalises inside. As in
    the official code and OpenOOD, a zero gradient counts as positive (pytorch-ood uses
    ``torch.sign``, which leaves those pixels unchanged).

    Cost: one batched forward + backward pass (the objective reads the head's input through the
    shared capture machinery; the model's parameters, ``.grad`` and hooks are never touched)
    and one forward pass on ``x~``. The fit is the one-pass Mahalanobis fit; ``noise = 0`` is
    plain Mahalanobis (one forward pass).
    """

    name = "mahalanobis_odin"
    paper = "Lee et al., NeurIPS 2018, arXiv:1807.03888"
    formula = "-min_c (h(x~)-mu_c)^T Sigma^-1 (h(x~)-mu_c), x~ = x - eps*sign(grad_x min_c MD_c(x)/2)"
    needs_gradients = True
    feature_only = False
    constraints = {"noise": Interval(0.0, float("inf")), "shrinkage": Interval(0.0, 1.0)}
    search_space = {"noise": [0.0, 0.0005, 0.001, 0.002, 0.005]}

    def __init__(self, noise: float = 0.002, shrinkage: float = 0.0) -> None:
        super().__init__(shrinkage=shrinkage)
        self.noise = noise

    def capture_spec(self, adapter, stage):
        if stage == "fit":
            return super().capture_spec(adapter, stage)
        # scoring runs its own backward pass: the shared pass only provides the input batch
        return CaptureSpec(logits=False, input=True)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validated_input(x)
        return self._score_input(x)

    def score_features(self, feats: Features) -> torch.Tensor:
        return self._score_input(feats.require("input"))

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-processed input ``x~`` of a validated batch ``x``."""
        p, mu, mu_sq = self._class_terms()
        mean = self.mean_

        def objective(h: torch.Tensor) -> torch.Tensor:
            self._check_width(h)
            z = (h.double() - mean.to(h.device)) @ p.to(h.device)
            closest = _sq_dists(z.detach(), mu.to(h.device), mu_sq.to(h.device)).argmin(dim=1)
            return 0.5 * (z - mu.to(h.device)[closest]).pow(2).sum(dim=1)

        bw = BackwardSpec(objective, input_grad=True, key=f"mahalanobis_odin:{id(self)}", on="penultimate")
        g = capture(self.adapter, x, CaptureSpec(logits=False, backward=bw), validated=True)["input_grad"]
        direction = torch.where(g >= 0, 1.0, -1.0).to(x.dtype)
        return x - float(self.noise) * direction

    def _check_width(self, h: torch.Tensor) -> None:
        # the score spec holds only the input, so the fingerprint has no penultimate shape to check
        d = int(self.mean_.shape[0])
        if h.ndim != 2 or h.shape[1] != d:
            raise InputError(
                f"{self.name}: the 'penultimate' features have shape {list(h.shape[1:])} per sample, but the "
                f"detector was fitted on [{d}]. The attached model is not the one it was fitted on: refit it on "
                "this model (det.fit(model, id_loader))."
            )

    def _score_input(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.perturb(x) if float(self.noise) != 0.0 else x
        h = capture(self.adapter, xt, CaptureSpec(logits=False, penultimate=True), validated=True)["penultimate"]
        self._check_width(h)
        return Mahalanobis.score_features(self, Features(penultimate=h))
