"""Catalog storage: one Delta Lake table per catalog table under one root URI (local, `file://`, `s3://`).

Layout: `{root}/{table}/` is a Delta table (delta-rs): Parquet data files plus a transaction log,
`{root}/{table}/_delta_log/`. A write is one Delta append: the rows become visible all at once when
its log entry (the next version) is created, or not at all; data files of a crashed write are never
referenced, so no reader sees them. Two writers appending at once both succeed: the commit that loses
the race for a version re-reads the log and retries at the next one (appends never conflict).
`run_id` is an ordinary column (no partitioning), so compaction can merge many runs into few files.

Other engines read the tables as they are (DuckDB `delta_scan`, pandas through `deltalake`, Spark,
Trino, Polars); reading the folder as plain Parquet is wrong after a compaction (it would also read
the files the log has removed). The schemas of `catalogs/schemas.py` are the contract: every write is
validated against them and every read is shaped to them, so a table written before a nullable column
was added reads with that column null, and a newer table's unknown columns are left out.
S3 settings: see `catalogs.location`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from catalogs.location import check_supported, delta_storage_options, local_path
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
# A commit that loses a race re-reads the log and tries the next version; many concurrent shard
# commits of several runs may each lose a few times.
MAX_COMMIT_RETRIES = 100
RUN_ID_KEY = "dynface.run_id"  # commit metadata: which run made a table version

Filters = ds.Expression | Sequence[Any] | None
AsOf = int | dt.datetime | None


class LegacyLayoutError(RuntimeError):
    """The catalog still has the hive `run_id=` layout; `dynface catalog migrate` converts it."""


@dataclass(frozen=True)
class Catalog:
    """A catalog rooted at `uri`; holds no open handles, so it pickles to Ray/Prefect workers.

    `storage_options` use fsspec/s3fs spelling (`key`, `secret`, `client_kwargs={"endpoint_url": ...}`);
    they are left out of `repr` and equality because they may hold secrets.
    """

    uri: str
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip("/"):
            raise ValueError(f"catalog uri must be a non-empty path or URL, got {self.uri!r}")
        check_supported(self.uri)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the root path on it (no protocol, no trailing slash)."""
        fs, root = fsspec.core.url_to_fs(self.uri, **(self.storage_options or {}))
        return fs, root.rstrip("/")

    def table_uri(self, table_name: TableName) -> str:
        """Where the Delta table lives (a local path or an `s3://` URI)."""
        schema_for(table_name)
        path = local_path(self.uri)
        root = path if path is not None else self.uri
        return f"{root.rstrip('/')}/{table_name}"

    def delta_options(self) -> dict[str, str] | None:
        """delta-rs storage options (explicit credentials on S3; see `catalogs.location`)."""
        return delta_storage_options(self.uri, self.storage_options)

    def delta_table(self, table_name: TableName, as_of: AsOf = None) -> DeltaTable | None:
        """The table at its latest version (or `as_of` a version number or a time: the latest version
        committed then); None when it was never written. A table is created empty (version 0)."""
        uri = self.table_uri(table_name)
        options = self.delta_options()
        try:
            if isinstance(as_of, dt.datetime):
                table = DeltaTable(uri, storage_options=options)
                table.load_as_version(as_of)
                return table
            return DeltaTable(uri, version=as_of, storage_options=options)
        except TableNotFoundError:
            self._refuse_legacy(table_name)
            return None

    def write_part(
        self,
        table_name: TableName,
        rows_or_table: Sequence[Mapping[str, Any]] | pa.Table | pd.DataFrame,
        *,
        run_id: str,
    ) -> str:
        """Validate the rows and append them to the table in one Delta commit; returns the table URI.

        Every row's `run_id` must equal `run_id`. Null `committed_at` values (images) are set to the
        commit time. Empty input raises `ValueError`. A table that does not exist yet is created.
        """
        schema = schema_for(table_name)
        _check_run_id(run_id)
        table = _to_table(rows_or_table, schema)
        if table.num_rows == 0:
            raise ValueError(f"no rows to write to {table_name!r}")
        if set(table.column(PARTITION_COLUMN).to_pylist()) != {run_id}:
            raise ValueError(f"every row's run_id must be {run_id!r}")
        if "committed_at" in schema.names:
            column = table.column("committed_at")
            filled = column.fill_null(pa.scalar(dt.datetime.now(dt.UTC), type=column.type))
            table = table.set_column(
                schema.get_field_index("committed_at"), schema.field("committed_at"), filled
            )
        target = self._open_or_create(table_name)
        write_deltalake(
            target,
            table.cast(_plain(schema)),
            mode="append",
            # A nullable column added to the schema is added to an older table on its first write.
            schema_mode="merge",
            writer_properties=WriterProperties(compression="ZSTD"),
            commit_properties=CommitProperties(
                custom_metadata={RUN_ID_KEY: run_id}, max_commit_retries=MAX_COMMIT_RETRIES
            ),
        )
        return self.table_uri(table_name)

    def dataset(self, table_name: TableName, *, as_of: AsOf = None) -> ds.Dataset:
        """A lazy pyarrow dataset over the table's current files (or those `as_of` an earlier state),
        with exactly the table's schema; an empty in-memory one when the table was never written."""
        schema = schema_for(table_name)
        table = self.delta_table(table_name, as_of)
        if table is None:
            return ds.dataset(empty_table(schema))
        # The files the log names at that version, read by pyarrow itself (locally) or through s3fs:
        # deltalake's own to_pyarrow_dataset reads through a Python filesystem handler, 4x slower
        # on a table of 800 files. Columns the files lack (added to the schema later) read as null;
        # columns the schema does not know are left out.
        uris = table.file_uris()
        if local_path(self.uri) is not None:
            return ds.dataset(uris, schema=schema, format="parquet")
        fs, _ = self.filesystem()
        return ds.dataset(
            [fsspec.core.strip_protocol(u) for u in uris], schema=schema, format="parquet", filesystem=fs
        )

    def read_arrow(
        self,
        table_name: TableName,
        *,
        run_id: str | None = None,
        columns: Sequence[str] | None = None,
        filters: Filters = None,
        as_of: AsOf = None,
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
        if run_id is not None:
            _check_run_id(run_id)
            mine = ds.field(PARTITION_COLUMN) == run_id
            expression = mine if expression is None else mine & expression
        return self.dataset(table_name, as_of=as_of).to_table(columns=columns, filter=expression)

    def read(
        self,
        table_name: TableName,
        *,
        run_id: str | None = None,
        columns: Sequence[str] | None = None,
        filters: Filters = None,
        as_of: AsOf = None,
    ) -> pd.DataFrame:
        """`read_arrow` as a DataFrame: string `run_id`, nullable ints/bools, lists as numpy arrays."""
        table = self.read_arrow(table_name, run_id=run_id, columns=columns, filters=filters, as_of=as_of)
        return table_to_frame(table)

    def committed_image_ids(self, config_hash: str) -> set[str]:
        """Image ids with an `ok` or `no_face` row under `config_hash`: what a re-run skips.

        The images row is a shard's commit marker (its faces rows are appended first), so only it is
        trusted. `failed` rows do not count, so a re-run retries failed images; `skipped` rows only
        record that a run passed an image by.
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

    def _open_or_create(self, table_name: TableName) -> DeltaTable:
        """The table at its latest version, created empty first if it does not exist. A commit made
        on it after another writer's is retried at the next version by delta-rs."""
        table = self.delta_table(table_name)
        if table is not None:
            return table
        try:
            DeltaTable.create(
                self.table_uri(table_name),
                schema=_plain(schema_for(table_name)),
                mode="ignore",
                storage_options=self.delta_options(),
                # Losing the race for version 0 must fail, not retry as a second CREATE at version 1.
                commit_properties=CommitProperties(max_commit_retries=0),
            )
        except DeltaError:
            pass  # another writer created it first
        table = self.delta_table(table_name)
        if table is None:
            raise RuntimeError(f"could not create {self.table_uri(table_name)}")
        return table

    def _refuse_legacy(self, table_name: TableName) -> None:
        fs, root = self.filesystem()
        fs.invalidate_cache()
        try:
            names = fs.ls(f"{root}/{table_name}", detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        if any(name.rstrip("/").rsplit("/", 1)[-1].startswith(f"{PARTITION_COLUMN}=") for name in names):
            raise LegacyLayoutError(
                f"{self.uri} has the old run_id= folder layout; convert it with"
                f" `dynface catalog migrate {self.uri} NEW_URI`"
            )


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """pandas view of a catalog table with dtypes that do not depend on the data (see `_PANDAS_TYPES`)."""
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


def _plain(schema: pa.Schema) -> pa.Schema:
    """`schema` without field metadata: the contracts live in catalogs/schemas.py, and keeping the
    docs out of the Delta log means editing one never conflicts with a table written before."""
    return pa.schema([field.remove_metadata() for field in schema])


def _to_table(rows_or_table: Any, schema: pa.Schema) -> pa.Table:
    if isinstance(rows_or_table, pa.Table):
        return conform_table(rows_or_table, schema)
    if isinstance(rows_or_table, pd.DataFrame):
        return conform_table(pa.Table.from_pandas(rows_or_table, preserve_index=False), schema)
    return rows_to_table(rows_or_table, schema)


def _check_run_id(run_id: str) -> None:
    # run_id names runs in commands and commit metadata: keep it to plain characters.
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id {run_id!r} must match {_RUN_ID.pattern}")
