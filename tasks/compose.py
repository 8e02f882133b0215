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

from dynface.images.color import gray_rgb_u8
from dynface.images.faces import AlignedFace, DetectedFace, FaceCrops, invert_affine, paste_faces
from dynface.images.imageio import encode_image, read_image
from tasks.sources import read_source_bytes
from tasks.tables import (
    COMPOSE_FACES,
    COMPOSE_IMAGES,
    DETECT_FACES,
    DETECT_IMAGES,
    SAMPLES,
    SHARDS,
    by_face,
    failed_sample_row,
)
from tasks.work import (
    RunContext,
    normalize_uri,
    output_format,
    read_bytes,
    read_png,
    short_error,
    stage_task,
    write_bytes,
    write_png,
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


def face_sample(samples: dict[tuple[str, int], dict[str, Any]], face: dict[str, Any]) -> dict[str, Any]:
    """The samples row of a detected face (a failed one when its batch never reported back)."""
    key = (face["image_id"], int(face["face_index"]))
    return samples.get(key) or failed_sample_row(*key, "no sampling result for this face")


def compose_image(
    ctx: RunContext, image: dict[str, Any], faces: list[dict[str, Any]], samples: dict[tuple[str, int], dict]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Paste one image's faces back and write its outputs; returns its compose_images row and the
    compose_faces rows of the faces written."""
    if normalize_uri(ctx.output_uri(image["relative_path"])) == normalize_uri(image["source_uri"]):
        raise ValueError(f"refusing to overwrite the source file {image['source_uri']}")
    loaded = read_image(read_source_bytes(image["source_uri"]))
    crops = rebuild_crops((loaded.height, loaded.width), bool(image["is_grayscale"]), faces)
    by_index = {f["face_index"]: face_sample(samples, f) for f in faces}
    restored: list[np.ndarray | None] = []
    face_rows = []
    for aligned in crops.faces:
        sampled = by_index[aligned.index]
        if sampled["sample_status"] != "ok":
            restored.append(None)
            continue
        pixels = read_png(sampled["restored_uri"])
        if crops.is_grayscale:
            pixels = gray_rgb_u8(pixels)
        face_uri = ctx.face_uri(image["image_id"], aligned.index)
        write_png(face_uri, pixels)
        face_rows.append({"image_id": image["image_id"], "face_index": aligned.index, "output_uri": face_uri})
        restored.append(pixels)
    composite = paste_faces(loaded.rgb, crops, restored)
    row: dict[str, Any] = {"output_uri": ctx.output_uri(image["relative_path"])}
    write_bytes(row["output_uri"], encode_image(composite, output_format(image["relative_path"])))
    if ctx.compare:
        row["compare_uri"] = ctx.compare_uri(image["relative_path"])
        write_png(row["compare_uri"], side_by_side(loaded.rgb, composite))
    failed = [s for s in by_index.values() if s["sample_status"] != "ok"]
    if failed:
        row["status"] = "failed"
        row["error"] = f"{len(failed)} of {len(faces)} faces kept unrestored: {failed[0]['sample_error']}"
    else:
        row["status"] = "ok"
    return row, face_rows


def reuse_output(ctx: RunContext, entry: dict[str, Any], original_output: str | None) -> dict[str, Any]:
    """Outputs of a file whose bytes another file has: the original's restored image, copied (or
    re-encoded when the output formats differ), and a fresh side-by-side when asked for."""
    row: dict[str, Any] = {}
    if original_output is None:
        return row
    row["output_uri"] = ctx.output_uri(entry["relative_path"])
    data = read_bytes(original_output)
    fmt = output_format(entry["relative_path"])
    if original_output.rsplit(".", 1)[-1].lower() != fmt:
        data = encode_image(read_image(data).rgb, fmt)
    write_bytes(row["output_uri"], data)
    if ctx.compare:
        row["compare_uri"] = ctx.compare_uri(entry["relative_path"])
        source = read_image(read_source_bytes(entry["source_uri"])).rgb
        write_png(row["compare_uri"], side_by_side(source, read_image(data).rgb))
    return row


def compose_duplicate(
    ctx: RunContext, entry: dict[str, Any], originals: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The compose_images row of a duplicate: the original's outcome, its output reused."""
    if entry["duplicate_status"] is not None:  # restored by an earlier run
        outcome = {"status": entry["duplicate_status"], "output_uri": entry["duplicate_output_uri"]}
    else:
        outcome = originals[entry["duplicate_of"]]
    row = {"status": outcome["status"], "error": outcome.get("error"), "duplicate_of": entry["duplicate_of"]}
    row.update(reuse_output(ctx, entry, outcome.get("output_uri")))
    return row


def compose_shard(ctx: RunContext, shard: int, samples_uri: str) -> tuple[str, str]:
    """The stage as a plain function; returns (compose_images URI, compose_faces URI)."""
    samples = by_face(SAMPLES.read(samples_uri))
    entries = {row["source_uri"]: row for row in SHARDS.read(SHARDS.shard_uri(ctx.work, shard))}
    faces_by_image: dict[str, list[dict[str, Any]]] = {}
    for face in DETECT_FACES.read(DETECT_FACES.shard_uri(ctx.work, shard)):
        faces_by_image.setdefault(face["image_id"], []).append(face)
    outcomes: dict[str, dict[str, Any]] = {}  # source URI -> final status, error, output (originals)
    image_rows, face_rows = [], []
    for image in DETECT_IMAGES.read(DETECT_IMAGES.shard_uri(ctx.work, shard)):
        outcomes[image["source_uri"]] = {"status": image["detect_status"], "error": image["detect_error"]}
        if image["detect_status"] not in ("pending", "duplicate"):
            continue  # nothing to compose: the detect outcome is the image's outcome
        t0 = time.perf_counter()
        written: list[dict[str, Any]] = []
        try:
            if image["detect_status"] == "duplicate":
                row = compose_duplicate(ctx, entries[image["source_uri"]], outcomes)
            else:
                row, written = compose_image(ctx, image, faces_by_image.get(image["image_id"], []), samples)
        except Exception as err:  # noqa: BLE001 - one image's paste-back failing must not stop the shard
            row = {"status": "failed", "error": f"compose failed: {short_error(err)}"}
        row.update(shard=shard, image_id=image["image_id"], source_uri=image["source_uri"])
        row["compose_seconds"] = time.perf_counter() - t0
        outcomes[image["source_uri"]] = row
        image_rows.append(row)
        face_rows.extend({"shard": shard, **r} for r in written)
    return (
        COMPOSE_IMAGES.write(COMPOSE_IMAGES.shard_uri(ctx.work, shard), image_rows),
        COMPOSE_FACES.write(COMPOSE_FACES.shard_uri(ctx.work, shard), face_rows),
    )


@stage_task("compose", retries=3)
def compose(ctx: RunContext, shard: int, samples_uri: str) -> str:
    """Paste back and write the outputs of one shard; returns the compose_images file URI."""
    return compose_shard(ctx, shard, samples_uri)[0]
