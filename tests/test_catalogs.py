"""Catalog schemas, Delta appends, resume helpers and SQL: local, file:// and loopback S3.
(Delta specifics: crashes, concurrent writers, maintenance, migration: tests/test_catalog_delta.py.)"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pickle
import re
import uuid
from collections.abc import Iterator

import duckdb
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from s3_server import S3Server, s3_environment

from catalogs import (
    FACES_SCHEMA,
    IMAGE_STATUSES,
    IMAGES_SCHEMA,
    RUNS_SCHEMA,
    Catalog,
    conform_table,
    empty_table,
    format_table,
    rows_to_table,
    sql,
)

BUCKET = "dynface-catalog-test"
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def image_row(run_id: str, name: str, status: str, *, config_hash: str = "cfg-a", **extra: object) -> dict:
    row = {
        "run_id": run_id,
        "image_id": sha(name),
        "source_uri": f"file:///archive/{name}.jpg",
        "relative_path": f"{name}.jpg",
        "status": status,
        "config_hash": config_hash,
    }
    return row | extra


def face_row(run_id: str, name: str, k: int, std_hat: float, **extra: object) -> dict:
    row = {
        "run_id": run_id,
        "image_id": sha(name),
        "face_index": k,
        "std_hat": std_hat,
        "config_hash": "cfg-a",
        "status": "ok",
    }
    return row | extra


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """One loopback S3 server for the module; dummy keys and no metadata probe in the environment."""
    with s3_environment(BUCKET) as server, pytest.MonkeyPatch.context() as mp:
        # The endpoint comes from storage_options here; test_s3_endpoint_from_environment sets it itself.
        mp.delenv("AWS_ENDPOINT_URL_S3")
        mp.delenv("AWS_ENDPOINT_URL")
        yield server


@pytest.fixture(params=["local", "s3"])
def catalog(request: pytest.FixtureRequest, tmp_path) -> Iterator[Catalog]:
    if request.param == "local":
        yield Catalog(str(tmp_path / "catalog"))
    else:
        server = request.getfixturevalue("s3")
        yield Catalog(f"s3://{BUCKET}/{uuid.uuid4().hex}/catalog", storage_options=server.storage_options)


# --------------------------------------------------------------------------- schemas


def test_schema_contracts():
    assert IMAGE_STATUSES == ("ok", "no_face", "failed", "skipped")
    required = {
        name: {f.name for f in s if not f.nullable}
        for name, s in [("runs", RUNS_SCHEMA), ("images", IMAGES_SCHEMA), ("faces", FACES_SCHEMA)]
    }
    assert required == {
        "runs": {"run_id", "started_at", "config_hash", "status"},
        "images": {"run_id", "image_id", "source_uri", "status", "config_hash"},
        "faces": {"run_id", "image_id", "face_index", "config_hash", "status"},
    }
    assert FACES_SCHEMA.field("bbox").type == pa.list_(pa.float32())
    assert FACES_SCHEMA.field("affine").type == pa.list_(pa.float64())
    assert RUNS_SCHEMA.field("started_at").type == pa.timestamp("us", tz="UTC")
    table = empty_table(IMAGES_SCHEMA)
    assert table.num_rows == 0 and table.schema.equals(IMAGES_SCHEMA)


@pytest.mark.parametrize(
    ("schema", "change", "message"),
    [
        (IMAGES_SCHEMA, {"colour": "red"}, "unknown columns"),
        (IMAGES_SCHEMA, {"image_id": None}, "non-nullable"),
        (IMAGES_SCHEMA, {"status": "done"}, "not in"),
        (IMAGES_SCHEMA, {"image_id": "ABC"}, "sha256"),
        (IMAGES_SCHEMA, {"width": "wide"}, "'width'"),
        (IMAGES_SCHEMA, {"committed_at": dt.datetime(2025, 1, 1)}, "naive"),
        (FACES_SCHEMA, {"bbox": [1.0, 2.0, 3.0]}, "4 values"),
        (FACES_SCHEMA, {"landmarks": [0.0] * 9 + [None]}, "null inside"),
        (FACES_SCHEMA, {"affine": [1.0] * 7}, "6 values"),
        (RUNS_SCHEMA, {"config_json": "{not json"}, "not JSON"),
    ],
)
def test_rows_to_table_rejects(schema, change, message):
    base = {
        RUNS_SCHEMA: {"run_id": "r1", "started_at": T0, "config_hash": "c", "status": "running"},
        IMAGES_SCHEMA: image_row("r1", "a", "ok"),
        FACES_SCHEMA: face_row("r1", "a", 0, 1.0),
    }[schema]
    with pytest.raises(ValueError, match=message):
        rows_to_table([base, base | change], schema)


def test_rows_to_table_missing_keys_and_nulls():
    with pytest.raises(ValueError, match="non-nullable"):
        rows_to_table([{"run_id": "r1", "status": "ok"}], IMAGES_SCHEMA)
    with pytest.raises(ValueError, match="list of dicts"):
        rows_to_table(image_row("r1", "a", "ok"), IMAGES_SCHEMA)
    table = rows_to_table(
        [image_row("r1", "a", "ok", width=640), image_row("r1", "b", "no_face")], IMAGES_SCHEMA
    )
    assert table.column("width").to_pylist() == [640, None]
    assert table.column("error").null_count == 2
    assert table.column("image_id").to_pylist() == [sha("a"), sha("b")]


def test_conform_table_casts_reorders_and_checks():
    source = pa.table(
        {"width": pa.array([640], pa.int64()), **{k: [v] for k, v in image_row("r", "a", "ok").items()}}
    )
    out = conform_table(source, IMAGES_SCHEMA)
    assert out.schema.names == IMAGES_SCHEMA.names
    assert out.column("width").type == pa.int32() and out.column("width").to_pylist() == [640]
    with pytest.raises(ValueError, match="cannot cast"):
        conform_table(source.set_column(0, "width", pa.array([2**40], pa.int64())), IMAGES_SCHEMA)
    with pytest.raises(ValueError, match="missing non-nullable"):
        conform_table(source.drop_columns(["status"]), IMAGES_SCHEMA)


# --------------------------------------------------------------------------- store, every backend


def test_round_trip_all_tables(catalog: Catalog):
    run = {
        "run_id": "r1",
        "started_at": T0,
        "pack_sha256": json.dumps({"unet": sha("unet")}),
        "config_hash": "cfg-a",
        "status": "completed",
        "n_images": 3,
        "faces_per_second": 1.25,
    }
    images = [
        image_row(
            "r1", "a", "ok", width=640, height=480, orientation=6, mode="L", is_grayscale=True, n_faces=1
        ),
        image_row("r1", "b", "failed", error="broken file", bytes=17),
    ]
    bbox = [10.5, 20.25, 110.0, 140.75]
    affine = [0.1, -0.2, 3.0, 0.2, 0.1, -4.5]
    face = face_row(
        "r1",
        "a",
        0,
        1.75,
        bbox=bbox,
        landmarks=[1.5 * i for i in range(10)],
        affine=affine,
        guidance_levels=[0.5, 0.25],
        identity_similarity=0.875,
        t_start=120,
    )
    before = dt.datetime.now(dt.UTC)
    uris = [
        catalog.write_part("runs", [run], run_id="r1"),
        catalog.write_part("images", images, run_id="r1"),
        catalog.write_part("faces", pa.Table.from_pylist([face]), run_id="r1"),
    ]
    after = dt.datetime.now(dt.UTC)
    fs, _ = catalog.filesystem()
    for table_name, uri in zip(("runs", "images", "faces"), uris, strict=True):
        assert uri == catalog.table_uri(table_name) and uri.endswith(f"/{table_name}")
        assert fs.exists(f"{fsspec.core.strip_protocol(uri)}/_delta_log/00000000000000000001.json")

    runs = catalog.read("runs")
    assert len(runs) == 1 and runs.loc[0, "started_at"] == pd.Timestamp(T0)
    assert (
        pd.isna(runs.loc[0, "finished_at"]) and runs.loc[0, "n_images"] == 3 and pd.isna(runs.loc[0, "n_ok"])
    )
    assert json.loads(runs.loc[0, "pack_sha256"]) == {"unet": sha("unet")}

    got = catalog.read("images").sort_values("relative_path").reset_index(drop=True)
    assert got["image_id"].tolist() == [sha("a"), sha("b")]
    assert got["status"].tolist() == ["ok", "failed"]
    assert str(got["width"].dtype) == "Int32" and got.loc[0, "width"] == 640 and pd.isna(got.loc[1, "width"])
    assert got.loc[0, "is_grayscale"] and pd.isna(got.loc[1, "is_grayscale"])
    assert got.loc[1, "error"] == "broken file" and pd.isna(got.loc[0, "error"])
    assert all(before <= t.to_pydatetime() <= after for t in got["committed_at"])
    # The run column: plain strings, not a dictionary/category.
    assert not isinstance(got["run_id"].dtype, pd.CategoricalDtype)
    assert pd.api.types.is_string_dtype(got["run_id"]) and got["run_id"].tolist() == ["r1", "r1"]
    assert catalog.read_arrow("images").schema.field("run_id").type == pa.string()

    faces = catalog.read("faces")
    assert len(faces) == 1 and faces.loc[0, "face_index"] == 0 and faces.loc[0, "t_start"] == 120
    np.testing.assert_array_equal(faces.loc[0, "bbox"], np.array(bbox, dtype=np.float32))
    assert faces.loc[0, "bbox"].dtype == np.float32 and faces.loc[0, "affine"].dtype == np.float64
    np.testing.assert_array_equal(faces.loc[0, "affine"], np.array(affine))
    np.testing.assert_array_equal(faces.loc[0, "landmarks"], np.arange(10) * 1.5)
    np.testing.assert_array_equal(faces.loc[0, "guidance_levels"], [0.5, 0.25])
    assert faces.loc[0, "std_hat"] == 1.75 and faces.loc[0, "identity_similarity"] == 0.875
    assert np.isnan(faces.loc[0, "psnr"]) and faces.loc[0, "bucket"] is pd.NA


def test_parts_runs_and_filters(catalog: Catalog):
    catalog.write_part("images", [image_row("r1", "a", "ok"), image_row("r1", "b", "failed")], run_id="r1")
    catalog.write_part("images", [image_row("r1", "c", "ok")], run_id="r1")
    catalog.write_part(
        "images", [image_row("r2", "d", "no_face"), image_row("r2", "e", "failed")], run_id="r2"
    )
    catalog.write_part("images", [image_row("r10", "f", "ok")], run_id="r10")

    assert len(catalog.read("images")) == 6
    assert sorted(catalog.read("images", run_id="r1")["relative_path"]) == ["a.jpg", "b.jpg", "c.jpg"]
    assert sorted(catalog.read("images", run_id="r2")["relative_path"]) == ["d.jpg", "e.jpg"]
    none = catalog.read("images", run_id="r3")
    assert len(none) == 0 and list(none.columns) == IMAGES_SCHEMA.names
    failed = catalog.read("images", filters=[("status", "==", "failed")])
    assert sorted(failed["relative_path"]) == ["b.jpg", "e.jpg"]
    by_partition = catalog.read("images", filters=ds.field("run_id") == "r2", columns=["run_id", "image_id"])
    assert list(by_partition.columns) == ["run_id", "image_id"]
    assert sorted(by_partition["image_id"]) == sorted([sha("d"), sha("e")])
    assert len(catalog.read("faces")) == 0 and list(catalog.read("faces").columns) == FACES_SCHEMA.names
    with pytest.raises(ValueError, match="unknown columns"):
        catalog.read("images", columns=["colour"])
    with pytest.raises(ValueError, match="run_id"):
        catalog.read("images", run_id="../r1")


def test_readers_ignore_files_the_log_does_not_name(catalog: Catalog):
    catalog.write_part("images", [image_row("r1", "a", "ok")], run_id="r1")
    fs, root = catalog.filesystem()
    for junk in [
        "images/part-00000-crashed-write-c000.zstd.parquet",  # a data file whose commit never happened
        "images/_SUCCESS",
        "images/notes.txt",
        "images/stray/part-2.parquet",
    ]:
        if catalog.uri.startswith(("/", "file:")):
            fs.makedirs(os.path.dirname(f"{root}/{junk}"), exist_ok=True)
        fs.pipe_file(f"{root}/{junk}", b"not parquet")
    assert catalog.read("images")["image_id"].tolist() == [sha("a")]
    assert sql(catalog, "SELECT COUNT(*) AS n FROM images")["n"].tolist() == [1]


def test_write_part_rejects_bad_input(catalog: Catalog):
    with pytest.raises(ValueError, match="every row's run_id"):
        catalog.write_part("images", [image_row("r2", "a", "ok")], run_id="r1")
    with pytest.raises(ValueError, match="no rows"):
        catalog.write_part("faces", [], run_id="r1")
    with pytest.raises(ValueError, match="run_id"):
        catalog.write_part("images", [image_row("a/b", "a", "ok")], run_id="a/b")
    with pytest.raises(ValueError, match="unknown catalog table"):
        catalog.write_part("photos", [image_row("r1", "a", "ok")], run_id="r1")
    with pytest.raises(ValueError, match="non-nullable"):
        catalog.write_part("images", [{"run_id": "r1", "status": "ok"}], run_id="r1")
    assert len(catalog.read("images")) == 0 and len(catalog.read("faces")) == 0


def test_resume_helpers(catalog: Catalog):
    t1, t2 = T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=2)
    r1 = [
        image_row("r1", "a", "ok", committed_at=T0),
        image_row("r1", "b", "failed", error="oom", committed_at=T0),
        image_row("r1", "c", "no_face", committed_at=T0),
        image_row("r1", "e", "ok", config_hash="cfg-b", committed_at=T0),
    ]
    catalog.write_part("images", r1, run_id="r1")
    assert catalog.committed_image_ids("cfg-a") == {sha("a"), sha("c")}
    assert catalog.committed_image_ids("cfg-b") == {sha("e")}
    assert catalog.committed_image_ids("cfg-zzz") == set()

    r2 = [image_row("r2", "b", "ok", committed_at=t2), image_row("r2", "a", "skipped", committed_at=t2)]
    catalog.write_part("images", r2, run_id="r2")
    # A late writer with an older commit time: committed_at, not file order, decides what is latest.
    catalog.write_part("images", [image_row("r3", "b", "failed", committed_at=t1)], run_id="r3")
    assert catalog.committed_image_ids("cfg-a") == {sha("a"), sha("b"), sha("c")}

    latest = catalog.latest_images("cfg-a")
    assert latest["image_id"].tolist() == sorted([sha("a"), sha("b"), sha("c")])
    by_id = latest.set_index("image_id")
    assert by_id.loc[sha("b"), "status"] == "ok" and by_id.loc[sha("b"), "run_id"] == "r2"
    assert by_id.loc[sha("a"), "status"] == "ok" and by_id.loc[sha("a"), "run_id"] == "r1"
    with_skipped = catalog.latest_images("cfg-a", include_skipped=True).set_index("image_id")
    assert with_skipped.loc[sha("a"), "status"] == "skipped"
    everything = catalog.latest_images()
    assert sorted(zip(everything["image_id"], everything["config_hash"], strict=True)) == sorted(
        [(sha("a"), "cfg-a"), (sha("b"), "cfg-a"), (sha("c"), "cfg-a"), (sha("e"), "cfg-b")]
    )
    assert len(Catalog(catalog.uri + "-empty", catalog.storage_options).latest_images("cfg-a")) == 0


def test_sql_queries(catalog: Catalog):
    run = {"run_id": "r1", "started_at": T0, "config_hash": "cfg-a", "status": "completed"}
    catalog.write_part("runs", [run], run_id="r1")
    catalog.write_part(
        "images",
        [
            image_row("r1", "a", "ok", n_faces=2),
            image_row("r1", "b", "ok", n_faces=1),
            image_row("r1", "c", "no_face"),
            image_row("r1", "d", "failed"),
        ],
        run_id="r1",
    )
    catalog.write_part("images", [image_row("r2", "d", "ok", n_faces=1)], run_id="r2")
    catalog.write_part(
        "faces",
        [
            face_row("r1", "a", 0, 0.5, bbox=[1.0, 2.0, 3.0, 4.0]),
            face_row("r1", "a", 1, 1.5),
            face_row("r1", "b", 0, 4.0),
        ],
        run_id="r1",
    )
    catalog.write_part("faces", [face_row("r2", "d", 0, 3.0)], run_id="r2")

    counts = sql(catalog, "SELECT status, COUNT(*) AS n FROM images GROUP BY status ORDER BY status")
    assert dict(zip(counts["status"], counts["n"], strict=True)) == {"failed": 1, "no_face": 1, "ok": 3}
    joined = sql(
        catalog,
        "SELECT i.relative_path, COUNT(*) AS n FROM faces f JOIN images i "
        "ON f.run_id = i.run_id AND f.image_id = i.image_id GROUP BY 1 ORDER BY 1",
    )
    assert joined["relative_path"].tolist() == ["a.jpg", "b.jpg", "d.jpg"] and joined["n"].tolist() == [
        2,
        1,
        1,
    ]
    avg = sql(catalog, "SELECT run_id, AVG(std_hat) AS s FROM faces GROUP BY run_id ORDER BY run_id")
    assert avg["run_id"].tolist() == ["r1", "r2"]
    np.testing.assert_allclose(avg["s"], [(0.5 + 1.5 + 4.0) / 3, 3.0])
    assert sql(catalog, "SELECT AVG(std_hat) AS s FROM faces")["s"].tolist() == [2.25]
    first = sql(catalog, "SELECT bbox[1] AS x0, bbox[4] AS y1 FROM faces WHERE bbox IS NOT NULL")
    assert first["x0"].tolist() == [1.0] and first["y1"].tolist() == [4.0]
    kinds = sql(catalog, "SELECT typeof(run_id) AS t, typeof(started_at) AS s FROM runs")
    assert kinds.loc[0, "t"] == "VARCHAR" and kinds.loc[0, "s"] == "TIMESTAMP WITH TIME ZONE"
    with pytest.raises(ValueError, match="empty"):
        sql(catalog, "  ")


def test_sql_on_empty_catalog(catalog: Catalog):
    assert sql(catalog, "SELECT COUNT(*) AS n FROM images")["n"].tolist() == [0]
    faces = sql(catalog, "SELECT * FROM faces")
    assert len(faces) == 0 and list(faces.columns) == FACES_SCHEMA.names
    runs = sql(catalog, "SELECT * FROM runs")
    assert list(runs.columns) == RUNS_SCHEMA.names
    joined = sql(catalog, "SELECT COUNT(*) AS n FROM faces JOIN images USING (run_id, image_id)")
    assert joined["n"].tolist() == [0]


# --------------------------------------------------------------------------- local Delta tables


def _tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_local_writes_are_one_delta_commit_each(tmp_path):
    cat = Catalog(tmp_path.as_uri())  # file:// URIs and plain paths name the same files
    uris = {cat.write_part("images", [image_row("r1", name, "ok")], run_id="r1") for name in "abc"}
    assert uris == {f"{tmp_path}/images"}
    files = _tree(tmp_path)
    data = [f for f in files if f.endswith(".parquet")]
    log = [f for f in files if f.startswith("images/_delta_log/") and f.endswith(".json")]
    assert len(data) == 3 and all(f.startswith("images/part-") for f in data)
    assert len(log) == 4  # version 0 creates the (empty) table, then one version per write
    assert sorted(Catalog(str(tmp_path)).read("images")["relative_path"]) == ["a.jpg", "b.jpg", "c.jpg"]


def test_tables_read_by_deltalake_pandas_and_duckdb(tmp_path):
    from deltalake import DeltaTable

    cat = Catalog(str(tmp_path))
    cat.write_part("images", [image_row("r1", "a", "ok"), image_row("r1", "b", "failed")], run_id="r1")
    cat.write_part("images", [image_row("20250301", "c", "ok")], run_id="20250301")
    frame = DeltaTable(str(tmp_path / "images")).to_pandas()
    assert sorted(zip(frame["run_id"], frame["relative_path"], strict=True)) == [
        ("20250301", "c.jpg"),
        ("r1", "a.jpg"),
        ("r1", "b.jpg"),
    ]
    files = DeltaTable(str(tmp_path / "images")).file_uris()
    rows = duckdb.sql(f"SELECT run_id, status FROM read_parquet({files}) ORDER BY relative_path").fetchall()
    assert rows == [("r1", "ok"), ("r1", "failed"), ("20250301", "ok")]


def test_a_data_file_without_its_commit_is_never_read(tmp_path):
    """A writer killed after uploading its data file but before creating its log entry leaves a file
    no reader, resume or SQL sees; the re-run commits the rows."""
    import pyarrow.parquet as pq

    cat = Catalog(str(tmp_path))
    cat.write_part("images", [image_row("r1", "a", "ok")], run_id="r1")
    orphan = rows_to_table([image_row("r1", "b", "ok")], IMAGES_SCHEMA)
    pq.write_table(orphan, tmp_path / "images" / "part-00000-killed-before-commit-c000.zstd.parquet")
    assert cat.read("images")["image_id"].tolist() == [sha("a")]
    assert cat.committed_image_ids("cfg-a") == {sha("a")}
    assert sql(cat, "SELECT COUNT(*) AS n FROM images")["n"].tolist() == [1]
    cat.write_part("images", [image_row("r1", "b", "ok")], run_id="r1")  # the re-run commits it
    assert cat.committed_image_ids("cfg-a") == {sha("a"), sha("b")}


# --------------------------------------------------------------------------- S3, the value object, format


def test_s3_server_is_loopback(s3: S3Server):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", s3.endpoint_url)
    options = s3.storage_options
    options["client_kwargs"]["endpoint_url"] = "changed"
    assert s3.storage_options["client_kwargs"]["endpoint_url"] == s3.endpoint_url


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_s3_endpoint_from_environment(s3: S3Server, monkeypatch, variable):
    import s3fs

    monkeypatch.setenv(variable, s3.endpoint_url)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep an older endpoint
    try:
        uri = f"s3://{BUCKET}/{uuid.uuid4().hex}/env"
        Catalog(uri).write_part("images", [image_row("r1", "a", "ok")], run_id="r1")
        explicit = Catalog(uri, storage_options=s3.storage_options)
        assert explicit.read("images")["image_id"].tolist() == [sha("a")]
        assert Catalog(uri).committed_image_ids("cfg-a") == {sha("a")}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_catalog_value_object():
    cat = Catalog("s3://bucket/catalog", storage_options={"secret": "hunter2"})
    assert "hunter2" not in repr(cat)
    copy = pickle.loads(pickle.dumps(cat))
    assert copy == cat and copy.storage_options == {"secret": "hunter2"}
    assert hash(cat) == hash(Catalog("s3://bucket/catalog"))
    with pytest.raises(ValueError, match="non-empty"):
        Catalog("")


def test_format_table():
    df = pd.DataFrame({"status": ["ok", "failed", "no_face"], "n": [3, 1, 1]})
    text = format_table(df, max_rows=2)
    lines = text.splitlines()
    assert lines[0].split() == ["status", "n"] and lines[1].split() == ["ok", "3"]
    assert (
        lines[2].split() == ["failed", "1"] and lines[3] == "(showing 2 of 3 rows)" and "no_face" not in text
    )
    assert format_table(df).splitlines()[-1] == "(3 rows)"
    assert format_table(df.head(0)) == "(0 rows; columns: status, n)"
    with pytest.raises(ValueError, match="max_rows"):
        format_table(df, max_rows=0)
