"""1-level 2-D stationary (undecimated) Haar wavelet transform in torch, so losses on it backpropagate.

Matches `pywt.swt2(x, "haar", level=1)` (periodic extension): with s = 1/√2, along one axis
lo[n] = s·(x[n] + x[n+1]) and hi[n] = s·(x[n] − x[n+1]), indices mod N. Sub-bands, in pywt's order:
LL = cA (lo rows, lo cols), LH = cH (hi along rows/axis −2), HL = cV (hi along columns/axis −1),
HH = cD (hi both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_S = 1.0 / math.sqrt(2.0)
BANDS = ("LL", "LH", "HL", "HH")


def _lo(x: Tensor, dim: int) -> Tensor:
    return _S * (x + torch.roll(x, shifts=-1, dims=dim))


def _hi(x: Tensor, dim: int) -> Tensor:
    return _S * (x - torch.roll(x, shifts=-1, dims=dim))


def haar_swt2(x: Tensor) -> Tensor:
    """x (..., H, W) -> (..., 4, H, W): sub-bands LL, LH, HL, HH stacked before the spatial axes."""
    if x.ndim < 2:
        raise ValueError(f"x needs at least 2 dimensions, got {tuple(x.shape)}")
    lo_w, hi_w = _lo(x, -1), _hi(x, -1)
    return torch.stack([_lo(lo_w, -2), _hi(lo_w, -2), _lo(hi_w, -2), _hi(hi_w, -2)], dim=-3)


def swt_l1_loss(pred: Tensor, target: Tensor, gammas: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Σ_b γ_b · mean|SWT(pred)_b − SWT(target)_b| over (B, C, H, W) images (spec §3.14 step 5)."""
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if len(gammas) != 4:
        raise ValueError("need one gamma per sub-band (LL, LH, HL, HH)")
    diff = (haar_swt2(pred) - haar_swt2(target)).abs()
    per_band = diff.transpose(0, -3).flatten(1).mean(1)  # (4,)
    return (per_band * torch.as_tensor(list(gammas), dtype=diff.dtype, device=diff.device)).sum()
