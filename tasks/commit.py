"""Stage 8, commit: catalog rows for a shard, after its outputs exist (the run's rows: tasks/runs.py);
and, when a run ends, the compaction of the tables it wrote.

A shard's commit is two Delta appends, faces first and images last: the images row is the commit
marker, the only thing a resume trusts (`Catalog.committed_image_ids`), so a crash between the two
leaves faces rows that nothing counts as done. A retried commit first looks for this run's rows of
the shard and does not write them twice. Units: std values in the catalog are pixels at 512 px.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.dataset as ds

from catalogs import Catalog, compact
from catalogs.maintenance import Compacted
from dynface.core.dblm import to_reference_std
from tasks.tables import (
    COMPOSE_FACES,
    COMPOSE_IMAGES,
    DETECT_FACES,
    DETECT_IMAGES,
    PLANS,
    SAMPLES,
    SCORES,
    by_face,
    failed_sample_row,
)
from tasks.work import RunContext, stage_task

IMAGE_DETECT_KEYS = ("image_id", "source_uri", "relative_path", "bytes", "width", "height", "orientation")
IMAGE_DETECT_KEYS += ("mode", "is_grayscale", "n_faces")
FACE_DETECT_KEYS = ("image_id", "face_index", "bbox", "landmarks", "det_score", "affine", "is_grayscale")


def to_catalog_std(std_px: float | None, resolution: int) -> float | None:
    """Pixels at the pack's resolution -> the catalog's unit, pixels at 512 (the one conversion)."""
    return None if std_px is None else float(to_reference_std(float(std_px), resolution))


def image_record(
    ctx: RunContext, detected: dict[str, Any], composed: dict[str, Any] | None
) -> dict[str, Any]:
    """The catalog row of an image: what detect found, and the compose outcome when it was composed."""
    out = {key: detected[key] for key in IMAGE_DETECT_KEYS}
    seconds = float(detected["detect_seconds"] or 0.0)
    if composed is None:
        out.update(status=detected["detect_status"], error=detected["detect_error"])
    else:
        keys = ("status", "error", "output_uri", "compare_uri", "duplicate_of")
        out.update({key: composed[key] for key in keys})
        seconds += float(composed["compose_seconds"] or 0.0)
    out.update(seconds=seconds, run_id=ctx.run_id, config_hash=ctx.config_hash)
    return out


def face_record(
    ctx: RunContext,
    detected: dict[str, Any],
    plan: dict[str, Any] | None,
    sampled: dict[str, Any],
    composed: dict[str, Any] | None,
    scored: dict[str, Any] | None,
) -> dict[str, Any]:
    """The catalog row of a face: the joined stage rows, stds converted to 512-px units."""
    res = ctx.resolution
    out = {key: detected[key] for key in FACE_DETECT_KEYS}
    ok = sampled["sample_status"] == "ok"
    out.update(status=sampled["sample_status"], error=sampled["sample_error"])
    if plan is not None:
        levels = [s for s, valid in zip(plan["level_stds_px"], plan["level_valid"], strict=True) if valid]
        out.update(
            std_hat=to_catalog_std(plan["std_hat_px"], res),
            std_source=plan["std_source"],
            t_start=plan["t_start"],
            bucket=plan["bucket"],
            eta=plan["eta"],
            guidance_levels=[to_catalog_std(s, res) for s in levels],
        )
    if ok:
        finals = sampled["std_final_px"] or []
        out.update(
            std_final=to_catalog_std(finals[0], res) if finals else None,
            n_steps=sampled["n_steps"],
            guidance_residual=sampled["guidance_residual"],
            seconds=sampled["sample_seconds"],
            output_uri=composed["output_uri"] if composed else None,
            identity_similarity=scored["identity_similarity"] if scored else None,
        )
    out.update(run_id=ctx.run_id, config_hash=ctx.config_hash)
    return out


def catalog_rows(ctx: RunContext, shard: int, samples_uri: str) -> tuple[list[dict], list[dict]]:
    """(images rows, faces rows) of a shard: the one join of every stage's work table."""
    work = ctx.work
    composed_images = {r["source_uri"]: r for r in COMPOSE_IMAGES.read(COMPOSE_IMAGES.shard_uri(work, shard))}
    images = [
        image_record(ctx, r, composed_images.get(r["source_uri"]))
        for r in DETECT_IMAGES.read(DETECT_IMAGES.shard_uri(work, shard))
    ]
    plans = by_face(PLANS.read(PLANS.shard_uri(work, shard)))
    samples = by_face(SAMPLES.read(samples_uri))
    composed = by_face(COMPOSE_FACES.read(COMPOSE_FACES.shard_uri(work, shard)))
    scores = by_face(SCORES.read(SCORES.shard_uri(work, shard)))
    faces = []
    for r in DETECT_FACES.read(DETECT_FACES.shard_uri(work, shard)):
        key = (r["image_id"], int(r["face_index"]))
        sampled = samples.get(key) or failed_sample_row(*key, "no sampling result for this face")
        faces.append(face_record(ctx, r, plans.get(key), sampled, composed.get(key), scores.get(key)))
    return images, faces


def _already_written(cat: Catalog, table: str, run_id: str, image_ids: set[str]) -> bool:
    got = cat.read_arrow(
        table, run_id=run_id, columns=["image_id"], filters=ds.field("image_id").isin(list(image_ids))
    )
    return got.num_rows > 0


def commit_shard_rows(ctx: RunContext, shard: int, samples_uri: str) -> dict[str, int]:
    """The stage as a plain function; returns {status: count} of the shard's images."""
    images, faces = catalog_rows(ctx, shard, samples_uri)
    cat = Catalog(ctx.catalog)
    for table, rows in (("faces", faces), ("images", images)):  # the images append is the marker
        ids = {r["image_id"] for r in rows}
        if rows and not _already_written(cat, table, ctx.run_id, ids):
            cat.write_part(table, rows, run_id=ctx.run_id)
    return dict(Counter(r["status"] for r in images))


@stage_task("commit", retries=3)
def commit(ctx: RunContext, shard: int, samples_uri: str) -> dict[str, int]:
    """Append the shard's faces and images rows to the catalog; returns {status: count}."""
    return commit_shard_rows(ctx, shard, samples_uri)


RUN_TABLES = ("runs", "images", "faces")


@stage_task("compact_tables", retries=2)
def compact_tables(catalog: str) -> list[Compacted]:
    """Merge the small files of the tables a run writes (safe while other runs append)."""
    return compact(Catalog(catalog), RUN_TABLES)
