"""The training flows under a Prefect test server: every component flow alone, in the recipe's order, then
`train-starter`, on a tiny data folder in quick mode."""

from __future__ import annotations

from pathlib import Path

from pipeline_fixtures import *  # noqa: F403 - the shared fixture prefect_api
from test_train import _write_faces

from dynface.packs.loading import load_pack
from dynface.train.data import UTKFACE_SOURCE, list_faces, split_faces
from dynface.train.plan import starter_plan
from dynface.train.starter import recipe_pools
from dynface.train.starter_options import StarterOptions


def test_component_flows_then_the_starter_flow(prefect_api, tmp_path: Path) -> None:
    from flows.train import (
        train_dgsa_flow,
        train_prior_flow,
        train_rm_flow,
        train_sde_flow,
        train_se_flow,
        train_starter_flow,
    )

    data = tmp_path / "data"
    _write_faces(data / "src", 12, 32)
    _write_faces(data / UTKFACE_SOURCE, 6, 24)
    plan = starter_plan(32, quick=True)
    pools = recipe_pools(data, list_faces(data, exclude=()), split_faces(list_faces(data))[0], plan, seed=0)
    assert pools.extra_files and pools.restore.lq.shape[0] == pools.base.lq.shape[0] + len(pools.extra_files)

    options = {"resolution": 32, "quick": True, "data_dir": str(data)}  # as a deployment's JSON gives them
    kw = {"work_dir": str(tmp_path / "work"), "options": options}
    prior = train_prior_flow(**kw)
    fresh = {**options, "rm_pairs": "fresh", "pair_workers": 1}  # a new degradation per sample
    rm = train_rm_flow(work_dir=kw["work_dir"], options=fresh)
    sde = train_sde_flow(**kw)
    se = train_se_flow(**kw)
    dgsa = train_dgsa_flow(**kw, guidance_scale=4.0)  # the ζ a pack would sample with
    assert (prior["steps"], rm["steps"], sde["steps"]) == (plan.prior.steps, plan.rm.steps, plan.sde.steps)
    assert se["steps"] == plan.se.steps and se["tau"] > 0 and dgsa["steps"] == plan.dgsa.steps
    assert dgsa["guidance_scale"] == 4.0 != plan.dgsa.guidance_scale
    for stage in ("prior", "rm", "sde", "se", "dgsa"):
        assert (tmp_path / "work" / stage / "last.pt").is_file()
    # A finished stage resumes from its checkpoint instead of training again.
    again = train_rm_flow(**kw)
    assert again["steps"] == rm["steps"] and again["elapsed_s"] == rm["elapsed_s"]

    out = tmp_path / "pack"
    report = train_starter_flow(
        out_dir=str(out),
        options=StarterOptions(
            resolution=32,
            quick=True,
            data_dir=str(data),
            work_dir=str(tmp_path / "work2"),
            prior_masked_share=0.5,  # generated faces: no face to re-align, so the prior trains as usual
        ),
    )
    assert set(report["stages"]) == {"prior", "rm", "sde", "se", "dgsa"}
    assert load_pack(str(out)).dgsa is not None
    assert "re-aligned tight crops" not in (out / "MODEL_CARD.md").read_text()
