"""Synthetic blind-face-restoration degradations: y = JPEG_q((x ⊛ k_σ)↓_r + n_σ)↑ (spec §6).

Everything works on numpy (H, W, 3) float32 RGB images in [0, 1]; numpy FFT does the blur, torch the bilinear
resizes, PIL does the JPEG round trip. OpenCV is not needed: its conventions (filter2D correlation with
BORDER_REFLECT_101, INTER_LINEAR without antialias, BT.601 gray) are reproduced here. Every random draw
comes from an explicit `np.random.Generator`, so a seed fixes the result.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Gray degradations use BT.601 luma, the weights of cv2.COLOR_BGR2GRAY (here applied to RGB order).
from dynface.images.color import gray_rgb


@dataclass(frozen=True)
class DegradationParams:
    """One fully specified degradation. Blur σ in pixels at the image's resolution, noise in /255 units."""

    sigma_x: float
    sigma_y: float
    theta: float
    kernel_size: int = 41
    scale: float = 1.0  # downscale factor r: LQ intermediate size is (floor(w/r), floor(h/r)); 1 = none
    noise_sigma: float = 0.0
    jpeg_quality: int | None = None  # None = no JPEG
    gray: bool = False
    hflip: bool = False

    def __post_init__(self) -> None:
        if not (self.sigma_x > 0 and self.sigma_y > 0):
            raise ValueError(f"blur sigmas must be > 0, got {self.sigma_x}, {self.sigma_y}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100 or None, got {self.jpeg_quality}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (floats, ints, bools, None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationParams:
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class DegradationRanges:
    """Sampling ranges of a training/test protocol (spec §6 table). Intervals are closed [lo, hi]."""

    sigma: tuple[float, float]
    iso_prob: float
    scale: tuple[float, float]
    noise: tuple[float, float]
    jpeg: tuple[int, int]
    gray_prob: float = 0.01
    hflip_prob: float = 0.5
    kernel_size: int = 41

    def __post_init__(self) -> None:
        for name in ("sigma", "scale", "noise", "jpeg"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} range is empty: ({lo}, {hi})")
        for name in ("iso_prob", "gray_prob", "hflip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.sigma[0] <= 0 or self.scale[0] <= 0 or self.noise[0] < 0:
            raise ValueError("sigma and scale must be > 0, noise >= 0")


# Spec §6.1/§6.2. Colour jitter (GFPGAN) is not part of this pipeline and is left out.
DIFFACE_RANGES = DegradationRanges(
    sigma=(0.1, 15.0), iso_prob=0.5, scale=(0.8, 32.0), noise=(0.0, 20.0), jpeg=(30, 100)
)
GFPGAN_RANGES = DegradationRanges(
    sigma=(0.1, 10.0), iso_prob=0.5, scale=(0.8, 8.0), noise=(0.0, 20.0), jpeg=(60, 100)
)
CODEFORMER_RANGES = DegradationRanges(
    sigma=(0.1, 10.0), iso_prob=0.5, scale=(1.0, 12.0), noise=(0.0, 15.0), jpeg=(60, 100)
)
CODEFORMER_LARGE_RANGES = DegradationRanges(
    sigma=(1.0, 15.0), iso_prob=0.5, scale=(4.0, 30.0), noise=(0.0, 20.0), jpeg=(30, 80)
)
DIFFBIR_RANGES = DegradationRanges(
    sigma=(0.1, 12.0), iso_prob=0.5, scale=(1.0, 12.0), noise=(0.0, 15.0), jpeg=(30, 100)
)


def bivariate_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """(size, size) float64 Gaussian kernel summing to 1.

    Covariance Σ = R diag(σx², σy²) Rᵀ, R the rotation by `theta`. Entry [i, j] is the density at
    x = j − size//2 (column, to the right), y = i − size//2 (row, downwards), so θ = 0 puts σx horizontal.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    if not (sigma_x > 0 and sigma_y > 0):
        raise ValueError("kernel sigmas must be > 0")
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    inv_cov = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)  # xx varies along columns, yy along rows
    quad = inv_cov[0, 0] * xx**2 + 2.0 * inv_cov[0, 1] * xx * yy + inv_cov[1, 1] * yy**2
    kernel = np.exp(-0.5 * quad)
    return kernel / kernel.sum()


def sample_params(rng: np.random.Generator, ranges: DegradationRanges = DIFFACE_RANGES) -> DegradationParams:
    """Draw one `DegradationParams` from `ranges` (draw order: kernel, r, noise, q, gray, hflip).

    JPEG quality is uniform over the integers jpeg[0]..jpeg[1] inclusive (DifFace's int(U[a, b)) never
    reaches b; the difference is one quality level).
    """
    if rng.random() < ranges.iso_prob:
        sigma_x = sigma_y = float(rng.uniform(*ranges.sigma))
        theta = 0.0
    else:
        sigma_x = float(rng.uniform(*ranges.sigma))
        sigma_y = float(rng.uniform(*ranges.sigma))
        theta = float(rng.uniform(-math.pi, math.pi))
    scale = float(rng.uniform(*ranges.scale))
    noise = float(rng.uniform(*ranges.noise))
    quality = int(rng.integers(ranges.jpeg[0], ranges.jpeg[1], endpoint=True))
    gray = bool(rng.random() < ranges.gray_prob)
    hflip = bool(rng.random() < ranges.hflip_prob)
    return DegradationParams(
        sigma_x=sigma_x,
        sigma_y=sigma_y,
        theta=theta,
        kernel_size=ranges.kernel_size,
        scale=scale,
        noise_sigma=noise,
        jpeg_quality=quality,
        gray=gray,
        hflip=hflip,
    )


def _reflect101_index(n: int, pad: int) -> np.ndarray:
    """Source indices for positions −pad..n−1+pad under BORDER_REFLECT_101 (…2 1 | 0 1 2 … n−1 | n−2…).

    Works for pad >= n too (repeated reflection, period 2(n−1)), as cv2 does.
    """
    idx = np.arange(-pad, n + pad)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def filter2d_reflect101(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of img (H, W, C) float with an odd (k, k) kernel, BORDER_REFLECT_101.

    Same result as cv2.filter2D(img, -1, kernel) (correlation, anchor at the centre). Returns float32.
    """
    k = kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != k or k % 2 == 0:
        raise ValueError(f"kernel must be square with odd size, got {kernel.shape}")
    if img.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got {img.shape}")
    h, w, _ = img.shape
    pad = k // 2
    padded = img[_reflect101_index(h, pad)][:, _reflect101_index(w, pad)].astype(np.float64)
    # FFT in float64: ~20x faster than a direct 41x41 conv on CPU and more exact than cv2's float32.
    # Correlation = convolution with the flipped kernel; with an FFT at least the padded size, the
    # wrapped-around part of the circular convolution falls only in the first k−1 rows/columns, which are
    # cut away. Rounding the size up to a 5-smooth one (552 → 576 at 512 px; 552 = 8·3·23) is ~35 % faster.
    n, m = padded.shape[:2]
    shape = (_smooth_fft_len(n), _smooth_fft_len(m))
    spec_img = np.fft.rfft2(padded, s=shape, axes=(0, 1))
    spec_ker = np.fft.rfft2(kernel[::-1, ::-1].astype(np.float64), s=shape)
    out = np.fft.irfft2(spec_img * spec_ker[:, :, None], s=shape, axes=(0, 1))
    return out[k - 1 : n, k - 1 : m].astype(np.float32)


def _smooth_fft_len(n: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ n: sizes numpy's FFT handles fastest."""
    best, twos = 2 * n, 1
    while twos < best:
        threes = twos
        while threes < best:
            size = threes
            while size < n:
                size *= 5
            best = min(best, size)
            threes *= 3
        twos *= 2
    return best


def resize_linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of img (H, W, C) to size = (width, height), cv2 INTER_LINEAR semantics.

    Half-pixel centres, source coordinate clamped at 0, no antialias (so downscaling aliases, as in the
    reference pipelines). Returns float32 (height, width, C).
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"resize target must be at least 1x1, got {size}")
    if img.shape[:2] == (height, width):
        return img.astype(np.float32, copy=True)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))[None]
    out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return out[0].numpy().transpose(1, 2, 0).copy()


