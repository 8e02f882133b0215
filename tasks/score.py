"""Stage 7, score: no-reference consistency scores per restored face.

identity_similarity: cosine similarity of dlib face descriptors, input crop vs restored crop, both
upsampled to the evaluation's ID_SIZE first, as `dynface evaluate` measures identity
(`dynface.metrics.identity.identity_similarity_at_id_size`); null when dlib finds no face in either crop
or the metrics module is unavailable (logged with the reason, once per shard). The guidance residual
comes from the sampler (stage 5).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from tasks.tables import DETECT_FACES, SAMPLES, SCORES, by_face
from tasks.work import RunContext, read_png, stage_task

Similarity = Callable[[np.ndarray, np.ndarray], float]
log = logging.getLogger(__name__)


def identity_scorer() -> Similarity | None:
    """The evaluation's identity measure (`identity_similarity_at_id_size`), or None, logged with the
    reason, when it cannot be imported here."""
    try:
        from dynface.metrics.identity import identity_similarity_at_id_size
    except Exception as err:  # noqa: BLE001 - scores are optional; the run records nulls instead
        log.warning("identity_similarity will be null: dlib's identity metric is unavailable (%r)", err)
        return None
    return identity_similarity_at_id_size


def similarity_or_none(scorer: Similarity | None, restored: np.ndarray, original: np.ndarray) -> float | None:
    if scorer is None:
        return None
    value = float(scorer(restored, original))
    return None if math.isnan(value) else value


def score_shard(ctx: RunContext, shard: int, samples_uri: str) -> str:
    """The stage as a plain function; returns the scores file URI (a row per restored face)."""
    samples = by_face(SAMPLES.read(samples_uri))
    faces = DETECT_FACES.read(DETECT_FACES.shard_uri(ctx.work, shard))
    restored = [(f, samples[key]) for f in faces if (key := (f["image_id"], f["face_index"])) in samples]
    restored = [(f, s) for f, s in restored if s["sample_status"] == "ok"]
    scorer = identity_scorer() if restored else None
    rows = [
        {
            "shard": shard,
            "image_id": face["image_id"],
            "face_index": face["face_index"],
            "identity_similarity": similarity_or_none(
                scorer, read_png(sample["restored_uri"]), read_png(face["crop_uri"])
            ),
        }
        for face, sample in restored
    ]
    return SCORES.write(SCORES.shard_uri(ctx.work, shard), rows)


@stage_task("score", retries=1)
def score(ctx: RunContext, shard: int, samples_uri: str) -> str:
    """Identity similarity (input vs restored crop) for every restored face of a shard."""
    return score_shard(ctx, shard, samples_uri)
