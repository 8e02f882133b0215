"""One face plan from estimate to catalog: SE and DSST run exactly once per face over a whole pipeline
run (driver and Ray actors together), the sampler samples the plans as estimated, and the catalog
records them in 512-px units with where std* came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from make_bad_inputs import smooth_image, synthetic_face, write_aligned_faces
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from catalogs import Catalog
from dynface.core.calls import LEDGER_ENV, read_ledger
from dynface.packs.writer import write_random_pack
from tasks.tables import PLANS, WORK_TABLES

OPTIONS = {"respacing": "ddim5", "batch_size": 2}


@pytest.fixture(scope="module", autouse=True)
def ledger(tmp_path_factory: pytest.TempPathFactory):
    """The call ledger, set before this module's Ray starts so that its actors inherit it."""
    path = tmp_path_factory.mktemp("ledger") / "calls.txt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LEDGER_ENV, str(path))
        yield path


def _sources(root: Path) -> tuple[Path, Path]:
    aligned = write_aligned_faces(root / "aligned", 5, name="f{k}.png")
    photos = root / "photos"
    photos.mkdir()
    scene = smooth_image(300, 420, seed=3)
    scene[20:220, 10:210] = synthetic_face(200)
    scene[110:270, 250:410] = synthetic_face(160)[:, ::-1]
    Image.fromarray(scene).save(photos / "two.png")
    return aligned, photos


def test_se_and_dsst_run_once_per_face_over_a_pipeline_run(local_ray, prefect_api, ledger, tmp_path):
    from flows.restore_archive import restore_archive

    aligned, photos = _sources(tmp_path)
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    n_faces = 0
    for source, is_aligned in ((aligned, True), (photos, False)):
        summary = restore_archive(
            source=str(source), dest=str(tmp_path / f"out-{source.name}"), pack=pack, aligned=is_aligned,
            shard_size=2, wave_shards=1, options=OPTIONS, guidance="closed_form", keep_work=True,
        )  # fmt: skip
        assert summary.n_faces_failed == 0
        n_faces += summary.n_faces
    assert n_faces == 7
    assert read_ledger(str(ledger)) == {"se": 7, "dsst": 7}
    # The catalog holds the plans as estimated, converted once to 512-px units.
    dest = tmp_path / "out-aligned"
    cat = Catalog(str(dest / "catalog"))
    faces = cat.read("faces").set_index(["image_id", "face_index"])
    run_id = cat.read("runs")["run_id"].iloc[0]
    work = dest / ".work" / run_id
    plans = [row for uri in sorted((work / PLANS.name).glob("*.parquet")) for row in PLANS.read(str(uri))]
    assert len(plans) == 5
    for plan in plans:
        face = faces.loc[(plan["image_id"], plan["face_index"])]
        assert face["std_hat"] == pytest.approx(plan["std_hat_px"] * 512 / 32, rel=1e-6)
        assert face["t_start"] == plan["t_start"] and face["eta"] == pytest.approx(plan["eta"])
        assert face["std_source"] == "se" and face["bucket"] == plan["t_start"] // 50
        valid = [s * 512 / 32 for s, v in zip(plan["level_stds_px"], plan["level_valid"], strict=True) if v]
        np.testing.assert_allclose(face["guidance_levels"], valid, rtol=1e-6)
    # Every work file a stage wrote is one of the declared tables, with exactly its columns.
    declared = {table.name for table in WORK_TABLES}
    written = {p.name for p in work.iterdir() if p.is_dir()} - {"crops", "restored"}
    assert written <= declared and {"plans", "samples", "batches"} <= written


def test_a_pack_without_se_records_the_fixed_std_fallback(local_ray, prefect_api, tmp_path):
    from flows.restore_archive import restore_archive

    aligned, _ = _sources(tmp_path)
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, with_se=False, with_dgsa=False)
    summary = restore_archive(
        source=str(aligned), dest=str(tmp_path / "out"), pack=pack, aligned=True,
        options={**OPTIONS, "fixed_std": 6.0}, guidance="closed_form",
    )  # fmt: skip
    faces = Catalog(str(tmp_path / "out" / "catalog")).read("faces", run_id=summary.run_id)
    assert len(faces) == 5 and set(faces["std_source"]) == {"fixed"}
    np.testing.assert_allclose(faces["std_hat"], 6.0, rtol=1e-6)
    assert faces["t_start"].nunique() == 1  # every face starts where DSST puts std* = 6 px at 512
