"""Restore, review and publish with everything on S3 (moto on loopback): a real aligned-mode run writes
its outputs and catalog to `s3://`, the review app reads faces and photos from there and writes its
decisions there, and `dynface publish` writes the final photos to another bucket."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray
from s3_server import S3Server, s3_environment

from app.cli import main
from catalogs import Catalog
from dynface.images.faces import aligned_input
from dynface.packs.writer import write_random_pack

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
OPTIONS = {"respacing": "ddim5"}
NAMES = ("ann.png", "sub/bob.png")
SOURCE, DEST, FINAL = "s3://archive/photos", "s3://restored/run1", "s3://final/run1"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_environment("archive", "restored", "final") as server:
        yield server


@pytest.fixture(scope="module")
def fs(s3: S3Server):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def s3_run(s3, fs, prefect_api, local_ray, tmp_path_factory):
    from flows.restore_archive import restore_archive

    for k, name in enumerate(NAMES):
        buf = io.BytesIO()
        Image.fromarray(np.roll(synthetic_face(48 + 8 * k), 3 * k, axis=1)).save(buf, "PNG")
        fs.pipe_file(f"archive/photos/{name}", buf.getvalue())
    pack = write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=32)
    summary = restore_archive(
        source=SOURCE, dest=DEST, pack=pack, aligned=True, shard_size=2, options=OPTIONS,
        guidance="closed_form",
    )  # fmt: skip
    assert summary.status == "completed" and summary.n_faces == 2
    return Catalog(f"{DEST}/catalog")


def test_review_and_publish_on_s3(s3_run, fs, capsys):
    from fastapi.testclient import TestClient

    from app.review.service import ReviewService
    from app.review.web import create_app

    catalog = s3_run
    sources = {name: fs.cat_file(f"archive/photos/{name}") for name in NAMES}
    etags = {path: info["ETag"] for path, info in fs.find("archive", detail=True).items()}
    client = TestClient(create_app(ReviewService(catalog, reviewer="curator")), base_url="http://127.0.0.1")
    listed = client.get("/api/faces").json()
    assert sorted(f["relative_path"] for f in listed["faces"]) == sorted(NAMES)
    assert listed["counts"]["to_review"] == 2 and listed["messages"] == []
    by_name = {f["relative_path"]: f for f in listed["faces"]}

    faces = catalog.read("faces").set_index("image_id")
    for name, card in by_name.items():
        assert card["det_score"] is None and card["identity_similarity"] is not None
        crop = decoded(client.get(card["input_url"]).content)
        np.testing.assert_array_equal(crop, aligned_input(decoded(sources[name]), 32).faces[0].crop)
        restored = decoded(client.get(card["restored_url"]).content)
        output_uri = faces.loc[card["image_id"], "output_uri"]
        assert output_uri.startswith(f"{DEST}/faces/")
        np.testing.assert_array_equal(restored, decoded(fs.cat_file(output_uri)))
        assert client.get(card["face_url"]).status_code == 200
        assert client.get(card["photo_url"]).headers["content-type"] == "image/jpeg"

    for name, decision in (("ann.png", "reject"), ("sub/bob.png", "accept")):
        card = by_name[name]
        key = {k: card[k] for k in ("run_id", "image_id", "face_index")}
        assert client.post("/api/decisions", json={**key, "decision": decision}).status_code == 200
    assert fs.find("restored/run1/catalog/reviews")  # the decisions live in the S3 catalog
    assert sorted(Catalog(catalog.uri).read("reviews")["decision"]) == ["accept", "reject"]

    assert main(["publish", catalog.uri, FINAL]) == 0
    assert "published 2 of 2 photos" in capsys.readouterr().out
    np.testing.assert_array_equal(decoded(fs.cat_file("final/run1/ann.png")), decoded(sources["ann.png"]))
    pipeline_bob = catalog.read("images").set_index("relative_path").loc["sub/bob.png", "output_uri"]
    np.testing.assert_array_equal(
        decoded(fs.cat_file("final/run1/sub/bob.png")), decoded(fs.cat_file(pipeline_bob))
    )
    assert not np.array_equal(decoded(fs.cat_file(pipeline_bob)), decoded(sources["sub/bob.png"]))
    publications = catalog.read("publications")
    assert sorted(publications["published_uri"]) == [f"{FINAL}/ann.png", f"{FINAL}/sub/bob.png"]
    assert {path: info["ETag"] for path, info in fs.find("archive", detail=True).items()} == etags