def add_gaussian_noise(img: np.ndarray, sigma: float, *, rng: np.random.Generator) -> np.ndarray:
    """img + N(0, (sigma/255)²) independently per pixel and channel (colour noise), clipped to [0, 1]."""
    if sigma <= 0:
        return np.clip(img, 0.0, 1.0).astype(np.float32)
    noise = rng.standard_normal(img.shape).astype(np.float32) * np.float32(sigma / 255.0)
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    # np.rint rounds half to even, like cv2's cvRound in convertTo and torch.round.
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode img (H, W, 3) float [0, 1] as 8-bit RGB JPEG (4:2:0) at `quality` with PIL, decode; float32."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buf = io.BytesIO()
    # subsampling=2 is 4:2:0, libjpeg's (and cv2.imencode's) default, fixed here so PIL never changes it.
    Image.fromarray(_to_uint8(img), mode="RGB").save(buf, format="JPEG", quality=int(quality), subsampling=2)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / np.float32(255.0)


def _check_hq(hq: np.ndarray) -> None:
    if hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"hq must be (H, W, 3), got {hq.shape}")
    if not np.issubdtype(hq.dtype, np.floating):
        raise ValueError(f"hq must be float in [0, 1], got dtype {hq.dtype}")
    if hq.size and (hq.min() < 0.0 or hq.max() > 1.0):
        raise ValueError("hq values must lie in [0, 1]")


