"""Catalog storage: append-only Parquet part files under one root URI (local, `file://`, `s3://`, `memory://`).

Layout: `{root}/{table}/run_id={run_id}/part-{UTC timestamp}-{uuid}.parquet`. Parts are never
rewritten; a write publishes one whole part or nothing:
- local filesystems: bytes go to a hidden `.tmp-...` file in the target folder, are fsynced, then
  `os.replace`d onto the final name (atomic within one filesystem);
- object stores (s3, memory, ...): one `pipe_file` call, i.e. a single PUT (or a multipart upload,
  which is also invisible until it completes).
Readers only look at `run_id=*/*.parquet` and skip any name starting with "." or "_", so temp files
left by a crash are never read.

`run_id` is a hive partition: it lives in the folder name, not inside the files, so other tools read
the folders directly: `pd.read_parquet("{root}/images")` (run_id comes back as a category there; our
readers return strings) or DuckDB's `read_parquet('{root}/images/*/part-*.parquet', hive_partitioning=true)`
(the `part-*` glob also skips temp files).
S3 settings come from `storage_options` or, when none are given, from the standard AWS environment
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, keys, profiles) as botocore reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from catalogs.schemas import (
    COMMITTED_STATUSES,
    PARTITION_COLUMN,
    TableName,
    conform_table,
    empty_table,
    rows_to_table,
    schema_for,
)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Nullable pandas dtypes so a column's dtype does not depend on whether a null happens to be present.
_PANDAS_TYPES = {
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}

Filters = ds.Expression | Sequence[Any] | None


@dataclass(frozen=True)
class Catalog:
    """A catalog rooted at `uri`; holds no open handles, so it pickles to Ray/Prefect workers.

    `storage_options` go to fsspec (for s3fs e.g. `key`, `secret`, `client_kwargs={"endpoint_url": ...}`);
    they are left out of `repr` and equality because they may hold secrets.
    """

    uri: str
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip("/"):
            raise ValueError(f"catalog uri must be a non-empty path or URL, got {self.uri!r}")

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the root path on it (no protocol, no trailing slash)."""
        fs, root = fsspec.core.url_to_fs(self.uri, **(self.storage_options or {}))
        return fs, root.rstrip("/")

    def write_part(
        self,
        table_name: TableName,
        rows_or_table: Sequence[Mapping[str, Any]] | pa.Table | pd.DataFrame,
        *,
        run_id: str,
    ) -> str:
        """Validate the rows, write them as one new part file atomically and return its URI.

        Every row's `run_id` must equal `run_id`. Null `committed_at` values (images) are set to the
        commit time, which is also the timestamp in the part's name. Empty input raises `ValueError`.
        """
        schema = schema_for(table_name)
        _check_run_id(run_id)
        table = _to_table(rows_or_table, schema)
        if table.num_rows == 0:
            raise ValueError(f"no rows to write to {table_name!r}")
        if set(table.column(PARTITION_COLUMN).to_pylist()) != {run_id}:
            raise ValueError(f"every row's run_id must be {run_id!r}")
        now = dt.datetime.now(dt.UTC)
        if "committed_at" in schema.names:
            column = table.column("committed_at")
            filled = column.fill_null(pa.scalar(now, type=column.type))
            table = table.set_column(
                schema.get_field_index("committed_at"), schema.field("committed_at"), filled
            )
        sink = pa.BufferOutputStream()
        pq.write_table(table.drop_columns([PARTITION_COLUMN]), sink, compression="zstd")
        data = sink.getvalue().to_pybytes()

        name = f"part-{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet"
        relative = f"{table_name}/{PARTITION_COLUMN}={run_id}/{name}"
        fs, root = self.filesystem()
        if isinstance(fs, LocalFileSystem):
            _write_local_atomically(f"{root}/{table_name}/{PARTITION_COLUMN}={run_id}", name, data)
        else:
            fs.pipe_file(f"{root}/{relative}", data)
        return f"{self.uri.rstrip('/')}/{relative}"

    def dataset(self, table_name: TableName, *, run_id: str | None = None) -> ds.Dataset:
        """A lazy pyarrow dataset over the committed parts (an empty in-memory one when there are none)."""
        schema = schema_for(table_name)
        fs, root = self.filesystem()
        base = f"{root}/{table_name}"
        if run_id is not None:
            _check_run_id(run_id)
        paths = _part_paths(fs, base, run_id)
        if not paths:
            return ds.dataset(empty_table(schema))
        partitioning = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")
        return ds.dataset(
            paths,
            schema=schema,
            format="parquet",
            filesystem=fs,
            partitioning=partitioning,
            partition_base_dir=base,
        )

    def read_arrow(
        self,
        table_name: TableName,
        *,
        run_id: str | None = None,
        columns: Sequence[str] | None = None,
        filters: Filters = None,
    ) -> pa.Table:
        """Committed rows of `table_name`, optionally one run's, selected `columns` and row `filters`.

        `filters` is a pyarrow expression or pyarrow/pandas-style tuples, e.g. `[("status", "==", "ok")]`.
        """
        schema = schema_for(table_name)
        if columns is not None:
            unknown = sorted(set(columns) - set(schema.names))
            if unknown:
                raise ValueError(f"unknown columns {unknown} for table {table_name!r}")
            columns = list(columns)
        expression = pq.filters_to_expression(filters) if isinstance(filters, Sequence) else filters
        return self.dataset(table_name, run_id=run_id).to_table(columns=columns, filter=expression)

    def read(
        self,
        table_name: TableName,
        *,
        run_id: str | None = None,
        columns: Sequence[str] | None = None,
        filters: Filters = None,
    ) -> pd.DataFrame:
        """`read_arrow` as a DataFrame: string `run_id`, nullable ints/bools, lists as numpy arrays."""
        return table_to_frame(self.read_arrow(table_name, run_id=run_id, columns=columns, filters=filters))

    def committed_image_ids(self, config_hash: str) -> set[str]:
        """Image ids with an `ok` or `no_face` row under `config_hash`: what a re-run skips.

        `failed` rows do not count, so a re-run retries failed images; `skipped` rows only record that
        a run passed an image by.
        """
        expression = (ds.field("config_hash") == config_hash) & ds.field("status").isin(COMMITTED_STATUSES)
        table = self.read_arrow("images", columns=["image_id"], filters=expression)
        return set(table.column("image_id").to_pylist())

    def latest_images(self, config_hash: str | None = None, *, include_skipped: bool = False) -> pd.DataFrame:
        """One row per (image_id, config_hash): the row with the latest `committed_at`.

        `skipped` rows are left out unless `include_skipped`, so a resumed run that skipped an image
        does not hide the row of the run that processed it. Sorted by image_id, config_hash.
        """
        expression = None if config_hash is None else ds.field("config_hash") == config_hash
        if not include_skipped:
            not_skipped = ds.field("status") != "skipped"
            expression = not_skipped if expression is None else expression & not_skipped
        frame = self.read("images", filters=expression)
        keys = ["image_id", "config_hash"]
        frame = frame.sort_values("committed_at", kind="stable", na_position="first")
        frame = frame.drop_duplicates(keys, keep="last").sort_values(keys, kind="stable")
        return frame.reset_index(drop=True)


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """pandas view of a catalog table with dtypes that do not depend on the data (see `_PANDAS_TYPES`)."""
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


