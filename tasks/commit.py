"""Stage 8, commit: catalog rows for a shard (after its outputs exist), then the run's row and artifacts.

A shard's faces part is written before its images part: an `ok` image row is what a resume trusts,
so it goes last. A retried commit first looks for this run's rows of the shard and does not write
them twice. Units: std values in the catalog are pixels at 512 px (resolution-independent).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.dataset as ds
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from catalogs import IMAGE_STATUSES, Catalog
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
from tasks.work import RunContext

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
    for table, rows in (("faces", faces), ("images", images)):
        ids = {r["image_id"] for r in rows}
        if rows and not _already_written(cat, table, ctx.run_id, ids):
            cat.write_part(table, rows, run_id=ctx.run_id)
    return dict(Counter(r["status"] for r in images))


@task(name="commit", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def commit(ctx: RunContext, shard: int, samples_uri: str) -> dict[str, int]:
    """Append the shard's faces and images rows to the catalog; returns {status: count}."""
    return commit_shard_rows(ctx, shard, samples_uri)


# -- the run -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: str
    counts: dict[str, int]
    n_faces: int
    n_faces_failed: int
    n_committed_before: int
    faces_per_second: float
    seconds: float
    stage_seconds: dict[str, float]
    dest: str
    catalog: str
    compare: bool
    std_hat: dict[str, float] = field(default_factory=dict)
    t_start: dict[str, float] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return sum(self.counts.values())


def runs_row(
    ctx: RunContext,
    *,
    started_at: dt.datetime,
    status: str,
    summary: RunSummary | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": ctx.run_id,
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.UTC) if summary is not None or status != "running" else None,
        "source_uri": ctx.source,
        "dest_uri": ctx.dest,
        "catalog_uri": ctx.catalog,
        "pack_name": ctx.pack.name,
        "pack_sha256": json.dumps(ctx.pack.sha256s(), sort_keys=True),
        "pack_files_json": json.dumps(ctx.pack.files(), sort_keys=True),
        "config_json": json.dumps(
            {"restore": ctx.config, "aligned": ctx.aligned, "detector": ctx.detector, "pack": ctx.pack.uri},
            sort_keys=True,
            default=list,
        ),
        "config_hash": ctx.config_hash,
        "code_version": ctx.code_version,
        "status": status,
        "host": socket.gethostname(),
    }
    if summary is not None:
        row.update(
            n_images=summary.n_images,
            n_ok=summary.counts.get("ok", 0),
            n_no_face=summary.counts.get("no_face", 0),
            n_failed=summary.counts.get("failed", 0),
            n_skipped=summary.counts.get("skipped", 0),
            n_faces=summary.n_faces,
            faces_per_second=summary.faces_per_second,
            stage_seconds_json=json.dumps(summary.stage_seconds, sort_keys=True),
        )
    return row


def write_run_row(
    ctx: RunContext, *, started_at: dt.datetime, status: str, summary: RunSummary | None = None
) -> str:
    return Catalog(ctx.catalog).write_part(
        "runs", [runs_row(ctx, started_at=started_at, status=status, summary=summary)], run_id=ctx.run_id
    )


def _distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    q = [float(v) for v in np.percentile(arr, [0, 25, 50, 75, 100])]
    return {"min": q[0], "p25": q[1], "median": q[2], "p75": q[3], "max": q[4], "mean": float(arr.mean())}


def summarize(
    ctx: RunContext,
    *,
    seconds: float,
    stage_seconds: dict[str, float],
    n_committed_before: int,
    status: str = "completed",
) -> RunSummary:
    """Counts and distributions of this run's committed rows."""
    cat = Catalog(ctx.catalog)
    images = cat.read_arrow("images", run_id=ctx.run_id, columns=["status"]).column("status").to_pylist()
    faces = cat.read_arrow("faces", run_id=ctx.run_id, columns=["status", "std_hat", "t_start"]).to_pylist()
    counts = {s: n for s, n in Counter(images).items()}
    restored = [f for f in faces if f["status"] == "ok"]
    return RunSummary(
        run_id=ctx.run_id,
        status=status,
        counts={s: counts.get(s, 0) for s in IMAGE_STATUSES},
        n_faces=len(restored),
        n_faces_failed=len(faces) - len(restored),
        n_committed_before=n_committed_before,
        faces_per_second=len(restored) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
        dest=ctx.dest,
        catalog=ctx.catalog,
        compare=ctx.compare,
        std_hat=_distribution([f["std_hat"] for f in restored if f["std_hat"] is not None]),
        t_start=_distribution([f["t_start"] for f in restored if f["t_start"] is not None]),
    )


def summary_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Rows {metric, value} for the table artifact and the CLI's closing summary."""
    rows: list[dict[str, Any]] = [{"metric": f"images {s}", "value": n} for s, n in summary.counts.items()]
    rows += [
        {"metric": "images already committed (not reprocessed)", "value": summary.n_committed_before},
        {"metric": "faces restored", "value": summary.n_faces},
        {"metric": "faces failed (kept unrestored)", "value": summary.n_faces_failed},
        {"metric": "faces per second", "value": round(summary.faces_per_second, 3)},
        {"metric": "run seconds", "value": round(summary.seconds, 2)},
    ]
    rows += [{"metric": f"seconds {k}", "value": v} for k, v in summary.stage_seconds.items()]
    rows += [{"metric": f"std* (px at 512) {k}", "value": round(v, 3)} for k, v in summary.std_hat.items()]
    rows += [{"metric": f"t_start {k}", "value": round(v, 1)} for k, v in summary.t_start.items()]
    return rows


def outputs_markdown(summary: RunSummary) -> str:
    lines = [
        f"# restore-archive run `{summary.run_id}`",
        "",
        f"- restored images: `{summary.dest}/restored/`",
        f"- restored aligned faces: `{summary.dest}/faces/{{image_id}}_{{k:02d}}.png`",
    ]
    if summary.compare:
        lines.append(f"- side-by-sides (input | output): `{summary.dest}/compare/`")
    lines += [
        f"- catalog: `{summary.catalog}` (tables runs, images, faces)",
        "",
        f'Look back with: `dynface catalog sql {summary.catalog} "SELECT status, COUNT(*) FROM images '
        f"WHERE run_id = '{summary.run_id}' GROUP BY status\"`",
    ]
    return "\n".join(lines)


@task(name="finalize", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def finalize(
    ctx: RunContext,
    started_at: dt.datetime,
    seconds: float,
    stage_seconds: dict[str, float],
    n_committed_before: int,
) -> RunSummary:
    """Write the run's final runs row, then the summary table and outputs markdown artifacts."""
    summary = summarize(
        ctx, seconds=seconds, stage_seconds=stage_seconds, n_committed_before=n_committed_before
    )
    write_run_row(ctx, started_at=started_at, status="completed", summary=summary)
    create_table_artifact(
        summary_table(summary), key="restore-archive-summary", description=f"run {ctx.run_id}"
    )
    create_markdown_artifact(
        outputs_markdown(summary), key="restore-archive-outputs", description=f"run {ctx.run_id}"
    )
    return summary
