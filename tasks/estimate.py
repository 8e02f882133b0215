"""Stage 3, estimate_std: SE + DSST on a shard's crops: std*, t_start and η per face.

These numbers decide the bucket a face is sampled in (stage 4), and the sampler reuses std* from
here (it runs RM and the diffusion, not SE again), so the bucket and the catalog agree exactly.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from dynface.core.device import resolve_device
from dynface.restorer import FaceEstimate, Restorer
from tasks.work import BUCKET_WIDTH, RunContext, chunks, read_png, read_rows, write_rows

ESTIMATE_COLUMNS = (
    "shard",
    "image_id",
    "face_index",
    "crop_uri",
    "std_hat",
    "std_hat_512",
    "t_start",
    "eta",
    "levels",
    "bucket",
)


@functools.lru_cache(maxsize=2)
def _cached_restorer(pack: str, overrides_json: str, device: str) -> Restorer:
    return Restorer.from_pack(pack, overrides=json.loads(overrides_json), device=device)


def restorer_for(ctx: RunContext) -> Restorer:
    """The run's Restorer in this process, loaded once (the estimate stage runs once per shard)."""
    device = str(resolve_device(ctx.device))
    return _cached_restorer(ctx.pack, json.dumps(ctx.overrides, sort_keys=True), device)


def estimate_faces(restorer: Restorer, crops: list[np.ndarray]) -> list[FaceEstimate]:
    """SE + DSST lookup on aligned (S, S, 3) uint8 crops at the pack's resolution."""
    res = restorer.resolution
    for crop in crops:
        if crop.shape != (res, res, 3):
            raise ValueError(f"crops must be ({res}, {res}, 3), got {crop.shape}")
    return restorer.estimate(crops)


def estimate_shard(ctx: RunContext, shard: int) -> str:
    """The stage as a plain function; returns the estimate file's URI."""
    faces = read_rows(ctx.work.shard_file("detect", shard, "-faces"))
    restorer = restorer_for(ctx) if faces else None
    rows: list[dict[str, Any]] = []
    for group in chunks(faces, ctx.batch_size) if faces else []:
        assert restorer is not None
        estimates = estimate_faces(restorer, [read_png(face["crop_uri"]) for face in group])
        for face, est in zip(group, estimates, strict=True):
            rows.append(
                {
                    "shard": shard,
                    "image_id": face["image_id"],
                    "face_index": face["face_index"],
                    "crop_uri": face["crop_uri"],
                    "std_hat": est.std_hat,
                    "std_hat_512": est.std_hat_512,
                    "t_start": est.t_start,
                    "eta": est.eta,
                    "levels": list(est.levels),
                    "bucket": est.t_start // BUCKET_WIDTH,
                }
            )
    return write_rows(ctx.work.shard_file("estimate", shard), rows, columns=ESTIMATE_COLUMNS)


@task(name="estimate_std", retries=1, retry_delay_seconds=[5], cache_policy=NO_CACHE)
def estimate_std(ctx: RunContext, shard: int) -> str:
    """std*, t_start and η for every face of a shard; returns the estimate file's URI."""
    return estimate_shard(ctx, shard)