def _to_table(rows_or_table: Any, schema: pa.Schema) -> pa.Table:
    if isinstance(rows_or_table, pa.Table):
        return conform_table(rows_or_table, schema)
    if isinstance(rows_or_table, pd.DataFrame):
        return conform_table(pa.Table.from_pandas(rows_or_table, preserve_index=False), schema)
    return rows_to_table(rows_or_table, schema)


def _check_run_id(run_id: str) -> None:
    # run_id becomes a folder name: keep it to characters every store and hive reader treats literally.
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id {run_id!r} must match {_RUN_ID.pattern}")


def _part_paths(fs: fsspec.AbstractFileSystem, base: str, run_id: str | None) -> list[str]:
    """Sorted `{base}/run_id=*/*.parquet` paths, skipping names that start with "." or "_"."""
    folder = base if run_id is None else f"{base}/{PARTITION_COLUMN}={run_id}"
    # Another process may have committed since this (cached) filesystem last listed the folder.
    fs.invalidate_cache()
    try:
        found = fs.find(folder)
    except FileNotFoundError:
        return []
    keep = []
    for path in found:
        parts = path[len(base) :].strip("/").split("/")
        if len(parts) != 2 or not parts[0].startswith(f"{PARTITION_COLUMN}="):
            continue
        if run_id is not None and parts[0] != f"{PARTITION_COLUMN}={run_id}":
            continue  # a prefix listing may also match run_id=<run_id>... siblings
        if any(part.startswith((".", "_")) for part in parts) or not parts[1].endswith(".parquet"):
            continue
        keep.append(path)
    return sorted(keep)


def _write_local_atomically(folder: str, name: str, data: bytes) -> None:
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".tmp-{name}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, os.path.join(folder, name))
    except BaseException:
        # Best effort: a temp file that survives (hard crash) is hidden from readers anyway.
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    # Persist the rename itself; not every platform can open a folder, and that is not an error.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
