"""Stage 6, compose: paste restored faces back and write the run's outputs for one shard.

Outputs: `{dest}/restored/<relative path>` (the source's format where we can write it, else PNG),
`{dest}/faces/{image_id}_{k:02d}.png` (restored aligned faces) and, with `compare`,
`{dest}/compare/<relative path>.png` (input | output). A face whose sampling failed keeps its
input pixels; its image is then `failed` (retried by the next run) but still gets its output.
Source files are only ever read.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from dynface.images.color import gray_rgb_u8
from dynface.images.faces import AlignedFace, DetectedFace, FaceCrops, invert_affine, paste_faces
from dynface.images.imageio import encode_image, read_image
from tasks.work import (
    IMAGE_FIELDS,
    RunContext,
    index_rows,
    normalize_uri,
    output_format,
    read_bytes,
    read_png,
    read_rows,
    short_error,
    write_bytes,
    write_png,
    write_rows,
)

COMPOSE_IMAGE_COLUMNS = ("shard", *IMAGE_FIELDS, "output_uri", "compare_uri", "seconds")
COMPOSE_FACE_COLUMNS = (
    "shard",
    "image_id",
    "face_index",
    "crop_uri",
    "restored_uri",
    "output_uri",
    "bbox",
    "landmarks",
    "det_score",
    "affine",
    "is_grayscale",
    "std_hat",
    "std_final",
    "t_start",
    "bucket",
    "eta",
    "levels",
    "n_steps",
    "guidance_residual",
    "seconds",
    "status",
    "error",
)
COMPARE_MAX_SIDE = 1024


def side_by_side(left: np.ndarray, right: np.ndarray, *, max_side: int = COMPARE_MAX_SIDE) -> np.ndarray:
    """(H, W, 3) input | output, each scaled so its longer side is at most `max_side`."""
    if left.shape != right.shape:
        raise ValueError(f"side_by_side needs equal shapes, got {left.shape} and {right.shape}")
    h, w = left.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        left, right = (
            np.asarray(Image.fromarray(a).resize(size, Image.Resampling.LANCZOS)) for a in (left, right)
        )
    return np.concatenate([left, right], axis=1)


def rebuild_crops(image_hw: tuple[int, int], gray: bool, faces: list[dict[str, Any]]) -> FaceCrops:
    """FaceCrops from the detect stage's face rows (crops read back from the work folder)."""
    aligned = []
    for row in sorted(faces, key=lambda r: r["face_index"]):
        affine = np.asarray(row["affine"], dtype=np.float64).reshape(2, 3)
        detected = None
        if row["landmarks"] is not None:
            detected = DetectedFace(
                bbox=np.asarray(row["bbox"], dtype=np.float64),
                landmarks=np.asarray(row["landmarks"], dtype=np.float64).reshape(5, 2),
                score=float(row["det_score"]),
            )
        aligned.append(
            AlignedFace(
                index=int(row["face_index"]),
                crop=read_png(row["crop_uri"]),
                affine=affine,
                inverse=invert_affine(affine),
                face=detected,
            )
        )
    return FaceCrops(image_hw=image_hw, is_grayscale=gray, faces=tuple(aligned))


def merge_face(
    face: dict[str, Any], est: dict[str, Any] | None, res: dict[str, Any] | None
) -> dict[str, Any]:
    """One face's detect, estimate and sample rows -> its compose row (sampler values win)."""
    row = {k: face[k] for k in ("shard", "image_id", "face_index", "crop_uri", "bbox", "landmarks")}
    row.update({k: face[k] for k in ("det_score", "affine", "is_grayscale")})
    est = est or {}
    row.update(
        std_hat=est.get("std_hat_512"),
        t_start=est.get("t_start"),
        bucket=est.get("bucket"),
        eta=est.get("eta"),
        levels=est.get("levels"),
    )
    if res is None:
        row.update(status="failed", error="no sampling result for this face")
        return row
    row.update(status=res["status"], error=res["error"])
    if res["status"] == "ok":
        row.update(
            restored_uri=res["restored_uri"],
            std_hat=res["std_hat_512"],
            std_final=res["std_final"],
            t_start=res["t_start"],
            eta=res["eta"],
            levels=res["levels"],
            n_steps=res["n_steps"],
            guidance_residual=res["guidance_residual"],
            seconds=res["seconds"],
        )
    return row


