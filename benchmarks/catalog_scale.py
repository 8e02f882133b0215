"""Catalog at archive scale: the old hive layout and the Delta tables side by side, in one run.

    python benchmarks/catalog_scale.py --faces 1000000 --runs 365 [--shards 8] [--out DIR]

Builds both catalogs through the project's own writing code, the way nightly runs write them: per
run a `running` row, then `--shards` shard commits (a faces append, then an images append), then a
closing row. Old layout: `catalogs.legacy.LegacyCatalog.write_part` (one Parquet part per write);
Delta: `catalogs.Catalog.write_part` (one Delta append per write). Then it times, in process, the
aggregate query and the images-faces join (DuckDB over the tables, as `dynface catalog sql` does)
and the resume read (committed image ids for a config), for the old layout, Delta before
compaction and Delta after `catalogs.compact`. Prints one table; numbers are the best of 3 runs.
Synthetic rows (two faces per image); no timing here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalogs import Catalog, LegacyCatalog, compact, sql  # noqa: E402
from catalogs.schemas import COMMITTED_STATUSES  # noqa: E402

AGGREGATE = "SELECT bucket, COUNT(*) AS n, AVG(std_hat) AS s FROM faces GROUP BY bucket"
JOIN = "SELECT i.status, COUNT(*) AS n FROM faces f JOIN images i USING (run_id, image_id) GROUP BY i.status"
CONFIG = "cfg-bench"
FACES_PER_IMAGE = 2


def _lists(values: np.ndarray, width: int, type_: pa.DataType) -> pa.ListArray:
    offsets = pa.array(np.arange(0, values.size + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), type=type_))


def shard_tables(run_id: str, first_image: int, n_images: int, rng: np.random.Generator) -> tuple:
    """(images, faces) pyarrow tables of one shard: `n_images` images with two faces each."""
    ids = [hashlib.sha256(f"image-{first_image + k}".encode()).hexdigest() for k in range(n_images)]
    n_faces = n_images * FACES_PER_IMAGE
    status = np.where(rng.random(n_images) < 0.97, "ok", "failed")
    images = pa.table(
        {
            "run_id": [run_id] * n_images,
            "image_id": ids,
            "source_uri": [f"s3://archive/photos/{i}.jpg" for i in ids],
            "relative_path": [f"photos/{i[:2]}/{i}.jpg" for i in ids],
            "bytes": rng.integers(50_000, 5_000_000, n_images),
            "width": np.full(n_images, 1024, dtype=np.int32),
            "height": np.full(n_images, 768, dtype=np.int32),
            "n_faces": np.full(n_images, FACES_PER_IMAGE, dtype=np.int32),
            "status": status,
            "output_uri": [f"s3://restored/run/restored/{i}.jpg" for i in ids],
            "config_hash": [CONFIG] * n_images,
            "seconds": rng.random(n_images) * 5,
        }
    )
    t_start = rng.integers(100, 999, n_faces).astype(np.int32)
    faces = pa.table(
        {
            "run_id": [run_id] * n_faces,
            "image_id": np.repeat(ids, FACES_PER_IMAGE),
            "face_index": np.tile(np.arange(FACES_PER_IMAGE, dtype=np.int32), n_images),
            "bbox": _lists(rng.random((n_faces, 4), dtype=np.float32) * 500, 4, pa.float32()),
            "landmarks": _lists(rng.random((n_faces, 10), dtype=np.float32) * 500, 10, pa.float32()),
            "det_score": rng.random(n_faces),
            "affine": _lists(rng.random((n_faces, 6)), 6, pa.float64()),
            "std_hat": rng.random(n_faces) * 8,
            "std_source": ["se"] * n_faces,
            "t_start": t_start,
            "bucket": t_start // 50,
            "n_steps": np.full(n_faces, 23, dtype=np.int32),
            "output_uri": [f"s3://restored/run/faces/{i}.png" for i in np.repeat(ids, FACES_PER_IMAGE)],
            "config_hash": [CONFIG] * n_faces,
            "status": ["ok"] * n_faces,
        }
    )
    return images, faces


def run_row(run_id: str, status: str) -> dict:
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return {"run_id": run_id, "started_at": started, "config_hash": CONFIG, "status": status}


def build(writer: object, args: argparse.Namespace) -> list[float]:
    """Write every run through `writer.write_part`; returns the seconds of each run."""
    rng = np.random.default_rng(0)
    n_images = args.faces // FACES_PER_IMAGE
    per_run = n_images // args.runs
    seconds = []
    next_image = 0
    for r in range(args.runs):
        run_id = f"2026{r:04d}T020000Z-bench"
        shards = [
            per_run // args.shards + (1 if k < per_run % args.shards else 0) for k in range(args.shards)
        ]
        tables = []
        for size in shards:
            tables.append(shard_tables(run_id, next_image, size, rng))
            next_image += size
        t0 = time.perf_counter()
        writer.write_part("runs", [run_row(run_id, "running")], run_id=run_id)
        for images, faces in tables:
            writer.write_part("faces", faces, run_id=run_id)
            writer.write_part("images", images, run_id=run_id)
        writer.write_part("runs", [run_row(run_id, "completed")], run_id=run_id)
        seconds.append(time.perf_counter() - t0)
    return seconds


def best_of(fn: Callable[[], object], n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def legacy_queries(old: LegacyCatalog) -> dict[str, float]:
    def query(text: str) -> None:
        con = duckdb.connect(":memory:")
        for name in ("images", "faces"):  # what `dynface catalog sql` registered before Delta
            con.register(name, old.dataset(name))
        con.execute(text).fetchall()
        con.close()

    def resume() -> set[str]:
        expression = (ds.field("config_hash") == CONFIG) & ds.field("status").isin(COMMITTED_STATUSES)
        return set(
            old.dataset("images").to_table(columns=["image_id"], filter=expression)["image_id"].to_pylist()
        )

    return {"aggregate": best_of(lambda: query(AGGREGATE)), "join": best_of(lambda: query(JOIN)),
            "resume": best_of(resume)}  # fmt: skip


def delta_queries(cat: Catalog) -> dict[str, float]:
    return {
        "aggregate": best_of(lambda: sql(cat, AGGREGATE)),
        "join": best_of(lambda: sql(cat, JOIN)),
        "resume": best_of(lambda: cat.committed_image_ids(CONFIG)),
    }


def data_files(root: Path, table: str) -> tuple[int, int]:
    """(count, bytes) of the Parquet files under a table folder, log excluded."""
    files = [p for p in (root / table).rglob("*.parquet") if "_delta_log" not in p.parts]
    return len(files), sum(p.stat().st_size for p in files)


def live_files(cat: Catalog, table: str) -> int:
    return len(cat.delta_table(table).file_uris())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=365)
    parser.add_argument("--shards", type=int, default=8, help="shard commits per run")
    parser.add_argument("--out", default=None, help="folder for the two catalogs (default: a temp folder)")
    args = parser.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="catalog-scale-"))
    old, new = LegacyCatalog(str(root / "old")), Catalog(str(root / "delta"))

    old_seconds = build(old, args)
    new_seconds = build(new, args)
    old_q = legacy_queries(old)
    before_q = delta_queries(new)
    before_files = {t: (live_files(new, t), data_files(root / "delta", t)) for t in ("images", "faces")}
    t0 = time.perf_counter()
    compact(new)
    compact_seconds = time.perf_counter() - t0
    after_q = delta_queries(new)

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"

    n_faces = len(sql(new, "SELECT image_id FROM faces"))
    print(f"catalog_scale: {n_faces} faces, {args.runs} runs x {args.shards} shard commits, in {root}")
    print(f"machine: {os.cpu_count()} CPUs; numbers: best of 3, in process\n")
    rows = [
        ("write time per run (mean)", ms(np.mean(old_seconds)), ms(np.mean(new_seconds)), "-"),
    ]
    for table in ("images", "faces"):
        n_old, b_old = data_files(root / "old", table)
        (live_before, _), live_after = before_files[table], live_files(new, table)
        mb = b_old / 2**20
        rows.append((f"{table} data files ({mb:.0f} MB old)", str(n_old), str(live_before), str(live_after)))
    rows += [
        ("aggregate query", ms(old_q["aggregate"]), ms(before_q["aggregate"]), ms(after_q["aggregate"])),
        ("images x faces join", ms(old_q["join"]), ms(before_q["join"]), ms(after_q["join"])),
        ("resume read (committed ids)", ms(old_q["resume"]), ms(before_q["resume"]), ms(after_q["resume"])),
        ("compaction", "-", "-", ms(compact_seconds)),
    ]
    header = ("", "old hive layout", "Delta", "Delta compacted")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
