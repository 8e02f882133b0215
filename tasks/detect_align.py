"""Stage 2, detect_align: decode each image of a shard, find and align its faces, write the crops.

Writes the shard's `detect_images` table (one row per image, `detect_status` `pending` when it has
faces, else `no_face`, `failed` or `skipped` with the reader's message) and `detect_faces` table
(one row per face: crop URI, box, landmarks, affine). One bad file never fails the shard.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dynface.images.faces import DetectorConfig, FaceCrops, align_faces, aligned_input, detect_faces
from dynface.images.imageio import ImageReadError, LoadedImage, read_image
from tasks.sources import SourceReadError, read_source_bytes
from tasks.tables import DETECT_FACES, DETECT_IMAGES, SHARDS, SOURCE_FIELDS
from tasks.work import RunContext, short_error, stage_task, write_png


def find_faces(loaded: LoadedImage, *, size: int, aligned: bool, detector: DetectorConfig) -> FaceCrops:
    """Aligned crops at `size` for a decoded image (the whole image is the face when `aligned`)."""
    if aligned:
        return aligned_input(loaded.rgb, size)
    faces = detect_faces(loaded.rgb, detector)
    return align_faces(loaded.rgb, faces, size, is_grayscale=loaded.is_grayscale)


def face_row(ctx: RunContext, shard: int, image_id: str, crops: FaceCrops, k: int) -> dict[str, Any]:
    aligned = crops.faces[k]
    face = aligned.face
    return {
        "shard": shard,
        "image_id": image_id,
        "face_index": k,
        "crop_uri": ctx.work.crop(image_id, k),
        "bbox": [float(v) for v in face.bbox]
        if face is not None
        else [0.0, 0.0, float(crops.image_hw[1]), float(crops.image_hw[0])],
        "landmarks": [float(v) for v in np.asarray(face.landmarks).reshape(-1)] if face is not None else None,
        "det_score": float(face.score) if face is not None else None,
        "affine": [float(v) for v in np.asarray(aligned.affine).reshape(-1)],
        "is_grayscale": bool(crops.is_grayscale),
    }


def not_an_aligned_crop(width: int, height: int, max_aspect: float) -> str | None:
    """Why an image cannot be an aligned face crop (None when it can): aligned crops are square."""
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > max_aspect:
        return (
            f"not_an_aligned_crop: {width}x{height} is not square (aspect {aspect:.2f} > {max_aspect});"
            " restore whole photos without --aligned"
        )
    return None


def detect_image(
    ctx: RunContext, shard: int, entry: dict[str, Any], detector: DetectorConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One shard entry -> its detect_images row and detect_faces rows (crops written)."""
    row: dict[str, Any] = {key: entry[key] for key in SOURCE_FIELDS}
    row.update(shard=shard, n_faces=0, detect_error=None)
    if entry["source_status"] is not None:  # discover found it cannot be read: never opened
        row.update(detect_status=entry["source_status"], detect_error=entry["source_error"])
        return row, []
    if entry["duplicate_of"] is not None:  # its bytes are another file's: compose reuses that result
        row.update(detect_status="duplicate", n_faces=None)
        return row, []
    try:
        loaded = read_image(read_source_bytes(entry["source_uri"]))
    except ImageReadError as err:
        row.update(detect_status=err.status, detect_error=f"{err.reason}: {err}")
        return row, []
    except SourceReadError as err:
        row.update(detect_status=err.status, detect_error=err.row_error)
        return row, []
    except Exception as err:  # noqa: BLE001 - unreadable storage object: this image fails, not the run
        row.update(detect_status="failed", detect_error=short_error(err))
        return row, []
    row.update(
        width=loaded.width,
        height=loaded.height,
        orientation=loaded.orientation,
        mode=loaded.mode,
        is_grayscale=loaded.is_grayscale,
    )
    refused = ctx.aligned and not_an_aligned_crop(loaded.width, loaded.height, ctx.aligned_max_aspect)
    if refused:
        row.update(detect_status="skipped", detect_error=refused)
        return row, []
    faces = []
    try:
        crops = find_faces(loaded, size=ctx.resolution, aligned=ctx.aligned, detector=detector)
        gray = bool(crops.is_grayscale or loaded.is_grayscale)
        crops = FaceCrops(image_hw=crops.image_hw, is_grayscale=gray, faces=crops.faces)
        for k, aligned in enumerate(crops.faces):
            write_png(ctx.work.crop(entry["image_id"], k), aligned.crop)
            faces.append(face_row(ctx, shard, entry["image_id"], crops, k))
        row.update(n_faces=len(crops.faces), detect_status="pending" if crops.faces else "no_face")
    except Exception as err:  # noqa: BLE001 - a detector/alignment error fails this image only
        error = f"face detection/alignment failed: {short_error(err)}"
        row.update(detect_status="failed", detect_error=error)
        faces = []
    return row, faces


def detect_shard(ctx: RunContext, shard: int) -> tuple[str, str]:
    """The stage as a plain function; returns (images URI, faces URI)."""
    detector = DetectorConfig(**ctx.detector)
    image_rows: list[dict[str, Any]] = []
    face_rows: list[dict[str, Any]] = []
    for entry in SHARDS.read(SHARDS.shard_uri(ctx.work, shard)):
        t0 = time.perf_counter()
        row, faces = detect_image(ctx, shard, entry, detector)
        row["detect_seconds"] = time.perf_counter() - t0
        image_rows.append(row)
        face_rows.extend(faces)
    images_uri = DETECT_IMAGES.write(DETECT_IMAGES.shard_uri(ctx.work, shard), image_rows)
    faces_uri = DETECT_FACES.write(DETECT_FACES.shard_uri(ctx.work, shard), face_rows)
    return images_uri, faces_uri


@stage_task("detect_align", retries=3)
def detect_align(ctx: RunContext, shard: int) -> str:
    """Decode, detect and align one shard; returns the faces-manifest URI."""
    return detect_shard(ctx, shard)[1]
