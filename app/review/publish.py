"""`dynface publish`: the final photos, with only the faces a curator let through pasted back.

For every restored photo (`images` rows with status ok; with several runs, the latest row per relative
path; a file with the same bytes as another is a photo of its own, with that file's faces) the source
is read again and the restored faces are pasted with the pipeline's own paste-back
(`paste_faces`, the crops rebuilt from the catalog's affines), choosing per face:
- accepted: pasted;
- rejected: the source pixels stay;
- no decision (or skipped): pasted, unless `require_review`, which keeps the source pixels;
- sampling failed: the source pixels stay (as in the pipeline's own output).
With every face pasted the result is the pipeline's `restored/` photo; with none, the source's pixels.
The photo goes to `DEST/<relative path>` in the source's format (GIF and other formats we do not write
become `<relative path>.png`), then one `publications` row per photo records what was done. A source is
only ever read: a destination that is a source file, or a source whose bytes changed since its run,
fails that photo.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from app.review.decisions import FACE_KEY, latest_decisions, review_history
from app.review.pixels import face_crops, read_face
from app.review.queue import FACE_COLUMNS, IMAGE_COLUMNS
from catalogs import Catalog
from dynface.images.faces import paste_faces
from dynface.images.imageio import content_hash, encode_image, read_image
from tasks.sources import read_source_bytes
from tasks.work import (
    is_inside,
    join_uri,
    normalize_uri,
    output_format,
    output_name,
    short_error,
    write_bytes,
)

# Why a face was pasted or kept, as the summary counts them.
PASTED_REASONS = ("accepted", "unreviewed")
KEPT_REASONS = ("rejected", "not reviewed", "sampling failed")


@dataclass(frozen=True)
class PublishedPhoto:
    """One photo of a publication: where it went (None when it failed) and why each face was pasted
    or kept (`reasons`: face index -> one of PASTED_REASONS or KEPT_REASONS)."""

    run_id: str
    image_id: str
    relative_path: str
    source_uri: str
    published_uri: str | None
    reasons: Mapping[int, str]
    error: str | None = None

    @property
    def pasted(self) -> list[int]:
        return sorted(k for k, why in self.reasons.items() if why in PASTED_REASONS)

    @property
    def kept(self) -> list[int]:
        return sorted(k for k, why in self.reasons.items() if why in KEPT_REASONS)


@dataclass(frozen=True)
class PublishSummary:
    publication_id: str
    dest: str
    require_review: bool
    photos: list[PublishedPhoto] = field(default_factory=list)

    @property
    def failed(self) -> list[PublishedPhoto]:
        return [p for p in self.photos if p.error is not None]

    def face_counts(self) -> Counter[str]:
        return Counter(why for p in self.photos if p.error is None for why in p.reasons.values())


def publish(
    catalog: Catalog,
    dest: str,
    *,
    require_review: bool = False,
    run_id: str | None = None,
    publisher: str | None = None,
) -> PublishSummary:
    """Write the final photos of the catalog (or of one run) under `dest` and record them."""
    now = dt.datetime.now(dt.UTC)
    summary = PublishSummary(
        publication_id=f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        dest=dest,
        require_review=require_review,
    )
    photos = photos_to_publish(catalog, run_id=run_id)
    if photos.empty:
        return summary
    _check_dest(catalog, dest)
    image_ids = sorted(set(photos["image_id"]))
    faces = catalog.read("faces", columns=FACE_COLUMNS, filters=[("image_id", "in", image_ids)])
    faces_of = {key: group.to_dict("records") for key, group in faces.groupby(["run_id", "image_id"])}
    history = review_history(catalog, run_id=run_id)
    decisions = {
        (r["run_id"], r["image_id"], int(r["face_index"])): r["decision"]
        for r in latest_decisions(history)[list(FACE_KEY) + ["decision"]].to_dict("records")
    }
    sources = {normalize_uri(uri) for uri in photos["source_uri"]}
    for image in photos.to_dict("records"):
        rows = photo_faces(faces_of, image["run_id"], image["image_id"])
        summary.photos.append(
            publish_photo(image, rows, decisions, dest, sources=sources, require_review=require_review)
        )
    reviews_through = history["decided_at"].max() if len(history) else None
    _record(catalog, summary, published_at=now, reviews_through=reviews_through, publisher=publisher)
    return summary


def photos_to_publish(catalog: Catalog, *, run_id: str | None = None) -> pd.DataFrame:
    """`images` rows with status ok, the latest per relative path (files with the same bytes under
    other names are photos of their own)."""
    images = catalog.read("images", run_id=run_id, columns=IMAGE_COLUMNS, filters=[("status", "==", "ok")])
    images = images.sort_values("committed_at", kind="stable", na_position="first")
    images = images.drop_duplicates("relative_path", keep="last")
    return images.sort_values("relative_path", kind="stable").reset_index(drop=True)


def photo_faces(
    faces_of: Mapping[tuple[str, str], list[dict[str, Any]]], run_id: str, image_id: str
) -> list[dict[str, Any]]:
    """The faces of a photo: its own run's rows, else (a file whose bytes an earlier run restored,
    reused as the pipeline reuses it) the rows of the latest run that has them."""
    if (run_id, image_id) in faces_of:
        return faces_of[(run_id, image_id)]
    runs = sorted(r for r, i in faces_of if i == image_id)
    return faces_of[(runs[-1], image_id)] if runs else []


def face_reasons(
    faces: Sequence[Mapping[str, Any]], decisions: Mapping[tuple[str, str, int], str], *, require_review: bool
) -> dict[int, str]:
    """Face index -> why it is pasted or kept (see the module docstring)."""
    reasons = {}
    for face in faces:
        k = int(face["face_index"])
        decision = decisions.get((face["run_id"], face["image_id"], k))
        if face["status"] != "ok":
            reasons[k] = "sampling failed"
        elif decision == "accept":
            reasons[k] = "accepted"
        elif decision == "reject":
            reasons[k] = "rejected"
        else:
            reasons[k] = "not reviewed" if require_review else "unreviewed"
    return reasons


def publish_photo(
    image: Mapping[str, Any],
    faces: Sequence[Mapping[str, Any]],
    decisions: Mapping[tuple[str, str, int], str],
    dest: str,
    *,
    sources: set[str],
    require_review: bool,
) -> PublishedPhoto:
    """Compose and write one final photo; a failure is returned in `error`, never raised."""
    reasons = face_reasons(faces, decisions, require_review=require_review)
    photo = PublishedPhoto(
        run_id=image["run_id"],
        image_id=image["image_id"],
        relative_path=image["relative_path"],
        source_uri=image["source_uri"],
        published_uri=None,
        reasons=reasons,
    )
    try:
        target = join_uri(dest, _safe_relative(image["relative_path"]))
        if normalize_uri(target) in sources:
            raise ValueError(f"refusing to overwrite the source file {target}")
        data = read_source_bytes(image["source_uri"])
        if content_hash(data) != image["image_id"]:
            raise ValueError(f"the source {image['source_uri']} changed since it was restored")
        loaded = read_image(data)
        crops = face_crops(loaded, bool(image["is_grayscale"]), faces)
        by_index = {int(f["face_index"]): f for f in faces}
        restored = [
            read_face(by_index[a.index]["output_uri"]) if reasons[a.index] in PASTED_REASONS else None
            for a in crops.faces
        ]
        fmt = output_format(image["relative_path"])
        unchanged = fmt == image["relative_path"].rsplit(".", 1)[-1].lower()
        if unchanged and all(face is None for face in restored):
            write_bytes(target, data)  # nothing pasted: the source file itself, not a lossy re-encoding
        else:
            composite = paste_faces(loaded.rgb, crops, restored)
            write_bytes(target, encode_image(composite, output_format(image["relative_path"])))
    except Exception as err:  # noqa: BLE001 - one photo failing is reported; the others are still published
        return replace(photo, error=short_error(err))
    return replace(photo, published_uri=target)


def format_publish_summary(summary: PublishSummary) -> str:
    """The closing text of `dynface publish`."""
    if not summary.photos:
        return "nothing to publish: the catalog has no restored photo (images with status ok)"
    counts = summary.face_counts()
    ok = len(summary.photos) - len(summary.failed)
    lines = [
        f"published {ok} of {len(summary.photos)} photos to {summary.dest} "
        f"(publication {summary.publication_id}{', review required' if summary.require_review else ''})",
        "faces pasted: " + ", ".join(f"{why} {counts[why]}" for why in PASTED_REASONS),
        "source pixels kept: " + ", ".join(f"{why} {counts[why]}" for why in KEPT_REASONS),
    ]
    lines += [f"failed: {p.relative_path}: {p.error}" for p in summary.failed]
    return "\n".join(lines)


def _safe_relative(relative_path: str) -> str:
    """The published name below DEST; a path that would climb out of DEST is refused."""
    name = output_name(relative_path)
    clean = posixpath.normpath(name.replace("\\", "/"))
    if clean.startswith(("/", "../")) or clean in ("..", ".") or "://" in name:
        raise ValueError(f"relative path {relative_path!r} would leave the destination")
    return clean


def _check_dest(catalog: Catalog, dest: str) -> None:
    """DEST must not lie inside an archive a run reads (outside that run's own output folder): the
    published photos would become inputs of the next run."""
    runs = catalog.read("runs", columns=["source_uri", "dest_uri"]).dropna().drop_duplicates()
    for source, run_dest in zip(runs["source_uri"], runs["dest_uri"], strict=True):
        if is_inside(dest, source) and not is_inside(dest, run_dest):
            raise ValueError(
                f"{dest} lies inside the archive {source}: publish outside it (or in {run_dest})"
            )


def _record(
    catalog: Catalog,
    summary: PublishSummary,
    *,
    published_at: dt.datetime,
    reviews_through: Any,
    publisher: str | None,
) -> None:
    rows_by_run: dict[str, list[dict[str, Any]]] = {}
    through = None if reviews_through is None or pd.isna(reviews_through) else pd.Timestamp(reviews_through)
    for photo in summary.photos:
        rows_by_run.setdefault(photo.run_id, []).append(
            {
                "run_id": photo.run_id,
                "image_id": photo.image_id,
                "publication_id": summary.publication_id,
                "published_at": published_at,
                "source_uri": photo.source_uri,
                "published_uri": photo.published_uri,
                "require_review": summary.require_review,
                "faces_pasted": photo.pasted,
                "faces_kept": photo.kept,
                "reviews_through": None if through is None else through.to_pydatetime(),
                "publisher": publisher,
                "status": "ok" if photo.error is None else "failed",
                "error": photo.error,
            }
        )
    for run_id, rows in rows_by_run.items():
        catalog.write_part("publications", rows, run_id=run_id)
