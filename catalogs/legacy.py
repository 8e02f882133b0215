"""The catalog layout before Delta Lake (hive `run_id=` Parquet folders), kept to read and to measure.

Layout: `{root}/{table}/run_id={run_id}/part-{UTC timestamp}-{uuid}.parquet`, one part per write,
`run_id` in the folder name only. `dynface catalog migrate` reads it (`LegacyCatalog.read_arrow`);
`benchmarks/catalog_scale.py` and the migration tests also write it (`LegacyCatalog.write_part`),
so "today's layout" can be built and compared. Nothing in the pipeline writes it any more.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from catalogs.schemas import (
    PARTITION_COLUMN,
    TABLE_NAMES,
    TableName,
    conform_table,
    empty_table,
    rows_to_table,
    schema_for,
)


@dataclass(frozen=True)
class LegacyCatalog:
    """A hive-layout catalog rooted at `uri`; `storage_options` go to fsspec (s3fs keys, endpoint)."""

    uri: str
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False, hash=False)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.uri, **(self.storage_options or {}))
        return fs, root.rstrip("/")

    def write_part(
        self, table_name: TableName, rows: Sequence[Mapping[str, Any]] | pa.Table, *, run_id: str
    ) -> str:
        """Write one part file of `run_id`'s rows (atomically: temp file + rename, or one PUT)."""
        schema = schema_for(table_name)
        table = conform_table(rows, schema) if isinstance(rows, pa.Table) else rows_to_table(rows, schema)
        if "committed_at" in schema.names:
            column = table.column("committed_at")
            now = pa.scalar(dt.datetime.now(dt.UTC), type=column.type)
            table = table.set_column(
                schema.get_field_index("committed_at"), "committed_at", column.fill_null(now)
            )
        sink = pa.BufferOutputStream()
        pq.write_table(table.drop_columns([PARTITION_COLUMN]), sink, compression="zstd")
        name = f"part-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet"
        fs, root = self.filesystem()
        folder = f"{root}/{table_name}/{PARTITION_COLUMN}={run_id}"
        if isinstance(fs, LocalFileSystem):
            _write_local_atomically(folder, name, sink.getvalue().to_pybytes())
        else:
            fs.pipe_file(f"{folder}/{name}", sink.getvalue().to_pybytes())
        return f"{folder}/{name}"

    def part_paths(self, table_name: TableName) -> list[str]:
        """Sorted `{table}/run_id=*/*.parquet` paths, skipping hidden (`.`, `_`) names."""
        fs, root = self.filesystem()
        base = f"{root}/{table_name}"
        fs.invalidate_cache()
        try:
            found = fs.find(base)
        except FileNotFoundError:
            return []
        keep = []
        for path in found:
            parts = path[len(base) :].strip("/").split("/")
            if len(parts) != 2 or not parts[0].startswith(f"{PARTITION_COLUMN}="):
                continue
            if any(p.startswith((".", "_")) for p in parts) or not parts[1].endswith(".parquet"):
                continue
            keep.append(path)
        return sorted(keep)

    def dataset(self, table_name: TableName) -> ds.Dataset:
        """A lazy dataset over the table's parts with `run_id` from the folder names."""
        schema = schema_for(table_name)
        paths = self.part_paths(table_name)
        if not paths:
            return ds.dataset(empty_table(schema))
        fs, root = self.filesystem()
        partitioning = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")
        return ds.dataset(
            paths,
            schema=schema,
            format="parquet",
            filesystem=fs,
            partitioning=partitioning,
            partition_base_dir=f"{root}/{table_name}",
        )

    def is_legacy(self) -> bool:
        """Whether any table folder holds `run_id=` partitions."""
        fs, root = self.filesystem()
        fs.invalidate_cache()
        for name in TABLE_NAMES:
            with contextlib.suppress(FileNotFoundError):
                if any(
                    os.path.basename(p.rstrip("/")).startswith(f"{PARTITION_COLUMN}=")
                    for p in fs.ls(f"{root}/{name}", detail=False)
                ):
                    return True
        return False


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
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
