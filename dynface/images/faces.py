"""Face detection, 5-point alignment to the FFHQ template, and soft paste-back (pure functions).

Coordinates are in pixels with pixel centres on integers (x right, y down), as in dlib and OpenCV.
An `affine` is a (2, 3) matrix A mapping homogeneous image points to crop points: q = A @ [x, y, 1].

Landmark order (dlib's 5-point model, "left/right" as seen in the image):
    0: outer corner of the eye on the image's right   1: inner corner of that eye
    2: outer corner of the eye on the image's left    3: inner corner of that eye
    4: base of the nose (subnasale)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dynface.images.color import gray_rgb_u8, luma
from dynface.images.dlib_models import dlib_model_path
from dynface.images.imageio import is_grayscale_rgb

# Spec section 4.6: the FFHQ-512 template of DifFace/facexlib (eye centres, nose tip, mouth corners),
# image-left eye first. Kept for reference and checks; dlib's points need the template below.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

# Where dlib's 5 points (order above) fall on an FFHQ-aligned 512 face. Measured by
# scripts/measure_face_template.py: HOG detector + 5-point predictor on the FFHQ and CelebA-HQ crops
# of shared/data/hq_aligned (GPEN, DPS, DDNM, InterFaceGAN folders) resized to 512 with PIL Lanczos;
# mean over the 207 of 220 images with exactly one detection. Per-image std: eye corners 3-6 px,
# nose base 10-11 px (head pose). The eye-corner midpoints, (193.8, 247.7) and (317.8, 247.9), sit
# within 1 px in x and ~8 px lower than FFHQ_TEMPLATE_512's eye centres (corners lie below pupils).
DLIB5_TEMPLATE_512 = np.array(
    [
        [342.768, 246.353],
        [292.913, 249.556],
        [168.981, 245.903],
        [218.585, 249.527],
        [254.386, 344.338],
    ],
    dtype=np.float64,
)

# DifFace's constant border colour for parts of the crop outside the image.
BORDER_VALUE = (135, 133, 132)
_FACE_MODEL = "shape_predictor_5_face_landmarks.dat"


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """bbox: (4,) x0, y0, x1, y1 (x1/y1 exclusive); landmarks: (5, 2) in the order of the module
    docstring; score: the HOG detector's SVM score (higher is surer)."""

    bbox: np.ndarray
    landmarks: np.ndarray
    score: float


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """crop: (S, S, 3) uint8; affine: (2, 3) image -> crop; inverse: (2, 3) crop -> image;
    face: the detection, None in aligned mode (the whole image is the face)."""

    index: int
    crop: np.ndarray
    affine: np.ndarray
    inverse: np.ndarray
    face: DetectedFace | None


@dataclass(frozen=True, eq=False)
class FaceCrops:
    image_hw: tuple[int, int]
    is_grayscale: bool
    faces: tuple[AlignedFace, ...]


@dataclass(frozen=True)
class DetectorConfig:
    """Face detector settings.

    min_face_size: faces whose detector box has a shorter side below this many original-image
        pixels are dropped (box side, not eye distance: the box is what HOG measures).
    score_threshold: minimum HOG SVM score (the detector fired on a background patch at 0.12).
    max_faces: the largest faces kept.
    detect_max_side: detection runs on a copy whose longer side is at most this...
    upsample_small: ...unless this is set: then the copy is enlarged (up to 2x the original, as
        dlib's "upsample once") while it stays within `detect_max_pixels`. HOG's window is 80 px,
        so without it a 2732x1066 scan of the Solvay 1927 photo (faces ~70 px) downscaled to 1600
        shows no face at all; at 4 MP it shows 25. Costs ~0.3-1 s of HOG per image at 4 MP.
    detect_max_pixels: pixel budget of the enlarged copy.
    """

    min_face_size: int = 24
    score_threshold: float = 0.5
    max_faces: int = 64
    detect_max_side: int = 1600
    upsample_small: bool = True
    detect_max_pixels: int = 4_000_000

    def __post_init__(self) -> None:
        if self.min_face_size < 1 or self.max_faces < 1 or self.detect_max_side < 64:
            raise ValueError("min_face_size and max_faces must be >= 1, detect_max_side >= 64")
        if self.detect_max_pixels < 64 * 64:
            raise ValueError("detect_max_pixels must be >= 4096")

    def detection_scale(self, height: int, width: int) -> float:
        """Resize factor of the copy the detector sees (<1 shrinks, >1 enlarges)."""
        base = min(1.0, self.detect_max_side / max(height, width))
        if not self.upsample_small:
            return base
        return max(base, min(2.0, math.sqrt(self.detect_max_pixels / (height * width))))


@dataclass(frozen=True)
class _DlibModels:
    detector: object
    predictor: object


