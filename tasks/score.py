"""Stage 7, score: no-reference consistency scores per restored face.

identity_similarity: cosine similarity of dlib face descriptors, input crop vs restored crop, both
upsampled to the evaluation's ID_SIZE first, as `dynface evaluate` measures identity
(`dynface.metrics.identity.identity_similarity_at_id_size`); null when dlib finds no face in either crop
or the metrics module is unavailable (logged with the reason, once per shard). The guidance residual
comes from the sampler (stage 5).

dlib's descriptors cost ~0.3 s per face on one CPU core: done by the driver alone, they would cap a GPU
cluster's throughput at a few faces per second. When Ray is running, a shard's faces are scored by
Ray tasks on the CPUs the sampling actors leave free anywhere in the cluster (`spread_chunks`); with
none free, or without Ray, the driver scores them itself. The values are the same either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from tasks.tables import DETECT_FACES, SAMPLES, SCORES, by_face
from tasks.work import RunContext, chunks, read_png, stage_task

Similarity = Callable[[np.ndarray, np.ndarray], float]
log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
MIN_FACES_PER_TASK = 8  # ~2.5 s of dlib work: a Ray task's start-up and model load stay small beside it


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


def identity_similarities(pairs: Sequence[tuple[str, str]]) -> list[float | None]:
    """identity_similarity for (restored_uri, crop_uri) pairs: in a Ray task, or in the driver."""
    scorer = identity_scorer()
    return [similarity_or_none(scorer, read_png(restored), read_png(crop)) for restored, crop in pairs]


def free_cpus() -> int:
    """Whole CPUs of the running Ray cluster that no actor or task holds now (0 without Ray)."""
    try:
        import ray
    except ImportError:
        return 0
    if not ray.is_initialized():
        return 0
    return int(ray.available_resources().get("CPU", 0.0))


def spread_chunks(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], *, min_chunk: int) -> list[R]:
    """`fn` over `items` in order, as Ray tasks over the cluster's free CPUs when there are at least two
    chunks' worth of items (one chunk per free CPU, at least `min_chunk` items each), else in this
    process. The tasks ask for no CPU of their own: their number is bounded by the CPUs found free, and a
    task waiting for a CPU that long-lived sampling actors hold would wait forever. SPREAD: over the
    nodes, not all on the driver's."""
    tasks = min(free_cpus(), len(items) // min_chunk)
    if tasks < 2:
        return fn(items)
    import ray

    remote = ray.remote(num_cpus=0, max_retries=1, scheduling_strategy="SPREAD")(fn)
    parts = ray.get([remote.remote(part) for part in chunks(items, -(-len(items) // tasks))])
    return [value for part in parts for value in part]


def score_shard(ctx: RunContext, shard: int, samples_uri: str) -> str:
    """The stage as a plain function; returns the scores file URI (a row per restored face)."""
    samples = by_face(SAMPLES.read(samples_uri))
    faces = DETECT_FACES.read(DETECT_FACES.shard_uri(ctx.work, shard))
    restored = [(f, samples[key]) for f in faces if (key := (f["image_id"], f["face_index"])) in samples]
    restored = [(f, s) for f, s in restored if s["sample_status"] == "ok"]
    pairs = [(sample["restored_uri"], face["crop_uri"]) for face, sample in restored]
    # Checked here too, so that a missing metric is logged in the run's own log (and nothing is sent).
    if restored and identity_scorer() is not None:
        values = spread_chunks(identity_similarities, pairs, min_chunk=MIN_FACES_PER_TASK)
    else:
        values = [None] * len(pairs)
    rows = [
        {
            "shard": shard,
            "image_id": face["image_id"],
            "face_index": face["face_index"],
            "identity_similarity": value,
        }
        for (face, _), value in zip(restored, values, strict=True)
    ]
    return SCORES.write(SCORES.shard_uri(ctx.work, shard), rows)


@stage_task("score", retries=1)
def score(ctx: RunContext, shard: int, samples_uri: str) -> str:
    """Identity similarity (input vs restored crop) for every restored face of a shard."""
    return score_shard(ctx, shard, samples_uri)
