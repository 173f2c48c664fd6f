"""A plain supervised training loop (cross-entropy, Adam, cosine schedule) for small models.

Used by the benchmarks and examples to get a trained classifier on CPU in minutes. The
fine-tuning methods (RNA, Separation) live in :mod:`normscore.finetune`.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn

from .progress import progress_bar
from .taps import eval_mode

__all__ = ["evaluate_accuracy", "train_classifier"]


def train_classifier(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    *,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
    progress: bool = True,
    deterministic: bool = False,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy; returns it in eval mode.

    Adam with cosine learning-rate decay per step; ``augment`` adds random shifts of up to 2 px
    and horizontal flips. The data order and augmentation are fixed by ``seed``.

    Reproducibility on CPU: with one thread, runs are bitwise identical. With several threads,
    oneDNN's convolution kernels may split their sums differently from run to run (observed on
    a loaded machine: two cold runs of ``normscore-bench`` trained to 87.3% and 87.6%, different
    weights); on an idle machine repeated runs were identical. ``deterministic=True`` trains
    with oneDNN off: bitwise reproducible at any thread count, about 2.5x slower (2 cores).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = progress_bar(total=steps, desc="train", enabled=progress, unit="step")
    with contextlib.ExitStack() as stack:
        if deterministic:  # oneDNN off for the training (torch's own kernels are order-stable)
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        stack.callback(bar.close)
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                if augment:
                    x = _augment(x, g)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    opt.zero_grad(set_to_none=True)
    return model.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on a labelled dataset, in eval mode; every module's own
    train/eval flag is restored afterwards (also on an exception)."""
    correct = total = 0
    dev = next(model.parameters()).device
    with eval_mode(model):
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x.to(dev)).argmax(1).cpu() == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)
