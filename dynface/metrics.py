"""Full-reference evaluation metrics for aligned faces (spec section 7); nothing here downloads anything.

Images are (H, W, 3) RGB, either uint8 or float in [0, 1]; every metric works in 8-bit units (data
range 255), as BasicSR and VQFR do.

* PSNR / SSIM: BasicSR conventions. Y is BT.601 "only_y" with MATLAB coefficients, not rounded; SSIM
  uses an 11x11 Gaussian window (sigma 1.5) over the valid region, averaged over channels.
* Identity: dlib's 128-D face descriptor (ships in face-recognition-models), offline. The learned
  VQFR metrics (ArcFace angle, FID Inception) need user-supplied weights: see `dynface.metric_nets`.
* LMD: dlib's 68-point landmarks, NOT the AWing 98-point (WFLW) model of VQFR, so values are not
  comparable with published LMD numbers; use them to compare methods against each other.
* FID: a Frechet distance between feature sets, always returned with the extractor's name.
LPIPS (VGG) and DISTS live in `dynface.perceptual` (user-supplied VGG16 weights); `dynface.supplied_metrics`
loads every metric whose weights the user supplies.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dynface.metric_nets import ArcFaceIdentity, load_fid_inception

__all__ = [
    "ArcFaceIdentity",
    "FeatureExtractor",
    "IdentityEmbedder",
    "MetricReport",
    "dlib_descriptor_extractor",
    "fid",
    "frechet_distance",
    "identity_distance",
    "identity_similarity",
    "inception_extractor",
    "landmark_distance",
    "psnr",
    "report_pair",
    "score_pair",
    "ssim",
    "y_channel",
]

Channel = Literal["rgb", "y"]

# dlib's HOG detector box on FFHQ-aligned crops as fractions of the crop side (left, top, right,
# bottom): the mean over the 9 of the 10 GPEN FFHQ crops (at 512 px) where it fired. dlib's shape
# predictors were trained on such boxes; given the whole crop as the box, their points drift, and the
# descriptor of a mildly blurred face moved by 0.65 on 2 of those 10 faces (at most 0.18 with this box).
FFHQ_FACE_BOX = (0.195, 0.286, 0.776, 0.867)

_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2


# ---------------------------------------------------------------------------------------------------
# PSNR / SSIM


def _to_255(img: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> float64 in [0, 255]."""
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: dtype {a.dtype} is neither uint8 nor float")
    if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
        raise ValueError(f"{name}: float images must be finite and lie in [0, 1]")
    return a.astype(np.float64) * 255.0


def _to_uint8(img: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        return a
    return np.rint(_to_255(a, name)).astype(np.uint8)


def _luma(x255: np.ndarray) -> np.ndarray:
    r, g, b = x255[..., 0] / 255.0, x255[..., 1] / 255.0, x255[..., 2] / 255.0
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def y_channel(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) float64 Y in 8-bit units ([16, 235]), unrounded:
    16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1] (BT.601, MATLAB rgb2ycbcr)."""
    return _luma(_to_255(img, "img"))


def _match_mean_std(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """VQFR's --correct_mean_var: per channel, shift x to ref's mean, then scale it (about zero, not
    about the mean) to ref's std; twice, so the match is close but not exact after scaling."""
    out = x.copy()
    for c in range(3):
        mean, std = ref[..., c].mean(), ref[..., c].std()
        for _ in range(2):
            out[..., c] += mean - out[..., c].mean()
            s = out[..., c].std()
            if s == 0.0:
                raise ValueError("correct_mean_var: a channel of the image is constant")
            out[..., c] *= std / s
    return out


def _prepare(
    img: np.ndarray, ref: np.ndarray, channel: Channel, correct_mean_var: bool, crop_border: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H', W', C) in 8-bit units, C = 3 (rgb) or 1 (y)."""
    x, y = _to_255(img, "img"), _to_255(ref, "ref")
    if x.shape != y.shape:
        raise ValueError(f"img {x.shape} and ref {y.shape} differ in shape")
    if crop_border < 0 or 2 * crop_border >= min(x.shape[:2]):
        raise ValueError(f"crop_border {crop_border} does not fit a {x.shape[:2]} image")
    if channel not in ("rgb", "y"):
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    if correct_mean_var:  # over the whole image, before cropping, as VQFR does
        x = _match_mean_std(x, y)
    if crop_border:
        x, y = (a[crop_border:-crop_border, crop_border:-crop_border] for a in (x, y))
    if channel == "y":
        x, y = _luma(x)[..., None], _luma(y)[..., None]
    return x, y


def psnr(
    img: np.ndarray,
    ref: np.ndarray,
    *,
    channel: Channel = "rgb",
    correct_mean_var: bool = False,
    crop_border: int = 0,
) -> float:
    """PSNR in dB over all pixels and channels, data range 255; inf for identical images.

    channel "y" measures BT.601 luma (`y_channel`). correct_mean_var matches img's per-channel mean and
    std to ref's first (VQFR's `--correct_mean_var`, on by default in its scripts: say whether a reported
    number used it). crop_border removes that many pixels from every side (after the correction).
    """
    x, y = _prepare(img, ref, channel, correct_mean_var, crop_border)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def _gauss_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(H, W) -> (H - k + 1, W - k + 1): separable correlation with g, valid region only."""
    rows = np.lib.stride_tricks.sliding_window_view(a, g.size, axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, g.size, axis=1) @ g


