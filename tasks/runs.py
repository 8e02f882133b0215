"""The run's own rows and summary: a `running` row when it starts, exactly one closing row when it ends
(`completed`, `failed` or `cancelled`; `abandoned` written by a later run for one that was killed), then
the summary table and outputs note as Prefect artifacts.

Closing is idempotent: a retried `finalize`, or a failure after a closing row was written, never adds a
second closing row for a run.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from catalogs import IMAGE_STATUSES, Catalog
from tasks.work import RunContext, join_uri, remove_tree, stage_task


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
    error: str | None = None,
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
        "error": error,
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
    ctx: RunContext,
    *,
    started_at: dt.datetime,
    status: str,
    summary: RunSummary | None = None,
    error: str | None = None,
) -> str:
    row = runs_row(ctx, started_at=started_at, status=status, summary=summary, error=error)
    return Catalog(ctx.catalog).write_part("runs", [row], run_id=ctx.run_id)


def closing_row(catalog: str, run_id: str) -> dict[str, Any] | None:
    """The run's closing row (any status but `running`), or None while it has none."""
    rows = Catalog(catalog).read_arrow("runs", run_id=run_id, columns=["status", "error"]).to_pylist()
    closed = [r for r in rows if r["status"] != "running"]
    return closed[0] if closed else None


def close_run(
    ctx: RunContext,
    *,
    started_at: dt.datetime,
    status: str,
    summary: RunSummary | None = None,
    error: str | None = None,
) -> bool:
    """Write the run's closing row unless it has one already; returns whether this call wrote it."""
    if status == "running":
        raise ValueError("a closing row needs a final status")
    if closing_row(ctx.catalog, ctx.run_id) is not None:
        return False
    write_run_row(ctx, started_at=started_at, status=status, summary=summary, error=error)
    return True


def close_abandoned_runs(ctx: RunContext) -> list[str]:
    """Close every other run of the catalog that has a `running` row and no closing row as `abandoned`,
    and remove its work folder; returns their run ids.

    Only a run holding the catalog's lease calls this: no other run can then be alive, so a run that never
    wrote its closing row was killed (kill -9, power loss) and will never write one.
    """
    cat = Catalog(ctx.catalog)
    rows = cat.read_arrow("runs").to_pylist()
    closed = {r["run_id"] for r in rows if r["status"] != "running"}
    abandoned = [r for r in rows if r["status"] == "running" and r["run_id"] not in closed | {ctx.run_id}]
    for row in abandoned:
        closing = dict(
            row,
            status="abandoned",
            finished_at=dt.datetime.now(dt.UTC),
            error=f"stopped without closing (killed?); found by run {ctx.run_id}",
        )
        cat.write_part("runs", [closing], run_id=row["run_id"])
        if row["dest_uri"]:
            remove_tree(join_uri(row["dest_uri"], ".work", row["run_id"]))
    return [r["run_id"] for r in abandoned]


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


@stage_task("finalize", retries=3)
def finalize(
    ctx: RunContext,
    started_at: dt.datetime,
    seconds: float,
    stage_seconds: dict[str, float],
    n_committed_before: int,
    status: str = "completed",
) -> RunSummary:
    """Write the run's closing row (once, however often retried), then the summary table and outputs
    markdown artifacts. `status`: completed, or cancelled when the user stopped the run."""
    summary = summarize(
        ctx,
        seconds=seconds,
        stage_seconds=stage_seconds,
        n_committed_before=n_committed_before,
        status=status,
    )
    close_run(ctx, started_at=started_at, status=status, summary=summary)
    create_table_artifact(
        summary_table(summary), key="restore-archive-summary", description=f"run {ctx.run_id}"
    )
    create_markdown_artifact(
        outputs_markdown(summary), key="restore-archive-outputs", description=f"run {ctx.run_id}"
    )
    return summary
