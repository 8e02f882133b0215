"""The sample stage on a two-node Ray cluster joined through RAY_ADDRESS (the flow's code path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from make_bad_inputs import synthetic_face

from app.raylocal import RAY_HOME_ENV, connect_ray, ray_start_environment
from dynface.packs.manifest import resolve_pack
from dynface.packs.writer import write_random_pack
from dynface.restorer import Restorer, load_planner, plan_faces
from tasks.sample import get_actors, plan_actors, release_actors, run_batches
from tasks.tables import BATCHES
from tasks.work import RunContext, read_png, read_rows, write_png

OVERRIDES = {"respacing": "ddim5", "mode": "closed_form", "method": "full"}


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory):
    """Head (1 CPU) + one worker node (1 CPU) on this machine; this process joins via RAY_ADDRESS."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another module left Ray running"
    home = tmp_path_factory.mktemp("ray-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RAY_HOME_ENV, str(home))
        with ray_start_environment(home):
            head = {"num_cpus": 1, "include_dashboard": False}
            cluster = Cluster(initialize_head=True, head_node_args=head)
            cluster.add_node(num_cpus=1)
        try:
            cluster.wait_for_nodes()
            mp.setenv("RAY_ADDRESS", cluster.address)
            conn = connect_ray()
            assert not conn.started  # joined, not started
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def make_batches(root: Path, pack: str, n_batches: int, per_batch: int) -> list[str]:
    """Batch manifests as the bucket stage writes them, with plans from the pack's own planner."""
    planner, device = load_planner(pack, overrides=OVERRIDES, device="cpu")
    uris = []
    for b in range(n_batches):
        rows = []
        crops = [np.roll(synthetic_face(32), 2 * (b * per_batch + k), axis=1) for k in range(per_batch)]
        plans = plan_faces(planner, crops, device=device, batch_size=per_batch)
        for k, (crop, plan) in enumerate(zip(crops, plans, strict=True)):
            image_id = f"{b * per_batch + k:064x}"
            crop_uri = str(root / "crops" / f"{image_id}_00.png")
            write_png(crop_uri, crop)
            rows.append(
                {"batch": b, "shard": 0, "image_id": image_id, "face_index": 0, "crop_uri": crop_uri,
                 "restored_uri": str(root / "restored" / f"{image_id}_00.png"), **plan.to_row()}
            )  # fmt: skip
        uris.append(BATCHES.write(str(root / f"batch-{b}.parquet"), rows))
    return uris


def test_sample_stage_spreads_over_both_nodes(two_node_cluster, tmp_path: Path):
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    batches = make_batches(tmp_path, pack, n_batches=4, per_batch=2)
    ctx = RunContext(
        run_id="cluster-test", source=str(tmp_path), dest=str(tmp_path / "out"), catalog="",
        pack=resolve_pack(pack), aligned=True, device="cpu", compare=False,
        overrides=OVERRIDES, config={}, config_hash="0" * 64, code_version="test", batch_size=2,
    )  # fmt: skip
    plan = plan_actors(ray.cluster_resources(), num_actors=2, n_batches=len(batches))
    assert (plan.num_actors, plan.num_gpus, plan.num_cpus) == (2, 0, 0.5)  # no GPU asked on a CPU cluster
    try:
        rows = run_batches(get_actors(ctx, plan), batches)
    finally:
        assert release_actors(ctx.run_id) == 2
    assert len(rows) == 8 and {r["sample_status"] for r in rows} == {"ok"}
    # SPREAD placement: the two actors (and so the batches) ran on both nodes.
    assert {r["node_id"] for r in rows} == {n["NodeID"] for n in alive}
    # What the cluster wrote is what the same restorer gives in this process.
    local = Restorer.from_pack(pack, overrides=OVERRIDES, device="cpu")
    for uri in batches:
        faces = read_rows(uri)
        direct = local.restore([read_png(f["crop_uri"]) for f in faces])
        for face, res in zip(faces, direct, strict=True):
            diff = np.abs(read_png(face["restored_uri"]).astype(int) - res.image.astype(int))
            assert diff.max() <= 2


def test_train_complete_joins_the_cluster_and_trains_on_both_nodes(
    two_node_cluster, tmp_path: Path, monkeypatch
):
    """`train complete --workers 2 --ray-address ADDR`: Ray Train on the existing cluster (one 1-CPU
    worker per node), left running afterwards; the weights are those of one worker on the whole batch."""
    import json

    import ray
    import torch
    from safetensors.torch import load_file
    from test_train import _write_faces
    from test_train_complete import DEGRADE, write_base_pack

    from app.train_parallel import ray_data_parallel
    from dynface.train.complete import complete
    from dynface.train.complete_plan import CompleteOptions

    base, faces = write_base_pack(tmp_path / "base"), tmp_path / "faces"
    _write_faces(faces / "generated", 4, DEGRADE)
    options = CompleteOptions(quick=True, degrade_resolution=DEGRADE, progress=False, steps={"dgsa": 2})

    def trained(name: str, workers: int, address: str | None) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        runner = ray_data_parallel(workers, address)
        chosen = CompleteOptions(
            **{**options.__dict__, "workers": workers, "checkpoint_uri": str(tmp_path / f"c-{name}")}
        )
        assert complete(str(base), str(out), str(faces), chosen, data_parallel=runner).finished
        assert json.loads((out / "training.json").read_text())["workers"] == max(workers, 1)
        return load_file(str(out / "dgsa.safetensors"))

    ray.shutdown()  # a fresh driver: only the address given leads to the cluster
    monkeypatch.delenv("RAY_ADDRESS")
    on_cluster = trained("cluster", 2, two_node_cluster.address)
    assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 2  # still running
    alone = trained("alone", 0, None)  # this process, no Ray
    for key in alone:
        torch.testing.assert_close(on_cluster[key], alone[key], rtol=1e-3, atol=1e-5, msg=key)


def test_scores_spread_over_the_free_cpus_of_both_nodes(two_node_cluster, tmp_path: Path):
    """The score stage's dlib work goes to Ray tasks on the cluster's free CPUs, in order, with the
    values the driver computes; too few faces for two tasks stay in this process."""
    import os
    import time

    import ray

    from tasks.score import identity_similarities, spread_chunks

    def where(items: list[int]) -> list[tuple[str, int, int]]:
        # A chunk takes seconds, as a chunk of dlib work does: an instant task lets Ray run the next one
        # on the worker it has already leased instead of on the other node.
        time.sleep(1.0)
        return [(ray.get_runtime_context().get_node_id(), os.getpid(), item) for item in items]

    spread = spread_chunks(where, list(range(20)), min_chunk=8)
    assert [item for *_, item in spread] == list(range(20))
    assert {node for node, *_ in spread} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {pid for _, pid, _ in spread_chunks(where, list(range(15)), min_chunk=8)} == {os.getpid()}

    pairs = []
    for k in range(4):
        face = np.roll(synthetic_face(64), 3 * k, axis=1)
        write_png(str(tmp_path / f"crop{k}.png"), face)
        write_png(str(tmp_path / f"restored{k}.png"), np.clip(face.astype(int) + 9, 0, 255).astype(np.uint8))
        pairs.append((str(tmp_path / f"restored{k}.png"), str(tmp_path / f"crop{k}.png")))
    on_cluster = spread_chunks(identity_similarities, pairs, min_chunk=2)
    assert on_cluster == identity_similarities(pairs) and all(v is not None for v in on_cluster)
