"""The official-weights path as the README tells a user to take it: the two DifFace files in a folder,
`DYNFACE_DIFFACE_DIR` or `--weights-dir`, `dynface restore --pack difface`; full-size checkpoints in the
released formats (random weights, tests/official_fixtures.py). The deployment path is in
tests/test_deployment.py. Slow: 512-px networks on a CPU (a coarse grid keeps every stage, two steps)."""

from __future__ import annotations

import pytest
from make_bad_inputs import smooth_image, synthetic_face
from official_fixtures import *  # noqa: F403 - the session fixture official_weights
from official_fixtures import OPTIONS, PRIOR_FILE, check_official_run
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from app.cli import OFFLINE_ENV, main
from dynface.packs.manifest import resolve_pack

pytestmark = pytest.mark.slow

RUN = ["--option", f"respacing={OPTIONS['respacing']}", "--guidance", "closed_form", "--shard-size", "1"]


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    monkeypatch.delenv("DYNFACE_DIFFACE_DIR", raising=False)


def test_restore_with_the_variable_on_an_aligned_face(
    official_weights, prefect_api, local_ray, offline_env, monkeypatch, tmp_path, capsys
):
    src = tmp_path / "crops"
    src.mkdir()
    Image.fromarray(synthetic_face(128)).save(src / "face.png")
    monkeypatch.setenv("DYNFACE_DIFFACE_DIR", str(official_weights))
    dest = tmp_path / "out"
    rc = main(["restore", str(src), str(dest), "--pack", "difface", "--aligned", *RUN])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "note: 512-px pack 'difface' on CPU" in err  # said before the run started
    check_official_run(dest, official_weights, n_images=1)
    with Image.open(dest / "restored" / "face.png") as im:
        assert im.size == (128, 128)  # aligned mode: the restored face back at the input's size


def test_restore_with_weights_dir_on_a_whole_photo(
    official_weights, prefect_api, local_ray, offline_env, tmp_path
):
    src = tmp_path / "photos"
    src.mkdir()
    scene = smooth_image(320, 400, seed=7)
    scene[40:280, 80:320] = synthetic_face(240)
    Image.fromarray(scene).save(src / "photo.png")
    dest = tmp_path / "out"
    weights = ["--weights-dir", str(official_weights)]
    rc = main(["restore", str(src), str(dest), "--pack", "difface", *weights, *RUN])
    assert rc == 0
    check_official_run(dest, official_weights, n_images=1)
    with Image.open(dest / "restored" / "photo.png") as im:
        assert im.size == (400, 320)


def test_an_actor_without_the_variable_loads_the_resolved_pack(official_weights, local_ray, monkeypatch):
    """Ray actors get the files the driver resolved: an actor whose environment names another folder
    (as on a node where the variable is unset or different) still loads them, verified by sha256."""
    import ray

    from tasks.sample import BatchRestorer

    monkeypatch.setenv("DYNFACE_DIFFACE_DIR", str(official_weights))
    pack = resolve_pack("difface")  # the driver's resolution, through the variable
    elsewhere = {"env_vars": {"DYNFACE_DIFFACE_DIR": "/nonexistent/difface"}}
    actor_cls = ray.remote(BatchRestorer).options(num_cpus=0.5, num_gpus=0, runtime_env=elsewhere)

    @ray.remote(num_cpus=0.5, num_gpus=0, runtime_env=elsewhere)
    def environment_there() -> str | None:
        import os

        return os.environ.get("DYNFACE_DIFFACE_DIR")

    assert ray.get(environment_there.remote()) == "/nonexistent/difface"
    actor = actor_cls.remote(pack, {"respacing": "ddim2"}, "cpu", 1)
    try:
        files = ray.get(actor.__ray_call__.remote(lambda self: self.restorer.pack.manifest.files()))
    finally:
        ray.kill(actor)
    assert files == pack.files()
    assert files["prior"]["uri"] == str(official_weights / PRIOR_FILE)
