"""The review queue: a run's faces joined with their photos, ordered by review priority, filtered.

Review priority puts the faces most likely to be wrong first. For each QA column a face gets its
percentile rank among the loaded faces in the risky direction (lowest `identity_similarity`, highest
`guidance_residual`, lowest `det_score` rank highest, 0..1); the priority is the mean of the ranks the
face has. A missing value (aligned-mode runs have no detection score; runs older than the QA columns
have none at all) is left out of the mean; a face with no QA value at all goes last, and so do faces
whose sampling failed (nothing to review: they keep their source pixels). Ties keep the order run,
image, face.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from catalogs import Catalog

FACE_COLUMNS = (
    "run_id",
    "image_id",
    "face_index",
    "bbox",
    "landmarks",
    "det_score",
    "affine",
    "std_hat",
    "t_start",
    "bucket",
    "output_uri",
    "identity_similarity",
    "guidance_residual",
    "status",
    "error",
)
IMAGE_COLUMNS = (
    "run_id",
    "image_id",
    "source_uri",
    "relative_path",
    "width",
    "height",
    "is_grayscale",
    "status",
    "output_uri",
    "committed_at",
)
# column -> True when a high value is risky
QA_COLUMNS: Mapping[str, bool] = {"identity_similarity": False, "guidance_residual": True, "det_score": False}
DECISION_COLUMNS = ("decision", "note", "reviewer", "decided_at")
DECISION_FILTERS = ("to_review", "accept", "reject", "skip")
FACE_STATUSES = ("ok", "failed")


@dataclass(frozen=True)
class ReviewFilters:
    """What the grid shows; None means everything. decision: "to_review" (no decision, or skipped),
    "accept", "reject" or "skip"."""

    run: str | None = None
    status: str | None = None
    bucket: int | None = None
    decision: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in FACE_STATUSES:
            raise ValueError(f"status must be one of {FACE_STATUSES}, got {self.status!r}")
        if self.decision is not None and self.decision not in DECISION_FILTERS:
            raise ValueError(f"decision must be one of {DECISION_FILTERS}, got {self.decision!r}")


@dataclass(frozen=True)
class ReviewCounts:
    """Progress over the faces that have a restored output (status ok): failed faces keep their
    source pixels whatever is decided, so they are not counted."""

    faces: int
    accepted: int
    rejected: int
    skipped: int

    @property
    def reviewed(self) -> int:
        return self.accepted + self.rejected

    @property
    def to_review(self) -> int:
        return self.faces - self.reviewed

    def as_dict(self) -> dict[str, int]:
        return {
            "faces": self.faces,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "reviewed": self.reviewed,
            "to_review": self.to_review,
        }


def load_faces(catalog: Catalog, *, run_id: str | None = None) -> pd.DataFrame:
    """Every face of the catalog (or of one run) with its photo's columns (prefixed `image_`) and
    `priority`, sorted most urgent first; `rank` is the 1-based position in that order."""
    faces = catalog.read("faces", run_id=run_id, columns=FACE_COLUMNS)
    images = catalog.read("images", run_id=run_id, columns=IMAGE_COLUMNS)
    images = images.sort_values("committed_at", kind="stable", na_position="first")
    images = images.drop_duplicates(["run_id", "image_id"], keep="last").drop(columns="committed_at")
    images = images.rename(
        columns={c: f"image_{c}" for c in IMAGE_COLUMNS if c not in ("run_id", "image_id")}
    )
    frame = faces.merge(images, on=["run_id", "image_id"], how="left", validate="many_to_one")
    frame["priority"] = review_priority(frame)
    frame = frame.sort_values(
        ["priority", "run_id", "image_id", "face_index"],
        ascending=[False, True, True, True],
        na_position="last",
        kind="stable",
    ).reset_index(drop=True)
    frame["rank"] = range(1, len(frame) + 1)
    return frame


def review_priority(faces: pd.DataFrame) -> pd.Series:
    """Mean percentile rank of the risky direction of each QA column among the restored faces (status
    ok); NaN for failed faces and faces without QA values (see the module docstring)."""
    restored = faces[faces["status"] == "ok"]
    if restored.empty:
        return pd.Series(float("nan"), index=faces.index, dtype="float64")
    ranks = [
        pd.to_numeric(restored[column], errors="coerce")
        .astype("float64")
        .rank(pct=True, ascending=high_is_risky)
        for column, high_is_risky in QA_COLUMNS.items()
    ]
    return pd.concat(ranks, axis=1).mean(axis=1, skipna=True).reindex(faces.index)


def qa_messages(faces: pd.DataFrame) -> list[str]:
    """Plain sentences about restored faces whose QA values the priority could not use."""
    restored = faces[faces["status"] == "ok"]
    if restored.empty:
        return []
    messages = []
    without_any = restored[[*QA_COLUMNS]].isna().all(axis=1)
    if without_any.all():
        messages.append(
            "These faces have no QA values (identity_similarity, guidance_residual, det_score): the run "
            "predates them. They are listed in photo order, not by review priority."
        )
    elif without_any.any():
        messages.append(
            f"{int(without_any.sum())} faces have no QA values (runs older than the QA columns); "
            "they are listed after the others."
        )
    return messages


def bucket_choices(faces: pd.DataFrame) -> list[tuple[int, str]]:
    """(bucket, label) for the t_start buckets present, labelled with the t_start range their faces
    span, e.g. (14, "t 702-745"); read from the data, so it holds whatever the bucket width was."""
    spans = faces.dropna(subset=["bucket", "t_start"]).groupby("bucket")["t_start"].agg(["min", "max"])
    return [(int(b), f"t {int(lo)}-{int(hi)}") for b, (lo, hi) in spans.sort_index().iterrows()]


def attach_decisions(
    faces: pd.DataFrame, latest: Mapping[tuple[str, str, int], Mapping[str, object]]
) -> pd.DataFrame:
    """`faces` with the decision in force (`decision`, `note`, `reviewer`, `decided_at`; None when
    undecided). `latest` maps (run_id, image_id, face_index) to a `reviews` row."""
    out = faces.copy()
    keys = zip(out["run_id"], out["image_id"], out["face_index"].astype(int), strict=True)
    rows = [latest.get(key) or {} for key in keys]
    for column in DECISION_COLUMNS:
        out[column] = [row.get(column) for row in rows]
    return out


def apply_filters(faces: pd.DataFrame, filters: ReviewFilters) -> pd.DataFrame:
    """The rows of `faces` (with decisions attached) that `filters` selects, order kept."""
    keep = pd.Series(True, index=faces.index)
    if filters.run is not None:
        keep &= faces["run_id"] == filters.run
    if filters.status is not None:
        keep &= faces["status"] == filters.status
    if filters.bucket is not None:
        keep &= faces["bucket"] == filters.bucket
    if filters.decision == "to_review":
        keep &= faces["decision"].isna() | (faces["decision"] == "skip")
    elif filters.decision is not None:
        keep &= faces["decision"] == filters.decision
    return faces[keep.fillna(False).astype(bool)]


def count_progress(faces: pd.DataFrame) -> ReviewCounts:
    """Counts over `faces` (decisions attached) with status ok."""
    ok = faces[faces["status"] == "ok"]
    decisions = ok["decision"].value_counts()
    return ReviewCounts(
        faces=len(ok),
        accepted=int(decisions.get("accept", 0)),
        rejected=int(decisions.get("reject", 0)),
        skipped=int(decisions.get("skip", 0)),
    )
