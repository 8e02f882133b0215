"""Catalogs (runs, images, faces, reviews, publications) as Delta Lake tables: schemas, writers, readers,
SQL and maintenance.

Typical use: `cat = Catalog("s3://bucket/catalog")` (or a local path, `file://`), then
`cat.write_part("images", rows, run_id=run_id)` after the outputs exist (one Delta append),
`cat.committed_image_ids(h)` to resume, `sql(cat, "SELECT status, COUNT(*) FROM images GROUP BY status")`
to look back, and `compact(cat)` / `vacuum(cat, hours)` to keep the tables small.
"""

from __future__ import annotations

from catalogs.legacy import LegacyCatalog
from catalogs.location import NoS3Credentials
from catalogs.maintenance import compact, history, migrate, vacuum
from catalogs.query import connect, format_table, sql
from catalogs.schemas import (
    COMMITTED_STATUSES,
    FACES_SCHEMA,
    IMAGE_STATUSES,
    IMAGES_SCHEMA,
    PUBLICATIONS_SCHEMA,
    REVIEW_DECISIONS,
    REVIEWS_SCHEMA,
    RUNS_SCHEMA,
    TABLE_NAMES,
    TABLE_SCHEMAS,
    TableName,
    conform_table,
    empty_table,
    rows_to_table,
    schema_for,
)
from catalogs.store import Catalog, LegacyLayoutError, table_to_frame

__all__ = [
    "COMMITTED_STATUSES",
    "FACES_SCHEMA",
    "IMAGES_SCHEMA",
    "IMAGE_STATUSES",
    "PUBLICATIONS_SCHEMA",
    "REVIEWS_SCHEMA",
    "REVIEW_DECISIONS",
    "RUNS_SCHEMA",
    "TABLE_NAMES",
    "TABLE_SCHEMAS",
    "Catalog",
    "LegacyCatalog",
    "LegacyLayoutError",
    "NoS3Credentials",
    "TableName",
    "compact",
    "conform_table",
    "connect",
    "empty_table",
    "format_table",
    "history",
    "migrate",
    "rows_to_table",
    "schema_for",
    "sql",
    "table_to_frame",
    "vacuum",
]
