"""Scores computed from the logits alone."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..taps import BackwardSpec, CaptureSpec, Features, capture
from ._zoo import check_labels
from .base import Detector
from .constraints import Interval
from .registry import register


@register
class MSP(Detector):
    """Maximum softmax probability: ``max_c softmax(z)_c``.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017, arXiv:1610.02136.
    """

    name = "msp"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Hendrycks & Gimpel, ICLR 2017, arXiv:1610.02136"
    formula = "max_c softmax(z)_c"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        return torch.softmax(feats.require("logits").float(), dim=1).amax(dim=1)


@register
class MaxLogit(Detector):
    """Maximum logit: ``max_c z_c``.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022, arXiv:1911.11132.
    """

    name = "maxlogit"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Hendrycks et al., ICML 2022, arXiv:1911.11132"
    formula = "max_c z_c"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        return feats.require("logits").float().amax(dim=1)


@register
class Energy(Detector):
    """Negative free energy: ``T * logsumexp(z / T)``.

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020, arXiv:2010.03759.
    """

    name = "energy"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Liu et al., NeurIPS 2020, arXiv:2010.03759"
    formula = "T * logsumexp(z / T)"
    constraints = {"temperature": Interval(0.0, float("inf"), closed="neither")}
    search_space = {"temperature": [0.5, 1.0, 2.0, 5.0, 10.0]}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        t = float(self.temperature)
        return t * torch.logsumexp(feats.require("logits").float() / t, dim=1)


# ---------------------------------------------------------------------------------------------
# the zoo: entropy, GEN, temperature scaling, ODIN, KL matching


@register
class Entropy(Detector):
    """Negative Shannon entropy of the softmax: ``sum_c p_c log p_c`` with ``p = softmax(z)``.

    Confident (peaked) predictions have low entropy and score high. Used as an OOD score e.g.
    by Macêdo et al., "Entropic Out-of-Distribution Detection", IJCNN 2021, arXiv:1908.05569.
    """

    name = "entropy"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Macêdo et al., IJCNN 2021, arXiv:1908.05569"
    formula = "sum_c p_c log p_c, p = softmax(z)"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        logp = torch.log_softmax(feats.require("logits").double(), dim=1)
        return (logp.exp() * logp).sum(dim=1).float()


@register
class GEN(Detector):
    """Generalised entropy: ``-sum_{top-M c} p_c^gamma (1 - p_c)^gamma`` over the ``M`` largest
    softmax probabilities (all of them when the model has fewer than ``M`` classes).

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023 (CVF open access; no arXiv version). Defaults gamma = 0.1, M = 100;
    the search space is OpenOOD's sweep.
    """

    name = "gen"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Liu, Lochman & Zach, CVPR 2023 (CVF open access, no arXiv)"
    formula = "-sum_{M largest p_c} p_c^gamma (1 - p_c)^gamma, p = softmax(z)"
    constraints = {
        "gamma": Interval(0.0, float("inf"), closed="neither"),
        "M": Interval(1, float("inf"), integer=True),
    }
    search_space = {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0], "M": [10, 50, 100, 200, 500, 1000]}

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        self.gamma = gamma
        self.M = M

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        p = torch.softmax(feats.require("logits").double(), dim=1)
        m = min(int(self.M), p.shape[1])
        top = torch.topk(p, m, dim=1).values
        g = float(self.gamma)
        return (-(top.pow(g) * (1.0 - top).pow(g)).sum(dim=1)).float()


#: inverse temperatures searched by TempScale's streamed fit: T from 0.01 to 100, 97 levels
_TS_BETAS = torch.logspace(-2.0, 2.0, 97, dtype=torch.float64)


@register
class TempScale(Detector):
    """MSP after temperature scaling: ``max_c softmax(z / T)_c`` with ``T`` fitted by NLL.

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017,
    arXiv:1706.04599. ``T`` minimises the negative log-likelihood of the fit labels; fit on
    held-out ID data as the paper does (on the training set ``T`` comes out too small for an
    over-fitted model).

    Streamed fit: the NLL is convex in ``beta = 1 / T``. For 97 log-spaced values of ``beta``
    (``T`` from 0.01 to 100) the fit accumulates the NLL and its first and second derivatives in
    float64 over the batches; the minimiser is the root of the derivative, located in the
    bracketing grid interval by cubic Hermite interpolation (relative error on ``T`` below
    1e-4 in the tests against a full-batch optimiser). ``T`` is clamped to [0.01, 100].
    """

    name = "tempscale"
    shape_bound = frozenset()  # one temperature: the score works on logits of any width
    paper = "Guo et al., ICML 2017, arXiv:1706.04599"
    formula = "max_c softmax(z / T)_c, T = argmin NLL on labelled ID data"
    needs_labels = True
    needs_fit = True

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    _fit_state = (("_sums", "sum"),)

    def _fit_begin(self, adapter) -> None:
        self._sums: torch.Tensor | None = None  # [3, G]: NLL, dNLL/dbeta, d2NLL/dbeta2

    def _fit_update(self, feats: Features) -> None:
        z = feats.require("logits").double()
        y = check_labels(feats["labels"].to(z.device), z.shape[1], self.name)
        betas = _TS_BETAS.to(z.device)
        zy = z.gather(1, y[:, None])  # [B, 1]
        parts = []
        step = max(1, (1 << 22) // max(1, z.numel()))  # bound the [B, C, g] temporary
        for i in range(0, betas.numel(), step):
            beta = betas[i : i + step]
            s = z[:, :, None] * beta  # [B, C, g]
            lse = torch.logsumexp(s, dim=1)  # [B, g]
            p = torch.exp(s - lse[:, None, :])
            e1 = (p * z[:, :, None]).sum(1)
            e2 = (p * (z * z)[:, :, None]).sum(1)
            nll = (lse - beta * zy).sum(0)
            parts.append(torch.stack([nll, (e1 - zy).sum(0), (e2 - e1 * e1).clamp_min(0).sum(0)]))
        out = torch.cat(parts, dim=1)
        self._sums = out if self._sums is None else self._sums + out

    def _fit_end(self) -> None:
        if self._sums is None:
            raise InputError("tempscale saw no fit samples.")
        s = self._sums.cpu()
        betas = _TS_BETAS
        d1, d2 = s[1], s[2]
        if float(d1[0]) >= 0:
            beta = float(betas[0])
        elif float(d1[-1]) <= 0:
            beta = float(betas[-1])
        else:
            j = int((d1 < 0).nonzero().max())  # d1[j] < 0 <= d1[j + 1]
            beta = _hermite_root(
                float(betas[j]), float(betas[j + 1]), float(d1[j]), float(d1[j + 1]), float(d2[j]), float(d2[j + 1])
            )
        self.temperature_ = 1.0 / beta
        del self._sums

    def score_features(self, feats: Features) -> torch.Tensor:
        z = feats.require("logits").float()
        return torch.softmax(z / float(self.temperature_), dim=1).amax(dim=1)


def _hermite_root(a: float, b: float, fa: float, fb: float, da: float, db: float) -> float:
    """Root in [a, b] of the cubic Hermite interpolant of f (values fa < 0 <= fb, slopes da, db)."""
    h = b - a

    def f(t: float) -> float:
        t2, t3 = t * t, t * t * t
        return (2 * t3 - 3 * t2 + 1) * fa + (t3 - 2 * t2 + t) * h * da + (-2 * t3 + 3 * t2) * fb + (t3 - t2) * h * db

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return a + 0.5 * (lo + hi) * h


@register
class ODIN(Detector):
    """ODIN: MSP at temperature ``T`` after an input step against the loss gradient.

    ``x~ = x - eps * sign(grad_x CE(z(x) / T, argmax z(x)))``, score
    ``max_c softmax(z(x~) / T)_c``. Liang, Li & Srikant, "Enhancing The Reliability of
    Out-of-distribution Image Detection in Neural Networks", ICLR 2018, arXiv:1706.02690.
    Defaults T = 1000, eps = 0.0014 (the paper's and OpenOOD's).

    ``eps`` is in the units of the model's *input*: for a model that normalises inside (like
    ``normscore.models.small_cnn``) that is pixel units; when images are normalised outside the
    model with a per-channel std ``s``, OpenOOD's ``eps`` corresponds to ``eps / s`` here. As in
    the reference code, a zero gradient counts as positive (``sign`` is ``+1`` where the
    gradient is ``>= 0``).

    One batched backward pass gives exact per-sample input gradients (the model runs in eval
    mode, so samples do not interact); a second forward pass scores the perturbed batch. The
    model's parameters and their ``.grad`` are never touched.
    """

    name = "odin"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Liang, Li & Srikant, ICLR 2018, arXiv:1706.02690"
    formula = "max_c softmax(z(x~)/T)_c, x~ = x - eps*sign(grad_x CE(z(x)/T, argmax z))"
    needs_gradients = True
    feature_only = False
    constraints = {
        "temperature": Interval(0.0, float("inf"), closed="neither"),
        "noise": Interval(0.0, float("inf")),
    }
    search_space = {
        "temperature": [1.0, 10.0, 100.0, 1000.0],
        "noise": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005],
    }

    def __init__(self, temperature: float = 1000.0, noise: float = 0.0014) -> None:
        super().__init__()
        self.temperature = temperature
        self.noise = noise

    def capture_spec(self, adapter, stage):
        # the shared pass only has to provide the (validated) input batch; ODIN runs its own
        # backward pass with its own objective, so it never forces gradients on other detectors
        return CaptureSpec(logits=False, input=True)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validated_input(x)
        return self._odin(x)

    def score_features(self, feats: Features) -> torch.Tensor:
        return self._odin(feats.require("input"))

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """The perturbed input ``x~`` of a validated batch ``x``."""
        t = float(self.temperature)

        def objective(z: torch.Tensor) -> torch.Tensor:
            z = z.float() / t
            return -torch.log_softmax(z, dim=1).gather(1, z.argmax(1, keepdim=True)).squeeze(1)

        spec = CaptureSpec(logits=False, backward=BackwardSpec(objective, input_grad=True, key=f"odin:{t!r}"))
        g = capture(self.adapter, x, spec, validated=True)["input_grad"]
        direction = torch.where(g >= 0, 1.0, -1.0).to(x.dtype)
        return x - float(self.noise) * direction

    def _odin(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.perturb(x) if float(self.noise) != 0.0 else x
        z = capture(self.adapter, xt, CaptureSpec(logits=True), validated=True)["logits"]
        # float64: at T = 1000 the probabilities differ from 1/C only in the 4th-5th digit
        return torch.softmax(z.double() / float(self.temperature), dim=1).amax(dim=1).float()


@register
class KLM(Detector):
    """KL matching: ``-min_c KL(p || d_c)`` with ``p = softmax(z)`` and ``d_c`` the mean softmax
    of the fit samples *predicted* as class ``c`` (no labels needed).

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML
    2022, arXiv:1911.11132. The minimum runs over classes predicted at least once during the
    fit; ``KL(p || d) = sum_j p_j log p_j - p . log d`` is one ``[B, C] x [C, C]`` GEMM (float64).
    """

    name = "klm"
    paper = "Hendrycks et al., ICML 2022, arXiv:1911.11132"
    formula = "-min_c KL(softmax(z) || d_c), d_c = mean softmax of fit samples predicted c"
    needs_fit = True

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    _fit_state = (("_sums", "sum"), ("_counts", "sum"))

    def _fit_begin(self, adapter) -> None:
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def _fit_update(self, feats: Features) -> None:
        z = feats.require("logits").double()
        p = torch.softmax(z, dim=1)
        pred = z.argmax(1)
        c = z.shape[1]
        if self._sums is None:
            self._sums = torch.zeros(c, c, dtype=torch.float64, device=z.device)
            self._counts = torch.zeros(c, dtype=torch.float64, device=z.device)
        self._sums.index_add_(0, pred, p)
        self._counts.index_add_(0, pred, torch.ones_like(pred, dtype=torch.float64))

    def _fit_end(self) -> None:
        if self._sums is None:
            raise InputError("klm saw no fit samples.")
        present = self._counts > 0
        t = self._sums / self._counts.clamp_min(1)[:, None]
        self.templates_ = t
        self.present_ = present
        del self._sums, self._counts

    def score_features(self, feats: Features) -> torch.Tensor:
        logp = torch.log_softmax(feats.require("logits").double(), dim=1)
        p = logp.exp()
        neg_ent = (p * logp).sum(1)
        t = self.templates_
        logd = self._memo("log_templates", (t,), lambda: t.clamp_min(torch.finfo(torch.float64).tiny).log())
        cross = p @ logd.T  # [B, C]: sum_j p_j log d_cj
        cross = cross.masked_fill(~self.present_[None, :], float("-inf"))
        kl_min = neg_ent - cross.amax(dim=1)
        return (-kl_min).float()
