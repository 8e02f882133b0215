"""Frechet distance between feature sets and FID; the extractor's name travels with every value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dynface.metrics.arrays import to_uint8
from dynface.metrics.identity import IdentityEmbedder
from dynface.metrics.nets import load_fid_inception


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to (N, D) and (M, D) feature sets:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), sample covariances (ddof 1).

    Computed with symmetric eigen-decompositions (no sqrtm), with negative round-off eigenvalues clipped,
    so singular covariances (N < D) are fine.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least 2 rows for a covariance")
    mu = a.mean(axis=0) - b.mean(axis=0)
    sa, sb = (np.atleast_2d(np.cov(f, rowvar=False, ddof=1)) for f in (a, b))
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root_a @ sb @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    return float(max(0.0, mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * cross))


@dataclass(frozen=True)
class FeatureExtractor:
    """A named image -> feature map; the name travels with every FID it produces.

    fn: N (H, W, 3) uint8 RGB images -> (N, D) features."""

    name: str
    fn: Callable[[list[np.ndarray]], np.ndarray]

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        images = [to_uint8(img, "image") for img in images]
        feats = np.asarray(self.fn(images), dtype=np.float64)
        if feats.ndim != 2 or len(feats) != len(images):
            raise ValueError(f"{self.name}: expected ({len(images)}, D) features, got {feats.shape}")
        return feats


def dlib_descriptor_extractor(embedder: IdentityEmbedder | None = None) -> FeatureExtractor:
    """Offline default: dlib's 128-D face descriptors of aligned crops (an identity-space FID, not
    comparable with Inception FID). Raises ValueError when a face yields no descriptor."""
    embedder = embedder or IdentityEmbedder()

    def describe(images: list[np.ndarray]) -> np.ndarray:
        feats = [embedder.embed(img) for img in images]
        missing = [i for i, f in enumerate(feats) if f is None]
        if missing:
            raise ValueError(f"no dlib descriptor for images {missing[:10]}")
        return np.stack(feats)

    return FeatureExtractor(name="dlib-face-descriptor-128", fn=describe)


def inception_extractor(
    weights_path: str, *, batch_size: int = 16, device: str = "cpu", sha256: str | None = None
) -> FeatureExtractor:
    """FID Inception pool3 features (2048-D) from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`,
    supplied by the user as a local path or fsspec URI; preprocessing as in pytorch-fid."""
    import torch

    net = load_fid_inception(weights_path, sha256=sha256).to(device)

    @torch.no_grad()
    def features(images: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            # torch.tensor copies: the images may be read-only numpy views.
            chunk = [torch.tensor(img).permute(2, 0, 1).float() / 255.0 for img in images[i : i + batch_size]]
            if len({tuple(t.shape) for t in chunk}) > 1:
                raise ValueError("images in one FID batch must share a size")
            x = torch.stack(chunk).to(device)  # [0, 1], as pytorch-fid feeds its InceptionV3
            out.append(net(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))

    return FeatureExtractor(name="fid-inception-v3-pool3 (pt_inception-2015-12-05)", fn=features)


def fid(
    images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray], extractor: FeatureExtractor
) -> tuple[float, str]:
    """(Frechet distance between the two image sets' features, extractor name)."""
    return frechet_distance(extractor(images_a), extractor(images_b)), extractor.name
