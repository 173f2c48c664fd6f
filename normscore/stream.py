"""Batches from user loaders: unpacking, validation and the streamed fit passes."""

from __future__ import annotations

import collections.abc as cabc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .adapters import Adapter
from .errors import InputError, InputTypeError
from .progress import progress_bar
from .taps import CaptureSpec, Features, capture, prepare_input

_X_KEYS = ("image", "x", "input", "pixel_values", "img")
_Y_KEYS = ("label", "y", "target", "labels")


def unpack_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a loader item into ``(x, y)``.

    Accepted: a tensor ``x``; a tuple/list ``(x, y, ...)`` (extra items ignored) or ``(x,)``;
    a dict with an image key (``image``, ``x``, ``input``, ``pixel_values``, ``img``) and
    optionally a label key (``label``, ``y``, ``target``, ``labels``). Labels are read with
    :func:`read_labels`; labels that are not class labels come back as ``None``.
    """
    x, y, _ = unpack_batch_index(batch)
    return x, y


def unpack_batch_index(batch: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Like :func:`unpack_batch`, plus the optional ``"index"`` of a dict batch.

    A dict batch may carry ``"index"``: the dataset position of each sample. normscore then uses
    it (instead of the position in the stream) for the calibration hold-out and for seeded
    input views such as the jigsaw, which makes a sharded ``torch.distributed`` fit select and
    transform exactly the samples a single-process fit would.
    """
    x, y_raw, idx = split_batch(batch)
    y, _ = read_labels(y_raw, x.shape[0])
    return x, y, idx


def split_batch(batch: object) -> tuple[torch.Tensor, object, torch.Tensor | None]:
    """``(images, raw labels as yielded or None, index or None)`` of one loader item."""
    if isinstance(batch, cabc.Mapping) and "index" in batch:
        x, y, _ = split_batch({k: v for k, v in batch.items() if k != "index"})
        idx = torch.as_tensor(batch["index"]).long().flatten()
        if idx.shape[0] != x.shape[0]:
            raise InputError(f"the batch's 'index' has {idx.shape[0]} entries for {x.shape[0]} images.")
        return x, y, idx
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, cabc.Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        if x is None:
            raise InputTypeError(
                f"the loader yielded a dict with keys {sorted(batch)}; normscore looks for the "
                f"images under one of {list(_X_KEYS)} and labels under one of {list(_Y_KEYS)}."
            )
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        return _check_x(x), y, None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputTypeError("the loader yielded an empty tuple/list; expected (x,) or (x, y).")
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        return _check_x(x), y, None
    raise InputTypeError(
        f"the loader yielded a {type(batch).__name__}; expected a tensor, a tuple (x, y) or a dict "
        "with an 'image' key. Wrap your dataset so that it returns tensors (e.g. add "
        "torchvision.transforms.ToTensor() and the model's normalisation)."
    )


