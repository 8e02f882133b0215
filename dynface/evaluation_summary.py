"""From per-face scores to the ablation table: means with 95 % bootstrap intervals over faces, paired
intervals for the difference between two methods, and a Fréchet distance only where it is defined.

The unit of resampling is the face: a face's score is the mean over its degradation seeds, and the
interval is the 2.5–97.5 % percentile of the mean over `n_boot` resamples of the faces (fixed seed,
so the table is reproducible from `per_face.parquet`). A difference between methods A and B is the
mean of the per-face differences A − B, resampled the same way (paired); it is called an effect only
when its interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dynface.metrics.fid import frechet_distance

# Per-face metrics with intervals, in table order (the supplied-weight ones only when present).
METRICS: tuple[str, ...] = ("psnr", "psnr_y", "ssim", "ssim_y", "identity_distance", "lmd")
SUPPLIED_METRICS: tuple[str, ...] = ("ida_rad", "ida_deg", "lpips", "dists")
# Metrics whose step along the ablation ladder (and against the input) gets a paired interval.
PAIRED_METRICS: tuple[str, ...] = ("psnr", "ssim", "identity_distance", "lmd")
N_BOOT = 2000
BOOT_SEED = 0
LEVEL = 0.95


def bootstrap_ci(
    values: np.ndarray, *, n_boot: int = N_BOOT, seed: int = BOOT_SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (one per face) over resamples of the faces."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def face_means(per_face: pd.DataFrame, method: str, metric: str) -> pd.Series:
    """One value per face: the mean of `metric` over the face's seeds (NaN seeds left out)."""
    rows = per_face[per_face["method"] == method]
    return rows.groupby("face")[metric].mean()


@dataclass(frozen=True)
class Frechet:
    """The Fréchet distance of one method's restored set to the ground truth, or why it is missing."""

    value: float  # NaN when not computed
    note: str  # "" when computed, else the reason
    extractor: str
    n: int  # distinct faces behind each feature set
    dim: int


def frechet_or_reason(restored: np.ndarray, truth: np.ndarray, *, n_faces: int, extractor: str) -> Frechet:
    """The distance only where N ≥ 2·dim (distinct faces against feature dimensions): below that the
    sample covariances are rank-deficient and the number says more about N than about the method."""
    dim = int(restored.shape[1])
    if n_faces < 2 * dim:
        note = f"not computed: {n_faces} faces < 2·{dim} feature dimensions (rank-deficient covariance)"
        return Frechet(float("nan"), note, extractor, n_faces, dim)
    return Frechet(frechet_distance(restored, truth), "", extractor, n_faces, dim)


def _ladder_previous(methods: Sequence[str]) -> dict[str, str]:
    """Each method's previous rung (the row above it, skipping `lq`); oracle rows compare to their base."""
    previous: dict[str, str] = {}
    last = None
    for m in methods:
        base, _, suffix = m.partition("@")
        if suffix and base in methods:
            previous[m] = base
            continue
        if last is not None and last != "lq":
            previous[m] = last
        last = m
    return previous


def summarise(
    per_face: pd.DataFrame,
    frechet: dict[str, Frechet],
    *,
    split: str = "test",
) -> pd.DataFrame:
    """One row per method on `split`: n_faces, n_seeds, every metric's mean with `_ci_low`/`_ci_high`,
    the paired step from the previous rung (`step_from`, `<metric>_step` and its interval) and from the
    input (`<metric>_vs_lq`), the Fréchet distance or its note, mean steps and seconds per face."""
    rows = per_face[per_face["split"] == split]
    methods = list(dict.fromkeys(rows["method"]))
    metrics = [m for m in (*METRICS, *SUPPLIED_METRICS) if m in rows.columns]
    previous = _ladder_previous(methods)
    out = []
    for method in methods:
        mine = rows[rows["method"] == method]
        row: dict[str, object] = {
            "method": method,
            "split": split,
            "n_faces": int(mine["face"].nunique()),
            "n_seeds": int(mine["seed"].nunique()),
        }
        for metric in metrics:
            values = face_means(rows, method, metric)
            row[metric] = float(values.mean())
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(values.to_numpy())
        row["step_from"] = previous.get(method, "")
        for metric in PAIRED_METRICS:
            for suffix, other in (
                ("step", previous.get(method)),
                ("vs_lq", "lq" if method != "lq" else None),
            ):
                diff = _paired(rows, method, other, metric) if other and other in methods else None
                mean, lo, hi = diff if diff is not None else (float("nan"),) * 3
                row[f"{metric}_{suffix}"] = mean
                row[f"{metric}_{suffix}_ci_low"], row[f"{metric}_{suffix}_ci_high"] = lo, hi
        fd = frechet.get(method)
        row["frechet_distance"] = fd.value if fd else float("nan")
        row["frechet_note"] = fd.note if fd else "not computed: no features"
        row["fd_extractor"] = fd.extractor if fd else ""
        row["mean_steps"] = float(mine["n_steps"].mean())
        row["seconds_per_face"] = float(mine["seconds"].mean())
        out.append(row)
    return pd.DataFrame(out)


def _paired(rows: pd.DataFrame, a: str, b: str, metric: str) -> tuple[float, float, float] | None:
    diff = (face_means(rows, a, metric) - face_means(rows, b, metric)).dropna()
    if diff.empty:
        return None
    lo, hi = bootstrap_ci(diff.to_numpy())
    return float(diff.mean()), lo, hi


def excludes_zero(lo: float, hi: float) -> bool:
    return bool(lo > 0 or hi < 0)
