"""Arrow schemas of the catalog tables and the validation that guards every write.

The pipeline writes `runs`, `images` and `faces`; the review workflow (`dynface review`, `dynface publish`)
appends `reviews` (one row per decision on a face) and `publications` (one row per published photo).

Each field may carry metadata that states its contract, checked by `conform_table`:
`doc` (what it means), `unit` (of a measured value), `allowed` (comma-separated values), `length`
(fixed list length) and `format` (`json` or `sha256`). Non-nullable fields are the keys a resume or
a join relies on.
Each table is a Delta table (catalogs/store.py); `run_id` is an ordinary column of every row.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

TableName = Literal["runs", "images", "faces", "reviews", "publications"]
TABLE_NAMES: tuple[TableName, ...] = ("runs", "images", "faces", "reviews", "publications")
PARTITION_COLUMN = "run_id"  # the run column (a folder partition in the legacy layout)

IMAGE_STATUSES: tuple[str, ...] = ("ok", "no_face", "failed", "skipped")
# A curator's verdict on one restored face: publish it, keep the source pixels, or decide later.
REVIEW_DECISIONS: tuple[str, ...] = ("accept", "reject", "skip")
PUBLICATION_STATUSES: tuple[str, ...] = ("ok", "failed")
# What a resume treats as done: `failed` rows are retried and `skipped` rows only say a run passed by.
COMMITTED_STATUSES: tuple[str, ...] = ("ok", "no_face")

TIMESTAMP = pa.timestamp("us", tz="UTC")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _f(name: str, type_: pa.DataType, doc: str, *, nullable: bool = True, **rules: object) -> pa.Field:
    meta = {"doc": doc, **{key: str(value) for key, value in rules.items()}}
    return pa.field(name, type_, nullable=nullable, metadata=meta)


def _run_id() -> pa.Field:
    return _f("run_id", pa.string(), "run that wrote the row", nullable=False)


def _config_hash() -> pa.Field:
    return _f("config_hash", pa.string(), "hash of the restoration config; resume key", nullable=False)


def _face_key() -> list[pa.Field]:
    """run_id, image_id, face_index: the key of a `faces` row."""
    return [
        _run_id(),
        _f("image_id", pa.string(), "image the face belongs to", nullable=False, format="sha256"),
        _f("face_index", pa.int32(), "face number k within the image", nullable=False),
    ]


RUNS_SCHEMA = pa.schema(
    [
        _run_id(),
        _f("started_at", TIMESTAMP, "run start", nullable=False),
        _f("finished_at", TIMESTAMP, "run end; null while running or after a crash"),
        _f("source_uri", pa.string(), "archive that was read"),
        _f("dest_uri", pa.string(), "where outputs were written"),
        _f("catalog_uri", pa.string(), "root of this catalog"),
        _f("pack_name", pa.string(), "model pack name"),
        _f("pack_sha256", pa.string(), "JSON object component -> sha256", format="json"),
        _f(
            "pack_files_json",
            pa.string(),
            "JSON object component -> {uri, sha256, pinned}: the files the run loaded (pinned: the"
            " manifest pins the hash; else it was measured when the run started)",
            format="json",
        ),
        _f("config_json", pa.string(), "full restoration config as JSON", format="json"),
        _config_hash(),
        _f("code_version", pa.string(), "package version + hash of the dynface and tasks sources"),
        _f(
            "status",
            pa.string(),
            "running (written at the start), then one closing row: completed, failed, cancelled (stopped"
            " by the user) or abandoned (written by a later run for a run that was killed)",
            nullable=False,
            allowed="running,completed,failed,cancelled,abandoned",
        ),
        _f("error", pa.string(), "why the run failed (failed and abandoned rows)"),
        _f("n_images", pa.int64(), "images rows this run wrote (files already committed are not counted)"),
        _f("n_ok", pa.int64(), "images restored"),
        _f("n_no_face", pa.int64(), "images without a detected face"),
        _f("n_failed", pa.int64(), "images that failed"),
        _f("n_skipped", pa.int64(), "images skipped by policy (special files, unsupported or oversize ...)"),
        _f("n_faces", pa.int64(), "faces restored"),
        _f("faces_per_second", pa.float64(), "throughput over the run"),
        _f("stage_seconds_json", pa.string(), "JSON object stage -> seconds", format="json"),
        _f("host", pa.string(), "machine or cluster that ran it"),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        _run_id(),
        _f(
            "image_id",
            pa.string(),
            "sha256 hex of the file's bytes (of 'dynface:unread:' + source_uri when they could not be read)",
            nullable=False,
            format="sha256",
        ),
        _f("source_uri", pa.string(), "URI the image was read from", nullable=False),
        _f("relative_path", pa.string(), "path below the source root"),
        _f("bytes", pa.int64(), "file size"),
        _f("width", pa.int32(), "width after EXIF orientation"),
        _f("height", pa.int32(), "height after EXIF orientation"),
        _f("orientation", pa.int32(), "EXIF orientation tag (1-8)"),
        _f("mode", pa.string(), "PIL mode of the file (L, RGB, RGBA, I;16 ...)"),
        _f("is_grayscale", pa.bool_(), "treated as grayscale (kept gray in the output)"),
        _f("n_faces", pa.int32(), "faces detected"),
        _f("status", pa.string(), "outcome", nullable=False, allowed=",".join(IMAGE_STATUSES)),
        _f("error", pa.string(), "error message when failed"),
        _f("output_uri", pa.string(), "restored image"),
        _f("compare_uri", pa.string(), "side-by-side comparison, if written"),
        _f(
            "duplicate_of",
            pa.string(),
            "source URI of a file with the same bytes whose result this row reuses (its faces rows are"
            " that image's)",
        ),
        _config_hash(),
        _f("seconds", pa.float64(), "processing time attributed to the image"),
        _f("committed_at", TIMESTAMP, "commit time; filled by Catalog.write_part when null"),
    ]
)

FACES_SCHEMA = pa.schema(
    [
        *_face_key(),
        _f("bbox", pa.list_(pa.float32()), "x0, y0, x1, y1 in image pixels", length=4),
        _f("landmarks", pa.list_(pa.float32()), "5 points x, y interleaved in image pixels", length=10),
        _f("det_score", pa.float64(), "detector score"),
        _f("affine", pa.list_(pa.float64()), "2x3 image -> aligned crop matrix, row-major", length=6),
        _f("is_grayscale", pa.bool_(), "face restored as grayscale"),
        _f("std_hat", pa.float64(), "std*, the blur std guidance starts from", unit="px at 512"),
        _f(
            "std_source",
            pa.string(),
            "where std* came from: se (the pack's SE network) or fixed (no SE: the fixed_std option)",
            allowed="se,fixed",
        ),
        _f("std_final", pa.float64(), "main level's blur std after the guidance updates", unit="px at 512"),
        _f("t_start", pa.int32(), "diffusion start step (original 0-999 grid) from the DSST lookup"),
        _f("bucket", pa.int32(), "t_start bucket the face was batched in (t_start // 50)"),
        _f("eta", pa.float64(), "DDIM eta of the face's sampling"),
        _f("guidance_levels", pa.list_(pa.float32()), "blur std of each guidance level", unit="px at 512"),
        _f("n_steps", pa.int32(), "sampling steps run"),
        _f("output_uri", pa.string(), "restored aligned face"),
        _f("identity_similarity", pa.float64(), "identity cosine similarity input vs output"),
        _f("guidance_residual", pa.float64(), "final guidance residual"),
        _f("seconds", pa.float64(), "processing time attributed to the face"),
        _config_hash(),
        _f("status", pa.string(), "ok, or failed (the input face was kept)", nullable=False),
        _f("error", pa.string(), "error message when failed"),
        _f("psnr", pa.float64(), "PSNR against ground truth, when given"),
        _f("ssim", pa.float64(), "SSIM against ground truth, when given"),
        _f("identity_distance", pa.float64(), "identity distance to ground truth, when given"),
        _f("lmd", pa.float64(), "landmark distance to ground truth, when given"),
    ]
)

# Append-only: a new decision on a face is a new row; the latest `decided_at` per face is the one in force.
REVIEWS_SCHEMA = pa.schema(
    [
        *_face_key(),
        _f("review_id", pa.string(), "unique id of this decision (uuid4 hex)", nullable=False),
        _f("decision", pa.string(), "the verdict", nullable=False, allowed=",".join(REVIEW_DECISIONS)),
        _f("note", pa.string(), "the reviewer's note"),
        _f("reviewer", pa.string(), "who decided (--reviewer or the OS user)", nullable=False),
        _f("decided_at", TIMESTAMP, "when the decision was recorded", nullable=False),
    ]
)

# One row per photo a `dynface publish` wrote (or failed to write); run_id and image_id name the
# images row whose restored faces were used.
PUBLICATIONS_SCHEMA = pa.schema(
    [
        _run_id(),
        _f("image_id", pa.string(), "image that was published", nullable=False, format="sha256"),
        _f("publication_id", pa.string(), "one id per publish command", nullable=False),
        _f("published_at", TIMESTAMP, "when the photo was written", nullable=False),
        _f("source_uri", pa.string(), "source photo (only read)", nullable=False),
        _f("published_uri", pa.string(), "the final photo; null when the publication failed"),
        _f("require_review", pa.bool_(), "only accepted faces were pasted", nullable=False),
        _f("faces_pasted", pa.list_(pa.int32()), "face indices whose restored pixels were pasted"),
        _f("faces_kept", pa.list_(pa.int32()), "face indices that kept the source pixels"),
        _f("reviews_through", TIMESTAMP, "latest review time taken into account"),
        _f("publisher", pa.string(), "who published"),
        _f("status", pa.string(), "outcome", nullable=False, allowed=",".join(PUBLICATION_STATUSES)),
        _f("error", pa.string(), "why the photo was not published"),
    ]
)

TABLE_SCHEMAS: Mapping[str, pa.Schema] = MappingProxyType(
    {
        "runs": RUNS_SCHEMA,
        "images": IMAGES_SCHEMA,
        "faces": FACES_SCHEMA,
        "reviews": REVIEWS_SCHEMA,
        "publications": PUBLICATIONS_SCHEMA,
    }
)


def schema_for(table_name: str) -> pa.Schema:
    """The schema of `table_name` (one of `TABLE_NAMES`)."""
    if table_name not in TABLE_SCHEMAS:
        raise ValueError(f"unknown catalog table {table_name!r}; expected one of {TABLE_NAMES}")
    return TABLE_SCHEMAS[table_name]


def empty_table(schema: pa.Schema) -> pa.Table:
    """A table with no rows and exactly `schema`."""
    return schema.empty_table()


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Validate dict rows against `schema` and build the table.

    Unknown keys, a missing or null non-nullable column, a naive datetime, a value that does not
    convert, or a broken field contract raise `ValueError`. Missing nullable columns become null.
    """
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise ValueError("rows must be a list of dicts")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i} is {type(row).__name__}, not a dict")
    unknown = sorted({key for row in rows for key in row} - set(schema.names))
    if unknown:
        raise ValueError(f"unknown columns {unknown}")
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if pa.types.is_timestamp(field.type):
            _reject_naive(field.name, values)
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as err:
            raise ValueError(f"column {field.name!r}: {err}") from None
    return conform_table(pa.Table.from_arrays(arrays, schema=schema), schema)


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s column order and types; same checks as `rows_to_table`."""
    unknown = sorted(set(table.column_names) - set(schema.names))
    if unknown:
        raise ValueError(f"unknown columns {unknown}")
    if len(set(table.column_names)) != table.num_columns:
        raise ValueError("duplicate column names")
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ValueError(f"missing non-nullable column {field.name!r}")
            columns.append(pa.nulls(table.num_rows, type=field.type))
            continue
        column = table.column(field.name)
        try:
            column = column.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(
                f"column {field.name!r}: cannot cast {column.type} to {field.type}: {err}"
            ) from None
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=schema)
    for field in schema:
        _check_field(field, out.column(field.name))
    return out


def _reject_naive(name: str, values: list[Any]) -> None:
    for value in values:
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            # A naive time would be read as UTC silently; make the caller say what they mean.
            raise ValueError(f"column {name!r}: naive datetime {value}; pass a timezone-aware one")


def _check_field(field: pa.Field, column: pa.ChunkedArray) -> None:
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    if not field.nullable and column.null_count:
        raise ValueError(f"null in non-nullable column {field.name!r}")
    present = column.drop_null()
    if "allowed" in meta:
        bad = set(present.unique().to_pylist()) - set(meta["allowed"].split(","))
        if bad:
            raise ValueError(
                f"column {field.name!r}: values {sorted(bad)} not in {meta['allowed'].split(',')}"
            )
    if "length" in meta:
        lengths = pc.list_value_length(present)
        n = int(meta["length"])
        if len(present) and (pc.min(lengths).as_py() != n or pc.max(lengths).as_py() != n):
            raise ValueError(f"column {field.name!r}: every list must have {n} values")
        if pc.list_flatten(present).null_count:
            raise ValueError(f"column {field.name!r}: null inside a list")
    if meta.get("format") == "json":
        for text in present.unique().to_pylist():
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"column {field.name!r}: not JSON ({err})") from None
    if meta.get("format") == "sha256":
        for text in present.unique().to_pylist():
            if not _SHA256.fullmatch(text):
                raise ValueError(f"column {field.name!r}: {text!r} is not a lowercase sha256 hex digest")
