"""restore-archive end to end (real Prefect, real local Ray, a 32-px random pack) and its pure helpers."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

import dynface
from catalogs import Catalog
from dynface.images.faces import aligned_input
from dynface.packs.writer import write_random_pack
from dynface.restorer import Restorer
from tasks.bucket import plan_batches
from tasks.discover import (
    check_locations,
    code_version,
    config_hash,
    discover_images,
    prepare_run,
)
from tasks.sample import plan_actors
from tasks.sources import list_entries
from tasks.work import output_name, read_rows

OPTIONS = {"respacing": "ddim5"}


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def face_variant(k: int, size: int = 64) -> np.ndarray:
    """Distinct synthetic aligned faces: tinted and lightly noised copies of the cartoon face."""
    rng = np.random.default_rng(k)
    face = synthetic_face(size).astype(np.float64)
    face = face * rng.uniform(0.7, 1.1, size=3) + rng.normal(0, 4, face.shape)
    return np.clip(np.rint(face), 0, 255).astype(np.uint8)


ALIGNED_FILES = {
    "a.jpg": "JPEG",
    "b.PNG": "PNG",
    "sub/c.png": "PNG",
    "sub/deeper/d.webp": "WEBP",
    "e.gif": "GIF",
}


def write_aligned_source(root: Path) -> Path:
    src = root / "src"
    for k, (name, fmt) in enumerate(ALIGNED_FILES.items()):
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face_variant(k)).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    (src / "notes.txt").write_text("not an image")
    (src / "sub" / "readme.md").write_text("not an image either")
    return src


# -- pure helpers (no Prefect, no Ray) ---------------------------------------------------------------
def test_plan_batches_fills_batches_in_t_start_order():
    ts = {"a": 864, "b": 860, "c": 700, "d": 710, "e": 120, "f": 710}
    faces = [{"image_id": i, "face_index": 0, "t_start": t, "bucket": t // 50} for i, t in ts.items()]
    batches = plan_batches(faces, batch_size=2)
    assert [[f["image_id"] for f in b] for b in batches] == [["a", "b"], ["d", "f"], ["c", "e"]]
    assert plan_batches(faces[::-1], batch_size=2) == batches  # input order does not matter
    with pytest.raises(ValueError):
        plan_batches(faces, batch_size=0)


def test_plan_actors_uses_fractional_cpus_or_whole_gpus():
    cpu = plan_actors({"CPU": 2.0}, num_actors=None, n_batches=5)
    assert (cpu.num_actors, cpu.num_cpus, cpu.num_gpus, cpu.num_threads) == (1, 0.5, 0, 1)
    assert plan_actors({"CPU": 8.0}, num_actors=None, n_batches=20).num_actors == 7
    assert plan_actors({"CPU": 8.0}, num_actors=None, n_batches=3).num_actors == 3
    gpu = plan_actors({"CPU": 16.0, "GPU": 2.0}, num_actors=None, n_batches=9)
    assert (gpu.num_actors, gpu.num_gpus) == (2, 1)
    assert plan_actors({"CPU": 2.0}, num_actors=2, n_batches=9).num_actors == 2
    with pytest.raises(ValueError):
        plan_actors({"CPU": 2.0}, num_actors=0, n_batches=1)


def test_config_hash_tracks_outputs_not_execution():
    base = dict(
        pack_sha256={"prior": "ab", "rm": "cd"},
        resolution=32,
        config={"respacing": "ddim5", "batch_size": 4, "mode": "dps"},
        aligned=False,
        detector={"min_face_size": 24},
        code_version="0.1.0",
    )
    h = config_hash(**base)
    assert len(h) == 64 and h == config_hash(**base)
    assert config_hash(**{**base, "config": {**base["config"], "batch_size": 16}}) == h
    assert config_hash(**{**base, "config": {**base["config"], "respacing": "ddim10"}}) != h
    assert config_hash(**{**base, "pack_sha256": {"prior": "ab", "rm": "ce"}}) != h
    assert config_hash(**{**base, "detector": {"min_face_size": 30}}) != h
    assert config_hash(**{**base, "compare": True}) != h  # side-by-sides are outputs too
    assert config_hash(**{**base, "code_version": "0.1.0+abc"}) != h
    aligned = {**base, "aligned": True}
    assert config_hash(**aligned) == config_hash(**{**aligned, "detector": {"min_face_size": 30}})


def test_code_version_is_package_version_plus_source_hash():
    version, digest = code_version().split("+")
    assert version == dynface.__version__ and len(digest) == 12 and int(digest, 16) >= 0


def test_locations_and_output_names(tmp_path: Path):
    with pytest.raises(ValueError, match="differ"):
        check_locations(str(tmp_path / "x"), str(tmp_path / "x/"), str(tmp_path / "cat"))
    with pytest.raises(ValueError, match="inside the output folder"):
        check_locations(str(tmp_path / "out/restored/old"), str(tmp_path / "out"), str(tmp_path / "cat"))
    check_locations(str(tmp_path / "src"), str(tmp_path / "src/out"), str(tmp_path / "src/out/catalog"))
    assert output_name("a/b.JPG") == "a/b.JPG"
    assert output_name("x.gif") == "x.gif.png"


def test_discover_keys_by_content_skips_outputs_and_duplicates(tmp_path: Path, pack: str):
    src = write_aligned_source(tmp_path)
    shutil.copy(src / "a.jpg", src / "sub" / "a_copy.jpg")  # same bytes, second name
    dest = src / "out"  # dest inside source: its files must never become inputs
    (dest / "restored").mkdir(parents=True)
    shutil.copy(src / "b.PNG", dest / "restored" / "b.PNG")
    ctx = prepare_run(
        source=str(src), dest=str(dest), catalog=None, pack=pack, aligned=True, device="cpu",
        compare=False, method="full", guidance=None, options=OPTIONS,
    )  # fmt: skip
    found = discover_images(ctx, shard_size=2)
    assert (found.n_files, found.n_new, found.n_duplicates, found.n_committed) == (6, 6, 1, 0)
    shards = [read_rows(uri) for uri in found.shards]
    # A duplicate travels in its original's shard, right after it; shards hold about shard_size rows.
    assert [[r["relative_path"] for r in rows] for rows in shards] == [
        ["a.jpg", "sub/a_copy.jpg"],
        ["b.PNG", "e.gif"],
        ["sub/c.png", "sub/deeper/d.webp"],
    ]
    rows = [row for part in shards for row in part]
    expected = {name: sha256(src / name) for name in ALIGNED_FILES}
    expected["sub/a_copy.jpg"] = expected["a.jpg"]
    assert {r["relative_path"]: r["image_id"] for r in rows} == expected
    assert all(r["bytes"] == (src / r["relative_path"]).stat().st_size for r in rows)
    assert {r["relative_path"]: r["duplicate_of"] for r in rows if r["duplicate_of"]} == {
        "sub/a_copy.jpg": str(src / "a.jpg")
    }
    single = list_entries(str(src / "sub" / "c.png"))  # a single file is a source too
    assert [(f.uri, f.relative_path) for f in single] == [(str(src / "sub" / "c.png"), "c.png")]


# -- the flow ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aligned_run(prefect_api, local_ray, pack, tmp_path_factory):
    from flows.restore_archive import restore_archive

    root = tmp_path_factory.mktemp("aligned")
    src = write_aligned_source(root)
    before = tree_hashes(src)
    summary = restore_archive(
        source=str(src), dest=str(root / "out"), pack=pack, aligned=True, shard_size=2, wave_shards=2,
        compare=True, options=OPTIONS, guidance="closed_form",
    )  # fmt: skip
    return src, root / "out", summary, before


def test_aligned_run_writes_restored_faces_and_compare(aligned_run):
    src, out, summary, before = aligned_run
    assert summary.status == "completed"
    assert summary.counts == {"ok": 5, "no_face": 0, "failed": 0, "skipped": 0}
    assert summary.n_faces == 5
    assert tree_hashes(src) == before  # sources untouched
    for name, fmt in ALIGNED_FILES.items():
        image_id = sha256(src / name)
        restored = out / "restored" / output_name(name)
        with Image.open(restored) as im:
            assert im.format == ("PNG" if fmt == "GIF" else fmt)
            assert im.size == (64, 64)
            out_rgb = np.asarray(im.convert("RGB"))
        face = np.asarray(Image.open(out / "faces" / f"{image_id}_00.png").convert("RGB"))
        assert face.shape == (32, 32, 3)
        # Aligned mode: the output is the restored 32-px face resized back (bicubic) to the input size.
        if fmt in ("PNG", "GIF"):
            back = np.asarray(Image.fromarray(face).resize((64, 64), Image.Resampling.BICUBIC))
            np.testing.assert_array_equal(out_rgb, back)
        with Image.open(out / "compare" / f"{name}.png") as im:
            assert im.size == (128, 64)
            left = np.asarray(im.convert("RGB"))[:, :64]
        source_rgb = np.asarray(Image.open(src / name).convert("RGB"))
        np.testing.assert_array_equal(left, source_rgb)
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())


def test_aligned_run_catalog_rows(aligned_run):
    src, out, summary, _ = aligned_run
    cat = Catalog(str(out / "catalog"))
    images = cat.read("images", run_id=summary.run_id)
    faces = cat.read("faces", run_id=summary.run_id)
    runs = cat.read("runs", run_id=summary.run_id).sort_values("status")
    assert len(images) == 5 and set(images["status"]) == {"ok"}
    assert sorted(images["image_id"]) == sorted(sha256(src / n) for n in ALIGNED_FILES)
    assert set(images["config_hash"]) == {faces["config_hash"].iloc[0]}
    assert all(Path(u).is_file() for u in images["output_uri"])
    assert all(Path(u).is_file() for u in images["compare_uri"])
    assert list(images["n_faces"]) == [1] * 5
    assert len(faces) == 5 and set(faces["status"]) == {"ok"}
    assert all(Path(u).is_file() for u in faces["output_uri"])
    assert (faces["t_start"] > 0).all() and (faces["n_steps"] >= 1).all()
    assert (faces["bucket"] == faces["t_start"] // 50).all()
    assert faces["guidance_residual"].notna().all()
    assert all(len(v) >= 1 for v in faces["guidance_levels"])
    # 512-px units: the first guidance level is std* itself.
    np.testing.assert_allclose([v[0] for v in faces["guidance_levels"]], faces["std_hat"], rtol=1e-5)
    assert list(runs["status"]) == ["completed", "running"]
    done = runs[runs["status"] == "completed"].iloc[0]
    assert (done["n_images"], done["n_ok"], done["n_faces"]) == (5, 5, 5)
    assert done["finished_at"] is not None and done["faces_per_second"] > 0


def test_aligned_run_faces_equal_a_direct_restorer_call(aligned_run, pack):
    """The pipeline feeds each face's own crop to the sampler and files the result under its id."""
    src, out, _, _ = aligned_run
    restorer = Restorer.from_pack(pack, overrides={**OPTIONS, "mode": "closed_form"}, device="cpu")
    names = ["b.PNG", "sub/c.png"]
    crops = [aligned_input(np.asarray(Image.open(src / n).convert("RGB")), 32).faces[0].crop for n in names]
    direct = restorer.restore(crops)
    for name, res in zip(names, direct, strict=True):
        piped = np.asarray(Image.open(out / "faces" / f"{sha256(src / name)}_00.png").convert("RGB"))
        diff = np.abs(piped.astype(int) - res.image.astype(int))
        assert diff.max() <= 2, f"{name}: pipeline output differs from the direct restore by {diff.max()}"


