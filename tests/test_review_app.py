"""The review app through its HTTP API (FastAPI TestClient) over a catalog written by `review_fixtures`:
listing and priority order, filters, decisions into the `reviews` table (and concurrent ones), the
pixels it shows, bad input as messages, and URLs that try to reach files."""

from __future__ import annotations

import datetime as dt
import io
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from review_fixtures import ReviewCatalog, write_review_catalog

from app.review.service import ReviewService
from app.review.web import create_app
from catalogs import Catalog
from dynface.images.faces import DetectedFace, align_faces, aligned_input

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture
def review(tmp_path: Path) -> ReviewCatalog:
    return write_review_catalog(str(tmp_path / "src"), str(tmp_path / "out"))


def client_for(review: ReviewCatalog, reviewer: str = "ann", run_id: str | None = None):
    from fastapi.testclient import TestClient

    service = ReviewService(review.catalog, reviewer=reviewer, run_id=run_id)
    return TestClient(create_app(service), base_url="http://127.0.0.1")


def labels(faces: list[dict]) -> list[str]:
    return [f"{f['relative_path']}#{f['face_index']}" for f in faces]


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decide(client, face, decision: str, note: str | None = None):
    return client.post("/api/decisions", json={**face.key, "decision": decision, "note": note})


# -- listing and priority ------------------------------------------------------------------------------
def test_listing_is_ordered_by_review_priority(review):
    body = client_for(review).get("/api/faces").json()
    # two.png#1 is worst on every QA column, two.png#0 best; one.jpg and whole.png lie between (whole.png
    # has no detection score, so only its identity and residual count). Failed and QA-less faces last.
    assert labels(body["faces"]) == [
        "two.png#1", "one.jpg#0", "whole.png#0", "two.png#0", "broken.png#0", "old.png#0", "old.png#1",
    ]  # fmt: skip
    assert [f["rank"] for f in body["faces"]] == list(range(1, 8))
    priorities = [f["priority"] for f in body["faces"]]
    assert priorities[:4] == sorted(priorities[:4], reverse=True) and priorities[4:] == [None] * 3
    assert body["total"] == 7
    assert body["counts"] == {
        "faces": 6,
        "accepted": 0,
        "rejected": 0,
        "skipped": 0,
        "reviewed": 0,
        "to_review": 6,
    }


def test_priority_follows_each_qa_column_in_its_risky_direction():
    from app.review.queue import review_priority

    base = {"identity_similarity": 0.8, "guidance_residual": 0.2, "det_score": 1.0, "status": "ok"}
    for column, risky, safe in [
        ("identity_similarity", 0.4, 0.9),
        ("guidance_residual", 0.6, 0.1),
        ("det_score", 0.3, 1.5),
    ]:
        frame = pd.DataFrame([{**base, column: safe}, {**base, column: risky}])
        priority = review_priority(frame)
        assert priority[1] > priority[0], column
    # A failed face has no priority whatever its values; a missing value is left out of the mean.
    frame = pd.DataFrame([{**base, "status": "failed"}, {**base, "det_score": None}])
    assert review_priority(frame).isna().tolist() == [True, False]


def test_filters_by_run_status_bucket_and_decision(review):
    client = client_for(review)
    assert labels(client.get("/api/faces?run=r2").json()["faces"]) == ["old.png#0", "old.png#1"]
    assert labels(client.get("/api/faces?status=failed").json()["faces"]) == ["broken.png#0"]
    # t_start 820 -> bucket 16; the filter lists each bucket with the t_start range of its faces
    assert labels(client.get("/api/faces?bucket=16").json()["faces"]) == ["two.png#1"]
    assert '<option value="16" >t 820-820</option>' in client.get("/").text
    assert '<option value="14" >t 700-705</option>' in client.get("/").text
    assert decide(client, review.faces["two.png#1"], "accept").status_code == 200
    assert decide(client, review.faces["one.jpg#0"], "reject").status_code == 200
    assert decide(client, review.faces["whole.png#0"], "skip").status_code == 200
    assert labels(client.get("/api/faces?decision=accept").json()["faces"]) == ["two.png#1"]
    assert labels(client.get("/api/faces?decision=reject").json()["faces"]) == ["one.jpg#0"]
    to_review = labels(client.get("/api/faces?decision=to_review&run=r1").json()["faces"])
    assert to_review == ["whole.png#0", "two.png#0", "broken.png#0"]  # skipped faces stay to review
    grid = client.get("/?run=r1&decision=to_review").text
    assert grid.count('class="card') == 3 and "3 faces" in grid
    assert client.get("/api/faces?decision=maybe").status_code == 400
    assert client.get("/?bucket=high").status_code == 400


