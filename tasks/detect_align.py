"""Stage 2, detect_align: decode each image of a shard, find and align its faces, write the crops.

Writes the shard's `detect_images` table (one row per image, `detect_status` `pending` when it has
faces, else `no_face`, `failed` or `skipped` with the reader's message) and `detect_faces` table
(one row per face: crop URI, box, landmarks, affine). One bad file never fails the shard.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from dynface.images.faces import DetectorConfig, FaceCrops, align_faces, aligned_input, detect_faces
from dynface.images.imageio import ImageReadError, LoadedImage, read_image
from tasks.tables import DETECT_FACES, DETECT_IMAGES, SHARDS, SOURCE_FIELDS
from tasks.work import RunContext, read_bytes, short_error, write_png


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


def detect_shard(ctx: RunContext, shard: int) -> tuple[str, str]:
    """The stage as a plain function; returns (images URI, faces URI)."""
    detector = DetectorConfig(**ctx.detector)
    image_rows: list[dict[str, Any]] = []
    face_rows: list[dict[str, Any]] = []
    for entry in SHARDS.read(SHARDS.shard_uri(ctx.work, shard)):
        t0 = time.perf_counter()
        row: dict[str, Any] = {key: entry[key] for key in SOURCE_FIELDS}
        row.update(shard=shard, n_faces=0, detect_error=None)
        try:
            loaded = read_image(read_bytes(entry["source_uri"]))
        except ImageReadError as err:
            row.update(detect_status=err.status, detect_error=f"{err.reason}: {err}")
        except Exception as err:  # noqa: BLE001 - unreadable storage object: this image fails, not the run
            row.update(detect_status="failed", detect_error=short_error(err))
        else:
            row.update(
                width=loaded.width,
                height=loaded.height,
                orientation=loaded.orientation,
                mode=loaded.mode,
                is_grayscale=loaded.is_grayscale,
            )
            try:
                crops = find_faces(loaded, size=ctx.resolution, aligned=ctx.aligned, detector=detector)
                gray = bool(crops.is_grayscale or loaded.is_grayscale)
                crops = FaceCrops(image_hw=crops.image_hw, is_grayscale=gray, faces=crops.faces)
                for k, aligned in enumerate(crops.faces):
                    write_png(ctx.work.crop(entry["image_id"], k), aligned.crop)
                    face_rows.append(face_row(ctx, shard, entry["image_id"], crops, k))
                row.update(n_faces=len(crops.faces), detect_status="pending" if crops.faces else "no_face")
            except Exception as err:  # noqa: BLE001 - a detector/alignment error fails this image only
                error = f"face detection/alignment failed: {short_error(err)}"
                row.update(detect_status="failed", detect_error=error)
        row["detect_seconds"] = time.perf_counter() - t0
        image_rows.append(row)
    images_uri = DETECT_IMAGES.write(DETECT_IMAGES.shard_uri(ctx.work, shard), image_rows)
    faces_uri = DETECT_FACES.write(DETECT_FACES.shard_uri(ctx.work, shard), face_rows)
    return images_uri, faces_uri


@task(name="detect_align", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def detect_align(ctx: RunContext, shard: int) -> str:
    """Decode, detect and align one shard; returns the faces-manifest URI."""
    return detect_shard(ctx, shard)[1]
