"""Gradient norms against a confounding label (Oberdiek, Rottmann & Gottschalk, ANNPR 2018,
arXiv:1805.08440)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters import model_failure, model_output_tensor
from ..errors import AdapterError, ConfigError, InputError
from ..runmode import eval_mode
from ..taps import CaptureSpec, Features, prepare_input
from .base import Detector
from .constraints import OneOf
from .registry import register

__all__ = ["GradUncertainty"]


@register
class GradUncertainty(Detector):
    """Gradient uncertainty (Oberdiek, Rottmann & Gottschalk, "Classification Uncertainty of Deep
    Neural Networks Based on Gradient Information", ANNPR 2018, arXiv:1805.08440; pytorch-ood's
    ``GradUncertainty``, after Lee & AlRegib, ICIP 2020, arXiv:2008.08030).

    The loss against the "confounding label" of all ones, ``L(x) = BCE(softmax(z), 1) =
    -sum_c log p_c``, has the logit gradient ``dL/dz = C p - 1``: zero for a uniform softmax,
    large for a confident one. The score is the summed squared L2 norm of the per-sample
    parameter gradients::

        score(x) = sum_theta || dL(x) / d theta ||_2^2          (higher = more ID)

    ``params``:

    * ``"all"`` (default, pytorch-ood's default filter): every parameter that requires grad
      (parameters the user froze are left out). One forward + backward pass per *sample*
      (batch of one, model in eval mode), gradients with ``torch.autograd.grad`` (no ``.grad``
      is written). Exact and batch-independent, but slow: ``B`` backward passes per batch.
    * ``"head"`` (OpenOOD's setting, pytorch-ood with a head-only ``param_filter``): the final
      linear layer only, in closed form from the logits and the penultimate features ``h``:
      ``||C p - 1||^2 (||h||^2 + 1)`` (``+ 1`` for the bias; without a bias ``+ 0``). No
      backward pass; joins the shared forward pass and works on cached features.

    pytorch-ood returns ``-score`` (higher = OOD). torch's BCE clamps ``log p`` at ``-100``;
    the closed form ``C p - 1`` agrees with it unless a probability is below ``e^-100``.
    """

    name = "grad_uncertainty"
    shape_bound = frozenset()  # fit-free; the head variant works at any width
    paper = "Oberdiek, Rottmann & Gottschalk, ANNPR 2018, arXiv:1805.08440"
    formula = "sum_theta ||d BCE(softmax(z), 1) / d theta||^2"
    needs_gradients = True
    feature_only = False
    constraints = {"params": OneOf(("all", "head"))}
    search_space = {"params": ["all", "head"]}

    def __init__(self, params: str = "all") -> None:
        super().__init__()
        self.params = params

    def capture_spec(self, adapter, stage):
        if self.params == "head":
            return CaptureSpec(logits=True, penultimate=True)
        return CaptureSpec(logits=False, input=True)  # the passes of "all" are our own

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if self.params == "head":
            return super().score(x)
        self._check_fitted()
        x = prepare_input(x, self.adapter, self.model)
        self.adapter.ensure_resolved(x)
        x = prepare_input(x, self.adapter, self.model)
        return self._all(x)

    def score_features(self, feats: Features) -> torch.Tensor:
        if self.params == "all":
            return self._all(feats.require("input"))
        z = feats.require("logits").double()
        h = feats.require("penultimate").double()
        g = z.shape[1] * torch.softmax(z, dim=1) - 1.0
        has_bias = getattr(self.adapter.head, "bias", None) is not None
        return ((g * g).sum(1) * ((h * h).sum(1) + float(has_bias))).float()

    def _all(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(
                "grad_uncertainty params='all': no parameter of the model requires grad; use params='head' "
                "(closed form from the head) or unfreeze the parameters."
            )
        out = torch.empty(x.shape[0], dtype=torch.float64)
        with eval_mode(model), torch.enable_grad():
            for i in range(x.shape[0]):
                xi = x[i : i + 1].detach()
                try:
                    z = model_output_tensor(model(xi))
                except (InputError, AdapterError):
                    raise
                except Exception as e:  # noqa: BLE001 - re-raised with context
                    raise model_failure(model, xi, e) from e
                loss = F.binary_cross_entropy(
                    torch.softmax(z.float(), dim=1), torch.ones_like(z.float()), reduction="sum"
                )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                out[i] = sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
        return out.float().to(x.device)
