"""Isotropic Gaussian blur operator K_std, its exact adjoint K_stdᵀ, and its transfer function.

The operator is `K x = crop(k ⊛ pad(x))`: pad each side by the kernel half-width r (reflect, replicate or
circular), correlate with the separable kernel k = g ⊗ g, keep the H×W valid part. Its adjoint is
`Kᵀ y = padᵀ(k ⋆ zero_embed(y))`: a full correlation followed by folding the padded border back onto
the pixels it was copied from. With reflect padding Kᵀ ≠ K (border pixels are counted more than once).

Padding is done with an index map (one gather per axis) rather than `F.pad`, so a kernel wider than the
image is handled exactly: the map is the periodic mirror extension, i.e. what repeated torch-style
reflect padding (edge not repeated, like cv2 BORDER_REFLECT_101 / numpy `mode="reflect"`) gives.

Everything is differentiable in x and in std (the sampler refines std by gradient, spec §2.3 item 5 and
§3.12). Per-sample stds use grouped convolutions / broadcast spectra, never a loop over the batch.

Choosing the kernel size from the stds and checking them reads the stds back to the host. A caller that
has decided the size and checked the stds on the host itself (the sampler, to keep a GPU step free of
waits) passes `size=` and `validate=False`: then nothing here reads the device.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Padding = Literal["reflect", "replicate", "circular"]
Method = Literal["separable", "fft"]

_PADDINGS = ("reflect", "replicate", "circular")
_METHODS = ("separable", "fft")


def kernel_size_for_std(std: float, truncate: float = 3.0) -> int:
    """Odd kernel size 2·⌈truncate·std⌉+1, at least 3 (61 at std 10, 91 at std 15 with truncate 3)."""
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std}")
    if not truncate > 0:
        raise ValueError(f"truncate must be > 0, got {truncate}")
    return max(3, 2 * math.ceil(truncate * std) + 1)


def gaussian_kernel1d(std: Tensor, size: int, *, validate: bool = True) -> Tensor:
    """Normalised sampled Gaussians: std (B,) -> (B, size), each row sums to 1; differentiable in std.

    Taps sit at integer offsets -(size-1)/2 … (size-1)/2, so every row is exactly symmetric.
    `validate=False` skips the check std > 0 (a read of the device).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    if std.ndim != 1:
        raise ValueError(f"std must have shape (B,), got {tuple(std.shape)}")
    if not std.is_floating_point():
        raise ValueError("std must be a floating-point tensor")
    if validate and not bool(torch.all(std > 0)):
        raise ValueError("std must be > 0")
    offsets = torch.arange(size, dtype=std.dtype, device=std.device) - (size - 1) / 2
    logits = -0.5 * (offsets[None, :] / std[:, None]) ** 2
    weights = torch.exp(logits)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_transfer_sq(std: float | np.ndarray, freq: np.ndarray) -> np.ndarray:
    """|K_std(f)|² = exp(−4π² std² |f|²), f in cycles/pixel (continuous Gaussian).

    Returns shape `std.shape + freq.shape` (outer over the two), float64.
    """
    std_arr = np.asarray(std, dtype=np.float64)
    freq_arr = np.asarray(freq, dtype=np.float64)
    if np.any(std_arr < 0) or not np.all(np.isfinite(std_arr)):
        raise ValueError("std must be finite and >= 0")
    return np.exp(-4.0 * np.pi**2 * np.multiply.outer(std_arr**2, freq_arr**2))


@functools.lru_cache(maxsize=256)
def _pad_index(n: int, r: int, padding: str, device: torch.device) -> Tensor:
    """Source index of each of the n+2r padded positions (LongTensor (n+2r,)); cached: a sampler asks for
    the same few maps at every step."""
    pos = torch.arange(-r, n + r, device=device)
    if padding == "replicate":
        return pos.clamp(0, n - 1)
    if padding == "circular":
        return torch.remainder(pos, n)
    if n < 2:
        raise ValueError("reflect padding needs every image side >= 2")
    # Periodic mirror extension (period 2(n-1)): equals torch reflect for r < n and repeated reflect beyond.
    period = 2 * (n - 1)
    q = torch.remainder(pos, period)
    return torch.where(q < n, q, period - q)


def _prepare(
    x: Tensor,
    std: Tensor | float,
    size: int | None,
    truncate: float,
    padding: str,
    method: str,
    validate: bool,
) -> tuple[Tensor, int]:
    """Validate arguments; return per-sample stds (B,) in x's dtype/device and the odd kernel size.

    validate=False (only with an explicit size) skips the checks that read the stds back to the host."""
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    batch = x.shape[0]
    if isinstance(std, Tensor):
        stds = std.to(dtype=x.dtype, device=x.device)
        if stds.ndim == 0 or stds.shape == (1,):
            stds = stds.reshape(1).expand(batch)
        elif stds.shape != (batch,):
            raise ValueError(f"std must be a scalar or have shape ({batch},), got {tuple(stds.shape)}")
    else:
        stds = torch.full((batch,), float(std), dtype=x.dtype, device=x.device)
    if validate and not bool(torch.all(torch.isfinite(stds) & (stds > 0))):
        raise ValueError("std must be finite and > 0")
    if size is None:
        if not validate:
            raise ValueError("validate=False needs an explicit kernel size")
        size = kernel_size_for_std(float(stds.detach().max()), truncate)
    elif size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    return stds, size


