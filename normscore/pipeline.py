"""Embedding normscore in inference pipelines.

* :class:`ScoringModule` - an ``nn.Module`` returning the model's logits **and** the OOD
  score(s) from the same single forward pass (plus the batched backward pass only for gradient
  detectors). Moves with ``.to(device)``; works under ``torch.no_grad()`` and
  ``torch.inference_mode()`` for forward-only detectors.
* ``hook_free=True`` builds an explicit scoring graph from the resolved parts (FX feature
  extraction of the model: penultimate features, block outputs and logits, then the detector's
  score as plain tensor ops), so ``torch.compile``, ``torch.jit.trace`` and ``torch.export``
  work where the model itself allows it. See :func:`exportable`.
* :func:`score_loader` - score a whole loader with a progress bar and bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .adapters import Adapter
from .detectors.base import Detector
from .detectors.dset import DetectorSet
from .errors import ConfigError, InputError
from .progress import progress_bar
from .runmode import eval_mode, model_device, tracing
from .stream import unpack_batch
from .taps import CaptureSpec, Features, block_key, capture, prepare_input, reduce_block

__all__ = ["ScoringModule", "exportable", "score_loader"]

Scorer = Detector | DetectorSet


def _members(scorer: Scorer) -> dict[str, Detector]:
    if isinstance(scorer, DetectorSet):
        return dict(scorer.detectors)
    if isinstance(scorer, Detector):
        return {scorer.name: scorer}
    raise ConfigError(f"expected a Detector or DetectorSet, got {type(scorer).__name__}.")


def _spec(scorer: Scorer, adapter: Adapter) -> CaptureSpec:
    spec = CaptureSpec(logits=True)
    for d in _members(scorer).values():
        d._check_fitted()
        spec = spec | d.capture_spec(adapter, "score")
    return spec


def _scores(scorer: Scorer, feats: Features) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(scorer, DetectorSet):
        return scorer.score_features(feats)
    return scorer.score_features(feats)


class _GraphScorer(nn.Module):
    """Hook-free: FX graph of the model returning logits, penultimate and block outputs."""

    def __init__(self, model: nn.Module, adapter: Adapter, spec: CaptureSpec) -> None:
        super().__init__()
        if spec.backward is not None or spec.views:
            raise ConfigError("the hook-free path only supports forward-only detectors (no gradients, no views).")
        self.block_specs = sorted(spec.blocks)
        self.infos = {name: adapter.block(name) for name, _ in self.block_specs}
        self.want_pen = spec.penultimate
        self.flatten_pen = isinstance(adapter.module(adapter.head_name), nn.Conv2d) if spec.penultimate else False
        head = adapter.head_name if adapter.has_head else None
        self.net = _feature_graph(model, head, sorted(self.infos), spec.penultimate)

    def forward(self, x: torch.Tensor) -> Features:
        out = self.net(x)
        feats = Features()
        feats["logits"] = out["logits"].float()
        if self.want_pen:
            pen = out["penultimate"]
            feats["penultimate"] = pen.flatten(1).float()
        for name, red in self.block_specs:
            feats[block_key(name, red)] = reduce_block(out[block_key(name, "raw")], self.infos[name], red)
        return feats


def _feature_graph(model: nn.Module, head: str | None, blocks: list[str], penultimate: bool) -> nn.Module:
    """An FX GraphModule of ``model`` returning ``{"logits", "penultimate"?, block_key(<name>, "raw")...}``."""
    try:  # timm's wrapper knows timm's leaf modules and untraceable helpers
        from timm.models import create_feature_extractor
        from timm.models._features_fx import get_graph_node_names
    except ImportError:  # pragma: no cover - timm is a dependency
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    try:
        if head is None:
            _, names = get_graph_node_names(model)
            logits_node = names[-1]
        else:
            logits_node = head
        fe = create_feature_extractor(
            model, return_nodes={logits_node: "logits", **{b: block_key(b, "raw") for b in blocks}}
        )
    except Exception as e:  # noqa: BLE001 - tracing failures come in many types
        raise ConfigError(
            f"the model cannot be traced symbolically with torch.fx ({type(e).__name__}: {e}); the "
            "hook-free path is unavailable for it. Use ScoringModule(model, det) (hooks) instead."
        ) from e
    # the extractor was traced in eval mode (the caller holds eval_mode); torchvision's
    # DualGraphModule would swap in its *training* graph on .train() (dropout as traced, no
    # penultimate output): keep the eval graph only, so no mode switch changes what runs
    fe = torch.fx.GraphModule(fe, fe.graph, class_name=type(model).__name__)
    if penultimate:
        g = fe.graph
        head_node = next((n for n in g.nodes if n.op == "call_module" and n.target == head), None)
        if head_node is None:
            raise ConfigError(f"the head {head!r} is not a module call in the traced graph.")
        out_node = next(n for n in g.nodes if n.op == "output")
        outputs = dict(out_node.args[0])
        outputs["penultimate"] = head_node.args[0]
        out_node.args = (outputs,)
        g.lint()
        fe.recompile()
    return fe


class ScoringModule(nn.Module):
    """``forward(x) -> (logits, scores)`` from one model pass.

    ``scores`` is a tensor ``[B]`` for a :class:`Detector` and a dict of them for a
    :class:`DetectorSet`. The detector must be fitted (or fit-free and attached).

    Parameters
    ----------
    model: the classifier (a registered submodule, so ``.to()`` and ``.eval()`` reach it).
    detector: a fitted detector or detector set.
    hook_free: build an explicit FX scoring graph instead of hooks (for compile/export).
    example_input: a batch used to resolve the model and build the hook-free graph eagerly.
    """

    def __init__(
        self,
        model: nn.Module,
        detector: Scorer,
        *,
        hook_free: bool = False,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.detector = detector
        self.hook_free = hook_free
        self.graph_scorer: _GraphScorer | None = None
        members = _members(detector)
        for d in members.values():
            if d._model is None:
                d.attach(model)
            elif d._model is not model:
                raise ConfigError(f"detector {d.name} is attached to a different model than the ScoringModule's.")
        self.adapter = next(iter(members.values())).adapter
        if hook_free:
            bad = [n for n, d in members.items() if not d.feature_only or d.needs_gradients]
            if bad:
                raise ConfigError(f"detectors {bad} need gradients or the live model; they cannot run hook-free.")
        if example_input is not None:
            example_input = prepare_input(example_input, self.adapter, model)
            self.adapter.ensure_resolved(example_input)
            if hook_free:
                self._build_graph(example_input)

    def _build_graph(self, example: torch.Tensor) -> _GraphScorer:
        if self.graph_scorer is None:
            spec = _spec(self.detector, self.adapter)
            with eval_mode(self.model):
                self.graph_scorer = _GraphScorer(self.model, self.adapter, spec)
                # one eager scoring pass fills the detectors' score-time caches (thresholds read
                # from tables, Gram matrices, ...), so that a later trace or export sees them as
                # constants instead of data-dependent computations
                with torch.no_grad():
                    _scores(self.detector, self.graph_scorer(example[:1]))
        return self.graph_scorer

    def _apply(self, fn: Any, recurse: bool = True) -> ScoringModule:
        super()._apply(fn, recurse)
        dev = model_device(self.model)
        for d in _members(self.detector).values():
            d.to(dev)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if not self.hook_free:
            members = _members(self.detector)
            if torch.is_inference_mode_enabled() and any(d.needs_gradients for d in members.values()):
                raise InputError(
                    "gradient detectors cannot run under torch.inference_mode(); use torch.no_grad() "
                    "or no context (normscore computes the gradients it needs without touching .grad)."
                )
            feats = capture(self.adapter, x, _spec(self.detector, self.adapter))
            return feats["logits"], _scores(self.detector, feats)
        if self.graph_scorer is None:
            if tracing():
                raise ConfigError("pass example_input= to ScoringModule(hook_free=True) before tracing or exporting.")
            x0 = prepare_input(x, self.adapter, self.model)
            self.adapter.ensure_resolved(x0)
            self._build_graph(x0)
        assert self.graph_scorer is not None
        with eval_mode(self.model):  # eval semantics for the graph's modules, flags restored
            feats = self.graph_scorer(x)
        return feats["logits"], _scores(self.detector, feats)


def exportable(detector: Detector) -> bool:
    """Whether a detector can run in the hook-free graph (forward-only, feature-only scores)."""
    return bool(detector.feature_only and not detector.needs_gradients)


def score_loader(
    scorer: Scorer,
    loader: Iterable,
    *,
    return_logits: bool = False,
    progress: bool | None = None,
    max_samples: int | None = None,
) -> Any:
    """Score every batch of ``loader`` (tensors, ``(x, y)`` or dicts) with one pass per batch.

    ``progress``: a progress bar (default ``None``: when stderr is a terminal).
    Returns the scores on the CPU (a tensor ``[N]``, or a dict for a DetectorSet); with
    ``return_logits`` a tuple ``(scores, logits [N, C])``. Only scores (and logits if asked) are
    kept, so memory is bounded by ``N`` floats per detector.
    """
    members = _members(scorer)
    first = next(iter(members.values()))
    adapter = first.adapter
    spec = _spec(scorer, adapter)
    total = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in members}
    logits: list[torch.Tensor] = []
    seen = 0
    bar = progress_bar(total=total, desc="score", enabled=progress, unit="batch")
    try:
        for batch in loader:
            x, _ = unpack_batch(batch)
            if max_samples is not None:
                x = x[: max(0, max_samples - seen)]
                if x.shape[0] == 0:
                    break
            feats = capture(adapter, x, spec)
            seen += x.shape[0]
            s = _scores(scorer, feats)
            if isinstance(s, dict):
                for k, v in s.items():
                    parts[k].append(v.detach().cpu())
            else:
                parts[first.name].append(s.detach().cpu())
            if return_logits:
                logits.append(feats["logits"].cpu())
            bar.update(1)
    finally:
        bar.close()
    if seen == 0:
        raise InputError("the loader yielded no samples to score.")
    out: Any = {k: torch.cat(v) for k, v in parts.items()}
    if not isinstance(scorer, DetectorSet):
        out = out[first.name]
    return (out, torch.cat(logits)) if return_logits else out
