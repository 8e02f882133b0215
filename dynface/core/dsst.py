"""DSST (Dynamic Starting Step via Statistical Testing): the std -> t_start table (spec §2.3 item 3, §3.6).

An HQ face x0 and its blurred version k_std ⊛ x0 become statistically indistinguishable after forward
diffusion to some step t. Per frequency f (orthonormal FFT, images in [−1, 1]) the diffused powers are

    X_t(f) = ᾱ_t·P(f) + (1 − ᾱ_t)        Ỹ_t(f) = ᾱ_t·|K_std(f)|²·P(f) + (1 − ᾱ_t)

with P the mean power spectrum of HQ faces, and t_std = min{t : reduce_f [log X_t − log Ỹ_t] ≤ tol}.
`reduction` is "max" (default), "mean", or "scalar" (Appendix B: compare per-pixel energies
ᾱ·E|x0|² + 1 − ᾱ instead, with E|x0|² = mean_f P(f) by Parseval).

The gap is non-negative and, for a decreasing ᾱ, non-increasing in t and non-decreasing in std, so the
start step is monotone in std and in tol. It is found in closed form for "max"/"scalar" (one bound on ᾱ_t)
and by bisection over t for "mean". ᾱ is always the unspaced 1000-step table, passed in by the caller.

Resolution matters beyond the std scale. The diffusion noise has unit power per orthonormal FFT
coefficient at any size, but a face downsampled from 512 to 128 px has (512/128)² = 16× less power per
coefficient, so with the same tol its gap closes much earlier (16 real faces, max, tol 0.05, std 4@512 ≙
1@128: t = 705 at 512 px, 482 at 128 px). A low-resolution pack should therefore calibrate tol on its own
PSD (build_dsst_table's default), or pass psd·(512/res)² to mimic the 512-px statistics (then t = 705).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from dynface.core.blur import gaussian_transfer_sq

REDUCTIONS = ("max", "mean", "scalar")
_FORMAT = "dynface.dsst_table/1"
_CHUNK_ELEMENTS = 1 << 22  # bounds the (t, f) working array of gap_curve to ~32 MB of float64


def radial_frequency(h: int, w: int) -> np.ndarray:
    """|f| on the unshifted FFT grid, (h, w) float64 in cycles/pixel (np.fft.fftfreq layout)."""
    if h < 1 or w < 1:
        raise ValueError(f"h and w must be >= 1, got {h}, {w}")
    fy = np.fft.fftfreq(h)
    fx = np.fft.fftfreq(w)
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def _as_unit_float(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 or float in [0, 1] -> float64 in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"images must have shape (H, W, C), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    return arr.astype(np.float64)


def psd_and_count(images: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
    total: np.ndarray | None = None
    count = 0
    for image in images:
        x = 2.0 * _as_unit_float(image) - 1.0
        power = np.abs(np.fft.fft2(x, axes=(0, 1), norm="ortho")) ** 2
        power = power.mean(axis=2)
        if total is None:
            total = np.zeros_like(power)
        elif power.shape != total.shape:
            raise ValueError(f"all images must share one size: {power.shape} vs {total.shape}")
        total += power
        count += 1
    if total is None:
        raise ValueError("no images given")
    return total / count, count


def mean_power_spectrum(images: Iterable[np.ndarray]) -> np.ndarray:
    """P(f): mean |FFT|² (orthonormal 2-D FFT) of images mapped to [−1, 1], over images and channels.

    images: each (H, W, C), float in [0, 1] or uint8, all the same size. Returns (H, W) float64 on the
    unshifted FFT grid (matches `radial_frequency(H, W)`).
    """
    return psd_and_count(images)[0]


def _check_inputs(
    psd: np.ndarray, alphas_cumprod: np.ndarray, reduction: str
) -> tuple[np.ndarray, np.ndarray]:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    p = np.asarray(psd, dtype=np.float64)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"psd must have shape (H, W), got {p.shape}")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("psd must be finite and >= 0")
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    if a.ndim != 1 or a.size < 2:
        raise ValueError(f"alphas_cumprod must have shape (T,) with T >= 2, got {a.shape}")
    if np.any(a <= 0) or np.any(a > 1) or np.any(np.diff(a) >= 0):
        raise ValueError("alphas_cumprod must be strictly decreasing within (0, 1]")
    return p, a


def _terms(p: np.ndarray, std: float) -> tuple[np.ndarray, np.ndarray]:
    """(P·(1−|K|²), P·|K|²) for one std, each (H, W) float64."""
    freq = radial_frequency(*p.shape)
    ksq = gaussian_transfer_sq(std, freq)
    # 1−|K|² via expm1 keeps precision where |K|² is close to 1 (low frequencies, small std).
    one_minus = -np.expm1(-4.0 * np.pi**2 * std**2 * freq**2)
    return p * one_minus, p * ksq


def _reduced_gap(terms: tuple[np.ndarray, np.ndarray], alphas: np.ndarray, reduction: str) -> np.ndarray:
    """Reduced log gap log X_t − log Ỹ_t for the ᾱ values `alphas` (m,) -> (m,).

    Written as log1p(ᾱ·P·(1−|K|²) / (ᾱ·|K|²·P + 1 − ᾱ)) so that small gaps keep full precision.
    """
    lost, kept = terms
    if reduction == "scalar":
        lost_e, kept_e = lost.mean(), kept.mean()  # per-pixel energies, by Parseval
        return np.log1p(alphas * lost_e / (alphas * kept_e + (1.0 - alphas)))
    flat_lost, flat_kept = lost.ravel(), kept.ravel()
    out = np.empty(alphas.shape[0])
    step = max(1, _CHUNK_ELEMENTS // flat_lost.size)
    for start in range(0, alphas.shape[0], step):
        a = alphas[start : start + step, None]
        g = np.log1p(a * flat_lost / (a * flat_kept + (1.0 - a)))
        out[start : start + step] = g.max(axis=1) if reduction == "max" else g.mean(axis=1)
    return out


def gap_curve(
    psd: np.ndarray, alphas_cumprod: np.ndarray, std: float, *, reduction: str = "max"
) -> np.ndarray:
    """reduce_f [log X_t(f) − log Ỹ_t(f)] for every t: (T,) float64, >= 0, non-increasing in t."""
    p, a = _check_inputs(psd, alphas_cumprod, reduction)
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return _reduced_gap(_terms(p, float(std)), a, reduction)


def _first_below(p: np.ndarray, a: np.ndarray, std: float, tol: float, reduction: str) -> int:
    """min{t : gap_t <= tol}; T−1 if never. Needs a strictly decreasing ᾱ (checked by the callers)."""
    terms = _terms(p, std)
    if reduction != "mean":
        # gap_t(f) <= tol  <=>  ᾱ_t·(lost_f − c·kept_f + c) <= c with c = e^tol − 1, so "max" (all f) and
        # "scalar" (the means) reduce to one bound on ᾱ_t: one pass over f instead of a search over t.
        lost, kept = terms
        c = math.expm1(tol)
        excess = float(np.max(lost - c * kept) if reduction == "max" else lost.mean() - c * kept.mean())
        slope = excess + c
        hits = np.flatnonzero(a * slope <= c)
        return int(hits[0]) if hits.size else a.shape[0] - 1

    def below(t: int) -> bool:
        return bool(_reduced_gap(terms, a[t : t + 1], reduction)[0] <= tol)

    last = a.shape[0] - 1
    if below(0):
        return 0
    if not below(last):
        return last
    lo, hi = 0, last  # invariant: gap(lo) > tol >= gap(hi); the gap is non-increasing in t
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if below(mid):
            hi = mid
        else:
            lo = mid
    return hi


def start_step_for_std(
    psd: np.ndarray, alphas_cumprod: np.ndarray, std: float, tol: float, *, reduction: str = "max"
) -> int:
    """t_std = min{t : gap_t(std) ≤ tol} in 0…T−1; T−1 if the gap never falls to tol."""
    p, a = _check_inputs(psd, alphas_cumprod, reduction)
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return _first_below(p, a, float(std), float(tol), reduction)


def calibrate_tol(
    psd: np.ndarray,
    alphas_cumprod: np.ndarray,
    *,
    std_max: float,
    t_at_std_max: int = 925,
    reduction: str = "max",
) -> float:
    """tol such that start_step_for_std(std_max, tol) == t_at_std_max.

    t(tol) is a non-increasing step function: t(tol) = t* exactly for tol in [gap_{t*}, gap_{t*−1}).
    Instead of bisecting on tol we read that interval off the gap curve (the same answer, exactly) and
    return its geometric midpoint, which stays inside it under rounding.
    """
    p, a = _check_inputs(psd, alphas_cumprod, reduction)
    if not 0 <= t_at_std_max < a.shape[0]:
        raise ValueError(f"t_at_std_max must be in [0, {a.shape[0] - 1}], got {t_at_std_max}")
    if not std_max > 0:
        raise ValueError(f"std_max must be > 0, got {std_max}")
    lo_t = max(t_at_std_max - 1, 0)
    gaps = _reduced_gap(_terms(p, float(std_max)), a[lo_t : t_at_std_max + 1], reduction)
    low = gaps[-1]
    if t_at_std_max == 0:
        return float(2.0 * low) if low > 0 else 0.0
    high = gaps[0]
    if not (high > low > 0):
        raise ValueError(
            f"t_at_std_max={t_at_std_max} cannot be reached at std_max={std_max}: flat gap curve"
        )
    return float(math.sqrt(low * high))


@dataclass(frozen=True)
class DSSTTable:
    """A std -> t_start table on an ascending std grid (std in pixels at `resolution`).

    stds (n,) float64, t_starts (n,) int64 clamped into t_range, raw_t_starts (n,) int64 before clamping.
    Arrays are stored read-only.
    """

    stds: np.ndarray
    t_starts: np.ndarray
    raw_t_starts: np.ndarray
    tol: float
    reduction: str
    resolution: int
    num_timesteps: int
    t_range: tuple[int, int] = (690, 925)
    std_range: tuple[float, float] = (0.0, 0.0)
    n_images: int = 0
    source: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        stds = np.array(self.stds, dtype=np.float64)
        t_starts = np.array(self.t_starts, dtype=np.int64)
        raw = np.array(self.raw_t_starts, dtype=np.int64)
        if stds.ndim != 1 or stds.size == 0 or t_starts.shape != stds.shape or raw.shape != stds.shape:
            raise ValueError("stds, t_starts and raw_t_starts must be 1-D arrays of one non-zero length")
        if np.any(np.diff(stds) <= 0):
            raise ValueError("stds must be strictly ascending")
        lo, hi = (int(v) for v in self.t_range)
        if not 0 <= lo <= hi < self.num_timesteps:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi < {self.num_timesteps}, got {self.t_range}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for arr in (stds, t_starts, raw):
            arr.setflags(write=False)
        normalised = {
            "stds": stds,
            "t_starts": t_starts,
            "raw_t_starts": raw,
            "t_range": (lo, hi),
            "std_range": (float(self.std_range[0]), float(self.std_range[1])),
            "tol": float(self.tol),
            "resolution": int(self.resolution),
            "num_timesteps": int(self.num_timesteps),
            "n_images": int(self.n_images),
        }
        for name, value in normalised.items():  # frozen: plain attribute assignment is blocked
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DSSTTable):
            return NotImplemented
        return self._meta() == other._meta() and all(
            np.array_equal(getattr(self, k), getattr(other, k)) for k in ("stds", "t_starts", "raw_t_starts")
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def _meta(self) -> dict[str, Any]:
        arrays = ("stds", "t_starts", "raw_t_starts")
        meta = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in arrays}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}

    def lookup(self, std: Any) -> np.ndarray:
        """t_start for std (float, array or tensor of any shape) -> int64 array of the same shape.

        Linear interpolation of t_starts over stds, std clamped to the table's range, rounded half up.
        A scalar gives a 0-d array.
        """
        if hasattr(std, "detach"):  # torch.Tensor, without importing torch here
            std = std.detach().cpu().numpy()
        values = np.asarray(std, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("std must be finite")
        t = np.interp(values, self.stds, self.t_starts.astype(np.float64))
        return np.asarray(np.floor(t + 0.5), dtype=np.int64)

    def to_json(self) -> str:
        """JSON text; floats are written with repr, so from_json gives back an equal table."""
        payload = {
            "format": _FORMAT,
            **self._meta(),
            "stds": [float(v) for v in self.stds],
            "t_starts": [int(v) for v in self.t_starts],
            "raw_t_starts": [int(v) for v in self.raw_t_starts],
        }
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str) -> DSSTTable:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a DSST table (format {data.get('format')!r}, expected {_FORMAT!r})")
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def _std_grid(std_min: float, std_max: float, std_step: float) -> np.ndarray:
    if not 0 < std_min <= std_max or not std_step > 0:
        raise ValueError(
            f"need 0 < std_min <= std_max and std_step > 0, got {std_min}, {std_max}, {std_step}"
        )
    steps = (std_max - std_min) / std_step
    n = round(steps)
    if abs(steps - n) > 1e-6:
        raise ValueError(
            f"(std_max − std_min) must be a multiple of std_step, got {std_min}, {std_max}, {std_step}"
        )
    # Rounded so that the grid holds 1.1, not 1.1000000000000001 (lookups and JSON stay readable).
    return np.round(std_min + std_step * np.arange(n + 1), 10)


def build_dsst_table(
    psd: np.ndarray,
    alphas_cumprod: np.ndarray,
    *,
    resolution: int,
    std_min: float,
    std_max: float,
    std_step: float = 0.1,
    tol: float | None = None,
    t_range: tuple[int, int] = (690, 925),
    reduction: str = "max",
    n_images: int = 0,
    source: str = "",
) -> DSSTTable:
    """The table over stds std_min, std_min+std_step, …, std_max (pixels at `resolution`).

    tol None -> calibrate_tol so that std_max starts at t_range[1]. Every t is then clamped into t_range.
    psd must be the (resolution, resolution) spectrum of images at that resolution.
    """
    p, a = _check_inputs(psd, alphas_cumprod, reduction)
    if p.shape != (resolution, resolution):
        raise ValueError(f"psd shape {p.shape} does not match resolution {resolution}")
    stds = _std_grid(std_min, std_max, std_step)
    if tol is None:
        tol = calibrate_tol(p, a, std_max=std_max, t_at_std_max=t_range[1], reduction=reduction)
    raw = np.array([_first_below(p, a, float(s), float(tol), reduction) for s in stds], dtype=np.int64)
    lo, hi = t_range
    return DSSTTable(
        stds=stds,
        t_starts=np.clip(raw, lo, hi),
        raw_t_starts=raw,
        tol=float(tol),
        reduction=reduction,
        resolution=int(resolution),
        num_timesteps=int(a.shape[0]),
        t_range=(int(lo), int(hi)),
        std_range=(float(stds[0]), float(stds[-1])),
        n_images=int(n_images),
        source=source,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
