"""Gradient norms against a confounding label (Oberdiek, Rottmann & Gottschalk, ANNPR 2018,
arXiv:1805.08440)."""

from __future__ import annotations

import torch

from ..adapters import model_failure, model_output_tensor
from ..errors import AdapterError, ConfigError, InputError
from ..runmode import eval_mode
from ..taps import CaptureSpec, Features
from .base import Detector
from .constraints import OneOf
from .engines.layers import resolve_layers
from .engines.persample import ExactGradients
from .registry import register

__all__ = ["BATCHED_MAX_PARAMS", "GradUncertainty"]

#: ``params="all"`` forms every layer's per-sample gradients in one batched backward pass up to
#: this many parameters, and runs one backward pass per sample above it: forming B x |theta|
#: gradient values costs more than B small backward passes for larger models
#: (``python benchmarks/perf.py --only gradunc``: the batched engine is 3.4x faster on the
#: bench's 0.1 M-parameter smallcnn, 1.6x slower on an 11 M-parameter resnet18 at 64 px)
BATCHED_MAX_PARAMS = 1 << 21


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
      (parameters the user froze are left out). The per-sample gradients come from **one**
      batched forward + backward pass through the per-sample gradient engine
      (:mod:`normscore.detectors.engines.persample`: eval mode makes samples independent, each
      layer's per-sample gradient is formed in closed form and only its squared norm is kept;
      a layer that runs several times sums its calls first) for models up to
      :data:`BATCHED_MAX_PARAMS` parameters. Larger models, models with parameters the engine
      cannot form per sample (e.g. a ViT's class token) and models with frozen parameters run one
      forward + backward pass per sample (``torch.autograd.grad``, no ``.grad`` written).
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
        x = self._validated_input(x)
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
        res = self._memo("layers", (self.adapter,), lambda: resolve_layers(self.adapter, "all", x[:1]))
        if res.excluded or len(params) != sum(len(s.params) for s in res.slots):
            return self._all_per_sample(x, params)
        if sum(s.size for s in res.slots) > BATCHED_MAX_PARAMS:
            return self._all_per_sample(x, params)
        return self._all_batched(x, res.slots)

    def _all_batched(self, x: torch.Tensor, slots: list) -> torch.Tensor:
        """One batched backward pass; ``sum_l ||g_l||^2`` from the per-layer per-sample gradients."""
        lmap = ExactGradients(slots)
        lmap.objective = confounding_loss
        out = torch.zeros(x.shape[0], dtype=torch.float64)
        shared: dict[int, torch.Tensor] = {}  # layers that run several times: sum their calls first

        def consumer(i: int, r0: int, g: torch.Tensor) -> None:
            g = g.detach().double().cpu()
            if slots[i].calls > 1:
                buf = shared.setdefault(i, torch.zeros(x.shape[0], g.shape[1], dtype=torch.float64))
                buf[r0 : r0 + g.shape[0]] += g
            else:
                out[r0 : r0 + g.shape[0]] += (g * g).sum(1)

        lmap.run(self.adapter, x, consumer)
        for buf in shared.values():
            out += (buf * buf).sum(1)
        return out.float().to(x.device)

    def _all_per_sample(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        model = self.model
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
                grads = torch.autograd.grad(confounding_loss(z).sum(), params, allow_unused=True)
                out[i] = sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
        return out.float().to(x.device)


def confounding_loss(logits: torch.Tensor) -> torch.Tensor:
    """``BCE(softmax(z), 1)`` per sample, ``-sum_c log p_c`` (``log p`` clamped at -100 as torch's
    BCE does); its logit gradient is ``C p - 1``."""
    return -torch.log_softmax(logits.float(), dim=1).clamp_min(-100.0).sum(dim=1)