@functools.cache
def _dlib_models() -> _DlibModels:
    import dlib  # imported lazily: align/paste need no dlib

    path = dlib_model_path(_FACE_MODEL)
    return _DlibModels(detector=dlib.get_frontal_face_detector(), predictor=dlib.shape_predictor(path))


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")


def detect_faces(rgb: np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[DetectedFace]:
    """Faces in an (H, W, 3) uint8 image, largest first, at most `config.max_faces`.

    HOG detection on a resized copy (`DetectorConfig.detection_scale`), boxes mapped back, 5
    landmarks predicted on the full-resolution image, duplicates merged (IoU > 0.5, or eye
    midpoints closer than a quarter of the eye distance), faces below `min_face_size` dropped.
    """
    import dlib

    _check_rgb(rgb)
    models = _dlib_models()
    h, w = rgb.shape[:2]
    scale = config.detection_scale(h, w)
    small = rgb
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))
    rects, scores, _ = models.detector.run(np.ascontiguousarray(small), 0, config.score_threshold)
    sx, sy = w / small.shape[1], h / small.shape[0]
    full = np.ascontiguousarray(rgb)
    found: list[DetectedFace] = []
    for rect, score in zip(rects, scores, strict=True):
        if score < config.score_threshold:
            continue
        box = np.array([rect.left() * sx, rect.top() * sy, (rect.right() + 1) * sx, (rect.bottom() + 1) * sy])
        if min(box[2] - box[0], box[3] - box[1]) < config.min_face_size:
            continue
        full_rect = dlib.rectangle(*(int(round(v)) for v in (box[0], box[1], box[2] - 1, box[3] - 1)))
        shape = models.predictor(full, full_rect)
        marks = np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], dtype=np.float64)
        found.append(DetectedFace(bbox=box, landmarks=marks, score=float(score)))
    kept = merge_duplicates(found)
    kept.sort(key=lambda f: -(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    return kept[: config.max_faces]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _eyes(marks: np.ndarray) -> tuple[np.ndarray, float]:
    """Midpoint between the eye centres and the eye-centre distance."""
    right, left = marks[0:2].mean(axis=0), marks[2:4].mean(axis=0)
    return (right + left) / 2, float(np.linalg.norm(right - left))


def merge_duplicates(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Greedy by score: a face is a duplicate of a kept one when the boxes overlap (IoU > 0.5) or
    the landmarks say it is the same face (HOG's sub-detectors can fire twice with offset boxes)."""
    kept: list[DetectedFace] = []
    for face in sorted(faces, key=lambda f: -f.score):
        mid, dist = _eyes(face.landmarks)
        duplicate = False
        for other in kept:
            omid, odist = _eyes(other.landmarks)
            same_eyes = np.linalg.norm(mid - omid) < 0.25 * max(dist, odist)
            if _iou(face.bbox, other.bbox) > 0.5 or same_eyes:
                duplicate = True
                break
        if not duplicate:
            kept.append(face)
    return kept


def _template(size: int) -> np.ndarray:
    # Pixel-centre convention: the 512 grid maps onto the size grid by (t + 0.5) * size/512 - 0.5.
    return (DLIB5_TEMPLATE_512 + 0.5) * (size / 512.0) - 0.5


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, translation; no reflection)
    mapping src (N, 2) onto dst (N, 2): u = a x - b y + tx, v = b x + a y + ty."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("points must be finite")
    if np.ptp(src, axis=0).max() < 1e-6:
        raise ValueError("degenerate landmarks: all points coincide")
    n = src.shape[0]
    m = np.zeros((2 * n, 4))
    m[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], axis=1)
    m[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], axis=1)
    (a, b, tx, ty), *_ = np.linalg.lstsq(m, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def alignment_transform(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(2, 3) image -> crop similarity taking dlib's 5 landmarks (5, 2) to the template at `size`."""
    if size < 8:
        raise ValueError(f"crop size must be >= 8, got {size}")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks, got {landmarks.shape}")
    return similarity_lstsq(landmarks, _template(size))


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine map."""
    return np.linalg.inv(_full(affine))[:2]


def _full(affine: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(affine, dtype=np.float64), [0.0, 0.0, 1.0]])


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(2, 3) map applying `inner` first, then `outer`."""
    return (_full(outer) @ _full(inner))[:2]


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _scale_map(fx: float, fy: float) -> np.ndarray:
    """Grid resize by fx, fy in pixel-centre coordinates: x' = (x + 0.5) * fx - 0.5."""
    return np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]])


