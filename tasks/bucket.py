"""Stage 4, bucket: group a wave's faces (across shards) into sample batches by t_start bucket.

Faces in one batch share a bucket (t_start // BUCKET_WIDTH), so the batch's samples run about the
same number of steps. Within a bucket, faces are ordered by t_start (longest first) and cut into
batches of at most `batch_size`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.work import RunContext, chunks, join_uri, read_rows, write_rows

BATCH_COLUMNS = ("batch", "shard", "image_id", "face_index", "crop_uri", "restored_uri", "bucket", "t_start")


def plan_batches(faces: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Faces (dicts with bucket, t_start, image_id, face_index) -> batches, highest bucket first.

    Deterministic: ties are broken by (image_id, face_index)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    by_bucket: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for face in faces:
        by_bucket[int(face["bucket"])].append(face)
    batches = []
    for bucket in sorted(by_bucket, reverse=True):
        members = sorted(
            by_bucket[bucket], key=lambda f: (-int(f["t_start"]), f["image_id"], f["face_index"])
        )
        batches.extend(chunks(members, batch_size))
    return batches


def bucket_wave(ctx: RunContext, wave: int, shards: list[int]) -> list[str]:
    """The stage as a plain function; returns the batch manifest URIs of the wave."""
    faces = [row for shard in shards for row in read_rows(ctx.work.shard_file("estimate", shard))]
    uris = []
    for number, batch in enumerate(plan_batches(faces, ctx.batch_size)):
        rows = [
            {
                "batch": number,
                "shard": face["shard"],
                "image_id": face["image_id"],
                "face_index": face["face_index"],
                "crop_uri": face["crop_uri"],
                "restored_uri": ctx.work.restored(face["image_id"], face["face_index"]),
                "bucket": face["bucket"],
                "t_start": face["t_start"],
            }
            for face in batch
        ]
        uri = join_uri(ctx.work.root, "batches", f"wave-{wave:04d}-batch-{number:04d}.parquet")
        uris.append(write_rows(uri, rows, columns=BATCH_COLUMNS))
    return uris


@task(name="bucket", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def bucket(ctx: RunContext, wave: int, shards: list[int]) -> list[str]:
    """Group the faces of `shards` into sample batches; returns batch manifest URIs."""
    return bucket_wave(ctx, wave, shards)
