"""`dynface publish`: end to end after a real restore-archive run (Prefect, Ray, a 32-px random pack) with
decisions made through the review app, and on the hand-written review catalog for the cases a run does
not produce (aligned faces rejected, a missing restored file, unsafe names, a changed source)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from make_bad_inputs import write_photos
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray
from review_fixtures import ReviewCatalog, write_review_catalog

from app.cli import main
from app.review.decisions import FaceKey, record_decision
from app.review.publish import publish
from catalogs import Catalog
from dynface.packs.writer import write_random_pack

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
OPTIONS = {"respacing": "ddim5"}


def rgb_of(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def crop_footprint(affine, hw: tuple[int, int], size: int = 32, margin: float = 1.0) -> np.ndarray:
    """Pixels of the image whose crop coordinates fall inside the crop square (plus a margin):
    everything a paste-back of this face may touch."""
    a = np.asarray(affine, dtype=np.float64).reshape(2, 3)
    ys, xs = np.mgrid[0 : hw[0], 0 : hw[1]]
    u = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
    v = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
    lo, hi = -0.5 - margin, size - 0.5 + margin
    return (u > lo) & (u < hi) & (v > lo) & (v < hi)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


# -- end to end after a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def restored_run(prefect_api, local_ray, tmp_path_factory):
    """The regression snapshot's drawn photos (two faces on a background, one gray face, a landscape
    without a face), restored in whole-photo mode."""
    from flows.restore_archive import restore_archive

    root = tmp_path_factory.mktemp("publish")
    src = write_photos(root / "photos")
    pack = write_random_pack(str(root / "pack"), resolution=32)
    summary = restore_archive(source=str(src), dest=str(root / "out"), pack=pack, options=OPTIONS)
    assert summary.status == "completed" and summary.n_faces == 3
    return src, root, Catalog(str(root / "out" / "catalog"))


def test_publish_after_review_keeps_rejected_faces_as_the_source(restored_run, capsys):
    from fastapi.testclient import TestClient

    from app.review.service import ReviewService
    from app.review.web import create_app

    src, root, catalog = restored_run
    before = tree_hashes(src)
    images = catalog.read("images").set_index("relative_path")
    faces = catalog.read("faces")
    two = images.loc["two_faces.png"]
    mine = faces[faces["image_id"] == two["image_id"]].sort_values("face_index")
    assert list(mine["face_index"]) == [0, 1]
    rejected, accepted = mine.iloc[0], mine.iloc[1]

    client = TestClient(create_app(ReviewService(catalog, reviewer="curator")), base_url="http://127.0.0.1")
    for face, decision in ((rejected, "reject"), (accepted, "accept")):
        key = {"run_id": face["run_id"], "image_id": face["image_id"], "face_index": int(face["face_index"])}
        assert client.post("/api/decisions", json={**key, "decision": decision}).status_code == 200

    assert main(["publish", catalog.uri, str(root / "final"), "--publisher", "ed"]) == 0
    out = capsys.readouterr().out
    assert "published 2 of 2 photos" in out and "accepted 1, unreviewed 1" in out and "rejected 1" in out

    source = rgb_of(src / "two_faces.png")
    pipeline = rgb_of(two["output_uri"])  # every face pasted
    published = rgb_of(root / "final" / "two_faces.png")
    hw = source.shape[:2]
    rejected_area = crop_footprint(rejected["affine"], hw) & ~crop_footprint(accepted["affine"], hw)
    accepted_area = crop_footprint(accepted["affine"], hw) & ~crop_footprint(rejected["affine"], hw)
    assert rejected_area.sum() > 5000
    # The rejected face: exactly the source's pixels, where the pipeline had pasted a restoration.
    np.testing.assert_array_equal(published[rejected_area], source[rejected_area])
    assert np.abs(pipeline[rejected_area].astype(int) - source[rejected_area]).mean() > 5
    # The accepted face: exactly what the pipeline pasted; nothing else changed anywhere.
    np.testing.assert_array_equal(published[accepted_area], pipeline[accepted_area])
    untouched = ~(crop_footprint(rejected["affine"], hw) | crop_footprint(accepted["affine"], hw))
    np.testing.assert_array_equal(published[untouched], source[untouched])

    # The unreviewed gray face is pasted without --require-review: the pipeline's own output.
    np.testing.assert_array_equal(
        rgb_of(root / "final" / "gray_face.jpg"), rgb_of(images.loc["gray_face.jpg", "output_uri"])
    )

    # --require-review: the unreviewed face keeps the source too; with nothing pasted, the photo is the
    # source file itself (not a lossy re-encoding of it).
    assert main(["publish", catalog.uri, str(root / "strict"), "--require-review"]) == 0
    capsys.readouterr()
    assert (root / "strict" / "gray_face.jpg").read_bytes() == (src / "gray_face.jpg").read_bytes()
    np.testing.assert_array_equal(rgb_of(root / "strict" / "two_faces.png"), published)

    publications = catalog.read("publications").sort_values(["published_at", "source_uri"])
    assert len(publications) == 4 and set(publications["status"]) == {"ok"}
    first = publications[~publications["require_review"]].set_index("image_id")
    assert list(first.loc[two["image_id"], "faces_pasted"]) == [1]
    assert list(first.loc[two["image_id"], "faces_kept"]) == [0]
    assert first.loc[two["image_id"], "published_uri"] == str(root / "final" / "two_faces.png")
    assert set(first["publisher"]) == {"ed"} and first["reviews_through"].notna().all()
    strict = publications[publications["require_review"]].set_index("image_id")
    assert list(strict.loc[images.loc["gray_face.jpg", "image_id"], "faces_kept"]) == [0]
    assert tree_hashes(src) == before  # sources are only read


# -- cases on the hand-written catalog -------------------------------------------------------------------
@pytest.fixture
def review(tmp_path: Path) -> ReviewCatalog:
    return write_review_catalog(str(tmp_path / "src"), str(tmp_path / "out"))


def decide(review: ReviewCatalog, label: str, decision: str) -> None:
    face = review.faces[label]
    record_decision(
        review.catalog, FaceKey(face.run_id, face.image_id, face.face_index), decision, reviewer="t"
    )


def test_aligned_and_failed_faces(review, tmp_path):
    decide(review, "whole.png#0", "reject")
    decide(review, "two.png#0", "accept")
    summary = publish(review.catalog, str(tmp_path / "final"), run_id="r1")
    assert not summary.failed and len(summary.photos) == 4
    final = tmp_path / "final"
    # A rejected aligned-mode face and a face whose sampling failed: the photo is the source.
    for name in ("whole.png", "broken.png"):
        np.testing.assert_array_equal(rgb_of(final / name), rgb_of(review.faces[f"{name}#0"].source_uri))
    # An accepted aligned-mode face replaces the whole photo with the restored face, resized back.
    decide(review, "whole.png#0", "accept")
    publish(review.catalog, str(tmp_path / "again"), run_id="r1")
    restored = rgb_of(review.faces["whole.png#0"].output_uri)
    np.testing.assert_array_equal(
        rgb_of(tmp_path / "again" / "whole.png"),
        np.asarray(Image.fromarray(restored).resize((64, 80), Image.Resampling.BICUBIC)),
    )
    counts = summary.face_counts()
    assert (counts["accepted"], counts["rejected"], counts["sampling failed"], counts["unreviewed"]) == (
        1,
        1,
        1,
        2,
    )


def test_missing_output_unsafe_name_and_changed_source_fail_that_photo(review, tmp_path, capsys):
    catalog = review.catalog
    images = catalog.read("images", run_id="r2")
    escape = images.copy()
    escape["relative_path"] = "../escape.png"
    escape["image_id"] = "e" * 64
    catalog.write_part("images", escape, run_id="r2")
    faces = catalog.read("faces", run_id="r2")
    faces["image_id"] = "e" * 64
    catalog.write_part("faces", faces, run_id="r2")
    assert main(["publish", catalog.uri, str(tmp_path / "final"), "--run", "r2"]) == 1
    out = capsys.readouterr().out
    assert "published 0 of 2 photos" in out
    assert "failed: old.png: FileNotFoundError" in out  # old.png#1's restored file is gone
    assert (
        "failed: ../escape.png: ValueError: relative path '../escape.png' would leave the destination" in out
    )
    assert not (tmp_path / "escape.png").exists()
    rows = catalog.read("publications", run_id="r2")
    assert set(rows["status"]) == {"failed"} and rows["published_uri"].isna().all()

    Path(review.faces["one.jpg#0"].source_uri).write_bytes(b"\xff\xd8 replaced")
    summary = publish(catalog, str(tmp_path / "final"), run_id="r1")
    assert [p.error for p in summary.failed] == [
        f"ValueError: the source {review.faces['one.jpg#0'].source_uri} changed since it was restored"
    ]


def test_publishing_into_the_archive_or_an_unknown_run_is_refused(review, capsys):
    before = tree_hashes(Path(review.source))
    assert main(["publish", review.catalog.uri, review.source]) == 1
    assert "lies inside the archive" in capsys.readouterr().err
    assert main(["publish", review.catalog.uri, f"{review.source}/final"]) == 1
    capsys.readouterr()
    assert main(["publish", review.catalog.uri, "elsewhere", "--run", "r7"]) == 2
    assert "Unknown run 'r7'" in capsys.readouterr().err
    assert tree_hashes(Path(review.source)) == before
    assert review.catalog.read("publications").empty


def test_same_bytes_under_other_names_are_photos_with_the_original_faces(review, tmp_path):
    """As the pipeline records them: a second name in the same run shares the image_id (and its faces);
    a later run's copy has no faces rows of its own and reuses those of the run that restored it."""
    catalog = review.catalog
    images = catalog.read("images", run_id="r1").set_index("relative_path")
    for run_id, name, copy in (("r1", "two.png", "copy/two.png"), ("r2", "one.jpg", "later/one.jpg")):
        row = images.loc[[name]].reset_index()
        target = Path(review.source) / copy
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(row.loc[0, "source_uri"]).read_bytes())
        row["run_id"], row["relative_path"], row["source_uri"] = run_id, copy, str(target)
        catalog.write_part("images", row, run_id=run_id)
    decide(review, "one.jpg#0", "reject")
    summary = publish(catalog, str(tmp_path / "final"))
    published = {p.relative_path: p for p in summary.photos}
    assert published["copy/two.png"].pasted == [0, 1] and published["later/one.jpg"].kept == [0]
    final = tmp_path / "final"
    np.testing.assert_array_equal(rgb_of(final / "copy" / "two.png"), rgb_of(final / "two.png"))
    source = Path(review.faces["one.jpg#0"].source_uri)
    assert (final / "later" / "one.jpg").read_bytes() == source.read_bytes()  # nothing pasted: the file
    assert catalog.read("publications", run_id="r2").set_index("image_id").loc[
        review.faces["one.jpg#0"].image_id, "published_uri"
    ] == str(final / "later" / "one.jpg")
