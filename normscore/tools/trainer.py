"""A plain supervised training loop for small models, bitwise reproducible on the CPU.

Used by the benchmark (``normscore-bench`` trains its default model with it), the examples and
the benchmarks scripts to get a trained classifier on the CPU in minutes. The fine-tuning
methods (RNA, Separation) live in :mod:`normscore.finetune`.

Recipe: SGD with Nesterov momentum, a linear warm-up over the first ``warmup`` share of the
steps then cosine decay to zero (per step), weight decay, and per-sample augmentation (random
crops of the image padded by ``2`` px with zeros, horizontal flips). Everything random (data
order, augmentation) is drawn from one generator seeded by ``seed``; the caller seeds the
initialisation.

Reproducibility (``deterministic=True``, the default): on the CPU the training runs its kernels
on **one** intra-op thread, whatever ``torch.get_num_threads()`` says (restored afterwards):
oneDNN's and MKL's multi-threaded kernels may split reductions by thread count and, under load,
by schedule, so two runs with several threads can end with different weights (observed:
87.3 % vs 87.6 % accuracy from two cold benchmark runs). On one thread the result depends only
on the data, the seed and the CPU's instruction set (oneDNN and MKL pick kernels per ISA: see
docs/benchmarks.md for what differs between AVX-512 and AVX2 kernels). On CUDA it selects
cuDNN's deterministic algorithms (not verified on a GPU yet). ``deterministic=False`` uses the
current thread count: faster on many cores, not reproducible.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..progress import progress_bar
from ..runmode import eval_mode

__all__ = ["augment_batch", "deterministic_training", "evaluate_accuracy", "train_classifier", "train_steps"]


@contextlib.contextmanager
def deterministic_training(device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the enclosed training bitwise reproducibly (see the module docstring); every global
    setting it changes is restored on exit."""
    dev = torch.device(device)
    with contextlib.ExitStack() as stack:
        if dev.type == "cpu":
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, before)
        elif dev.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True))
        yield


def train_classifier(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup: float = 0.15,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
    progress: bool | None = None,
    deterministic: bool = True,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy (recipe in the module docstring); returns it
    in eval mode. ``lr`` is the peak learning rate, reached after ``warmup * steps`` steps.

    The global random state is left as it was: data order and augmentation come from a
    generator seeded by ``seed``, random layers (dropout) from a forked global RNG seeded by it.
    """
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    steps = max(1, epochs * len(loader))
    factor = _warmup_cosine(steps, warmup)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                yield (augment_batch(x, g) if augment else x), y

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss, {"total": float(loss.item())}

    with contextlib.ExitStack() as stack:
        dev = torch.device(device)  # random layers (dropout, drop-path) draw from a forked, seeded RNG
        stack.enter_context(torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []))
        torch.manual_seed(seed)
        if deterministic:
            stack.enter_context(deterministic_training(device))
        train_steps(opt, batches(), loss_fn, lr_at=lambda k: lr * factor(k), total_steps=steps, progress=progress)
    return model.eval()


def train_steps(
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    *,
    lr_at: Callable[[int], float],
    total_steps: int,
    start_step: int = 0,
    desc: str = "train",
    progress: bool | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> int:
    """The one optimisation loop of normscore (the bench's classifier training above and
    :func:`normscore.finetune.finetune`): for every ``(x, y)`` of ``batches``, set the learning
    rate ``lr_at(step)``, ``loss, values = loss_fn(x, y)`` (``values["total"]`` is the loss as a
    float), stop with a clear error if it is not finite, then ``zero_grad``, ``backward`` and
    ``step``; after each step ``on_step(step, values)`` with the number of steps done.

    The caller owns everything random (``batches`` draws its order and augmentation from its own
    generators) and the model's mode. Returns the number of steps done; the gradients are
    cleared on exit (also on an exception).
    """
    step = int(start_step)
    bar = progress_bar(total=total_steps, desc=desc, enabled=progress, unit="step")
    bar.update(step)
    try:
        for x, y in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss, values = loss_fn(x, y)
            total = values["total"]
            if not math.isfinite(total):
                raise FloatingPointError(f"the loss became {total} at step {step}; lower the learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix_str(f"loss {total:.3f}")
            if on_step is not None:
                on_step(step, values)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    return step


def _warmup_cosine(steps: int, warmup: float):
    n_warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1.0 + math.cos(math.pi * min(step - n_warm, steps - n_warm) / max(1, steps - n_warm)))

    return factor


def augment_batch(x: torch.Tensor, g: torch.Generator, shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Per-sample horizontal flip and random translation by up to ``shift`` px (a crop of the
    zero-padded image), drawn from ``g`` (flips first, then the vertical and horizontal offsets)."""
    b, c, h, w = x.shape
    if flip:
        f = (torch.rand(b, generator=g) < 0.5).to(x.device)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    if shift > 0:
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=g).to(x.device)
        padded = nn.functional.pad(x, (shift, shift, shift, shift))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    return x


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
