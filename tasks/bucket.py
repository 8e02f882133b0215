"""Stage 4, bucket: order a wave's faces (across shards) by start step and cut them into sample batches.

Faces are sorted by t_start (longest first) and cut into full batches of `batch_size`, so a batch
holds neighbouring start steps (usually one DSST bucket, t_start // BUCKET_WIDTH) and only the last
batch of a wave is partial. The sampler runs only a batch's active rows at each step, so mixing
starts costs nothing but a smaller effective batch for a few steps, whereas one batch list per bucket
left a partial batch in every bucket.
"""

from __future__ import annotations

from typing import Any

from dynface.core.plan import PLAN_COLUMNS
from tasks.tables import BATCHES, DETECT_FACES, PLANS, by_face
from tasks.work import RunContext, chunks, stage_task


def plan_batches(faces: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Faces (dicts with t_start, image_id, face_index) -> batches of `batch_size`, longest start first.

    Deterministic: ties are broken by (image_id, face_index)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ordered = sorted(faces, key=lambda f: (-int(f["t_start"]), f["image_id"], f["face_index"]))
    return chunks(ordered, batch_size)


def bucket_wave(ctx: RunContext, wave: int, shards: list[int]) -> list[str]:
    """The stage as a plain function; returns the batch manifest URIs of the wave."""
    plans = PLANS.read_shards(ctx.work, shards)
    crops = by_face(DETECT_FACES.read_shards(ctx.work, shards))
    uris = []
    for number, batch in enumerate(plan_batches(plans, ctx.batch_size)):
        rows = [
            {
                "batch": number,
                "shard": plan["shard"],
                "image_id": plan["image_id"],
                "face_index": plan["face_index"],
                "crop_uri": crops[(plan["image_id"], plan["face_index"])]["crop_uri"],
                "restored_uri": ctx.work.restored(plan["image_id"], plan["face_index"]),
                **{key: plan[key] for key in PLAN_COLUMNS},  # the sampler's input, as estimated
            }
            for plan in batch
        ]
        uris.append(BATCHES.write(BATCHES.wave_uri(ctx.work, wave, number), rows))
    return uris


@stage_task("bucket", retries=2)
def bucket(ctx: RunContext, wave: int, shards: list[int]) -> list[str]:
    """Group the faces of `shards` into sample batches; returns batch manifest URIs."""
    return bucket_wave(ctx, wave, shards)
