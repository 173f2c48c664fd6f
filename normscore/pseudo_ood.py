"""Pseudo-OOD images made from ID images only, and the deterministic held-out split of
:func:`normscore.select`.

Every kind is a function of an ID image and its position in the loader (seeded per sample by
a hash of the position), so it does not depend on the batching, the global RNG or any data
other than the ID images (:data:`PSEUDO_OOD` says what each kind makes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .detectors.engines.jigsaw import jigsaw
from .errors import ConfigError, InputError
from .hashing import splitmix64

__all__ = ["DEFAULT_KINDS", "PSEUDO_OOD", "heldout_mask", "pseudo_ood"]

_MASK64 = (1 << 64) - 1
_SPLIT_SALT = 0x5E1EC7  # the held-out split's hash salt (xor-ed with the seed)

#: the pseudo-OOD kinds, with what each makes of an ID image ``x`` (one image, channels ``c``)
PSEUDO_OOD: dict[str, str] = {
    "jigsaw": "FeatureNorm's jigsaw: the 3x3 tiles shuffled (normscore.detectors.engines.jigsaw, never the identity)",
    "blur": "heavy Gaussian blur, sigma = max(H, W) / 8 per axis (replicate padding): only the coarse layout survives",
    "permute": "the pixel positions randomly permuted (one permutation for all channels): same colour histogram, "
    "no spatial structure",
    "contrast": "contrast x4 around the image's per-channel mean, clipped to the image's own per-channel range "
    "(saturated, posterised look)",
    "corrupt": "one of blur / permute / contrast per image, chosen by a hash of its position",
    "mix": "0.5 x + 0.5 x' with x' the previous held-out image in loader order (the first one: itself rotated "
    "by 180 degrees)",
    "noise": "noise with the image's per-channel mean and standard deviation: Gaussian or uniform (per image, "
    "by a hash of its position)",
}
#: the kinds :func:`select` uses by default
DEFAULT_KINDS: tuple[str, ...] = ("jigsaw", "corrupt", "mix", "noise")

_KIND_SALT = {k: 0x70D0 + i for i, k in enumerate(PSEUDO_OOD)}  # per-kind hash salts (fixed forever)


# ---------------------------------------------------------------------------------------------
# the split and the pseudo-OOD images


def heldout_mask(index: torch.Tensor, holdout: float, seed: int = 0) -> torch.Tensor:
    """Bool ``[B]``: which samples (global positions ``index``) are held out for the selection.

    ``u(i) = splitmix64(i, salt=seed ^ 0x5E1EC7) / 2**64 < holdout``: a function of the position
    and the seed only (not of the batch size or the other samples)."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout}.")
    idx = index.detach().cpu().numpy().astype(np.int64).astype(np.uint64)
    h = splitmix64(idx, salt=(int(seed) ^ _SPLIT_SALT) & _MASK64)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return torch.from_numpy(u < holdout)


def _sample_seeds(index: torch.Tensor, kind: str, seed: int) -> list[int]:
    """One 63-bit generator seed per sample, from ``(seed, kind, position)``."""
    idx = index.detach().cpu().numpy().astype(np.int64).astype(np.uint64)
    base = int(splitmix64(int(seed) & _MASK64, salt=_KIND_SALT[kind]))
    return [int(v) >> 1 for v in splitmix64(idx ^ np.uint64(base))]


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    _, c, h, w = x.shape
    sigma = max(h, w) / 8.0
    out = x
    for dim, n in ((2, h), (3, w)):
        r = min(math.ceil(3.0 * sigma), n - 1)
        if r < 1:
            continue
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
        if dim == 2:
            weight = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
            pad = (0, 0, r, r)
        else:
            weight = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
            pad = (r, r, 0, 0)
        out = torch.nn.functional.conv2d(torch.nn.functional.pad(out, pad, mode="replicate"), weight, groups=c)
    return out


def _permute_pixels(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    b, c, h, w = x.shape
    g = torch.Generator()
    perms = torch.empty(b, h * w, dtype=torch.long)
    for r, s in enumerate(seeds):
        g.manual_seed(s)
        perms[r] = torch.randperm(h * w, generator=g)
    flat = x.reshape(b, c, h * w)
    return torch.gather(flat, 2, perms.to(x.device)[:, None, :].expand(-1, c, -1)).reshape(b, c, h, w)


def _contrast(x: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(2, 3), keepdim=True)
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.minimum(torch.maximum(m + 4.0 * (x - m), lo), hi)


def _noise(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    b = x.shape[0]
    m = x.mean(dim=(2, 3), keepdim=True)
    s = x.std(dim=(2, 3), keepdim=True)
    g = torch.Generator()
    z = torch.empty(x.shape, dtype=torch.float32)
    for r, sd in enumerate(seeds):
        g.manual_seed(sd)
        if sd & 1:  # uniform with unit variance
            z[r] = (torch.rand(x.shape[1:], generator=g) * 2.0 - 1.0) * math.sqrt(3.0)
        else:
            z[r] = torch.randn(x.shape[1:], generator=g)
    return m + s * z.to(device=x.device, dtype=x.dtype)[:b]


def pseudo_ood(
    kind: str,
    x: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    seed: int = 0,
    partner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pseudo-OOD copies of an ID batch ``x`` ``[B, C, H, W]`` (see :data:`PSEUDO_OOD`).

    ``index`` holds each sample's global position (default ``arange(B)``): the random choices of
    sample ``i`` (tile and pixel permutations, noise, which corruption) are seeded by
    ``(seed, kind, i)``, so they do not depend on the batch. ``partner`` (``"mix"`` only) is the
    image each one is mixed with (default: the previous image of the batch, the first one its
    own 180-degree rotation). The result has the shape, dtype and device of ``x``; ``x`` is not
    modified.
    """
    if kind not in PSEUDO_OOD:
        raise ConfigError(f"unknown pseudo-OOD kind {kind!r}; the kinds are {list(PSEUDO_OOD)}.")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"pseudo-OOD images are made from image batches [B, C, H, W]; got {shape}.")
    b, _, h, w = x.shape
    if h < 3 or w < 3:
        raise InputError(f"pseudo-OOD images need at least 3x3 pixels, got {h}x{w}.")
    if index is None:
        index = torch.arange(b)
    if index.shape[0] != b:
        raise InputError(f"index has {index.shape[0]} entries for {b} images.")
    if b == 0:
        return x.clone()
    if kind == "jigsaw":
        return jigsaw(x, index, grid=3, seed=seed)
    if kind == "blur":
        return _gaussian_blur(x)
    if kind == "permute":
        return _permute_pixels(x, _sample_seeds(index, kind, seed))
    if kind == "contrast":
        return _contrast(x)
    if kind == "noise":
        return _noise(x, _sample_seeds(index, kind, seed))
    if kind == "mix":
        if partner is None:
            partner = torch.cat([torch.rot90(x[:1], 2, dims=(2, 3)), x[:-1]])
        if partner.shape != x.shape:
            raise InputError(f"partner has shape {tuple(partner.shape)}, not the batch's {tuple(x.shape)}.")
        return 0.5 * x + 0.5 * partner.to(device=x.device, dtype=x.dtype)
    # corrupt: one of blur / permute / contrast per image (each exactly as its own kind)
    which = torch.tensor([s % 3 for s in _sample_seeds(index, kind, seed)])
    out = x.clone()
    for j, sub in enumerate(("blur", "permute", "contrast")):
        sel = which == j
        if bool(sel.any()):
            out[sel.to(x.device)] = pseudo_ood(sub, x[sel.to(x.device)], index[sel], seed=seed)
    return out
