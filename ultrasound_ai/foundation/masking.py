"""USFM's spatial-frequency dual masking (paper eqs. 1, 6 and 7).

* Spatial mean masking (eq. 1): the image is cut into mask patches (a multiple of the ViT patch); exactly
  round(ratio x number of patches) of them, chosen at random, are replaced by the mean of the whole image
  (not zeros, so the grey-level distribution stays plausible).
* Frequency band-stop masking (eq. 6): the image's 2D DFT has a random selection of concentric annular
  bands set to zero, then is transformed back. Band edges are radii of the normalised frequency
  r = sqrt(fy^2 + fx^2) (cycles per pixel, numpy's fftfreq grid); a protected disc around DC is never
  removed (it holds the mean brightness and the coarse anatomy), and the band widths grow geometrically
  outwards (the spectrum's energy falls off with frequency, so equal-width rings would be mostly empty
  at high frequency). The removal set is symmetric under f -> -f, so the inverse transform is real.
* Combination (eq. 7): the input is the frequency-masked image, and inside the spatially masked patches
  the pixels are the original image's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError

__all__ = ["MaskingConfig", "band_edges", "radius_grid", "band_stop_filter", "frequency_band_stop",
           "random_patch_mask", "patch_mask_to_pixels", "spatial_mean_mask", "dual_mask", "random_band_selection"]


@dataclass(frozen=True)
class MaskingConfig:
    mask_patch_size: int = 32  # pixels; a multiple of the ViT patch
    mask_ratio: float = 0.6
    n_bands: int = 8
    protected_radius: float = 0.02  # cycles/pixel kept around DC
    band_growth: float = 1.4  # width ratio of consecutive rings
    band_probability: float = 0.3  # each ring is removed with this probability
    frequency: bool = True
    spatial: bool = True

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise InputError(f"masking mask_ratio: expected a number in [0, 1], got {self.mask_ratio!r}")
        if not 0.0 <= self.band_probability <= 1.0:
            raise InputError(f"masking band_probability: expected a number in [0, 1], got {self.band_probability!r}")
        if self.n_bands < 1 or self.mask_patch_size < 1 or self.band_growth <= 0:
            raise InputError("masking: n_bands and mask_patch_size must be >= 1 and band_growth > 0")


def radius_grid(h: int, w: int, device=None) -> torch.Tensor:
    """|f| in cycles per pixel on the unshifted DFT grid, [h, w]."""
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def band_edges(n_bands: int, protected_radius: float = 0.02, growth: float = 1.4,
               max_radius: float = float(np.sqrt(0.5))) -> np.ndarray:
    """n_bands + 1 increasing radii from protected_radius to max_radius (the grid's corner, sqrt(0.5)),
    ring k spanning [edges[k], edges[k+1]) with widths in geometric progression."""
    if not 0 <= protected_radius < max_radius:
        raise InputError(f"band_edges protected_radius: expected a value in [0, {max_radius:.3f}), got {protected_radius}")
    widths = growth ** np.arange(n_bands, dtype=np.float64)
    widths *= (max_radius - protected_radius) / widths.sum()
    edges = protected_radius + np.concatenate([[0.0], np.cumsum(widths)])
    edges[-1] = max_radius + 1e-9  # the corner frequency itself belongs to the last ring
    return edges


def band_stop_filter(h: int, w: int, edges: np.ndarray, removed, device=None) -> torch.Tensor:
    """[h, w] float mask on the DFT grid: 0 on the removed rings, 1 elsewhere."""
    r = radius_grid(h, w, device)
    keep = torch.ones(h, w, dtype=torch.float64, device=device)
    for k, gone in enumerate(np.asarray(removed, dtype=bool).reshape(-1)):
        if gone:
            keep[(r >= edges[k]) & (r < edges[k + 1])] = 0.0
    return keep


def frequency_band_stop(images: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Apply band-stop filters: iDFT(filter * DFT(image)). images [..., H, W]; filters broadcast to it."""
    spec = torch.fft.fft2(images.to(torch.float64) if images.dtype == torch.float64 else images.float())
    out = torch.fft.ifft2(spec * filters.to(spec.real.dtype)).real
    return out.to(images.dtype)


def random_band_selection(generator: torch.Generator, batch: int, n_bands: int, probability: float) -> torch.Tensor:
    """[batch, n_bands] bool: which rings each image loses (at least one when probability > 0, so every
    image is frequency-masked)."""
    sel = torch.rand(batch, n_bands, generator=generator) < probability
    if probability > 0:
        forced = torch.randint(0, n_bands, (batch,), generator=generator)
        sel[torch.arange(batch), forced] |= ~sel.any(dim=1)
    return sel


def random_patch_mask(generator: torch.Generator, batch: int, grid: tuple[int, int], ratio: float) -> torch.Tensor:
    """[batch, gh, gw] bool with exactly round(ratio * gh * gw) True entries per image."""
    gh, gw = grid
    n = gh * gw
    k = int(round(ratio * n))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.reshape(batch, gh, gw)


def patch_mask_to_pixels(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, gh, gw] -> [B, 1, gh*patch, gw*patch]."""
    return mask.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2).unsqueeze(1)


def spatial_mean_mask(images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 1: masked pixels take the mean of the whole image (per image and channel)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return torch.where(pixel_mask.to(images.device), mean.expand_as(images), images)


def dual_mask(images: torch.Tensor, generator: torch.Generator, cfg: MaskingConfig = MaskingConfig()
              ) -> dict[str, torch.Tensor]:
    """Eq. 7 on a batch [B, C, H, W] (H, W multiples of cfg.mask_patch_size).

    Returns {"input": the masked images, "pixel_mask": [B, 1, H, W] bool (spatially masked pixels),
    "patch_mask": [B, gh, gw] bool, "bands": [B, n_bands] bool (removed rings)}. Masks are drawn on the CPU
    from `generator`, so they depend only on its seed.
    """
    if images.ndim != 4:
        raise InputError(f"dual_mask images: expected [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    p = cfg.mask_patch_size
    if h % p or w % p:
        raise InputError(f"dual_mask images: {h}x{w} pixels is not a multiple of the mask patch size {p}")
    grid = (h // p, w // p)
    patch_mask = random_patch_mask(generator, b, grid, cfg.mask_ratio if cfg.spatial else 0.0)
    bands = random_band_selection(generator, b, cfg.n_bands, cfg.band_probability if cfg.frequency else 0.0)
    out = images
    if cfg.frequency:
        edges = band_edges(cfg.n_bands, cfg.protected_radius, cfg.band_growth)
        filters = torch.stack([band_stop_filter(h, w, edges, bands[i], images.device) for i in range(b)])
        out = frequency_band_stop(images, filters[:, None])
    pixel_mask = patch_mask_to_pixels(patch_mask, p).to(images.device)
    if cfg.spatial:
        # The fill is the mean of the original image U (eq. 1), not of the frequency-masked one.
        mean = images.mean(dim=(-2, -1), keepdim=True)
        out = torch.where(pixel_mask, mean.expand_as(out), out)
    return {"input": out, "pixel_mask": pixel_mask, "patch_mask": patch_mask, "bands": bands}