def test_aligned_run_publishes_summary_and_outputs_artifacts(aligned_run):
    import json

    from prefect.artifacts import Artifact

    _, out, summary, _ = aligned_run
    table = Artifact.get("restore-archive-summary")
    assert table is not None and table.description == f"run {summary.run_id}"
    rows = {r["metric"]: r["value"] for r in json.loads(table.data)}
    assert rows["images ok"] == 5 and rows["images failed"] == 0 and rows["faces restored"] == 5
    assert rows["faces per second"] > 0 and "seconds sample" in rows and "t_start median" in rows
    assert rows["std* (px at 512) min"] <= rows["std* (px at 512) median"] <= rows["std* (px at 512) max"]
    markdown = Artifact.get("restore-archive-outputs")
    assert markdown is not None and markdown.description == f"run {summary.run_id}"
    for folder in ("restored", "faces", "compare", "catalog"):
        assert f"{out}/{folder}" in markdown.data


def test_rerun_processes_nothing_new(aligned_run, pack):
    from flows.restore_archive import restore_archive

    src, out, first, before = aligned_run
    cat = Catalog(str(out / "catalog"))
    n_images, n_faces = len(cat.read("images")), len(cat.read("faces"))
    again = restore_archive(
        source=str(src), dest=str(out), pack=pack, aligned=True, shard_size=2, options=OPTIONS,
        guidance="closed_form", compare=True,
    )  # fmt: skip
    assert again.n_committed_before == 5 and again.n_images == 0 and again.n_faces == 0
    assert (len(cat.read("images")), len(cat.read("faces"))) == (n_images, n_faces)
    assert set(cat.read("runs")["run_id"]) == {first.run_id, again.run_id}
    assert tree_hashes(src) == before


