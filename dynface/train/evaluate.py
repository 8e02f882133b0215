"""Pack checks on held-out faces: synthetic DifFace-range degradations, PSNR of LQ vs RM-only vs full.

Protocol: each held-out HQ face is loaded at 512 px, degraded with DifFace-range parameters drawn from a
seeded generator (spec §6.1; hflip and gray off), then LQ and GT are both resized to the pack resolution
(PIL bicubic, antialiased). PSNR is RGB on 8-bit outputs against the resized GT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dynface.images.degrade import DIFFACE_RANGES, degrade_pair, sample_params
from dynface.restorer import Restorer

EVAL_SEED = 2024


def _resize(img: np.ndarray, resolution: int) -> np.ndarray:
    pil = Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    out = pil.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(out, dtype=np.float32) / np.float32(255.0)


def degraded_eval_set(
    hq: np.ndarray, resolution: int, *, seed: int = EVAL_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """hq (N, S, S, 3) float32 in [0, 1] (S = 512 for the spec's protocol) -> (lq, gt), (N, R, R, 3)."""
    rng = np.random.default_rng(seed)
    ranges = dataclasses.replace(DIFFACE_RANGES, hflip_prob=0.0, gray_prob=0.0)
    lqs, gts = [], []
    for face in hq:
        lq, gt = degrade_pair(face, sample_params(rng, ranges), rng=rng)
        lqs.append(_resize(lq, resolution))
        gts.append(_resize(gt, resolution))
    return np.stack(lqs), np.stack(gts)


def psnr01(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


@dataclass(frozen=True)
class EvalResult:
    method: str
    mean_psnr: float
    psnrs: tuple[float, ...]


def evaluate_restorer(
    restorer: Restorer, lq: np.ndarray, gt: np.ndarray, *, methods: Sequence[str] = ("rm_only", "full")
) -> dict[str, EvalResult]:
    """Mean PSNR per method, plus "lq" (the degraded input itself)."""
    results = {"lq": _result("lq", [psnr01(a, b) for a, b in zip(lq, gt)])}
    faces = list(lq)
    for method in methods:
        out = restorer.with_config(method=method).restore(faces)
        results[method] = _result(method, [psnr01(r.image / 255.0, g) for r, g in zip(out, gt)])
    return results


def _result(method: str, values: list[float]) -> EvalResult:
    return EvalResult(method=method, mean_psnr=float(np.mean(values)), psnrs=tuple(values))
