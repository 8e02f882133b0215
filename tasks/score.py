"""Stage 7, score: no-reference consistency scores per restored face.

identity_similarity: cosine similarity of dlib face descriptors, input crop vs restored crop
(`dynface.metrics.identity.identity_similarity`); null when dlib finds no face in either crop or the
metrics module is unavailable. The guidance residual comes from the sampler (stage 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.compose import COMPOSE_FACE_COLUMNS
from tasks.work import RunContext, read_png, read_rows, write_rows

SCORE_FACE_COLUMNS = (*COMPOSE_FACE_COLUMNS, "identity_similarity")

Similarity = Callable[[np.ndarray, np.ndarray], float]


def identity_scorer() -> Similarity | None:
    """`dynface.metrics.identity.identity_similarity`, or None when it cannot be imported here."""
    try:
        from dynface.metrics.identity import identity_similarity
    except Exception:  # noqa: BLE001 - scores are optional; the run records nulls instead
        return None
    return identity_similarity


def similarity_or_none(scorer: Similarity | None, restored: np.ndarray, original: np.ndarray) -> float | None:
    if scorer is None:
        return None
    value = float(scorer(restored, original))
    return None if math.isnan(value) else value


def score_shard(ctx: RunContext, shard: int) -> str:
    """The stage as a plain function; returns the scored faces file URI."""
    faces = read_rows(ctx.work.shard_file("compose", shard, "-faces"))
    scorer = identity_scorer() if faces else None
    rows = []
    for face in faces:
        row = dict(face, identity_similarity=None)
        if face["status"] == "ok" and face["restored_uri"]:
            row["identity_similarity"] = similarity_or_none(
                scorer, read_png(face["restored_uri"]), read_png(face["crop_uri"])
            )
        rows.append(row)
    return write_rows(ctx.work.shard_file("score", shard, "-faces"), rows, columns=SCORE_FACE_COLUMNS)


@task(name="score", retries=1, retry_delay_seconds=[5], cache_policy=NO_CACHE)
def score(ctx: RunContext, shard: int) -> str:
    """Identity similarity (input vs restored crop) for every restored face of a shard."""
    return score_shard(ctx, shard)
