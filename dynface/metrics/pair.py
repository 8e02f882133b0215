"""Every full-reference metric of one restored face against its ground truth."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from dynface.metrics.fidelity import psnr, ssim
from dynface.metrics.identity import IdentityEmbedder, cosine, descriptor_pair, landmark_distance


@dataclass(frozen=True)
class MetricReport:
    """Full-reference scores of one restored face; *_cmv = VQFR's mean/variance correction applied.
    PSNR in dB, identity_distance in dlib descriptor units, lmd in pixels of the ground truth."""

    psnr_rgb: float
    psnr_y: float
    ssim_rgb: float
    ssim_y: float
    psnr_rgb_cmv: float
    ssim_rgb_cmv: float
    identity_distance: float
    identity_similarity: float
    lmd: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def report_pair(
    restored: np.ndarray, gt: np.ndarray, *, embedder: IdentityEmbedder | None = None
) -> MetricReport:
    """All full-reference metrics of `restored` against `gt`, both (H, W, 3) RGB of one size."""
    embedder = embedder or IdentityEmbedder()
    pair = descriptor_pair(restored, gt, embedder)
    dist = math.nan if pair is None else float(np.linalg.norm(pair[0] - pair[1]))
    sim = math.nan if pair is None else cosine(*pair)
    return MetricReport(
        psnr_rgb=psnr(restored, gt),
        psnr_y=psnr(restored, gt, channel="y"),
        ssim_rgb=ssim(restored, gt),
        ssim_y=ssim(restored, gt, channel="y"),
        psnr_rgb_cmv=psnr(restored, gt, correct_mean_var=True),
        ssim_rgb_cmv=ssim(restored, gt, correct_mean_var=True),
        identity_distance=dist,
        identity_similarity=sim,
        lmd=landmark_distance(restored, gt, box=embedder.box),
    )


def score_pair(
    restored: np.ndarray, gt: np.ndarray, *, embedder: IdentityEmbedder | None = None
) -> dict[str, float]:
    """`report_pair` as a flat {metric name: value} dict (catalog rows, benchmark tables)."""
    return report_pair(restored, gt, embedder=embedder).as_dict()
