"""Placing the sampling actors: more actors than GPUs share them instead of waiting forever, and actors
that cannot start fail the stage after a timeout (a local Ray that advertises one logical GPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from app.raylocal import RAY_HOME_ENV, ray_start_environment
from dynface.packs.writer import write_random_pack
from tasks.sample import ActorPlan, get_actors, plan_actors, release_actors


def test_more_actors_than_gpus_share_them() -> None:
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    assert plan_actors(one_gpu, num_actors=None, n_batches=9).num_gpus == 1
    shared = plan_actors(one_gpu, num_actors=3, n_batches=9)
    assert (shared.num_actors, shared.num_gpus) == (3, pytest.approx(1 / 3))
    # 3 actors on 2 GPUs: 2 per GPU at 1/2 each, never 2/3 (two of those do not fit on one GPU).
    assert plan_actors({"CPU": 16.0, "GPU": 2.0}, num_actors=3, n_batches=9).num_gpus == 0.5
    # Every actor also asks one CPU: never more actors than the cluster's CPUs hold.
    assert plan_actors({"CPU": 2.0, "GPU": 4.0}, num_actors=None, n_batches=9).num_actors == 2


@pytest.fixture(scope="module")
def ray_with_one_gpu(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray with 2 CPUs and one logical GPU (torch sees none: the actors run on the CPU)."""
    import ray

    assert not ray.is_initialized(), "another module left Ray running"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RAY_HOME_ENV, str(tmp_path_factory.mktemp("ray-home")))
        mp.delenv("RAY_ADDRESS", raising=False)
        with ray_start_environment():
            # address="local": without it Ray joins a cluster that `ray start` recorded on this machine,
            # e.g. one a test in another pytest worker has running at the time.
            ray.init(
                address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING"
            )
        try:
            yield
        finally:
            ray.shutdown()


def _context(tmp_path: Path, run_id: str) -> SimpleNamespace:
    """What get_actors reads of a run's context (a RunContext in the pipeline)."""
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    return SimpleNamespace(run_id=run_id, pack=pack, overrides={"respacing": "ddim5"}, device="cpu")


def test_two_actors_share_the_one_gpu_and_start(ray_with_one_gpu, tmp_path: Path) -> None:
    import ray

    ctx = _context(tmp_path, "share-test")
    plan = plan_actors(ray.cluster_resources(), num_actors=2, n_batches=2)
    assert (plan.num_actors, plan.num_gpus) == (2, 0.5)
    try:
        actors = get_actors(ctx, plan, start_timeout_s=300)  # returns once both have loaded the pack
        assert ray.get([a.ready.remote() for a in actors], timeout=60) == [True, True]
    finally:
        assert release_actors(ctx.run_id) == 2


def test_actors_that_cannot_be_placed_fail_after_the_timeout(ray_with_one_gpu, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "unplaceable-test")
    plan = ActorPlan(num_actors=2, num_cpus=1.0, num_gpus=1.0, num_threads=1)  # 2 whole GPUs on a 1-GPU Ray
    with pytest.raises(TimeoutError, match="did not start within 10 s; each asks num_gpus=1"):
        get_actors(ctx, plan, start_timeout_s=10)
    assert release_actors(ctx.run_id) == 0  # the timed-out actors were ended
