"""Delta Lake catalogs: the commit marker (a crash between a shard's two appends), concurrent writers
(local and loopback S3), compaction during a write, vacuum, history and `--as-of`, schema evolution,
migration from the hive layout, and no metadata-service call from delta-rs."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import threading
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pyarrow as pa
import pytest
from s3_server import S3Server, s3_environment

import catalogs.store
import tasks.commit
from app.cli import main
from catalogs import (
    IMAGES_SCHEMA,
    Catalog,
    LegacyCatalog,
    LegacyLayoutError,
    NoS3Credentials,
    compact,
    history,
    sql,
    vacuum,
)
from tasks.discover import committed_images

BUCKET = "dynface-delta-test"
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def image_row(run_id: str, name: str, status: str = "ok", **extra: object) -> dict:
    row = {"run_id": run_id, "image_id": sha(name), "source_uri": f"file:///a/{name}.jpg", "status": status}
    return row | {"relative_path": f"{name}.jpg", "config_hash": "cfg"} | extra


def face_row(run_id: str, name: str, k: int = 0) -> dict:
    row = {"run_id": run_id, "image_id": sha(name), "face_index": k, "config_hash": "cfg", "status": "ok"}
    return row | {"std_hat": 1.0 + k, "bucket": 2}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_environment(BUCKET) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def catalog(request: pytest.FixtureRequest, tmp_path) -> Catalog:
    if request.param == "local":
        return Catalog(str(tmp_path / "catalog"))
    server = request.getfixturevalue("s3")
    return Catalog(f"s3://{BUCKET}/{uuid.uuid4().hex}/catalog", storage_options=server.storage_options)


# --------------------------------------------------------------------------- the commit marker


def test_crash_between_the_faces_and_images_appends(tmp_path, monkeypatch):
    """A shard's faces are appended first and its images rows last: killed in between, nothing of the
    shard counts as done (resume trusts images rows only); the task's retry completes the shard
    without writing its faces twice."""
    cat = Catalog(str(tmp_path / "catalog"))
    ctx = SimpleNamespace(catalog=cat.uri, run_id="r1")
    images = [image_row("r1", "a"), image_row("r1", "b", "no_face", n_faces=0)]
    faces = [face_row("r1", "a", 0), face_row("r1", "a", 1)]
    monkeypatch.setattr(tasks.commit, "catalog_rows", lambda ctx, shard, uri: (images, faces))
    real_write = Catalog.write_part
    appends: list[str] = []

    def killed_at_second_append(self, table_name, rows, *, run_id):
        appends.append(table_name)
        if len(appends) == 2:
            raise SystemExit("killed between the two appends")
        return real_write(self, table_name, rows, run_id=run_id)

    monkeypatch.setattr(Catalog, "write_part", killed_at_second_append)
    with pytest.raises(SystemExit):
        tasks.commit.commit_shard_rows(ctx, 0, "unused")
    monkeypatch.setattr(Catalog, "write_part", real_write)
    assert cat.committed_image_ids("cfg") == set()  # nothing of the shard looks done
    assert committed_images(cat.uri, "cfg") == {}
    assert len(cat.read("images")) == 0

    assert tasks.commit.commit_shard_rows(ctx, 0, "unused") == {"ok": 1, "no_face": 1}  # the retry
    assert cat.committed_image_ids("cfg") == {sha("a"), sha("b")}
    assert sorted(cat.read("faces")["face_index"]) == [0, 1]  # faces written once


# --------------------------------------------------------------------------- concurrent writers


def test_concurrent_writers_lose_no_commit(catalog: Catalog):
    """Four runs append at once (threads: delta-rs commits outside the GIL): every row arrives once
    and every version is one commit."""
    n_writers, n_appends = 4, 5
    barrier = threading.Barrier(n_writers)
    errors: list[BaseException] = []

    def run(w: int) -> None:
        mine = Catalog(catalog.uri, catalog.storage_options)
        barrier.wait()
        try:
            for k in range(n_appends):
                mine.write_part("images", [image_row(f"r{w}", f"{w}-{k}")], run_id=f"r{w}")
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(n_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    images = catalog.read("images")
    assert sorted(images["image_id"]) == sorted(
        sha(f"{w}-{k}") for w in range(n_writers) for k in range(n_appends)
    )
    commits = catalog.delta_table("images").history()
    assert [h["operation"] for h in commits].count("CREATE TABLE") == 1  # one writer created it
    assert sorted(h["version"] for h in commits) == list(range(n_writers * n_appends + 1))


def test_compaction_while_a_run_writes(tmp_path):
    cat = Catalog(str(tmp_path / "catalog"))
    for k in range(6):
        cat.write_part("faces", [face_row("r0", f"old{k}")], run_id="r0")
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for k in range(8):
                cat.write_part("faces", [face_row("r1", f"new{k}")], run_id="r1")
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    rounds = 0
    while not done.is_set() or rounds == 0:
        compact(cat, ("faces",))
        rounds += 1
    thread.join()
    assert errors == []
    faces = cat.read("faces")
    assert len(faces) == 14 and sorted(set(faces["run_id"])) == ["r0", "r1"]
    compact(cat, ("faces",))
    assert len(cat.delta_table("faces").file_uris()) == 1


# --------------------------------------------------------------------------- maintenance and history


def test_compact_vacuum_history_and_as_of(tmp_path, capsys):
    cat = Catalog(str(tmp_path / "catalog"))
    for run in ("r1", "r2"):
        cat.write_part("faces", [face_row(run, f"{run}-a")], run_id=run)
        cat.write_part("images", [image_row(run, f"{run}-a")], run_id=run)
        cat.write_part("images", [image_row(run, f"{run}-b")], run_id=run)
    images_dir = tmp_path / "catalog" / "images"
    assert len(list(images_dir.glob("*.parquet"))) == 4

    assert main(["catalog", "compact", cat.uri]) == 0
    assert "images: 4 files -> 1" in capsys.readouterr().out
    assert len(cat.delta_table("images").file_uris()) == 1
    assert len(list(images_dir.glob("*.parquet"))) == 5  # removed files stay until a vacuum
    assert main(["catalog", "compact", cat.uri]) == 0  # nothing left to merge: no new version
    assert cat.delta_table("images").version() == 5

    # History: which run committed each version; the catalog as it was after r1's last commit.
    hist = history(cat)
    images = hist[hist["table"] == "images"].sort_values("version")
    assert images["operation"].tolist() == ["CREATE TABLE", "WRITE", "WRITE", "WRITE", "WRITE", "OPTIMIZE"]
    assert images["run_id"].tolist()[1:5] == ["r1", "r1", "r2", "r2"]
    assert images["rows_added"].tolist()[1:5] == [1, 1, 1, 1]
    assert main(["catalog", "history", cat.uri]) == 0
    out = capsys.readouterr().out
    assert "OPTIMIZE" in out and "r2" in out
    then = sql(cat, "SELECT run_id, COUNT(*) AS n FROM images GROUP BY run_id", as_of=2)
    assert then.to_dict("records") == [{"run_id": "r1", "n": 2}]
    faces_then = sql(cat, "SELECT run_id FROM faces", as_of=2)
    assert faces_then["run_id"].tolist() == ["r1"]  # faces as they were when images v2 was committed
    assert main(["catalog", "sql", cat.uri, "SELECT COUNT(*) AS n FROM images", "--as-of", "3"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["n", "3"]
    assert main(["catalog", "sql", cat.uri, "SELECT 1", "--as-of", "99"]) == 1
    assert "versions 0..5" in capsys.readouterr().err

    # Vacuum: removed files older than the retention go; the current state reads the same.
    assert vacuum(cat, retain_hours=24)["images"] == []  # compacted just now: kept for --as-of
    assert main(["catalog", "vacuum", cat.uri, "--retain-hours", "0"]) == 0
    assert "images: 4 files deleted" in capsys.readouterr().out
    assert len(list(images_dir.glob("*.parquet"))) == 1
    assert len(cat.read("images")) == 4 and len(cat.read("faces")) == 2


def test_a_table_never_written_reads_empty(tmp_path):
    cat = Catalog(str(tmp_path / "nothing"))
    assert cat.delta_table("reviews") is None
    assert list(cat.read("reviews").columns) == list(catalogs.schemas.REVIEWS_SCHEMA.names)
    assert compact(cat) == [] and vacuum(cat, 0) == {} and len(history(cat)) == 0
    with pytest.raises(ValueError, match="no images table"):
        sql(cat, "SELECT 1", as_of=0)


# --------------------------------------------------------------------------- schema evolution


def test_a_nullable_column_added_to_a_schema(tmp_path, monkeypatch):
    cat = Catalog(str(tmp_path / "catalog"))
    cat.write_part("images", [image_row("old", "a")], run_id="old")
    newer = IMAGES_SCHEMA.append(pa.field("camera", pa.string(), metadata={"doc": "camera model"}))
    real_schema_for = catalogs.store.schema_for
    monkeypatch.setattr(
        catalogs.store, "schema_for", lambda name: newer if name == "images" else real_schema_for(name)
    )
    before = cat.read("images")  # the older table reads with the new column null
    assert before["camera"].isna().all() and len(before) == 1
    cat.write_part("images", [image_row("new", "b", camera="Leica")], run_id="new")
    both = cat.read("images").set_index("run_id")
    assert both.loc["new", "camera"] == "Leica" and both["camera"].isna().sum() == 1
    monkeypatch.undo()  # older code: reads without the column and still writes
    cat.write_part("images", [image_row("old2", "c")], run_id="old2")
    older = cat.read("images")
    assert "camera" not in older.columns and sorted(older["run_id"]) == ["new", "old", "old2"]


# --------------------------------------------------------------------------- migration


def _legacy_catalog(root: str) -> LegacyCatalog:
    old = LegacyCatalog(root)
    for run in ("20250301", "20250302"):
        run_row = {"run_id": run, "started_at": T0, "config_hash": "cfg", "status": "running"}
        old.write_part("runs", [run_row], run_id=run)
        old.write_part("faces", [face_row(run, f"{run}-a"), face_row(run, f"{run}-a", 1)], run_id=run)
        old.write_part("images", [image_row(run, f"{run}-a", n_faces=2)], run_id=run)
        old.write_part("images", [image_row(run, f"{run}-b", "failed", error="broken")], run_id=run)
    return old


MIGRATION_KEYS = {
    "runs": ["run_id"],
    "images": ["run_id", "image_id"],
    "faces": ["run_id", "image_id", "face_index"],
    "reviews": ["run_id", "image_id"],
}


def test_migrate_a_hive_layout_catalog_row_for_row(tmp_path, capsys):
    old = _legacy_catalog(str(tmp_path / "old"))
    with pytest.raises(LegacyLayoutError, match="catalog migrate"):
        Catalog(old.uri).read("images")
    new = Catalog(str(tmp_path / "new"))
    assert main(["catalog", "migrate", old.uri, new.uri]) == 0
    assert "images: 4 rows" in capsys.readouterr().out
    for name, keys in MIGRATION_KEYS.items():
        order = [(key, "ascending") for key in keys]
        assert new.read_arrow(name).sort_by(order).equals(old.dataset(name).to_table().sort_by(order)), name
    hist = history(new)
    writes = hist[(hist["table"] == "images") & (hist["operation"] == "WRITE")]
    assert sorted(writes["run_id"]) == ["20250301", "20250302"]  # one append per run
    assert len(new.delta_table("images").file_uris()) == 1  # compacted
    assert main(["catalog", "migrate", old.uri, new.uri]) == 1  # never doubled into a used catalog
    assert "already has rows" in capsys.readouterr().err


# --------------------------------------------------------------------------- S3: no metadata service


@pytest.fixture
def metadata_recorder(monkeypatch) -> Iterator[list[str]]:
    """A loopback HTTP server standing in for 169.254.169.254: delta-rs (object_store) is pointed at it
    with AWS_METADATA_ENDPOINT, botocore with AWS_EC2_METADATA_SERVICE_ENDPOINT. Yields the paths asked."""
    asked: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            asked.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.end_headers()

        do_GET = do_PUT = _record

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", address)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", address)
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


def test_delta_rs_never_asks_the_metadata_service(s3: S3Server, metadata_recorder, monkeypatch, tmp_path):
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    uri = f"s3://{BUCKET}/{uuid.uuid4().hex}/catalog"
    cat = Catalog(uri)  # keys and endpoint from the environment, as the pipeline gets them
    cat.write_part("images", [image_row("r1", "a")], run_id="r1")
    assert cat.committed_image_ids("cfg") == {sha("a")}
    assert sql(cat, "SELECT COUNT(*) AS n FROM images")["n"].tolist() == [1]
    compact(cat)
    assert len(history(cat)) >= 2
    assert metadata_recorder == []

    # Keys given only as storage options (none in the environment) reach delta-rs too.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    given = Catalog(uri, storage_options=s3.storage_options)
    given.write_part("images", [image_row("r2", "b")], run_id="r2")
    assert given.committed_image_ids("cfg") == {sha("a"), sha("b")}
    assert metadata_recorder == []

    # The control: delta-rs left to find credentials itself does ask (so the recorder would see it).
    bare = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    with pytest.raises((DeltaError, OSError)):
        DeltaTable(f"{uri}/images", storage_options=bare)
    assert any("/latest/api/token" in path for path in metadata_recorder)

    # No keys anywhere: the catalog refuses before delta-rs (or botocore) goes looking.
    metadata_recorder.clear()
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with pytest.raises(NoS3Credentials, match="no S3 credentials"):
        Catalog(uri).read("images")
    assert metadata_recorder == []
