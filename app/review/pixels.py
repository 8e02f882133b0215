"""Pixels of a catalog's faces, rebuilt from what the catalog stores.

The catalog keeps no input crops (a run removes its work folder), but it keeps each face's affine
(image -> crop, row-major) and, for detected faces, the landmarks. That is enough to recompute the
crop the sampler saw, exactly as the detect stage made it: `warp_affine(source, affine)` for detected
faces (`align_faces`), the bicubic resize of `aligned_input` for aligned-mode runs (landmarks null).
The same `FaceCrops` then feed `paste_faces` when a photo is published.

Every image is read into memory through fsspec (local disk, S3, any URL); nothing is copied to a
temporary folder. The review app sends only pixels it decoded and re-encoded, never a file's raw bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from dynface.images.faces import (
    AlignedFace,
    DetectedFace,
    FaceCrops,
    aligned_input,
    alignment_transform,
    invert_affine,
    warp_affine,
)
from dynface.images.imageio import LoadedImage, read_image
from tasks.sources import read_source_bytes
from tasks.work import read_bytes

PREVIEW_MAX_SIDE = 1600


def crop_size(affine: np.ndarray, landmarks: np.ndarray | None, image_hw: tuple[int, int]) -> int:
    """Side S of the square crop a stored affine maps into.

    Detected faces: `alignment_transform(landmarks, S)` is linear in S (the template scales with the
    crop), so S = 512 * |A| / |A_512| on the 2x2 linear parts. Aligned mode: the image's width maps
    onto S. Raises ValueError when the affine does not fit the landmarks (a damaged row)."""
    affine = np.asarray(affine, dtype=np.float64).reshape(2, 3)
    if landmarks is None:
        h, w = image_hw
        size = round(affine[0, 0] * w)
        if size < 8 or abs(affine[1, 1] * h - size) > 0.01 or abs(affine[0, 0] * w - size) > 0.01:
            raise ValueError(
                f"aligned-mode affine {affine.tolist()} does not map a {w}x{h} image onto a square"
            )
        return size
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    unit = alignment_transform(landmarks, 512)
    size = round(512.0 * np.linalg.norm(affine[:, :2]) / np.linalg.norm(unit[:, :2]))
    # Landmarks are stored as float32 and the affine as float64: allow for that rounding.
    expected = alignment_transform(landmarks, max(size, 8))
    if size < 8 or not np.allclose(expected, affine, rtol=1e-4, atol=1e-3 * max(1, size)):
        raise ValueError("the face's affine does not match its landmarks")
    return size


def face_crops(loaded: LoadedImage, is_grayscale: bool, faces: Sequence[Mapping[str, Any]]) -> FaceCrops:
    """The `FaceCrops` of one photo from its catalog face rows (bbox, landmarks, det_score, affine,
    face_index), with every input crop recomputed from the decoded source."""
    hw = (loaded.height, loaded.width)
    aligned: list[AlignedFace] = []
    for row in sorted(faces, key=lambda r: int(r["face_index"])):
        affine = np.asarray(row["affine"], dtype=np.float64).reshape(2, 3)
        landmarks = _optional_array(row.get("landmarks"))
        size = crop_size(affine, landmarks, hw)
        index = int(row["face_index"])
        if landmarks is None:
            whole = aligned_input(loaded.rgb, size).faces[0]
            aligned.append(AlignedFace(index, whole.crop, whole.affine, whole.inverse, None))
            continue
        score = row.get("det_score")
        detected = DetectedFace(
            bbox=np.asarray(row["bbox"], dtype=np.float64),
            landmarks=landmarks.reshape(5, 2),
            score=float("nan") if _is_missing(score) else float(score),
        )
        crop = warp_affine(loaded.rgb, affine, (size, size))
        aligned.append(AlignedFace(index, crop, affine, invert_affine(affine), detected))
    return FaceCrops(image_hw=hw, is_grayscale=bool(is_grayscale), faces=tuple(aligned))


def read_photo(uri: str) -> LoadedImage:
    """Decode a photo (EXIF orientation applied, the same reader the pipeline used; a special file
    swapped in for a source is never opened)."""
    return read_image(read_source_bytes(uri))


def read_face(uri: str) -> np.ndarray:
    """A restored face file -> (S, S, 3) uint8. Raises FileNotFoundError when it is gone."""
    with Image.open(io.BytesIO(read_bytes(uri))) as im:
        return np.asarray(im.convert("RGB"))


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def preview_jpeg(rgb: np.ndarray, *, max_side: int = PREVIEW_MAX_SIDE) -> bytes:
    """The whole photo for a browser: longer side at most `max_side`, JPEG."""
    h, w = rgb.shape[:2]
    im = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    scale = max_side / max(h, w)
    if scale < 1.0:
        im = im.resize(
            (max(1, math.floor(w * scale)), max(1, math.floor(h * scale))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except TypeError:
        return False


def _optional_array(value: Any) -> np.ndarray | None:
    if value is None or (np.ndim(value) == 0 and _is_missing(value)):
        return None
    return np.asarray(value, dtype=np.float64)
