"""Jigsaw pseudo-OOD images for FeatureNorm's NormRatio block selection.

Yu et al., "Block Selection Method for Using Feature Norm in Out-of-distribution Detection",
CVPR 2023, arXiv:2212.02295: each ID training image is cut into a ``g x g`` grid of tiles and
the tiles are shuffled; a block whose feature norm drops on such images separates ID from
pseudo-OOD.

Choices (documented in ``docs/seed-methods.md``):

* **Preprocessed input.** The jigsaw works on the batch exactly as the model receives it (after
  the loader's resizing and normalisation). Original and jigsaw therefore share one
  preprocessing by construction; the official code cut unnormalised images while the model was
  trained and evaluated on normalised ones.
* **Reproducible, batch-size independent.** The permutation of sample ``i`` is drawn from a
  generator seeded with ``splitmix64(seed, i)``, where ``i`` is the sample's global position in
  the fit stream. The same image at the same position gets the same jigsaw whatever the batch
  size, the device or the other samples.
* **No identity.** A permutation that leaves every tile in place is not pseudo-OOD; when the
  draw is the identity the tiles are rotated by one position instead.
* **Sizes not divisible by g.** Tiles are ``floor(H / g) x floor(W / g)`` pixels and cover the
  top-left ``g*floor(H/g) x g*floor(W/g)`` area (as in the official code). The remaining
  bottom rows and right columns (at most ``g - 1`` pixels) **keep the original pixels**. The
  official code zeroed them, but "zero" means black only for unnormalised images; in a
  normalised tensor it is the mean colour, so a zero border would be a different artefact
  depending on the preprocessing. Keeping the border adds no artefact at all, and at most
  ``g - 1`` pixel rows and columns of unpermuted content remain.
"""

from __future__ import annotations

import torch

from ...hashing import splitmix64
from ...taps import register_view

__all__ = ["jigsaw", "jigsaw_permutations", "jigsaw_view"]

_MASK64 = (1 << 64) - 1


def jigsaw_permutations(index: torch.Tensor, grid: int = 3, seed: int = 0) -> torch.Tensor:
    """Tile permutations ``[B, grid*grid]`` for global sample indices ``index`` ``[B]``.

    Row ``i`` gives, for each output tile position (row-major), the source tile. Each row
    depends only on ``(seed, index[i], grid)`` and is never the identity.
    """
    if grid < 2:
        raise ValueError(f"the jigsaw grid must be at least 2, got {grid}")
    n = grid * grid
    out = torch.empty(len(index), n, dtype=torch.long)
    ident = torch.arange(n)
    g = torch.Generator()
    base = int(splitmix64(int(seed) & _MASK64))
    for r, i in enumerate(index.detach().cpu().tolist()):
        g.manual_seed(int(splitmix64(base ^ (int(i) & _MASK64))) >> 1)
        p = torch.randperm(n, generator=g)
        if torch.equal(p, ident):
            p = torch.roll(p, 1)
        out[r] = p
    return out


def jigsaw(x: torch.Tensor, index: torch.Tensor | None = None, *, grid: int = 3, seed: int = 0) -> torch.Tensor:
    """Jigsaw-shuffle a batch ``x`` ``[B, C, H, W]`` (see the module docstring).

    ``index`` holds the global position of each sample (default ``arange(B)``). The result has
    the same shape, dtype and device; the input is not modified.
    """
    if x.ndim != 4:
        raise ValueError(f"jigsaw needs a batch [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"images of size {h}x{w} are too small for a {grid}x{grid} jigsaw")
    if index is None:
        index = torch.arange(b)
    perm = jigsaw_permutations(index, grid, seed).to(x.device)
    area = x[:, :, : grid * th, : grid * tw]
    tiles = area.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, th, tw)
    shuffled = torch.gather(tiles, 1, perm[:, :, None, None, None].expand(-1, -1, c, th, tw))
    out = x.clone()
    out[:, :, : grid * th, : grid * tw] = (
        shuffled.reshape(b, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * th, grid * tw)
    )
    return out


def jigsaw_view(grid: int = 3, seed: int = 0) -> str:
    """Register (once) and return the name of the input view ``jigsaw:g<grid>:s<seed>``.

    Use it in ``CaptureSpec(views=frozenset({name}))`` to capture the jigsaw of every batch in
    the same forward pass as the batch itself (features under ``"<name>|<key>"``).
    """
    name = f"jigsaw:g{int(grid)}:s{int(seed)}"

    def fn(x: torch.Tensor, index: torch.Tensor, _g: int = int(grid), _s: int = int(seed)) -> torch.Tensor:
        return jigsaw(x, index, grid=_g, seed=_s)

    register_view(name, fn)
    return name
