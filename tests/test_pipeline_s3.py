"""restore-archive entirely on S3 (moto on loopback): source, dest, catalog and pack are `s3://` URIs,
and the endpoint and keys come only from the standard AWS environment variables."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray
from s3_server import S3Server, s3_environment

from app.cli import main
from catalogs import Catalog
from dynface.packs.writer import write_random_pack

OPTIONS = {"respacing": "ddim5"}
# Source keys under s3://archive/photos/ -> (image format, side in pixels).
PHOTOS = {
    "2019/ann.png": ("PNG", 48),
    "2019/bob.jpg": ("JPEG", 40),
    "2020/summer/cid.png": ("PNG", 64),
    "dee.webp": ("WEBP", 32),
}
SOURCE, DEST = "s3://archive/photos", "s3://restored/run1"


def encoded_face(k: int, fmt: str, side: int) -> bytes:
    face = np.roll(synthetic_face(side), 2 * k + 1, axis=1)
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto on 127.0.0.1 with the standard AWS variables pointing at it, set before this module's
    Ray starts (its workers read and write the work folder on S3 with the same settings)."""
    with s3_environment("archive", "restored", "packs") as server:
        yield server


@pytest.fixture(scope="module")
def s3fs_client(s3: S3Server):
    import s3fs

    # No endpoint or keys given: s3fs must find them in the environment, as the pipeline does.
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def photos(s3fs_client) -> dict[str, str]:
    """Upload the photos (plus a non-image file); returns {relative path: sha256 of the bytes}."""
    ids = {}
    for k, (name, (fmt, side)) in enumerate(PHOTOS.items()):
        data = encoded_face(k, fmt, side)
        s3fs_client.pipe_file(f"archive/photos/{name}", data)
        ids[name] = hashlib.sha256(data).hexdigest()
    s3fs_client.pipe_file("archive/photos/2019/index.txt", b"not an image")
    return ids


@pytest.fixture(scope="module")
def s3_pack(s3) -> str:
    return write_random_pack("s3://packs/random32", resolution=32)


@pytest.fixture(scope="module")
def first_run(s3, photos, s3_pack, prefect_api, local_ray):
    """The flow once over the archive. `s3` comes first so Ray starts with the S3 environment."""
    from flows.restore_archive import restore_archive

    return restore_archive(
        source=SOURCE, dest=DEST, pack=s3_pack, aligned=True, shard_size=3, wave_shards=1,
        options=OPTIONS, guidance="closed_form",
    )  # fmt: skip


def listing(fs, prefix: str) -> dict[str, str]:
    """{key: ETag} of every object under `prefix` (a missing prefix lists as empty)."""
    if not fs.exists(prefix):
        return {}
    return {path: info["ETag"] for path, info in fs.find(prefix, detail=True).items()}


def test_pack_manifest_lives_on_s3(s3_pack, s3fs_client):
    assert s3_pack == "s3://packs/random32/manifest.json"
    manifest = json.loads(s3fs_client.cat_file("packs/random32/manifest.json"))
    assert manifest["resolution"] == 32


def test_outputs_and_catalog_rows_are_on_s3(first_run, photos, s3fs_client):
    fs = s3fs_client
    assert first_run.status == "completed"
    assert first_run.counts == {"ok": 4, "no_face": 0, "failed": 0, "skipped": 0}
    for name, (fmt, side) in PHOTOS.items():
        with Image.open(io.BytesIO(fs.cat_file(f"restored/run1/restored/{name}"))) as im:
            assert im.format == fmt and im.size == (side, side)
        with Image.open(io.BytesIO(fs.cat_file(f"restored/run1/faces/{photos[name]}_00.png"))) as im:
            assert im.size == (32, 32)
    assert not fs.exists("restored/run1/restored/2019/index.txt")
    assert listing(fs, "restored/run1/.work") == {}  # the work folder is removed after success
    commits = Catalog(f"{DEST}/catalog").delta_table("images").history()
    appends = [
        c for c in commits if c["operation"] == "WRITE" and c.get("dynface.run_id") == first_run.run_id
    ]
    assert len(appends) == 2  # one images append per shard (3 + 1 images)
    images_table = Catalog(f"{DEST}/catalog").delta_table("images")
    assert commits[0]["operation"] == "OPTIMIZE" and len(images_table.file_uris()) == 1  # run end

    catalog = Catalog(f"{DEST}/catalog")
    images = catalog.read("images").set_index("relative_path").sort_index()
    assert sorted(images.index) == sorted(PHOTOS)
    assert set(images["status"]) == {"ok"}
    for name, row in images.iterrows():
        assert row["image_id"] == photos[name]
        assert row["source_uri"] == f"{SOURCE}/{name}"
        assert row["output_uri"] == f"{DEST}/restored/{name}"
    faces = catalog.read("faces")
    assert sorted(faces["image_id"]) == sorted(photos.values())
    assert all(fs.exists(uri) for uri in faces["output_uri"])
    assert all(uri.startswith(f"{DEST}/faces/") for uri in faces["output_uri"])


