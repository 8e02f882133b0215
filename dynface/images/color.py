"""The one luma/gray conversion: BT.601 luma (0.299 R + 0.587 G + 0.114 B) in float32.

Grayscale inputs are restored in colour by the networks and given back as gray (three equal
channels); synthetic degradations make gray inputs the same way. (The metrics' Y channel is a
different quantity, MATLAB's studio-range Y, and lives in `dynface.metrics.fidelity`.)
"""

from __future__ import annotations

import numpy as np

LUMA_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB (any real dtype, any range) -> (...) float32 luma in the same units."""
    return rgb.astype(np.float32) @ LUMA_BT601


def gray_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> three equal channels of its luma, float32 in the input's units."""
    return np.repeat(luma(rgb)[..., None], 3, axis=-1)


def gray_rgb_u8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> three equal channels of its luma, rounded to uint8."""
    return np.clip(np.rint(gray_rgb(rgb)), 0, 255).astype(np.uint8)
