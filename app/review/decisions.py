"""Review decisions as catalog data: the append-only `reviews` table.

Every decision is a new row (one part per decision, written before the app answers), so the history
of a face is never lost. The decision in force for a face is its row with the latest `decided_at`
(ties broken by `review_id`, so every reader picks the same row): when two reviewers decide the same
face at once, the later write wins and both rows stay.
"""

from __future__ import annotations

import datetime as dt
import getpass
import uuid
from dataclasses import dataclass

import pandas as pd

from catalogs import REVIEW_DECISIONS, Catalog

FACE_KEY = ("run_id", "image_id", "face_index")
MAX_NOTE_CHARS = 2000


@dataclass(frozen=True)
class FaceKey:
    """The key of a `faces` row."""

    run_id: str
    image_id: str
    face_index: int


def default_reviewer() -> str:
    """The OS user name, or "unknown" where the platform cannot tell."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def record_decision(
    catalog: Catalog,
    key: FaceKey,
    decision: str,
    *,
    reviewer: str,
    note: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, object]:
    """Append one decision to `reviews` and return the row written (ValueError on a bad value)."""
    if decision not in REVIEW_DECISIONS:
        raise ValueError(f"decision must be one of {REVIEW_DECISIONS}, got {decision!r}")
    note = (note or "").strip() or None
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise ValueError(f"a note holds at most {MAX_NOTE_CHARS} characters, got {len(note)}")
    if not reviewer.strip():
        raise ValueError("the reviewer name is empty")
    row = {
        "run_id": key.run_id,
        "image_id": key.image_id,
        "face_index": int(key.face_index),
        "review_id": uuid.uuid4().hex,
        "decision": decision,
        "note": note,
        "reviewer": reviewer.strip(),
        "decided_at": now or dt.datetime.now(dt.UTC),
    }
    catalog.write_part("reviews", [row], run_id=key.run_id)
    return row


def review_history(catalog: Catalog, *, run_id: str | None = None) -> pd.DataFrame:
    """Every decision (of one run, or all), oldest first."""
    frame = catalog.read("reviews", run_id=run_id)
    return frame.sort_values(["decided_at", "review_id"], kind="stable").reset_index(drop=True)


def latest_decisions(history: pd.DataFrame) -> pd.DataFrame:
    """One row per face: its latest decision (`history` as `review_history` returns it)."""
    ordered = history.sort_values(["decided_at", "review_id"], kind="stable")
    return ordered.drop_duplicates(list(FACE_KEY), keep="last").reset_index(drop=True)