def _pil_affine(
    src: np.ndarray, affine: np.ndarray, out_hw: tuple[int, int], fill: tuple[int, ...]
) -> np.ndarray:
    """Bilinear warp by PIL (C code). PIL maps output to input in pixel-corner coordinates (centres
    at +0.5), so the centre-convention inverse is conjugated by half-pixel shifts."""
    back = _full(invert_affine(affine))
    corner = _full(_translation(0.5, 0.5)) @ back @ _full(_translation(-0.5, -0.5))
    data = tuple(float(v) for v in corner[:2].reshape(-1))
    warped = Image.fromarray(np.ascontiguousarray(src)).transform(
        (out_hw[1], out_hw[0]), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=tuple(fill)
    )
    return np.asarray(warped)


def warp_affine(
    rgb: np.ndarray, affine: np.ndarray, out_hw: tuple[int, int], *, border: tuple[int, ...] = BORDER_VALUE
) -> np.ndarray:
    """Warp (H, W, 3) uint8 by `affine` (input -> output pixel coordinates) into an out_hw image,
    bilinear, `border` where the output falls outside the input.

    Bilinear sampling alone aliases when it shrinks; when the map shrinks by more than 1.5x, the
    input window it reads is first reduced with PIL's filtered (antialiased) resize."""
    _check_rgb(rgb)
    shrink = 1.0 / math.sqrt(abs(np.linalg.det(np.asarray(affine)[:, :2])))
    if shrink <= 1.5:
        return _pil_affine(rgb, affine, out_hw, border)
    h, w = rgb.shape[:2]
    oh, ow = out_hw
    corners = np.array(
        [[-0.5, -0.5, 1.0], [ow - 0.5, -0.5, 1.0], [-0.5, oh - 0.5, 1.0], [ow - 0.5, oh - 0.5, 1.0]]
    )
    pts = corners @ invert_affine(affine).T
    pad = 2.0 * shrink
    x0, y0 = max(0, math.floor(pts[:, 0].min() - pad)), max(0, math.floor(pts[:, 1].min() - pad))
    x1, y1 = min(w, math.ceil(pts[:, 0].max() + pad)), min(h, math.ceil(pts[:, 1].max() + pad))
    if x0 >= x1 or y0 >= y1:  # the output sees nothing of the input
        return np.broadcast_to(np.asarray(border, dtype=np.uint8), (oh, ow, 3)).copy()
    sw, sh = max(1, round((x1 - x0) / shrink)), max(1, round((y1 - y0) / shrink))
    small = np.asarray(Image.fromarray(rgb[y0:y1, x0:x1]).resize((sw, sh), Image.Resampling.BICUBIC))
    small_to_image = compose_affine(
        _translation(x0, y0), invert_affine(_scale_map(sw / (x1 - x0), sh / (y1 - y0)))
    )
    return _pil_affine(small, compose_affine(affine, small_to_image), out_hw, border)


def align_faces(
    rgb: np.ndarray, faces: list[DetectedFace], size: int, *, is_grayscale: bool | None = None
) -> FaceCrops:
    """Warp each detected face to a (size, size, 3) crop on the template. `is_grayscale` defaults
    to `is_grayscale_rgb(rgb)`; pass the reader's flag to keep gray-mode inputs gray."""
    _check_rgb(rgb)
    gray = is_grayscale_rgb(rgb) if is_grayscale is None else bool(is_grayscale)
    out = []
    for k, face in enumerate(faces):
        affine = alignment_transform(face.landmarks, size)
        crop = warp_affine(rgb, affine, (size, size))
        out.append(AlignedFace(index=k, crop=crop, affine=affine, inverse=invert_affine(affine), face=face))
    return FaceCrops(image_hw=(rgb.shape[0], rgb.shape[1]), is_grayscale=gray, faces=tuple(out))


def aligned_input(rgb: np.ndarray, size: int) -> FaceCrops:
    """--aligned mode: the whole (H, W, 3) image is one face, resized (bicubic) to (size, size).
    A non-square image is stretched; `paste_faces` stretches the restored face back."""
    _check_rgb(rgb)
    if size < 8:
        raise ValueError(f"crop size must be >= 8, got {size}")
    h, w = rgb.shape[:2]
    crop = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    sx, sy = size / w, size / h
    affine = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
    face = AlignedFace(index=0, crop=crop, affine=affine, inverse=invert_affine(affine), face=None)
    return FaceCrops(image_hw=(h, w), is_grayscale=is_grayscale_rgb(rgb), faces=(face,))


# The ramp's Gaussian CDF, tabulated once (np.interp is ~50x faster than a vectorised math.erf).
_RAMP_T = np.linspace(-3.0, 3.0, 4097)
_RAMP_CDF = np.array([math.erf(t / math.sqrt(2.0)) for t in _RAMP_T])
_RAMP_CDF = (_RAMP_CDF - _RAMP_CDF[0]) / (_RAMP_CDF[-1] - _RAMP_CDF[0])