def test_rerun_adds_nothing(first_run, s3_pack, photos, s3fs_client):
    from flows.restore_archive import restore_archive

    fs = s3fs_client
    before = {p: listing(fs, f"restored/run1/{p}") for p in ("restored", "faces", "catalog/images")}
    again = restore_archive(
        source=SOURCE, dest=DEST, pack=s3_pack, aligned=True, shard_size=3, options=OPTIONS,
        guidance="closed_form",
    )  # fmt: skip
    assert (again.n_committed_before, again.n_images, again.n_faces) == (4, 0, 0)
    after = {p: listing(fs, f"restored/run1/{p}") for p in ("restored", "faces", "catalog/images")}
    assert after == before  # same objects, same ETags: nothing rewritten, no new rows
    runs = Catalog(f"{DEST}/catalog").read("runs")
    assert set(runs["run_id"]) == {first_run.run_id, again.run_id}


def test_catalog_sql_and_pandas_over_s3(first_run, photos, capsys: pytest.CaptureFixture[str]):
    query = "SELECT relative_path, status, n_faces FROM images ORDER BY relative_path"
    assert main(["catalog", "sql", f"{DEST}/catalog", query]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "(4 rows)"
    assert [line.split() for line in lines[1:-1]] == [[name, "ok", "1"] for name in sorted(PHOTOS)]
    join = (
        "SELECT COUNT(*) AS n FROM faces f JOIN images i USING (run_id, image_id) "
        f"WHERE i.status = 'ok' AND f.output_uri LIKE '{DEST}/faces/%'"
    )
    assert main(["catalog", "sql", f"{DEST}/catalog", join]) == 0
    assert capsys.readouterr().out.split()[:2] == ["n", "4"]
    # pandas reads the Delta table straight from S3 through deltalake (settings as the catalog has them).
    from deltalake import DeltaTable

    catalog = Catalog(f"{DEST}/catalog")
    images = DeltaTable(catalog.table_uri("images"), storage_options=catalog.delta_options()).to_pandas()
    assert sorted(images["relative_path"]) == sorted(PHOTOS)
    assert set(images["run_id"]) == {first_run.run_id}


def test_a_bucket_is_never_created(
    s3, s3fs_client, photos, s3_pack, prefect_api, local_ray, tmp_path, monkeypatch
):
    """A destination bucket deleted mid-run is a clear error (in the command's message and the run's
    closing row), never re-created by a write; a missing bucket is refused before a run begins."""
    import tasks.compose
    from flows.restore_archive import restore_archive
    from tasks.work import MissingBucketError, write_bytes

    with pytest.raises(MissingBucketError, match="s3://nowhere does not exist"):
        write_bytes("s3://nowhere/a/b.png", b"x")
    assert not s3fs_client.exists("nowhere")
    catalog = str(tmp_path / "catalog")
    with pytest.raises(MissingBucketError, match="s3://nowhere"):
        restore_archive(source=SOURCE, dest="s3://nowhere/run", catalog=catalog, pack=s3_pack, aligned=True)
    assert not (tmp_path / "catalog").exists()  # refused before anything was written
    s3.create_bucket("doomed")
    original = tasks.compose.compose_shard

    def bucket_gone(ctx, shard, samples_uri):
        s3fs_client.rm("doomed", recursive=True)
        return original(ctx, shard, samples_uri)

    monkeypatch.setattr(tasks.compose, "compose_shard", bucket_gone)
    with pytest.raises(Exception, match="the bucket s3://doomed does not exist"):
        restore_archive(
            source=SOURCE, dest="s3://doomed/run", catalog=catalog, pack=s3_pack, aligned=True,
            options=OPTIONS, guidance="closed_form",
        )  # fmt: skip
    assert not s3fs_client.exists("doomed")
    runs = Catalog(catalog).read("runs")
    closing = runs[runs["status"] != "running"]
    assert list(closing["status"]) == ["failed"] and "s3://doomed does not exist" in closing.iloc[0]["error"]
