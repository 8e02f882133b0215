"""PSNR and SSIM (spec section 7) with BasicSR's conventions, in 8-bit units (data range 255).

Y is BT.601 "only_y" with MATLAB coefficients, not rounded; SSIM uses an 11x11 Gaussian window
(sigma 1.5) over the valid region, averaged over channels. `correct_mean_var` is VQFR's option.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from dynface.metrics.arrays import to_255

Channel = Literal["rgb", "y"]

_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2


def _luma(x255: np.ndarray) -> np.ndarray:
    r, g, b = x255[..., 0] / 255.0, x255[..., 1] / 255.0, x255[..., 2] / 255.0
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def y_channel(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) float64 Y in 8-bit units ([16, 235]), unrounded:
    16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1] (BT.601, MATLAB rgb2ycbcr)."""
    return _luma(to_255(img, "img"))


def _match_mean_std(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """VQFR's --correct_mean_var: per channel, shift x to ref's mean, then scale it (about zero, not
    about the mean) to ref's std; twice, so the match is close but not exact after scaling."""
    out = x.copy()
    for c in range(3):
        mean, std = ref[..., c].mean(), ref[..., c].std()
        for _ in range(2):
            out[..., c] += mean - out[..., c].mean()
            s = out[..., c].std()
            if s == 0.0:
                raise ValueError("correct_mean_var: a channel of the image is constant")
            out[..., c] *= std / s
    return out


def _prepare(
    img: np.ndarray, ref: np.ndarray, channel: Channel, correct_mean_var: bool, crop_border: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H', W', C) in 8-bit units, C = 3 (rgb) or 1 (y)."""
    x, y = to_255(img, "img"), to_255(ref, "ref")
    if x.shape != y.shape:
        raise ValueError(f"img {x.shape} and ref {y.shape} differ in shape")
    if crop_border < 0 or 2 * crop_border >= min(x.shape[:2]):
        raise ValueError(f"crop_border {crop_border} does not fit a {x.shape[:2]} image")
    if channel not in ("rgb", "y"):
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    if correct_mean_var:  # over the whole image, before cropping, as VQFR does
        x = _match_mean_std(x, y)
    if crop_border:
        x, y = (a[crop_border:-crop_border, crop_border:-crop_border] for a in (x, y))
    if channel == "y":
        x, y = _luma(x)[..., None], _luma(y)[..., None]
    return x, y


def psnr(
    img: np.ndarray,
    ref: np.ndarray,
    *,
    channel: Channel = "rgb",
    correct_mean_var: bool = False,
    crop_border: int = 0,
) -> float:
    """PSNR in dB over all pixels and channels, data range 255; inf for identical images.

    channel "y" measures BT.601 luma (`y_channel`). correct_mean_var matches img's per-channel mean and
    std to ref's first (VQFR's `--correct_mean_var`, on by default in its scripts: say whether a reported
    number used it). crop_border removes that many pixels from every side (after the correction).
    """
    x, y = _prepare(img, ref, channel, correct_mean_var, crop_border)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def _gauss_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(H, W) -> (H - k + 1, W - k + 1): separable correlation with g, valid region only."""
    rows = np.lib.stride_tricks.sliding_window_view(a, g.size, axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, g.size, axis=1) @ g


def _ssim_plane(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    num = (2 * mx * my + _SSIM_C1) * (2 * sxy + _SSIM_C2)
    den = (mx * mx + my * my + _SSIM_C1) * (sxx + syy + _SSIM_C2)
    return float(np.mean(num / den))


def ssim(
    img: np.ndarray,
    ref: np.ndarray,
    *,
    channel: Channel = "rgb",
    correct_mean_var: bool = False,
    crop_border: int = 0,
) -> float:
    """SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range
    255, averaged over the valid region and then over channels. Options as in `psnr`."""
    x, y = _prepare(img, ref, channel, correct_mean_var, crop_border)
    if min(x.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels, got {x.shape[:2]}")
    g = _gauss_window()
    return float(np.mean([_ssim_plane(x[..., c], y[..., c], g) for c in range(x.shape[2])]))