def _kernels(x: Tensor, stds: Tensor, size: int, validate: bool) -> Tensor:
    """One 1-D kernel per (sample, channel): (B*C, size)."""
    return gaussian_kernel1d(stds, size, validate=validate).repeat_interleave(x.shape[1], dim=0)


def _correlate(z: Tensor, kernels: Tensor, dim: int) -> Tensor:
    """Valid correlation of z (1, B*C, H', W') along dim 2 (rows) or 3 (columns), one kernel per channel."""
    weight = kernels[:, None, :, None] if dim == 2 else kernels[:, None, None, :]
    return F.conv2d(z, weight, groups=z.shape[1])


def _fold(z: Tensor, index: Tensor, n: int, dim: int) -> Tensor:
    """Adjoint of `z.index_select(dim, index)`: add each padded entry back onto its source pixel."""
    shape = list(z.shape)
    shape[dim] = n
    return z.new_zeros(shape).index_add(dim, index, z)


def _transfer(kernels: Tensor, hp: int, wp: int) -> Tensor:
    """rFFT-domain transfer of the separable kernel on an hp×wp circle: (B*C, hp, wp//2+1), complex."""
    r = kernels.shape[1] // 2
    # Centre tap at index 0, negative offsets wrapped to the end of the circle.
    col = torch.roll(F.pad(kernels, (0, hp - kernels.shape[1])), -r, dims=1)
    row = torch.roll(F.pad(kernels, (0, wp - kernels.shape[1])), -r, dims=1)
    return torch.fft.fft(col, dim=1)[:, :, None] * torch.fft.rfft(row, dim=1)[:, None, :]


def gaussian_blur(
    x: Tensor,
    std: Tensor | float,
    *,
    size: int | None = None,
    truncate: float = 3.0,
    padding: Padding = "reflect",
    method: Method = "separable",
    validate: bool = True,
) -> Tensor:
    """K_std x for x (B, C, H, W) -> (B, C, H, W); std a scalar or (B,) per-sample (> 0).

    `size` defaults to kernel_size_for_std(max std, truncate), one size for the whole batch (smaller stds
    just get longer, near-zero tails). `method="fft"` pads the same way and does a circular convolution
    on the padded grid with rFFT, then crops: it equals the separable result up to rounding.
    Differentiable in x and std. `validate=False` with an explicit `size`: no read of the device.
    """
    stds, size = _prepare(x, std, size, truncate, padding, method, validate)
    b, c, h, w = x.shape
    r = size // 2
    kernels = _kernels(x, stds, size, validate)
    idx_h = _pad_index(h, r, padding, x.device)
    idx_w = _pad_index(w, r, padding, x.device)
    z = x.reshape(1, b * c, h, w)
    if method == "separable":
        z = _correlate(z.index_select(3, idx_w), kernels, dim=3)
        z = _correlate(z.index_select(2, idx_h), kernels, dim=2)
        return z.reshape(b, c, h, w)
    zp = z.index_select(3, idx_w).index_select(2, idx_h)
    hp, wp = h + 2 * r, w + 2 * r
    spectrum = torch.fft.rfft2(zp[0]) * _transfer(kernels, hp, wp)
    out = torch.fft.irfft2(spectrum, s=(hp, wp))[:, r : r + h, r : r + w]
    return out.reshape(b, c, h, w)


def gaussian_blur_adjoint(
    y: Tensor,
    std: Tensor | float,
    *,
    size: int | None = None,
    truncate: float = 3.0,
    padding: Padding = "reflect",
    method: Method = "separable",
    validate: bool = True,
) -> Tensor:
    """K_stdᵀ y for y (B, C, H, W) -> (B, C, H, W), the exact transpose of `gaussian_blur` with the same
    arguments: ⟨K x, y⟩ = ⟨x, Kᵀ y⟩.

    Full correlation of the zero-extended y on the padded grid, then the padded border is folded back
    onto the pixels it was read from. Equals the blur itself only for circular padding.
    """
    stds, size = _prepare(y, std, size, truncate, padding, method, validate)
    b, c, h, w = y.shape
    r = size // 2
    kernels = _kernels(y, stds, size, validate)
    idx_h = _pad_index(h, r, padding, y.device)
    idx_w = _pad_index(w, r, padding, y.device)
    z = y.reshape(1, b * c, h, w)
    if method == "separable":
        flipped = kernels.flip(1)  # the transpose of a correlation is a correlation with the flipped kernel
        z = _correlate(F.pad(z, (0, 0, 2 * r, 2 * r)), flipped, dim=2)
        z = _fold(z, idx_h, h, dim=2)
        z = _correlate(F.pad(z, (2 * r, 2 * r, 0, 0)), flipped, dim=3)
        z = _fold(z, idx_w, w, dim=3)
        return z.reshape(b, c, h, w)
    hp, wp = h + 2 * r, w + 2 * r
    embedded = F.pad(z[0], (r, r, r, r))  # adjoint of the crop
    spectrum = torch.fft.rfft2(embedded) * _transfer(kernels, hp, wp).conj()
    zp = torch.fft.irfft2(spectrum, s=(hp, wp))[None]
    out = _fold(_fold(zp, idx_h, h, dim=2), idx_w, w, dim=3)
    return out.reshape(b, c, h, w)
