"""Image arrays as every metric takes them: (H, W, 3) RGB, uint8 or float in [0, 1], in 8-bit units."""

from __future__ import annotations

import numpy as np


def to_255(img: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> float64 in [0, 255]."""
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: dtype {a.dtype} is neither uint8 nor float")
    if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
        raise ValueError(f"{name}: float images must be finite and lie in [0, 1]")
    return a.astype(np.float64) * 255.0


def to_uint8(img: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        return a
    return np.rint(to_255(a, name)).astype(np.uint8)


def resize_u8(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> (size, size, 3) uint8, PIL bicubic (unchanged when already
    that size): how every metric that needs larger faces than a pack gives upsamples them."""
    from PIL import Image

    arr = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC))