# -- decisions -----------------------------------------------------------------------------------------
def test_decision_round_trip_into_the_reviews_table(review):
    client = client_for(review, reviewer="ann")
    face = review.faces["two.png#1"]
    reply = decide(client, face, "reject", note="  glasses removed  ")
    assert reply.status_code == 200
    assert reply.json()["counts"]["rejected"] == 1 and reply.json()["counts"]["to_review"] == 5
    rows = Catalog(review.catalog.uri).read("reviews")
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["run_id"], row["image_id"], row["face_index"]) == (face.run_id, face.image_id, 1)
    assert (row["decision"], row["note"], row["reviewer"]) == ("reject", "glasses removed", "ann")
    assert str(row["decided_at"].tz) == "UTC" and len(row["review_id"]) == 32
    # A fresh app (a restart, or another reviewer) reads the decision back from the catalog.
    again = client_for(review, reviewer="bob")
    card = again.get(f"/api/faces/r1/{face.image_id}/1").json()
    assert (card["decision"], card["note"], card["reviewer"]) == ("reject", "glasses removed", "ann")
    assert [h["decision"] for h in card["history"]] == ["reject"]
    assert "glasses removed" in again.get(f"/face/r1/{face.image_id}/1").text
    # Bad requests write nothing.
    for bad in ({**face.key, "decision": "maybe"}, {"run_id": "r1", "decision": "accept"}, ["accept"]):
        assert client.post("/api/decisions", json=bad).status_code == 400
    unknown = {**face.key, "face_index": 7, "decision": "accept"}
    assert client.post("/api/decisions", json=unknown).status_code == 404
    assert len(Catalog(review.catalog.uri).read("reviews")) == 1


def test_later_decision_wins_and_history_stays(review):
    client = client_for(review)
    face = review.faces["one.jpg#0"]
    for decision in ("accept", "skip", "reject"):
        assert decide(client, face, decision).status_code == 200
    card = client.get(f"/api/faces/r1/{face.image_id}/0").json()
    assert card["decision"] == "reject"
    assert [h["decision"] for h in card["history"]] == ["accept", "skip", "reject"]
    assert client.get("/api/faces").json()["counts"]["rejected"] == 1


