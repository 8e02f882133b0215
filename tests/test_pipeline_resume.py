"""Kill and resume: a CLI run killed after its first shard's commit, then re-run, ends with exactly
one ok row per image; nothing committed is processed twice."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from app.cli import main
from catalogs import Catalog
from dynface.packs.writer import write_random_pack
from dynface.paths import REPO_ROOT

N_IMAGES = 6


def image_parts(catalog: Path) -> list[Path]:
    """The images table's commits with rows (version 0 only creates the empty Delta table)."""
    return sorted(p for p in catalog.glob("images/_delta_log/*.json") if int(p.stem) > 0)


def test_killed_run_resumes_with_one_ok_row_per_image(prefect_api, local_ray, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(N_IMAGES):
        Image.fromarray(np.roll(synthetic_face(40), 2 * k, axis=0)).save(src / f"face{k}.png")
    ids = {hashlib.sha256((src / f"face{k}.png").read_bytes()).hexdigest() for k in range(N_IMAGES)}
    assert len(ids) == N_IMAGES
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    dest, catalog = tmp_path / "out", tmp_path / "out" / "catalog"
    args = ["restore", str(src), str(dest), "--pack", pack, "--aligned", "--shard-size", "1"]
    args += ["--wave-shards", "1", "--option", "respacing=ddim5", "--guidance", "closed_form"]

    # The first run: a separate process (its own Ray driver and Prefect client, sharing this
    # module's Ray and the session's Prefect server), SIGKILLed right after its first commit.
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RAY_ADDRESS": local_ray.address}
    log = (tmp_path / "first_run.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 300
        while not image_parts(catalog):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-3000:]
                pytest.fail(f"first run ended (rc={proc.returncode}) before any commit:\n{tail}")
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    cat = Catalog(str(catalog))
    first = cat.read("images")
    first_run = first["run_id"].iloc[0]
    assert set(first["status"]) == {"ok"}
    assert 1 <= len(first) < N_IMAGES, "the run was not killed mid-way"
    assert list(cat.read("runs", run_id=first_run)["status"]) == ["running"]  # never finished

    # The re-run, through the same CLI in this process.
    assert main(args) == 0
    images = cat.read("images")
    assert sorted(images["image_id"]) == sorted(ids)  # exactly one row per image, all runs together
    assert set(images["status"]) == {"ok"}
    config_hash = images["config_hash"].iloc[0]
    latest = cat.latest_images(config_hash)
    assert len(latest) == N_IMAGES and set(latest["status"]) == {"ok"}
    second_run = (set(images["run_id"]) - {first_run}).pop()
    assert (images["run_id"] == second_run).sum() == N_IMAGES - len(first)
    runs = cat.read("runs", run_id=second_run)
    done = runs[runs["status"] == "completed"].iloc[0]
    assert done["n_images"] == N_IMAGES - len(first)
    # Every ok image row has its face row from the same run (outputs and rows stay together).
    faces = cat.read("faces")
    for _, row in images.iterrows():
        mine = faces[(faces["image_id"] == row["image_id"]) & (faces["run_id"] == row["run_id"])]
        assert len(mine) == 1 and mine["status"].iloc[0] == "ok"
        assert Path(row["output_uri"]).is_file() and Path(mine["output_uri"].iloc[0]).is_file()