def degrade_pair(
    hq: np.ndarray, params: DegradationParams, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(lq, gt), both (H, W, 3) float32. gt is hq with the same hflip and gray as lq (DifFace's gt_gray).

    gt is not re-quantised (as in DifFace); lq is on 8-bit levels. Only the noise draws from `rng`.
    """
    _check_hq(hq)
    h, w, _ = hq.shape
    gt = hq[:, ::-1] if params.hflip else hq
    gt = gt.astype(np.float32)  # copies, so the caller's array is never touched
    kernel = bivariate_gaussian_kernel(params.kernel_size, params.sigma_x, params.sigma_y, params.theta)
    x = filter2d_reflect101(gt, kernel)
    lq_w, lq_h = math.floor(w / params.scale), math.floor(h / params.scale)
    if lq_w < 1 or lq_h < 1:
        raise ValueError(f"scale {params.scale} leaves an empty image from {w}x{h}")
    x = resize_linear(x, (lq_w, lq_h))
    x = add_gaussian_noise(x, params.noise_sigma, rng=rng)
    if params.jpeg_quality is not None:
        x = jpeg_roundtrip(x, params.jpeg_quality)
    x = resize_linear(x, (w, h))
    if params.gray:
        x = gray_rgb(x)
        gt = gray_rgb(gt)
    lq = _to_uint8(x).astype(np.float32) / np.float32(255.0)
    return lq, gt


def degrade(hq: np.ndarray, params: DegradationParams, *, rng: np.random.Generator) -> np.ndarray:
    """LQ (H, W, 3) float32 on 8-bit levels in [0, 1] from hq (H, W, 3) float RGB in [0, 1] (spec §6.1).

    Steps: hflip → blur (correlation, reflect-101) → bilinear down to (⌊w/r⌋, ⌊h/r⌋) → colour noise σ/255,
    clip → JPEG q → bilinear back to (W, H) → gray → round to 8 bit and clip.
    """
    return degrade_pair(hq, params, rng=rng)[0]


_GRID_SIGMAS = (4.0, 8.0, 12.0, 16.0)
_GRID_THETAS = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


def celeba_test_grid(n_images: int = 4000, seed: int = 10000) -> list[DegradationParams]:
    """DifFace CelebA-Test deterministic grid (spec §6.3): the first n_images in loop order.

    Loops qf ∈ {30..70} × sf ∈ {4, 8, …, 40} × nf ∈ {1, 5, 10, 15, 20} × σx ∈ {4, 8, 12, 16} ×
    θ ∈ {0, π/4, π/2, 3π/4}; σy is drawn per entry from {4, 8, 12, 16}. The σy stream is ours
    (`np.random.default_rng(seed)`), not bit-identical to DifFace's `random.choice` stream, so the
    (σx, σy) pairs differ from DifFace's files while the grid and distribution are the same.
    Kernel 41, anisotropic, no hflip, no gray. Pair entry i with image i of the sorted file list.
    """
    if not 0 <= n_images <= 4000:
        raise ValueError(f"the grid has 4000 entries, asked for {n_images}")
    rng = np.random.default_rng(seed)
    grid: list[DegradationParams] = []
    for qf in (30, 40, 50, 60, 70):
        for sf in range(4, 41, 4):
            for nf in (1, 5, 10, 15, 20):
                for sigma_x in _GRID_SIGMAS:
                    for theta in _GRID_THETAS:
                        if len(grid) == n_images:
                            return grid
                        sigma_y = _GRID_SIGMAS[int(rng.integers(len(_GRID_SIGMAS)))]
                        grid.append(
                            DegradationParams(
                                sigma_x=sigma_x,
                                sigma_y=sigma_y,
                                theta=theta,
                                kernel_size=41,
                                scale=float(sf),
                                noise_sigma=float(nf),
                                jpeg_quality=qf,
                            )
                        )
    return grid


def random_test_params(
    n_images: int = 3000, seed: int = 2025, ranges: DegradationRanges = DIFFACE_RANGES
) -> list[DegradationParams]:
    """3000-image random CelebA-Test convention (spec §6.4): i.i.d. draws from `ranges`, hflip/gray off."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    rng = np.random.default_rng(seed)
    no_aug = dataclasses.replace(ranges, gray_prob=0.0, hflip_prob=0.0)
    return [sample_params(rng, no_aug) for _ in range(n_images)]


def params_for_resolution(
    params: DegradationParams, resolution: int, *, reference: int = 512
) -> DegradationParams:
    """Params given at `reference` pixels, rescaled to act on an image of `resolution` pixels.

    σ and kernel size scale by resolution/reference (kernel kept odd and >= 3). The downscale factor
    becomes r·resolution/reference (at least 1), so the LQ intermediate has the same pixel count as at
    the reference size. Noise, JPEG, gray and hflip are unchanged.
    """
    if resolution < 1 or reference < 1:
        raise ValueError("resolution and reference must be >= 1")
    f = resolution / reference
    size = max(3, round(params.kernel_size * f))
    size += 1 - size % 2  # round an even size up to the next odd one
    return dataclasses.replace(
        params,
        sigma_x=params.sigma_x * f,
        sigma_y=params.sigma_y * f,
        kernel_size=size,
        scale=max(1.0, params.scale * f),
    )
