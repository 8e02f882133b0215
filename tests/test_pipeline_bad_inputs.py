"""Bad input never stops a run: each odd or broken file gets one catalog row with its status and
reason, sources stay untouched, and a failed sample batch leaves its faces unrestored."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from make_bad_inputs import EXPECTED_REASONS, synthetic_face, write_bad_inputs
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from catalogs import Catalog
from dynface.packs.writer import write_random_pack
from tasks.bucket import bucket_wave
from tasks.commit import commit_shard_rows
from tasks.compose import compose_shard
from tasks.detect_align import detect_shard
from tasks.discover import discover_images, prepare_run
from tasks.estimate import estimate_shard
from tasks.sample import release_actors, sample_wave_rows
from tasks.score import score_shard
from tasks.tables import BATCHES, SAMPLES

OPTIONS = {"respacing": "ddim5"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=32)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def bad_run(prefect_api, local_ray, pack, tmp_path_factory):
    from flows.restore_archive import restore_archive

    root = tmp_path_factory.mktemp("bad")
    src = root / "src"
    expected = write_bad_inputs(src)
    before = tree_hashes(src)
    summary = restore_archive(source=str(src), dest=str(root / "out"), pack=pack, options=OPTIONS)
    return src, root / "out", expected, before, summary


def test_every_bad_input_gets_one_row_with_its_status(bad_run):
    src, out, expected, _, summary = bad_run
    assert summary.status == "completed"
    images = Catalog(str(out / "catalog")).read("images", run_id=summary.run_id)
    assert sorted(images["relative_path"]) == sorted(expected)  # one row per file, none twice
    by_name = images.set_index("relative_path")
    for name, status in expected.items():
        row = by_name.loc[name]
        assert row["status"] == status, f"{name}: {row['status']} ({row['error']})"
        if name in EXPECTED_REASONS:
            assert row["error"].startswith(f"{EXPECTED_REASONS[name]}: "), f"{name}: {row['error']}"
            assert pd.isna(row["output_uri"])
        else:
            assert pd.isna(row["error"])
    assert by_name.loc["no_face.png", "n_faces"] == 0
    assert pd.isna(by_name.loc["no_face.png", "output_uri"])
    counts = {s: list(expected.values()).count(s) for s in ("ok", "no_face", "failed", "skipped")}
    assert summary.counts == counts == {"ok": 3, "no_face": 1, "failed": 3, "skipped": 4}


def test_awkward_but_valid_files_are_restored_upright(bad_run):
    src, out, _, _, summary = bad_run
    images = Catalog(str(out / "catalog")).read("images", run_id=summary.run_id).set_index("relative_path")
    for name in ("cmyk.jpg", "sixteen_bit.png", "exif_rotated.jpg"):
        row = images.loc[name]
        assert row["n_faces"] == 1
        with Image.open(row["output_uri"]) as im:
            assert im.size == (300, 300) and im.mode == "RGB"
    assert images.loc["exif_rotated.jpg", "orientation"] == 6
    assert images.loc["cmyk.jpg", "mode"] == "CMYK"
    # Displayed upright: the restored output's eye row is where the drawn face has its eyes
    # (y ~ 0.44 * 300), brighter sclera than the rows far below the face.
    face = synthetic_face(300).astype(np.float64)
    with Image.open(images.loc["exif_rotated.jpg", "output_uri"]) as im:
        upright = np.asarray(im.convert("RGB")).astype(np.float64)
    stored_wrong = np.rot90(face, k=1)
    assert np.abs(upright - face).mean() < np.abs(upright - stored_wrong).mean()


def test_sources_untouched_and_runs_row(bad_run):
    src, out, _, before, summary = bad_run
    assert tree_hashes(src) == before
    runs = Catalog(str(out / "catalog")).read("runs", run_id=summary.run_id)
    done = runs[runs["status"] == "completed"].iloc[0]
    assert (done["n_ok"], done["n_no_face"], done["n_failed"], done["n_skipped"]) == (3, 1, 3, 4)


def test_failed_batch_keeps_faces_unrestored_and_run_goes_on(local_ray, pack, tmp_path):
    """Stages as plain functions on the module's Ray: one batch points at a missing crop."""
    src = tmp_path / "src"
    src.mkdir()
    faces = {f"f{k}.png": np.roll(synthetic_face(48), 3 * k, axis=1) for k in range(3)}
    for name, rgb in faces.items():
        Image.fromarray(rgb).save(src / name)
    ctx = prepare_run(
        source=str(src), dest=str(tmp_path / "out"), catalog=None, pack=pack, aligned=True, device="cpu",
        compare=False, method="full", guidance=None, options={**OPTIONS, "batch_size": 2},
    )  # fmt: skip
    assert discover_images(ctx, shard_size=3).n_new == 3
    detect_shard(ctx, 0)
    estimate_shard(ctx, 0)
    batches = bucket_wave(ctx, 0, [0])
    assert [len(BATCHES.read(b)) for b in batches] == [2, 1]
    broken = BATCHES.read(batches[1])
    BATCHES.write(batches[1], [{**r, "crop_uri": r["crop_uri"] + ".missing"} for r in broken])
    try:
        rows = sample_wave_rows(ctx, batches)
    finally:
        release_actors(ctx.run_id)
    status = {(r["image_id"], r["face_index"]): r for r in rows}
    bad_key = (broken[0]["image_id"], broken[0]["face_index"])
    assert status[bad_key]["sample_status"] == "failed"
    assert "FileNotFoundError" in status[bad_key]["sample_error"]
    assert sorted(r["sample_status"] for r in rows) == ["failed", "ok", "ok"]
    samples = SAMPLES.write(SAMPLES.wave_uri(ctx.work, 0), rows)
    compose_shard(ctx, 0, samples)
    score_shard(ctx, 0, samples)
    assert commit_shard_rows(ctx, 0, samples) == {"ok": 2, "failed": 1}
    cat = Catalog(ctx.catalog)
    images = cat.read("images").set_index("image_id")
    failed = images.loc[broken[0]["image_id"]]
    assert failed["status"] == "failed" and "1 of 1 faces kept unrestored" in failed["error"]
    # The fallback output exists and is the input itself (aligned mode, nothing pasted).
    name = failed["relative_path"]
    np.testing.assert_array_equal(np.asarray(Image.open(failed["output_uri"]).convert("RGB")), faces[name])
    face_rows = cat.read("faces").set_index("image_id")
    assert face_rows.loc[broken[0]["image_id"], "status"] == "failed"
    assert pd.isna(face_rows.loc[broken[0]["image_id"], "output_uri"])
    # A failed image is retried by the next run: it is not among the committed ids.
    assert cat.committed_image_ids(ctx.config_hash) == set(images.index) - {broken[0]["image_id"]}
    # A failed face keeps its plan: std*, start step and levels are recorded all the same.
    assert face_rows.loc[broken[0]["image_id"], "t_start"] == broken[0]["t_start"]
    # A retried commit of the same shard writes nothing twice.
    commit_shard_rows(ctx, 0, samples)
    assert len(cat.read("images")) == 3 and len(cat.read("faces")) == 3