def _check_x(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(
            f"the loader yielded images of type {type(x).__name__}, not a torch.Tensor batch. "
            "Add a transform that returns tensors (torchvision.transforms.ToTensor() plus the "
            "model's normalisation, e.g. normscore.input_transform(model)) and batch with a DataLoader."
        )
    return x


#: the label forms :func:`read_labels` accepts (quoted in its errors)
LABEL_FORMS = (
    "class indices of shape [B] (integers, or floats with integral values), [B, 1], or one-hot "
    "rows [B, C] (0/1 with a single 1)"
)


def read_labels(y: object, n: int) -> tuple[torch.Tensor | None, str | None]:
    """Class labels ``long [n]`` from what a loader yielded next to ``n`` images.

    Accepted (unambiguous) forms: integer indices ``[n]``; floats with integral values (cast);
    ``[n, 1]`` (squeezed); one-hot rows ``[n, C]`` (0/1 with exactly one 1 per row; argmax).
    Returns ``(labels, None)``, ``(None, None)`` without labels, or ``(None, problem)`` with a
    description of what is wrong with them (soft or non-integral labels, negative values,
    other shapes); the caller raises it when a detector needs labels and ignores it otherwise.
    """
    if y is None:
        return None, None
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except Exception:  # noqa: BLE001 - strings, ragged lists, objects
            return None, f"of type {type(y).__name__} and cannot be converted to a tensor"
    shape = tuple(y.shape)
    if y.dtype == torch.bool:
        return None, f"booleans {shape} (convert class indices with y.long())"
    if y.is_complex():
        return None, f"complex numbers {shape}"
    if y.ndim == 0 and n == 1:
        y = y.reshape(1)
    elif y.ndim == 2 and y.shape[0] == n and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[0] == n:
        binary = bool(((y == 0) | (y == 1)).all())
        if binary and bool((y.sum(1) == 1).all()):
            return y.argmax(1).long(), None
        if (
            y.dtype.is_floating_point
            and bool((y >= 0).all())
            and bool(torch.allclose(y.double().sum(1), torch.ones(n, dtype=torch.float64)))
        ):
            return None, f"soft labels {shape} (rows of class probabilities, e.g. mixup or label smoothing)"
        return None, f"of shape {shape} but not one-hot (rows of 0/1 with exactly one 1)"
    if y.ndim != 1 or y.shape[0] != n:
        return None, f"of shape {shape} for a batch of {n} images"
    if y.dtype.is_floating_point:
        finite = torch.isfinite(y)
        if not bool(finite.all()):
            return None, "floats with NaN or Inf values"
        frac = y != torch.round(y)
        if bool(frac.any()):
            return None, f"floats with non-integral values (e.g. {float(y[frac][0]):g})"
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        return None, f"negative (min {int(y.min())}; -1 often marks unlabelled samples)"
    return y, None


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor  # global sample index of each row (for deterministic splits)


class FitStream:
    """Re-iterable view of a fit loader with a deterministic calibration hold-out.

    Sample ``i`` (in loader order) is held out for calibration when
    ``i % stride == stride - 1`` with ``stride = round(1 / calibration)``; the split therefore
    does not depend on the batch size.
    """

    def __init__(
        self,
        adapter: Adapter,
        loader: Iterable,
        *,
        calibration: float = 0.1,
        max_samples: int | None = None,
        progress: bool | None = False,
        desc: str = "fit",
    ) -> None:
        if not isinstance(loader, Iterable) or isinstance(loader, (torch.Tensor, str, bytes)):
            if isinstance(loader, torch.Tensor):
                raise InputTypeError(
                    "fit() takes a loader (an iterable of batches), not one tensor. Wrap it: "
                    "[x] or torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=...)."
                )
            raise InputTypeError(
                f"fit() needs an iterable of batches (e.g. a torch DataLoader), got {type(loader).__name__}."
            )
        if not 0.0 <= calibration < 1.0:
            raise InputError(f"calibration must be in [0, 1), got {calibration}.")
        if max_samples is not None and max_samples < 1:
            raise InputError(f"max_samples must be >= 1, got {max_samples}.")
        self.adapter = adapter
        self.loader = loader
        self.calibration = calibration
        self.stride = round(1.0 / calibration) if calibration > 0 else 0
        self.max_samples = max_samples
        self.progress = progress
        self.desc = desc
        self.passes = 0
        self.n_seen: int | None = None
        self.labelled: bool | None = None
        #: names of the detectors that need class labels (set by the fit); the first batch is
        #: checked for usable labels before the model runs
        self.need_labels: list[str] = []
        self._one_shot = isinstance(loader, Iterator)

    # ------------------------------------------------------------------ raw batches
    def batches(self) -> Iterator[Batch]:
        if self._one_shot and self.passes > 0:
            raise InputTypeError(
                "this detector needs several passes over the fit data, but the loader is a "
                "one-shot iterator/generator. Pass a re-iterable loader (a DataLoader or a list)."
            )
        self.passes += 1
        model = self.adapter.model
        seen = 0
        labelled = None
        total = None
        try:
            total = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        bar = progress_bar(total=total, desc=self.desc, enabled=self.progress, unit="batch")
        try:
            for batch in self.loader:
                x, y_raw, given_idx = split_batch(batch)
                y, problem = read_labels(y_raw, x.shape[0])
                if self.need_labels and y is None and (labelled is None or problem is not None):
                    raise self._labels_error(batch, problem)
                if self.max_samples is not None and seen + x.shape[0] > self.max_samples:
                    keep = self.max_samples - seen
                    x, y = x[:keep], (y[:keep] if y is not None else None)
                    given_idx = given_idx[:keep] if given_idx is not None else None
                if x.shape[0] == 0:
                    break
                x = prepare_input(x, self.adapter if self.adapter.resolved else None, model)
                self.adapter.ensure_resolved(x)
                x = prepare_input(x, self.adapter, model)
                if labelled is None:
                    labelled = y is not None
                elif labelled != (y is not None):
                    raise InputError("some batches of the loader have labels and others do not.")
                idx = given_idx if given_idx is not None else torch.arange(seen, seen + x.shape[0])
                seen += x.shape[0]
                bar.update(1)
                yield Batch(x, y.to(x.device) if y is not None else None, idx)
                if self.max_samples is not None and seen >= self.max_samples:
                    break
        finally:
            bar.close()
        if seen == 0:
            raise InputError(
                "the fit loader yielded no samples. Pass a loader over in-distribution training "
                "data (it may be empty because of a filter or a too large batch with drop_last=True)."
            )
        self.n_seen = seen
        self.labelled = bool(labelled)

    def _labels_error(self, batch: object, problem: str | None) -> InputError:
        who = ", ".join(self.need_labels)
        verb = "needs" if len(self.need_labels) == 1 else "need"
        if problem is not None:
            return InputError(
                f"{who} {verb} class labels, but the loader's labels are {problem}. Accepted: "
                f"{LABEL_FORMS}. Yield (x, y) with y the class index of each image."
            )
        if isinstance(batch, torch.Tensor):
            got = "tensors of images only"
        elif isinstance(batch, cabc.Mapping):
            got = f"dicts with keys {sorted(batch)} (labels are read from one of {list(_Y_KEYS)})"
        else:
            got = f"{type(batch).__name__}s of length {len(batch)} (labels are the second item)"  # type: ignore[arg-type]
        return InputError(
            f"{who} {verb} labels (class-conditional), but the loader yields no labels: its first batch "
            f"holds {got}. Use a loader that yields (x, y) pairs of ID training data."
        )

    def calibration_mask(self, index: torch.Tensor) -> torch.Tensor:
        if self.stride == 0:
            return torch.zeros_like(index, dtype=torch.bool)
        return (index % self.stride) == (self.stride - 1)

    # ------------------------------------------------------------------ features
    def features(
        self,
        spec: CaptureSpec,
        *,
        split: str = "fit",
        calib_spec: CaptureSpec | None = None,
        calib_store: list[Features] | None = None,
    ) -> Iterator[Features]:
        """Captured features of the ``split`` samples ("fit", "calibration" or "all").

        With ``calib_spec`` and ``calib_store``, the calibration samples' features for that
        spec are captured in the same pass and appended to ``calib_store``.
        """
        for b in self.batches():
            cmask = self.calibration_mask(b.index)
            if split == "fit":
                sel = ~cmask
            elif split == "calibration":
                sel = cmask
            elif split == "all":
                sel = torch.ones_like(cmask)
            else:
                raise ValueError(split)
            want_calib = calib_spec is not None and calib_store is not None and bool(cmask.any())
            full = spec | calib_spec if want_calib else spec
            if not bool(sel.any()) and not want_calib:
                continue
            if want_calib:
                feats = capture(self.adapter, b.x, full, validated=True, index=b.index)
                if b.y is not None:
                    feats["labels"] = b.y
                feats["index"] = b.index.to(b.x.device)
                calib_store.append(feats.select(cmask.to(b.x.device)))
                if bool(sel.any()):
                    yield feats.select(sel.to(b.x.device))
            else:
                selx = sel.to(b.x.device)
                x = b.x if bool(sel.all()) else b.x[selx]
                feats = capture(self.adapter, x, spec, validated=True, index=b.index[sel.cpu()])
                if b.y is not None:
                    feats["labels"] = b.y[selx] if not bool(sel.all()) else b.y
                feats["index"] = b.index[sel.cpu()].to(b.x.device)
                yield feats

    def inputs(self, *, split: str = "fit") -> Iterator[Batch]:
        """Raw validated batches of one split (for detectors that transform inputs)."""
        for b in self.batches():
            cmask = self.calibration_mask(b.index)
            sel = {"fit": ~cmask, "calibration": cmask, "all": torch.ones_like(cmask)}[split]
            if not bool(sel.any()):
                continue
            if bool(sel.all()):
                yield b
            else:
                s = sel.to(b.x.device)
                yield Batch(b.x[s], b.y[s] if b.y is not None else None, b.index[sel])
