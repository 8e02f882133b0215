"""Identity and landmarks from dlib (offline: its models ship in face-recognition-models).

* Identity: dlib's 128-D face descriptor of an aligned crop; distance (dlib's own metric) and cosine
  similarity (the pipeline's input<->output score).
* LMD: dlib's 68-point landmarks, NOT the AWing 98-point (WFLW) model of VQFR, so values are not
  comparable with published LMD numbers; use them to compare methods against each other.
The learned VQFR metrics (ArcFace angle) need user-supplied weights: see `dynface.metrics.nets`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dynface.images.dlib_models import dlib_model_path
from dynface.metrics.arrays import resize_u8, to_uint8

# dlib's HOG detector box on FFHQ-aligned crops as fractions of the crop side (left, top, right,
# bottom): the mean over the 9 of the 10 GPEN FFHQ crops (at 512 px) where it fired. dlib's shape
# predictors were trained on such boxes; given the whole crop as the box, their points drift, and the
# descriptor of a mildly blurred face moved by 0.65 on 2 of those 10 faces (at most 0.18 with this box).
FFHQ_FACE_BOX = (0.195, 0.286, 0.776, 0.867)


@functools.cache
def _shape_predictor(points: Literal[5, 68]):  # -> dlib.shape_predictor
    import dlib  # lazily: PSNR/SSIM users need no dlib

    return dlib.shape_predictor(dlib_model_path(f"shape_predictor_{points}_face_landmarks.dat"))


@functools.cache
def _face_recognizer():  # -> dlib.face_recognition_model_v1
    import dlib

    return dlib.face_recognition_model_v1(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat"))


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
        face = np.ascontiguousarray(to_uint8(face, "face"))
        shape = _landmark_shape(face, 5, self.box)
        if shape is None:
            return None
        desc = _face_recognizer().compute_face_descriptor(face, shape, 0, self.padding)
        return np.asarray(desc, dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))


def descriptor_pair(img, ref, embedder: IdentityEmbedder | None) -> tuple[np.ndarray, np.ndarray] | None:
    embedder = embedder or IdentityEmbedder()
    a, b = embedder.embed(img), embedder.embed(ref)
    return None if a is None or b is None else (a, b)


def identity_distance(img: np.ndarray, ref: np.ndarray, embedder: IdentityEmbedder | None = None) -> float:
    """Euclidean distance of dlib descriptors (dlib's own metric: under 0.6 reads as the same person);
    nan when either face yields no descriptor."""
    pair = descriptor_pair(img, ref, embedder)
    return math.nan if pair is None else float(np.linalg.norm(pair[0] - pair[1]))


# dlib's descriptor and landmarks need larger faces than a 64-px pack gives: the evaluation and the
# pipeline's score stage both upsample both faces to this size first (bicubic, `resize_u8`).
ID_SIZE = 256


def identity_similarity_at_id_size(
    img: np.ndarray, ref: np.ndarray, embedder: IdentityEmbedder | None = None, *, size: int = ID_SIZE
) -> float:
    """`identity_similarity` of the two faces upsampled to `size`: the pipeline's score, measured as the
    evaluation measures identity."""
    return identity_similarity(resize_u8(img, size), resize_u8(ref, size), embedder)


def identity_similarity(img: np.ndarray, ref: np.ndarray, embedder: IdentityEmbedder | None = None) -> float:
    """Cosine similarity in [-1, 1] of dlib descriptors (the pipeline's input<->output score); nan when
    either face yields no descriptor."""
    pair = descriptor_pair(img, ref, embedder)
    return math.nan if pair is None else cosine(*pair)


def landmark_distance(
    img: np.ndarray, ref: np.ndarray, *, box: tuple[float, float, float, float] = FFHQ_FACE_BOX
) -> float:
    """LMD: mean L2 distance in pixels between the dlib 68-point landmarks of img and ref, with img's
    points scaled to ref's size. dlib-68 (integer coordinates), not VQFR's AWing 98-point model; nan when
    either face yields no landmarks. box: the face box in both crops, as in IdentityEmbedder."""
    shapes = []
    for name, a in (("img", img), ("ref", ref)):
        face = np.ascontiguousarray(to_uint8(a, name))
        shape = _landmark_shape(face, 68, box)
        if shape is None:
            return math.nan
        shapes.append((np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64), face.shape[:2]))
    (p, (hi, wi)), (q, (hr, wr)) = shapes
    p = (p + 0.5) * np.array([wr / wi, hr / hi]) - 0.5  # pixel centres map to pixel centres
    return float(np.mean(np.linalg.norm(p - q, axis=1)))
