"""Keeping a catalog small and looking back at it: compact, vacuum, history, and the migration from the
hive `run_id=` layout.

- compact: rewrites small data files into files of up to `TARGET_FILE_BYTES` (Delta optimize). It
  changes no row, so it never conflicts with a concurrent append and is safe while runs write.
  Files already at the target size are left alone, so a nightly compaction rewrites at most about
  one target-sized file plus the night's new files.
- vacuum: deletes the data files that compaction replaced more than `retain_hours` ago (nothing
  else removes files: rows are never deleted). Until then `--as-of` can read those older states.
- history: one row per table version, with the run that committed it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd
import pyarrow.compute as pc
from deltalake import CommitProperties

from catalogs.legacy import LegacyCatalog
from catalogs.schemas import TABLE_NAMES, TableName
from catalogs.store import MAX_COMMIT_RETRIES, RUN_ID_KEY, Catalog

TARGET_FILE_BYTES = 128 * 2**20
# Delta's own default retention (7 days); shorter needs saying so, because it breaks --as-of
# for older versions and readers that started before the vacuum.
DEFAULT_RETAIN_HOURS = 168


@dataclass(frozen=True)
class Compacted:
    table: str
    files_removed: int
    files_added: int


def compact(catalog: Catalog, tables: tuple[TableName, ...] = TABLE_NAMES) -> list[Compacted]:
    """Compact each existing table of `tables`; a table with nothing to merge gets no new version."""
    out = []
    for name in tables:
        table = catalog.delta_table(name)
        if table is None:
            continue
        metrics = table.optimize.compact(
            target_size=TARGET_FILE_BYTES,
            commit_properties=CommitProperties(max_commit_retries=MAX_COMMIT_RETRIES),
        )
        out.append(Compacted(name, int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"])))
    return out


def vacuum(catalog: Catalog, retain_hours: int = DEFAULT_RETAIN_HOURS) -> dict[str, list[str]]:
    """Delete files removed from each table more than `retain_hours` ago; {table: deleted files}."""
    if retain_hours < 0:
        raise ValueError(f"retain_hours must be >= 0, got {retain_hours}")
    out = {}
    for name in TABLE_NAMES:
        table = catalog.delta_table(name)
        if table is None:
            continue
        out[name] = table.vacuum(
            retention_hours=retain_hours,
            dry_run=False,
            # delta-rs refuses less than the table's retention unless told; the caller chose it.
            enforce_retention_duration=False,
        )
    return out


def history(catalog: Catalog, limit: int | None = None) -> pd.DataFrame:
    """Every table version, newest first per table: table, version, committed_at, operation, run_id,
    rows_added, files_added, files_removed. `limit`: the latest versions of each table only."""
    rows = []
    for name in TABLE_NAMES:
        table = catalog.delta_table(name)
        if table is None:
            continue
        for entry in table.history(limit):
            metrics = entry.get("operationMetrics") or {}
            rows.append(
                {
                    "table": name,
                    "version": int(entry["version"]),
                    "committed_at": dt.datetime.fromtimestamp(entry["timestamp"] / 1000, dt.UTC),
                    "operation": entry.get("operation"),
                    "run_id": entry.get(RUN_ID_KEY),
                    "rows_added": metrics.get("num_added_rows"),
                    "files_added": metrics.get("num_added_files", metrics.get("numFilesAdded")),
                    "files_removed": metrics.get("num_removed_files", metrics.get("numFilesRemoved")),
                }
            )
    columns = ["table", "version", "committed_at", "operation", "run_id"]
    columns += ["rows_added", "files_added", "files_removed"]
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("rows_added", "files_added", "files_removed"):
        frame[column] = frame[column].astype("Int64")
    return frame


def migrate(old: LegacyCatalog, new: Catalog) -> dict[str, int]:
    """Copy every table of a hive-layout catalog into Delta tables, row for row: one append per run
    and table (so `history` shows the runs), then a compaction. {table: rows copied}.

    `new` must hold no rows yet, so a half-done migration is redone into a fresh URI, never doubled.
    """
    for name in TABLE_NAMES:
        table = new.delta_table(name)
        if table is not None and table.count() > 0:
            raise ValueError(f"{new.uri} already has rows in {name!r}; migrate into an empty catalog")
    copied = {}
    for name in TABLE_NAMES:
        rows = old.dataset(name).to_table()
        copied[name] = rows.num_rows
        if rows.num_rows == 0:
            continue
        run_ids = sorted(set(rows.column("run_id").to_pylist()))
        for run_id in run_ids:
            new.write_part(name, rows.filter(pc.equal(rows.column("run_id"), run_id)), run_id=run_id)
    compact(new)
    return copied