def test_concurrent_decisions_on_one_face_last_writer_wins_both_kept(review):
    face = review.faces["two.png#0"]
    clients = {"ann": client_for(review, "ann"), "bob": client_for(review, "bob")}
    start = threading.Barrier(2)
    replies: dict[str, dict] = {}

    def post(name: str, decision: str) -> None:
        start.wait()
        replies[name] = decide(clients[name], face, decision, note=f"by {name}").json()

    threads = [threading.Thread(target=post, args=a) for a in (("ann", "accept"), ("bob", "reject"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = Catalog(review.catalog.uri).read("reviews")
    assert sorted(history["reviewer"]) == ["ann", "bob"]
    last = history.sort_values(["decided_at", "review_id"]).iloc[-1]
    for client in clients.values():
        client.get("/")  # a grid page re-reads the decisions other reviewers wrote
        card = client.get(f"/api/faces/r1/{face.image_id}/0").json()
        assert (card["decision"], card["reviewer"]) == (last["decision"], last["reviewer"])
        assert len(card["history"]) == 2


# -- pixels ----------------------------------------------------------------------------------------------
def test_images_are_the_recomputed_input_crop_and_the_restored_face(review):
    client = client_for(review)
    face = review.faces["two.png#1"]
    source = np.asarray(Image.open(face.source_uri).convert("RGB"))
    detected = DetectedFace(bbox=np.zeros(4), landmarks=face.landmarks, score=1.0)
    expected = align_faces(source, [detected], 32).faces[0].crop
    reply = client.get(f"/img/input/r1/{face.image_id}/1")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(pixels(reply.content), expected)
    restored = client.get(f"/img/restored/r1/{face.image_id}/1")
    np.testing.assert_array_equal(pixels(restored.content), 255 - expected)  # the fixture's "restoration"

    whole = review.faces["whole.png#0"]  # aligned mode: the whole photo resized is the crop
    source = np.asarray(Image.open(whole.source_uri).convert("RGB"))
    got = pixels(client.get(f"/img/input/r1/{whole.image_id}/0").content)
    np.testing.assert_array_equal(got, aligned_input(source, 32).faces[0].crop)

    photo = client.get(f"/img/photo/r1/{face.image_id}")
    assert photo.headers["content-type"] == "image/jpeg" and pixels(photo.content).shape == (200, 300, 3)


def test_face_page_shows_the_photo_with_the_face_box(review):
    client = client_for(review)
    face = review.faces["two.png#1"]
    page = client.get(f"/face/r1/{face.image_id}/1").text
    assert f'src="/img/photo/r1/{face.image_id}"' in page
    assert page.count('class="box') == 2 and page.count('class="box current"') == 1
    style = page.split('class="box current"')[1].split('style="')[1].split('"')[0]
    box = {k.strip(): float(v.strip(" %")) for k, v in (part.split(":") for part in style.split(";"))}
    x0, y0 = face.landmarks[:, 0].min() - 20, face.landmarks[:, 1].min() - 30  # the fixture's bbox
    assert box["left"] == pytest.approx(100 * x0 / 300, abs=1e-3)
    assert box["top"] == pytest.approx(100 * y0 / 200, abs=1e-3)


# -- bad input -------------------------------------------------------------------------------------------
def test_unknown_run_is_a_message(review, capsys):
    from app.cli import main

    reply = client_for(review).get("/?run=r9")
    assert reply.status_code == 404
    assert "Unknown run &#39;r9&#39;. Runs in this catalog: r1, r2." in reply.text
    assert "Traceback" not in reply.text
    assert client_for(review).get("/api/faces?run=r9").status_code == 404
    assert main(["review", review.catalog.uri, "--run", "r9"]) == 2
    assert "Unknown run 'r9'" in capsys.readouterr().err


def test_run_without_qa_columns_and_missing_output_are_messages(review):
    client = client_for(review, run_id="r2")
    page = client.get("/").text
    assert "no QA values" in page and "listed in photo order" in page
    old = review.faces["old.png#1"]
    missing = client.get(f"/img/restored/r2/{old.image_id}/1")
    assert missing.status_code == 404 and missing.headers["content-type"] == "image/svg+xml"
    assert "restored face missing" in missing.text
    face_page = client.get(f"/face/r2/{old.image_id}/1")
    assert face_page.status_code == 200
    assert f"The restored face is missing: {old.output_uri} does not exist." in face_page.text
    broken = review.faces["broken.png#0"]
    failed = client_for(review).get(f"/face/r1/{broken.image_id}/0").text
    assert "Sampling failed for this face (RuntimeError: sampler diverged)" in failed


def test_empty_catalog_is_a_message(tmp_path):
    from fastapi.testclient import TestClient

    service = ReviewService(Catalog(str(tmp_path / "nothing")), reviewer="ann")
    page = TestClient(create_app(service), base_url="http://127.0.0.1").get("/")
    assert page.status_code == 200 and "There are no faces in the catalog" in page.text


# -- what a URL can reach ------------------------------------------------------------------------------
def test_path_traversal_in_image_urls_is_refused(review, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    face = review.faces["two.png#1"]
    client = client_for(review)
    attempts = [
        "/img/input/../../../etc/passwd",
        "/img/restored/r1/..%2F..%2F..%2Fetc%2Fpasswd/0",
        f"/img/input/r1/..%2F..%2F{secret}/0",
        f"/img/restored/r1/{face.image_id}/..%2F..%2Fsecret.txt",
        f"/img/photo/r1/..%2F..%2F..%2F{secret.name}",
        "/img/photo/..%2F..%2F/etc%2Fpasswd",
        "/static/..%2Fweb.py",
        "/static/../review/web.py",
        "/static/%2E%2E%2F%2E%2E%2Fcli.py",
        f"/face/r1/{face.image_id}/1%2F..%2F..%2F..",
        f"/img/input/r1/{face.image_id}/-1",
        "/static/%2E%2E",
        "/static/__init__.py",
    ]
    for url in attempts:
        reply = client.get(url)
        assert 400 <= reply.status_code < 500, url
        assert "TOP-SECRET" not in reply.text and "root:" not in reply.text and "def " not in reply.text, url
    assert client.get("/static/review.js").status_code == 200

    # A catalog row that points a face's output at a file that is no image: the app decodes what it
    # sends, so it never passes a file's bytes on.
    catalog = review.catalog
    row = catalog.read("faces", run_id="r2").iloc[[0]].copy()
    row["face_index"] = 5
    row["output_uri"] = str(secret)
    catalog.write_part("faces", row, run_id="r2")
    old = review.faces["old.png#0"]
    reply = client_for(review).get(f"/img/restored/r2/{old.image_id}/5")
    assert reply.status_code == 404 and "TOP-SECRET" not in reply.text and "unreadable" in reply.text


def test_only_this_machine_and_same_origin_posts(review):
    client = client_for(review)
    face = review.faces["two.png#1"]
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400
    body = {**face.key, "decision": "accept"}
    refused = client.post("/api/decisions", json=body, headers={"origin": "http://evil.example"})
    assert refused.status_code == 403
    assert review.catalog.read("reviews").empty
    ok = client.post("/api/decisions", json=body, headers={"origin": "http://127.0.0.1"})
    assert ok.status_code == 200 and len(review.catalog.read("reviews")) == 1


def test_review_command_serves_on_loopback_only(review, monkeypatch, capsys):
    import uvicorn

    from app.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    assert main(["review", review.catalog.uri, "--port", "8799", "--reviewer", "cat"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8799
    out = capsys.readouterr().out
    assert "reviewing 7 faces (0 reviewed, 6 to review) as cat: open http://127.0.0.1:8799/" in out


def test_reviews_and_publications_tables_are_validated_like_the_others(review):
    from catalogs import sql

    face = review.faces["two.png#1"]
    good = {
        **face.key, "review_id": "a" * 32, "decision": "accept", "reviewer": "ann",
        "decided_at": dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
    }  # fmt: skip
    for bad, message in [
        ({**good, "decision": "maybe"}, "not in"),
        ({**good, "reviewer": None}, "non-nullable"),
        ({**good, "image_id": "../../etc"}, "sha256"),
        ({**good, "decided_at": dt.datetime(2026, 12, 1)}, "naive"),
        ({**good, "verdict": "accept"}, "unknown columns"),
    ]:
        with pytest.raises(ValueError, match=message):
            review.catalog.write_part("reviews", [bad], run_id="r1")
    with pytest.raises(ValueError, match="run_id"):
        review.catalog.write_part("reviews", [good], run_id="r2")
    publication = {
        "run_id": "r1", "image_id": face.image_id, "publication_id": "p", "source_uri": face.source_uri,
        "published_at": dt.datetime(2026, 12, 1, tzinfo=dt.UTC), "require_review": False, "status": "done",
    }  # fmt: skip
    with pytest.raises(ValueError, match="not in"):
        review.catalog.write_part("publications", [publication], run_id="r1")
    review.catalog.write_part("reviews", [good], run_id="r1")
    counted = sql(review.catalog, "SELECT decision, count(*) AS n FROM reviews GROUP BY decision")
    assert counted.to_dict("records") == [{"decision": "accept", "n": 1}]
    assert sql(review.catalog, "SELECT count(*) AS n FROM publications")["n"].tolist() == [0]
