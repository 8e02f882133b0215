"""Metrics whose network weights DynFace cannot ship: loaded from files the user supplies, none downloaded.

* `arcface`: ArcFace ResNet-18 (`resnet18_110.pth`) -> identity angle `ida_rad` / `ida_deg` (spec §7.2);
* `fid_inception`: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> the Fréchet distance on FID
  Inception pool3 features instead of dlib's descriptors (the extractor name says which);
* `vgg16`: torchvision's `vgg16-397923af.pth` -> `lpips` (VGG, v0.1) and `dists`; their small heads
  come from the installed `lpips` / `dists-pytorch` packages unless `lpips_head` / `dists_head` are given.
Every path may be a local path or an fsspec URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynface.metrics.fid import FeatureExtractor, inception_extractor
from dynface.metrics.nets import ArcFaceIdentity
from dynface.metrics.perceptual import DISTS, LPIPS, load_vgg16_features, score_images


@dataclass(frozen=True)
class MetricWeights:
    arcface: str | None = None
    fid_inception: str | None = None
    vgg16: str | None = None
    lpips_head: str | None = None
    dists_head: str | None = None


@dataclass(frozen=True, eq=False)
class SuppliedMetrics:
    arcface: ArcFaceIdentity | None = None
    extractor: FeatureExtractor | None = None
    lpips: LPIPS | None = None
    dists: DISTS | None = None

    @classmethod
    def load(cls, weights: MetricWeights | None) -> SuppliedMetrics:
        if weights is None:
            return cls()
        vgg = load_vgg16_features(weights.vgg16) if weights.vgg16 else None  # one trunk for both metrics
        return cls(
            arcface=ArcFaceIdentity.from_file(weights.arcface) if weights.arcface else None,
            extractor=inception_extractor(weights.fid_inception) if weights.fid_inception else None,
            lpips=LPIPS.from_files(vgg, weights.lpips_head) if vgg is not None else None,
            dists=DISTS.from_files(vgg, weights.dists_head) if vgg is not None else None,
        )

    @property
    def columns(self) -> tuple[str, ...]:
        """The per-face columns `score` adds, in order."""
        cols: tuple[str, ...] = ()
        if self.arcface is not None:
            cols += ("ida_rad", "ida_deg")
        if self.lpips is not None:
            cols += ("lpips",)
        if self.dists is not None:
            cols += ("dists",)
        return cols

    def score(self, images: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """{column: (N,) values} for N restored faces against their references (same sizes)."""
        out: dict[str, np.ndarray] = {}
        if self.arcface is not None:
            out["ida_rad"], out["ida_deg"] = self.arcface.angles(images, refs)
        if self.lpips is not None:
            out["lpips"] = score_images(self.lpips, list(images), list(refs)).astype(np.float64)
        if self.dists is not None:
            out["dists"] = score_images(self.dists, list(images), list(refs)).astype(np.float64)
        return out
