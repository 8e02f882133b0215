"""The work tables of a run, declared once: which stage writes which file, with which columns.

Every stage reads what earlier stages wrote and writes only its own table; no stage rewrites another's
values. Rows are keyed by `image_id` (and `face_index` for faces); the commit stage joins them into the
catalog's rows, the one place where pack pixels become the catalog's 512-px units. Column names carry
their unit: `_px` is pixels at the pack's resolution, `_seconds` wall seconds.

    discover      shards          the images of a shard
    detect_align  detect_images   decoded size, mode, faces found, and the detect outcome
                  detect_faces    crop, box, landmarks, affine per face
    estimate_std  plans           each face's FacePlan (dynface.core.plan) and its t_start bucket
    bucket        batches         the sampler's input: faces grouped by start step, plans as estimated
    sample        samples         what sampling did per face (restored crop, final kernel stds, steps)
    compose       compose_images  the image's final outcome and outputs
                  compose_faces   each restored face's output file
    score         scores          identity similarity, input vs output
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynface.core.plan import PLAN_COLUMNS
from tasks.work import WorkDir, join_uri, read_rows, write_rows

# Faces are grouped into sample batches by t_start // BUCKET_WIDTH: faces of one batch then share
# (nearly) the same number of sampling steps, so no sample waits idle for the longest one.
BUCKET_WIDTH = 50


@dataclass(frozen=True)
class WorkTable:
    """One kind of work file: its folder under the run's work dir, the stage that writes it, columns."""

    name: str
    stage: str
    columns: tuple[str, ...]

    def shard_uri(self, work: WorkDir, shard: int) -> str:
        return join_uri(work.root, self.name, f"shard-{shard:05d}.parquet")

    def wave_uri(self, work: WorkDir, wave: int, part: int | None = None) -> str:
        name = f"wave-{wave:04d}" if part is None else f"wave-{wave:04d}-batch-{part:04d}"
        return join_uri(work.root, self.name, f"{name}.parquet")

    def write(self, uri: str, rows: Sequence[Mapping[str, Any]]) -> str:
        return write_rows(uri, rows, columns=self.columns)

    def read_shards(self, work: WorkDir, shards: Sequence[int]) -> list[dict[str, Any]]:
        return [row for shard in shards for row in self.read(self.shard_uri(work, shard))]

    def read(self, uri: str) -> list[dict[str, Any]]:
        rows = read_rows(uri)
        if rows and set(rows[0]) != set(self.columns):
            raise ValueError(f"{uri}: columns {sorted(rows[0])} are not those of work table {self.name!r}")
        return rows


FACE_KEY = ("image_id", "face_index")
SOURCE_FIELDS = ("image_id", "source_uri", "relative_path", "bytes")

SHARDS = WorkTable(
    "shards",
    "discover",
    (
        "shard",
        *SOURCE_FIELDS,
        "source_status",  # set when the entry cannot be read (failed/skipped): never opened again
        "source_error",
        "duplicate_of",  # source URI of the file whose bytes these are (this run, or an earlier one)
        "duplicate_output_uri",  # an earlier run's output to reuse (null: the original is in this run)
        "duplicate_status",  # that earlier row's status
    ),
)
DETECT_IMAGES = WorkTable(
    "detect_images",
    "detect_align",
    (
        "shard",
        *SOURCE_FIELDS,
        "width",
        "height",
        "orientation",
        "mode",
        "is_grayscale",
        "n_faces",
        "detect_status",  # pending (faces to restore), duplicate (reuses another's), no_face, failed, skipped
        "detect_error",
        "detect_seconds",
    ),
)
DETECT_FACES = WorkTable(
    "detect_faces",
    "detect_align",
    ("shard", *FACE_KEY, "crop_uri", "bbox", "landmarks", "det_score", "affine", "is_grayscale"),
)
PLANS = WorkTable("plans", "estimate_std", ("shard", *FACE_KEY, *PLAN_COLUMNS, "bucket"))
BATCHES = WorkTable(
    "batches", "bucket", ("batch", "shard", *FACE_KEY, "crop_uri", "restored_uri", *PLAN_COLUMNS)
)
SAMPLES = WorkTable(
    "samples",
    "sample",
    (
        *FACE_KEY,
        "sample_status",  # ok or failed
        "sample_error",
        "restored_uri",
        "std_final_px",  # kernel stds of the valid levels after the updates
        "n_steps",
        "guidance_residual",
        "sample_seconds",
        "node_id",
    ),
)
COMPOSE_IMAGES = WorkTable(
    "compose_images",
    "compose",
    (
        "shard",
        "image_id",
        "source_uri",
        "status",
        "error",
        "output_uri",
        "compare_uri",
        "duplicate_of",
        "compose_seconds",
    ),
)
COMPOSE_FACES = WorkTable("compose_faces", "compose", ("shard", *FACE_KEY, "output_uri"))
SCORES = WorkTable("scores", "score", ("shard", *FACE_KEY, "identity_similarity"))

WORK_TABLES: tuple[WorkTable, ...] = (
    SHARDS,
    DETECT_IMAGES,
    DETECT_FACES,
    PLANS,
    BATCHES,
    SAMPLES,
    COMPOSE_IMAGES,
    COMPOSE_FACES,
    SCORES,
)


def by_face(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """{(image_id, face_index): row}; a duplicate key raises ValueError."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["image_id"], int(row["face_index"]))
        if key in out:
            raise ValueError(f"duplicate face {key!r}")
        out[key] = dict(row)
    return out


def failed_sample_row(image_id: str, face_index: int, error: str) -> dict[str, Any]:
    """The samples row of a face whose sampling failed (or that has none: its batch never came back)."""
    return {"image_id": image_id, "face_index": face_index, "sample_status": "failed", "sample_error": error}