def compose_image(ctx: RunContext, image: dict[str, Any], faces: list[dict[str, Any]]) -> dict[str, Any]:
    """Paste one image's faces back and write its outputs; returns the updated image row."""
    out = dict(image)
    if normalize_uri(ctx.output_uri(image["relative_path"])) == normalize_uri(image["source_uri"]):
        raise ValueError(f"refusing to overwrite the source file {image['source_uri']}")
    loaded = read_image(read_bytes(image["source_uri"]))
    crops = rebuild_crops((loaded.height, loaded.width), bool(image["is_grayscale"]), faces)
    by_index = {f["face_index"]: f for f in faces}
    restored: list[np.ndarray | None] = []
    for aligned in crops.faces:
        face = by_index[aligned.index]
        if face["status"] != "ok":
            restored.append(None)
            continue
        pixels = read_png(face["restored_uri"])
        if crops.is_grayscale:
            pixels = gray_rgb_u8(pixels)
        face["output_uri"] = ctx.face_uri(image["image_id"], aligned.index)
        write_png(face["output_uri"], pixels)
        restored.append(pixels)
    composite = paste_faces(loaded.rgb, crops, restored)
    out["output_uri"] = ctx.output_uri(image["relative_path"])
    write_bytes(out["output_uri"], encode_image(composite, output_format(image["relative_path"])))
    if ctx.compare:
        out["compare_uri"] = ctx.compare_uri(image["relative_path"])
        write_png(out["compare_uri"], side_by_side(loaded.rgb, composite))
    failed = [f for f in faces if f["status"] != "ok"]
    if failed:
        out["status"] = "failed"
        out["error"] = f"{len(failed)} of {len(faces)} faces kept unrestored: {failed[0]['error']}"
    else:
        out["status"] = "ok"
    return out


def compose_shard(ctx: RunContext, shard: int, samples_uri: str) -> tuple[str, str]:
    """The stage as a plain function; returns (images URI, faces URI) of the compose files."""
    images = read_rows(ctx.work.shard_file("detect", shard, "-images"))
    estimates = index_rows(read_rows(ctx.work.shard_file("estimate", shard)), "image_id", "face_index")
    results = index_rows(read_rows(samples_uri), "image_id", "face_index")
    faces_by_image: dict[str, list[dict[str, Any]]] = {}
    for face in read_rows(ctx.work.shard_file("detect", shard, "-faces")):
        key = (face["image_id"], face["face_index"])
        faces_by_image.setdefault(face["image_id"], []).append(
            merge_face(face, estimates.get(key), results.get(key))
        )
    image_rows, face_rows = [], []
    for image in images:
        faces = faces_by_image.get(image["image_id"], [])
        row = dict(image)
        if image["status"] == "pending":
            t0 = time.perf_counter()
            try:
                row = compose_image(ctx, image, faces)
            except Exception as err:  # noqa: BLE001 - one image's paste-back failing must not stop the shard
                row.update(status="failed", error=f"compose failed: {short_error(err)}")
            row["seconds"] = float(image["seconds"] or 0.0) + time.perf_counter() - t0
        image_rows.append(row)
        face_rows.extend(faces)
    images_uri = write_rows(
        ctx.work.shard_file("compose", shard, "-images"), image_rows, columns=COMPOSE_IMAGE_COLUMNS
    )
    faces_uri = write_rows(
        ctx.work.shard_file("compose", shard, "-faces"), face_rows, columns=COMPOSE_FACE_COLUMNS
    )
    return images_uri, faces_uri


@task(name="compose", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def compose(ctx: RunContext, shard: int, samples_uri: str) -> str:
    """Paste back and write the outputs of one shard; returns the composed images file URI."""
    return compose_shard(ctx, shard, samples_uri)[0]