def _ssim_plane(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    num = (2 * mx * my + _SSIM_C1) * (2 * sxy + _SSIM_C2)
    den = (mx * mx + my * my + _SSIM_C1) * (sxx + syy + _SSIM_C2)
    return float(np.mean(num / den))


def ssim(
    img: np.ndarray,
    ref: np.ndarray,
    *,
    channel: Channel = "rgb",
    correct_mean_var: bool = False,
    crop_border: int = 0,
) -> float:
    """SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range
    255, averaged over the valid region and then over channels. Options as in `psnr`."""
    x, y = _prepare(img, ref, channel, correct_mean_var, crop_border)
    if min(x.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels, got {x.shape[:2]}")
    g = _gauss_window()
    return float(np.mean([_ssim_plane(x[..., c], y[..., c], g) for c in range(x.shape[2])]))


# ---------------------------------------------------------------------------------------------------
# dlib identity descriptor and landmarks


def _dlib_model(name: str) -> str:
    # find_spec, not import: the package imports pkg_resources, which recent setuptools lack.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package face-recognition-models is not installed (it ships dlib's models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise RuntimeError(f"dlib model missing: {path}")
    return str(path)


@functools.cache
def _shape_predictor(points: Literal[5, 68]):  # -> dlib.shape_predictor
    import dlib  # lazily: PSNR/SSIM users need no dlib

    return dlib.shape_predictor(_dlib_model(f"shape_predictor_{points}_face_landmarks.dat"))


@functools.cache
def _face_recognizer():  # -> dlib.face_recognition_model_v1
    import dlib

    return dlib.face_recognition_model_v1(_dlib_model("dlib_face_recognition_resnet_model_v1.dat"))


def _landmark_shape(face: np.ndarray, points: Literal[5, 68], box: tuple[float, float, float, float]):
    """dlib full_object_detection for the fixed box, or None when any point leaves the image."""
    import dlib

    h, w = face.shape[:2]
    left, top, right, bottom = box
    rect = dlib.rectangle(round(left * w), round(top * h), round(right * w) - 1, round(bottom * h) - 1)
    shape = _shape_predictor(points)(face, rect)
    xy = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    if len(xy) != points or xy.min() < 0 or np.any(xy.max(axis=0) > (w - 1, h - 1)):
        return None
    return shape


@dataclass(frozen=True)
class IdentityEmbedder:
    """dlib's ResNet face descriptor on aligned crops (no detector: the crop says where the face is).

    box: the face box as fractions of the crop (left, top, right, bottom); the default fits FFHQ-aligned
    crops (see FFHQ_FACE_BOX), (0, 0, 1, 1) means the whole crop. padding: dlib's chip padding.
    """

    box: tuple[float, float, float, float] = FFHQ_FACE_BOX
    padding: float = 0.25

    def embed(self, face: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) aligned RGB face -> (128,) float64 descriptor, or None when the 5-point predictor
        puts a landmark outside the crop (no face where the alignment says one is)."""
        face = np.ascontiguousarray(_to_uint8(face, "face"))
        shape = _landmark_shape(face, 5, self.box)
        if shape is None:
            return None
        desc = _face_recognizer().compute_face_descriptor(face, shape, 0, self.padding)
        return np.asarray(desc, dtype=np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))


def _descriptor_pair(img, ref, embedder: IdentityEmbedder | None) -> tuple[np.ndarray, np.ndarray] | None:
    embedder = embedder or IdentityEmbedder()
    a, b = embedder.embed(img), embedder.embed(ref)
    return None if a is None or b is None else (a, b)


def identity_distance(img: np.ndarray, ref: np.ndarray, embedder: IdentityEmbedder | None = None) -> float:
    """Euclidean distance of dlib descriptors (dlib's own metric: under 0.6 reads as the same person);
    nan when either face yields no descriptor."""
    pair = _descriptor_pair(img, ref, embedder)
    return math.nan if pair is None else float(np.linalg.norm(pair[0] - pair[1]))


def identity_similarity(img: np.ndarray, ref: np.ndarray, embedder: IdentityEmbedder | None = None) -> float:
    """Cosine similarity in [-1, 1] of dlib descriptors (the pipeline's input<->output score); nan when
    either face yields no descriptor."""
    pair = _descriptor_pair(img, ref, embedder)
    return math.nan if pair is None else _cosine(*pair)


def landmark_distance(
    img: np.ndarray, ref: np.ndarray, *, box: tuple[float, float, float, float] = FFHQ_FACE_BOX
) -> float:
    """LMD: mean L2 distance in pixels between the dlib 68-point landmarks of img and ref, with img's
    points scaled to ref's size. dlib-68 (integer coordinates), not VQFR's AWing 98-point model; nan when
    either face yields no landmarks. box: the face box in both crops, as in IdentityEmbedder."""
    shapes = []
    for name, a in (("img", img), ("ref", ref)):
        face = np.ascontiguousarray(_to_uint8(a, name))
        shape = _landmark_shape(face, 68, box)
        if shape is None:
            return math.nan
        shapes.append((np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64), face.shape[:2]))
    (p, (hi, wi)), (q, (hr, wr)) = shapes
    p = (p + 0.5) * np.array([wr / wi, hr / hi]) - 0.5  # pixel centres map to pixel centres
    return float(np.mean(np.linalg.norm(p - q, axis=1)))


# ---------------------------------------------------------------------------------------------------
# Frechet distance and FID


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
        images = [_to_uint8(img, "image") for img in images]
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


# ---------------------------------------------------------------------------------------------------
# One restored face against its ground truth


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
    pair = _descriptor_pair(restored, gt, embedder)
    dist = math.nan if pair is None else float(np.linalg.norm(pair[0] - pair[1]))
    sim = math.nan if pair is None else _cosine(*pair)
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
