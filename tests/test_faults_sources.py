"""Odd entries in a source never stop or hang a run: each image-like entry ends as one catalog row with
a clear reason, special files are never opened, identical bytes under several names each get a row
that reuses one restoration, and a file that vanishes mid-run is a failed row."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from catalogs import Catalog
from dynface.packs.writer import write_random_pack
from tasks.detect_align import detect_shard
from tasks.discover import discover_images, prepare_run
from tasks.sources import list_entries
from tasks.tables import DETECT_IMAGES

OPTIONS = {"respacing": "ddim5"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=32)


def _face(path: Path, shift: int = 0, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.roll(synthetic_face(size), shift, axis=1)).save(path)


def odd_source(root: Path) -> Path:
    """A source holding every odd entry of issue 15 beside two good crops."""
    src = root / "src"
    _face(src / "good.png")
    _face(src / "other.png", shift=5)
    (src / "later").mkdir()
    shutil.copy(src / "good.png", src / "later" / "same_bytes.png")
    (src / "dangling.jpg").symlink_to(src / "missing-target.jpg")
    (src / "loop_a.jpg").symlink_to(src / "loop_b.jpg")
    (src / "loop_b.jpg").symlink_to(src / "loop_a.jpg")
    os.mkfifo(src / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock.png"))
    sock.close()
    (src / "dirlink").symlink_to(src, target_is_directory=True)  # a folder cycle: walked once
    for name in ("photo.heic", "photo.HEIF", "raw.CR2", "raw.nef", "raw.dng"):
        (src / name).write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    Image.fromarray(np.zeros((40, 5000, 3), np.uint8)).save(src / "strip.png")
    Image.fromarray(synthetic_face(200)).resize((300, 200)).save(src / "wide.png")
    Image.fromarray(synthetic_face(64)).save(src / "modern.avif")
    return src


EXPECTED = {  # relative path -> (status, reason prefix); copies and avif are checked apart
    "dangling.jpg": ("failed", "broken_link:"),
    "loop_a.jpg": ("failed", "link_loop:"),
    "loop_b.jpg": ("failed", "link_loop:"),
    "pipe.jpg": ("skipped", "special_file: a FIFO"),
    "sock.png": ("skipped", "special_file: a socket"),
    "photo.heic": ("skipped", "unsupported_format:"),
    "photo.HEIF": ("skipped", "unsupported_format:"),
    "raw.CR2": ("skipped", "unsupported_format:"),
    "raw.nef": ("skipped", "unsupported_format:"),
    "raw.dng": ("skipped", "unsupported_format:"),
    "strip.png": ("skipped", "not_an_aligned_crop: 5000x40"),
    "wide.png": ("skipped", "not_an_aligned_crop: 300x200"),
    "good.png": ("ok", None),
    "other.png": ("ok", None),
    "later/same_bytes.png": ("ok", None),
    "modern.avif": ("ok", None),
}


def test_listing_classifies_without_opening(tmp_path: Path):
    src = odd_source(tmp_path)
    entries = {e.relative_path: e for e in list_entries(str(src))}
    assert set(entries) == set(EXPECTED)  # nothing twice through the folder link, nothing missing
    for name, (status, reason) in EXPECTED.items():
        problem = entries[name].problem
        if reason is None or reason.startswith("not_an_aligned"):
            assert problem is None, name
        else:
            assert problem is not None and problem.status == status, name
            assert problem.row_error.startswith(reason), (name, problem.row_error)


def test_odd_entries_each_end_as_one_row(prefect_api, local_ray, pack, tmp_path: Path):
    from flows.restore_archive import restore_archive

    src = odd_source(tmp_path)
    dest = tmp_path / "out"
    summary = restore_archive(
        source=str(src), dest=str(dest), pack=pack, aligned=True, shard_size=3, options=OPTIONS,
        guidance="closed_form", compare=True,
    )  # fmt: skip
    assert summary.status == "completed" and summary.n_images == len(EXPECTED)
    images = Catalog(str(dest / "catalog")).read("images", run_id=summary.run_id)
    by_path = images.set_index("relative_path")
    assert len(images) == len(EXPECTED) and by_path.index.is_unique
    for name, (status, reason) in EXPECTED.items():
        row = by_path.loc[name]
        assert row["status"] == status, (name, row["status"], row["error"])
        if reason is not None:
            assert row["error"].startswith(reason), (name, row["error"])
    # Identical bytes: one restoration, reused; the copy records what it duplicates.
    original, copy = by_path.loc["good.png"], by_path.loc["later/same_bytes.png"]
    assert copy["image_id"] == original["image_id"] and copy["duplicate_of"] == str(src / "good.png")
    assert Path(copy["output_uri"]).read_bytes() == Path(original["output_uri"]).read_bytes()
    assert Path(copy["compare_uri"]).is_file()
    faces = Catalog(str(dest / "catalog")).read("faces", run_id=summary.run_id)
    assert (faces["image_id"] == original["image_id"]).sum() == 1  # restored once
    # Entries whose bytes were never read get an id that says so and no size.
    dangling = by_path.loc["dangling.jpg"]
    unread = hashlib.sha256(f"dynface:unread:{src / 'dangling.jpg'}".encode()).hexdigest()
    assert dangling["image_id"] == unread and pd.isna(dangling["bytes"])


def test_a_copy_in_a_later_run_reuses_the_earlier_result(prefect_api, local_ray, pack, tmp_path: Path):
    from flows.restore_archive import restore_archive

    src = tmp_path / "src"
    _face(src / "a.png")
    dest = tmp_path / "out"
    first = restore_archive(source=str(src), dest=str(dest), pack=pack, aligned=True, options=OPTIONS)
    assert first.counts["ok"] == 1
    shutil.copy(src / "a.png", src / "b.png")  # arrives with tonight's batch: same bytes, new name
    second = restore_archive(source=str(src), dest=str(dest), pack=pack, aligned=True, options=OPTIONS)
    assert second.n_committed_before == 1 and second.counts["ok"] == 1 and second.n_faces == 0
    cat = Catalog(str(dest / "catalog"))
    row = cat.read("images", run_id=second.run_id).iloc[0]
    assert row["relative_path"] == "b.png" and row["duplicate_of"] == str(src / "a.png")
    assert (dest / "restored" / "b.png").read_bytes() == (dest / "restored" / "a.png").read_bytes()
    assert len(cat.read("faces")) == 1
    third = restore_archive(source=str(src), dest=str(dest), pack=pack, aligned=True, options=OPTIONS)
    assert third.n_committed_before == 2 and third.n_images == 0


def test_a_file_that_vanishes_mid_run_is_a_failed_row(pack, tmp_path: Path):
    src = tmp_path / "src"
    _face(src / "stays.png")
    _face(src / "goes.png", shift=3)
    ctx = prepare_run(
        source=str(src), dest=str(tmp_path / "out"), catalog=None, pack=pack, aligned=True, device="cpu",
        compare=False, method="full", guidance=None, options=OPTIONS,
    )  # fmt: skip
    discover_images(ctx, shard_size=8)
    (src / "goes.png").unlink()  # after listing and hashing, before decoding
    detect_shard(ctx, 0)
    rows = {r["relative_path"]: r for r in DETECT_IMAGES.read(DETECT_IMAGES.shard_uri(ctx.work, 0))}
    assert rows["goes.png"]["detect_status"] == "failed"
    assert rows["goes.png"]["detect_error"].startswith("vanished:")
    assert rows["stays.png"]["detect_status"] == "pending"
