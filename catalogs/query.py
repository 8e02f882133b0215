"""SQL over a catalog with DuckDB: one view per table (`runs`, `images`, `faces`, `reviews`,
`publications`) over each Delta table's current files (or an earlier state, `as_of`).

The views are pyarrow datasets built by delta-rs from the transaction log, so the same query runs on
a local catalog and on S3, and DuckDB needs no extension or credentials of its own. Empty tables
still exist with all their columns.

A catalog version is a version of the `images` table, the commit marker: `as_of=N` shows the images
table at version N and every other table as it was when that version was committed.
"""

from __future__ import annotations

import datetime as dt

import duckdb
import pandas as pd

from catalogs.schemas import TABLE_NAMES
from catalogs.store import AsOf, Catalog

# Never fetch extensions over the network; every query here runs on what is registered.
_DUCKDB_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
MARKER_TABLE = "images"


def snapshot(catalog: Catalog, as_of: AsOf) -> dict[str, AsOf]:
    """{table: what to load}: None (latest) for every table, or one consistent earlier state."""
    if as_of is None or isinstance(as_of, dt.datetime):
        return dict.fromkeys(TABLE_NAMES, as_of)
    if as_of < 0:
        raise ValueError(f"a catalog version is >= 0, got {as_of}")
    images = catalog.delta_table(MARKER_TABLE)
    if images is None:
        raise ValueError(f"{catalog.uri} has no {MARKER_TABLE} table yet, so no version {as_of}")
    latest = images.version()
    if as_of > latest:
        raise ValueError(f"the catalog has versions 0..{latest} (of its {MARKER_TABLE} table), not {as_of}")
    entry = next(h for h in images.history(latest - as_of + 1) if h["version"] == as_of)
    committed = dt.datetime.fromtimestamp(entry["timestamp"] / 1000, dt.UTC)
    return {name: as_of if name == MARKER_TABLE else committed for name in TABLE_NAMES}


def connect(catalog: Catalog, *, as_of: AsOf = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection (TimeZone UTC) with one view per catalog table."""
    versions = snapshot(catalog, as_of)
    con = duckdb.connect(":memory:", config=_DUCKDB_CONFIG)
    con.execute("SET TimeZone = 'UTC'")
    for name in TABLE_NAMES:
        con.register(name, catalog.dataset(name, as_of=versions[name]))
    return con


def sql(catalog: Catalog, query: str, *, as_of: AsOf = None) -> pd.DataFrame:
    """Run one SQL statement over the catalog's table views (`TABLE_NAMES`)."""
    if not query.strip():
        raise ValueError("empty SQL query")
    con = connect(catalog, as_of=as_of)
    try:
        return con.execute(query).df()
    finally:
        con.close()


def format_table(df: pd.DataFrame, max_rows: int = 50) -> str:
    """Plain-text table for a terminal: at most `max_rows` rows and a footer with the row count."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    n = len(df)
    if n == 0:
        return f"(0 rows; columns: {', '.join(map(str, df.columns))})"
    body = df.head(max_rows).to_string(index=False)
    footer = f"({n} row{'s' if n != 1 else ''})" if n <= max_rows else f"(showing {max_rows} of {n} rows)"
    return f"{body}\n{footer}"
