"""SQL over a catalog with DuckDB: one view per table (`runs`, `images`, `faces`, `reviews`,
`publications`) on lazy pyarrow datasets.

The datasets are read through fsspec, so the same query runs on a local catalog and on S3, and
DuckDB needs no extension or credentials of its own. Empty tables still exist with all their columns.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from catalogs.schemas import TABLE_NAMES
from catalogs.store import Catalog

# Never fetch extensions over the network; every query here runs on what is registered.
_DUCKDB_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def connect(catalog: Catalog) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection (TimeZone UTC) with one view per catalog table."""
    con = duckdb.connect(":memory:", config=_DUCKDB_CONFIG)
    con.execute("SET TimeZone = 'UTC'")
    for name in TABLE_NAMES:
        con.register(name, catalog.dataset(name))
    return con


def sql(catalog: Catalog, query: str) -> pd.DataFrame:
    """Run one SQL statement over the catalog's table views (`TABLE_NAMES`)."""
    if not query.strip():
        raise ValueError("empty SQL query")
    con = connect(catalog)
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
