"""Stage 3, estimate_std: each face's `FacePlan` (std*, guidance levels, start step, η, seed).

Only the pack's SE network and DSST table are loaded here (`dynface.restorer.load_planner`): no
prior, no RM, so the driver holds no 160 M-parameter prior beside the sampling actors. The plans
decide the bucket a face is sampled in (stage 4) and the sampler samples from them as they are
(stage 5): SE and DSST run exactly once per face.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from dynface.core.plan import FacePlan, FacePlanner
from dynface.restorer import load_planner, plan_faces
from tasks.tables import BUCKET_WIDTH, DETECT_FACES, PLANS
from tasks.work import RunContext, chunks, read_png, stage_task

# This process's planners by (pack files, overrides): a run plans many shards with one planner.
_PLANNERS: dict[str, tuple[FacePlanner, torch.device]] = {}


def planner_for(ctx: RunContext) -> tuple[FacePlanner, torch.device]:
    """The run's FacePlanner and its device in this process, loaded once."""
    key = json.dumps([ctx.pack.files(), ctx.overrides, ctx.device], sort_keys=True, default=list)
    if key not in _PLANNERS:
        if len(_PLANNERS) >= 2:
            _PLANNERS.pop(next(iter(_PLANNERS)))
        _PLANNERS[key] = load_planner(ctx.pack, overrides=ctx.overrides, device=ctx.device)
    return _PLANNERS[key]


def plan_row(shard: int, face: dict[str, Any], plan: FacePlan) -> dict[str, Any]:
    return {
        "shard": shard,
        "image_id": face["image_id"],
        "face_index": face["face_index"],
        **plan.to_row(),
        "bucket": plan.t_start // BUCKET_WIDTH,
    }


def estimate_shard(ctx: RunContext, shard: int) -> str:
    """The stage as a plain function; returns the plans file's URI."""
    faces = DETECT_FACES.read(DETECT_FACES.shard_uri(ctx.work, shard))
    rows: list[dict[str, Any]] = []
    if faces:
        planner, device = planner_for(ctx)
        for group in chunks(faces, ctx.batch_size):
            crops = [read_png(face["crop_uri"]) for face in group]
            plans = plan_faces(planner, crops, device=device, batch_size=len(crops))
            rows.extend(plan_row(shard, face, plan) for face, plan in zip(group, plans, strict=True))
    return PLANS.write(PLANS.shard_uri(ctx.work, shard), rows)


@stage_task("estimate_std", retries=1)
def estimate_std(ctx: RunContext, shard: int) -> str:
    """A FacePlan for every face of a shard; returns the plans file's URI."""
    return estimate_shard(ctx, shard)