def _ramp(d: np.ndarray, d0: float, d1: float) -> np.ndarray:
    """0 for d <= d0, 1 for d >= d1, between them a Gaussian CDF (sigma = (d1-d0)/6) rescaled so
    it meets 0 and 1 exactly: an eroded edge blurred by a truncated Gaussian."""
    t = (d - (d0 + d1) / 2) / ((d1 - d0) / 6)
    return np.interp(t, _RAMP_T, _RAMP_CDF)


def paste_mask(u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Soft paste-back weight at crop coordinates (u, v) for a (size, size) crop.

    The crop square (edges at -0.5 and size-0.5) is eroded by size/64 and feathered over size/8
    (64 px at 512), so the weight is exactly 0 near the crop edge and 1 in the face. Defined in crop
    units, the feather scales with the face's size in the image."""
    d0, d1 = size / 64.0, size / 64.0 + size / 8.0

    def edge(t: np.ndarray) -> np.ndarray:
        dist = np.minimum(t + 0.5, size - 0.5 - t)
        out = (dist >= d1).astype(np.float32)
        band = (dist > d0) & (dist < d1)
        out[band] = _ramp(dist[band], d0, d1)
        return out

    return edge(np.asarray(u)) * edge(np.asarray(v))


def paste_faces(rgb: np.ndarray, crops: FaceCrops, restored: list[np.ndarray | None]) -> np.ndarray:
    """Blend restored (S, S, 3) uint8 faces (None keeps the original) into a copy of the (H, W, 3)
    image, in order, with the soft mask of `paste_mask`. Pixels where the mask is 0 are returned
    unchanged. Grayscale inputs get gray (3 equal channels) faces back. Aligned-mode crops
    (face is None) replace the whole image, resized back."""
    _check_rgb(rgb)
    if rgb.shape[:2] != tuple(crops.image_hw):
        raise ValueError(f"image is {rgb.shape[:2]}, crops were made from {crops.image_hw}")
    if len(restored) != len(crops.faces):
        raise ValueError(f"{len(restored)} restored faces for {len(crops.faces)} crops")
    out = rgb.copy()
    h, w = rgb.shape[:2]
    for aligned, face in zip(crops.faces, restored, strict=True):
        if face is None:
            continue
        if face.shape != aligned.crop.shape or face.dtype != np.uint8:
            raise ValueError(
                f"restored face {aligned.index} is {face.shape} {face.dtype}, expected {aligned.crop.shape}"
            )
        if crops.is_grayscale:
            face = gray_rgb_u8(face)
        if aligned.face is None:
            out = np.asarray(Image.fromarray(face).resize((w, h), Image.Resampling.BICUBIC)).copy()
            continue
        _paste_one(out, aligned, face, crops.is_grayscale)
    return out


def _paste_one(out: np.ndarray, aligned: AlignedFace, face: np.ndarray, gray: bool) -> None:
    """In-place blend of one face inside the image box covered by its crop square."""
    size = face.shape[0]
    h, w = out.shape[:2]
    lo, hi = -0.5, size - 0.5
    corners = np.array([[lo, lo, 1.0], [hi, lo, 1.0], [lo, hi, 1.0], [hi, hi, 1.0]])
    pts = corners @ aligned.inverse.T
    x0, y0 = max(0, math.floor(pts[:, 0].min())), max(0, math.floor(pts[:, 1].min()))
    x1, y1 = min(w, math.ceil(pts[:, 0].max()) + 1), min(h, math.ceil(pts[:, 1].max()) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    a = region_to_crop = compose_affine(aligned.affine, _translation(x0, y0))
    # float32 crop coordinates by broadcasting: a 2000 px face costs tens, not hundreds, of MB.
    xs, ys = np.arange(x1 - x0, dtype=np.float32)[None, :], np.arange(y1 - y0, dtype=np.float32)[:, None]
    u = np.float32(a[0, 0]) * xs + np.float32(a[0, 1]) * ys + np.float32(a[0, 2])
    v = np.float32(a[1, 0]) * xs + np.float32(a[1, 1]) * ys + np.float32(a[1, 2])
    mask = paste_mask(u, v, size)
    sel = mask > 0
    if not sel.any():
        return
    sampled = warp_affine(face, invert_affine(region_to_crop), (y1 - y0, x1 - x0), border=(0, 0, 0))
    region = out[y0:y1, x0:x1]
    # Dense arithmetic over the box, then a masked copy: faster than boolean gathers and scatters.
    blended = region.astype(np.float32)
    blended += mask[:, :, None] * (sampled.astype(np.float32) - blended)
    if gray:
        blended = luma(blended)[:, :, None]
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    np.copyto(region, np.broadcast_to(result, region.shape), where=sel[:, :, None])
