"""What the review app knows and does, without HTTP: the loaded faces, the decisions in force, the
pixels of a face. `web.py` turns it into pages; tests can drive it directly.

Faces and photos are read once, when the app starts (restart it to see a newer run). Decisions are
re-read from the catalog on every grid page, so decisions written by another reviewer's app show
up, and kept in memory in between, so a decision costs one small write and no read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

from app.review.decisions import FaceKey, latest_decisions, record_decision, review_history
from app.review.pixels import face_crops, png_bytes, preview_jpeg, read_face, read_photo
from app.review.queue import (
    DECISION_COLUMNS,
    ReviewCounts,
    ReviewFilters,
    apply_filters,
    attach_decisions,
    count_progress,
    load_faces,
    qa_messages,
)
from catalogs import Catalog

CROP_CACHE_PHOTOS = 32
KeyTuple = tuple[str, str, int]


class UnknownRun(LookupError):
    """A run id the catalog does not hold."""


class PixelsUnavailable(Exception):
    """A face's pixels cannot be shown; the message says why, for the page."""


@dataclass(frozen=True)
class QueueView:
    """One page of the grid: the faces shown, how many match, progress and notes for the curator."""

    faces: pd.DataFrame
    total: int
    counts: ReviewCounts
    messages: list[str]


class ReviewService:
    """The catalog's faces under review; thread-safe (the web server answers from a thread pool)."""

    def __init__(self, catalog: Catalog, *, reviewer: str, run_id: str | None = None) -> None:
        self.catalog = catalog
        self.reviewer = reviewer
        self.run_id = run_id
        self.runs = known_runs(catalog)
        if run_id is not None and run_id not in self.runs:
            raise UnknownRun(unknown_run_message(run_id, self.runs))
        self.faces = load_faces(catalog, run_id=run_id)
        self._row_of: dict[KeyTuple, int] = {
            (r, i, int(k)): n
            for n, (r, i, k) in enumerate(
                zip(self.faces["run_id"], self.faces["image_id"], self.faces["face_index"], strict=True)
            )
        }
        self._lock = threading.Lock()
        self._latest: dict[KeyTuple, dict[str, Any]] = {}
        self._crops: OrderedDict[tuple[str, str], dict[int, bytes]] = OrderedDict()
        self.refresh_decisions()

    # -- decisions -----------------------------------------------------------------------------------
    def refresh_decisions(self) -> None:
        latest = latest_decisions(review_history(self.catalog, run_id=self.run_id))
        rows = {_key_tuple(row): row for row in latest.to_dict("records")}
        with self._lock:
            self._latest = rows

    def decide(self, key: FaceKey, decision: str, note: str | None = None) -> dict[str, Any]:
        """Record a decision on a loaded face (LookupError for a face the app does not show)."""
        if self.face_row(key) is None:
            raise LookupError(f"no face {key.face_index} of image {key.image_id} in run {key.run_id}")
        row = record_decision(self.catalog, key, decision, reviewer=self.reviewer, note=note)
        with self._lock:
            current = self._latest.get(_key_tuple(row))
            if current is None or (current["decided_at"], current["review_id"]) <= (
                row["decided_at"],
                row["review_id"],
            ):
                self._latest[_key_tuple(row)] = row
        return row

    def history(self, key: FaceKey) -> pd.DataFrame:
        frame = review_history(self.catalog, run_id=key.run_id)
        mine = (frame["image_id"] == key.image_id) & (frame["face_index"] == key.face_index)
        return frame[mine].reset_index(drop=True)

    # -- the queue -----------------------------------------------------------------------------------
    def decided_faces(self) -> pd.DataFrame:
        with self._lock:
            latest = dict(self._latest)
        return attach_decisions(self.faces, latest)

    def view(self, filters: ReviewFilters, *, offset: int = 0, limit: int = 48) -> QueueView:
        if filters.run is not None and filters.run not in self.runs:
            raise UnknownRun(unknown_run_message(filters.run, self.runs))
        faces = self.decided_faces()
        in_run = faces if filters.run is None else faces[faces["run_id"] == filters.run]
        chosen = apply_filters(faces, filters)
        messages = qa_messages(in_run)
        if in_run.empty:
            where = f"run {filters.run}" if filters.run else f"the catalog {self.catalog.uri}"
            messages.append(f"There are no faces in {where}.")
        return QueueView(
            faces=chosen.iloc[offset : offset + limit],
            total=len(chosen),
            counts=count_progress(in_run),
            messages=messages,
        )

    def decided_row(self, key: FaceKey) -> dict[str, Any]:
        """One loaded face's columns with the decision in force (as `attach_decisions` adds them)."""
        row = self._face_or_raise(key).to_dict()
        with self._lock:
            latest = self._latest.get((key.run_id, key.image_id, int(key.face_index))) or {}
        row.update({column: latest.get(column) for column in DECISION_COLUMNS})
        return row

    def counts(self, run: str | None = None) -> ReviewCounts:
        faces = self.decided_faces()
        return count_progress(faces if run is None else faces[faces["run_id"] == run])

    def face_row(self, key: FaceKey) -> pd.Series | None:
        n = self._row_of.get((key.run_id, key.image_id, int(key.face_index)))
        return None if n is None else self.faces.iloc[n]

    def image_faces(self, run_id: str, image_id: str) -> pd.DataFrame:
        mine = (self.faces["run_id"] == run_id) & (self.faces["image_id"] == image_id)
        return self.faces[mine].sort_values("face_index")

    # -- pixels ----------------------------------------------------------------------------------------
    def input_png(self, key: FaceKey) -> bytes:
        """The crop the sampler saw, recomputed from the source photo (cached per photo)."""
        row = self._face_or_raise(key)
        photo = (key.run_id, key.image_id)
        with self._lock:
            crops = self._crops.get(photo)
            if crops is not None:
                self._crops.move_to_end(photo)
        if crops is None:
            loaded = self._source(row)
            faces = self.image_faces(*photo).to_dict("records")
            try:
                made = face_crops(loaded, bool(row["image_is_grayscale"]), faces)
            except ValueError as err:
                raise PixelsUnavailable(f"cannot rebuild the input crop: {err}") from None
            crops = {face.index: png_bytes(face.crop) for face in made.faces}
            with self._lock:
                self._crops[photo] = crops
                while len(self._crops) > CROP_CACHE_PHOTOS:
                    self._crops.popitem(last=False)
        return crops[int(key.face_index)]

    def restored_png(self, key: FaceKey) -> bytes:
        row = self._face_or_raise(key)
        uri = row["output_uri"]
        if row["status"] != "ok" or not isinstance(uri, str):
            raise PixelsUnavailable(f"no restored face: sampling failed ({row['error'] or 'no output'})")
        try:
            return png_bytes(read_face(uri))
        except FileNotFoundError:
            raise PixelsUnavailable(f"restored face missing: {uri}") from None
        except Exception as err:  # noqa: BLE001 - any unreadable file becomes a message on the page
            raise PixelsUnavailable(f"restored face unreadable: {uri} ({type(err).__name__})") from None

    def photo_jpeg(self, run_id: str, image_id: str) -> bytes:
        faces = self.image_faces(run_id, image_id)
        if faces.empty:
            raise LookupError(f"no image {image_id} in run {run_id}")
        return preview_jpeg(self._source(faces.iloc[0]).rgb)

    def output_exists(self, row: Mapping[str, Any]) -> bool:
        uri = row["output_uri"]
        if not isinstance(uri, str):
            return False
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            return bool(fs.exists(path))
        except Exception:  # noqa: BLE001 - a store we cannot ask counts as missing
            return False

    def _face_or_raise(self, key: FaceKey) -> pd.Series:
        row = self.face_row(key)
        if row is None:
            raise LookupError(f"no face {key.face_index} of image {key.image_id} in run {key.run_id}")
        return row

    def _source(self, row: Mapping[str, Any]):
        uri = row["image_source_uri"]
        if not isinstance(uri, str):
            raise PixelsUnavailable("the catalog has no images row for this face")
        try:
            return read_photo(uri)
        except FileNotFoundError:
            raise PixelsUnavailable(f"source photo missing: {uri}") from None
        except Exception as err:  # noqa: BLE001 - unreadable or damaged source: a message, not a trace
            raise PixelsUnavailable(f"source photo unreadable: {uri} ({type(err).__name__}: {err})") from None


def known_runs(catalog: Catalog) -> list[str]:
    """Run ids that have a `runs` or a `faces` row, sorted."""
    runs = set(catalog.read("runs", columns=["run_id"])["run_id"])
    runs |= set(catalog.read("faces", columns=["run_id"])["run_id"])
    return sorted(runs)


def unknown_run_message(run_id: str, runs: list[str]) -> str:
    if not runs:
        return f"Unknown run {run_id!r}: this catalog holds no runs yet."
    listed = ", ".join(runs[-10:]) + (f" (and {len(runs) - 10} more)" if len(runs) > 10 else "")
    return f"Unknown run {run_id!r}. Runs in this catalog: {listed}."


def _key_tuple(row: Mapping[str, Any]) -> KeyTuple:
    return (str(row["run_id"]), str(row["image_id"]), int(row["face_index"]))
