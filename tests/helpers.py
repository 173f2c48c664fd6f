"""Shared test helpers: model snapshots for the "detector never changes the model" invariant."""

from __future__ import annotations

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": {n: tuple(len(getattr(m, h, {})) for h in _HOOK_DICTS) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "global": (
            len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks),
            len(nn.modules.module._global_backward_hooks),
        ),
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["hooks"] == snap["hooks"], "hooks left on the model"
    assert now["global"] == snap["global"], "global hooks left"
    assert now["training"] == snap["training"], "train/eval flags changed"
    assert now["requires_grad"] == snap["requires_grad"], "requires_grad changed"
    for n, p in snap["params"].items():
        assert torch.equal(now["params"][n], p), f"parameter {n} changed"
    for n, b in snap["buffers"].items():
        assert torch.equal(now["buffers"][n], b), f"buffer {n} changed"
    for n, g in snap["grads"].items():
        h = now["grads"][n]
        assert (g is None and h is None) or (g is not None and h is not None and torch.equal(g, h)), (
            f".grad of {n} changed"
        )


class TinyCNN(nn.Module):
    """A small conv net with BatchNorm, residual-free, 1 or 3 input channels."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_loader(n: int = 48, batch: int = 16, size: int = 16, classes: int = 10, seed: int = 0, chans: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