def test_automatic_batch_size_runs_through_the_pipeline(aligned_run, pack, tmp_path):
    """batch_size 0 ("auto"): the bucket stage cuts manifests of a fixed size and each actor splits them
    into the batches its own memory holds; the faces are those of a fixed batch size."""
    from flows.restore_archive import restore_archive

    src, out, first, _ = aligned_run
    auto = restore_archive(
        source=str(src), dest=str(tmp_path / "auto"), pack=pack, aligned=True, shard_size=2,
        options={**OPTIONS, "batch_size": 0}, guidance="closed_form",
    )  # fmt: skip
    assert auto.status == "completed" and auto.counts["ok"] == 5 and auto.n_faces == 5
    for face in sorted((out / "faces").glob("*.png")):
        fixed = np.asarray(Image.open(face).convert("RGB")).astype(int)
        again = np.asarray(Image.open(tmp_path / "auto" / "faces" / face.name).convert("RGB")).astype(int)
        assert np.abs(fixed - again).max() <= 2, face.name


@pytest.mark.data
def test_whole_image_run_detects_and_pastes_back(prefect_api, local_ray, pack, data_dir, tmp_path):
    from flows.restore_archive import restore_archive

    names = {"img12": 1, "selfie-many-people": 3}  # dlib finds 1 and 3 faces in these
    src = tmp_path / "photos"
    src.mkdir()
    for name in names:
        shutil.copy(next(data_dir.glob(f"whole_clean/*/*__{name}.jpg")), src / f"{name}.jpg")
    before = tree_hashes(src)
    summary = restore_archive(source=str(src), dest=str(tmp_path / "out"), pack=pack, options=OPTIONS)
    assert summary.counts["ok"] == 2 and summary.n_faces == 4
    assert tree_hashes(src) == before
    cat = Catalog(str(tmp_path / "out" / "catalog"))
    images = cat.read("images").set_index("relative_path")
    faces = cat.read("faces")
    for name, n in names.items():
        row = images.loc[f"{name}.jpg"]
        assert row["n_faces"] == n and row["status"] == "ok"
        mine = faces[faces["image_id"] == row["image_id"]].sort_values("face_index")
        assert list(mine["face_index"]) == list(range(n))
        assert all(len(lm) == 10 for lm in mine["landmarks"]) and (mine["det_score"] >= 0.5).all()
        inp = np.asarray(Image.open(src / f"{name}.jpg").convert("RGB")).astype(np.float64)
        with Image.open(row["output_uri"]) as im:
            assert im.format == "JPEG"
            outp = np.asarray(im.convert("RGB")).astype(np.float64)
        assert outp.shape == inp.shape
        # Where no crop square reaches, the output is the input (up to JPEG re-encoding); at the
        # centre of each face it is the (random-pack) restoration, far from the input.
        h, w = inp.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w]
        covered = np.zeros((h, w), dtype=bool)
        for affine in mine["affine"]:
            a = np.asarray(affine).reshape(2, 3)
            u = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
            v = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
            covered |= (u > -2) & (u < 34) & (v > -2) & (v < 34)
            centre = (np.abs(u - 16) < 6) & (np.abs(v - 16) < 6)
            assert np.abs(outp[centre] - inp[centre]).mean() > 8
        assert np.abs(outp[~covered] - inp[~covered]).mean() < 2.0
