"""Prefect flows for training: `train-starter` (the whole recipe) and one flow per component.

Thin wrappers over `dynface.train`: every flow takes plain parameters (paths, numbers), trains or resumes
in `work_dir/<stage>` and returns a JSON-ready summary. Component flows that need earlier stages (SE needs
RM and SDE, DGSA needs prior, RM, SE and the DSST table) reload those stages' finished checkpoints from the
same `work_dir`, so run them in the recipe's order or use `train-starter`. RM, SE and DGSA train on the
recipe's pair pools (`recipe_pools`), as in `train-starter`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from dynface.paths import shared_dir
from dynface.train.chain import transfer_model
from dynface.train.common import LoopResult
from dynface.train.data import (
    EXCLUDED_SOURCES,
    FaceFile,
    list_faces,
    load_faces,
    split_faces,
    without_sources,
)
from dynface.train.dgsa import dists_loss, train_dgsa
from dynface.train.plan import StarterPlan, starter_plan, with_loop
from dynface.train.prior import train_prior
from dynface.train.restorer_net import train_rm
from dynface.train.sde import train_sde
from dynface.train.se import train_se
from dynface.train.starter import (
    RecipePools,
    recipe_pools,
    recipe_rm_pairs,
    recipe_stages,
    run_recipe_chain,
    train_starter,
)


@dataclass(frozen=True, eq=False)
class _Setup:
    plan: StarterPlan
    images: np.ndarray  # training faces at the pack resolution
    data: Path
    listing: list[FaceFile]  # every face of `data`, excluded sources included
    train_files: list[FaceFile]
    seed: int

    def pools(self) -> RecipePools:
        return recipe_pools(self.data, self.listing, self.train_files, self.plan, self.seed)


def _setup(
    resolution: int,
    quick: bool,
    budget_minutes: float | None,
    data_dir: str | None,
    seed: int,
    threads: int,
    device: str = "cpu",
) -> _Setup:
    import torch

    torch.set_num_threads(threads)
    plan = with_loop(
        starter_plan(resolution, quick=quick, budget_minutes=budget_minutes, progress=False),
        seed=seed,
        device=device,
    )
    data = Path(data_dir) if data_dir else shared_dir() / "data"
    listing = list_faces(data, exclude=())
    train_files, _ = split_faces(without_sources(listing, EXCLUDED_SOURCES))
    return _Setup(plan, load_faces(data, train_files, resolution), data, listing, train_files, seed)


def _summary(result: LoopResult) -> dict[str, Any]:
    return {
        "steps": result.step,
        "elapsed_s": result.elapsed_s,
        "stopped_by": result.stopped_by,
        "loss": result.final(),
    }


@flow(name="train-starter")
def train_starter_flow(
    out_dir: str = "weights/starter",
    resolution: int = 64,
    quick: bool = False,
    budget_minutes: float = 75.0,
    data_dir: str | None = None,
    work_dir: str | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    reuse_prior: str | None = None,
    vgg16: str | None = None,
    steps_scale: float = 1.0,
    stage_steps: dict[str, int] | None = None,
    stage_minutes: dict[str, float] | None = None,
    rm_pairs: str = "pool",
    pair_workers: int = 0,
    prior_masked_share: float = 0.0,
) -> dict[str, Any]:
    """Every stage in order, then the pack (dynface.train.starter.train_starter); `reuse_prior`: a pack
    folder whose prior is taken instead of training one; `vgg16`: VGG16 weights, adds DISTS to DGSA's loss;
    `stage_steps` / `stage_minutes`: one stage's steps / total minutes, e.g. {"prior": 6000};
    `rm_pairs`: "pool" or "fresh" (StarterPlan.rm_pairs), fresh pairs made by `pair_workers` processes;
    `prior_masked_share`: share of each prior batch from re-aligned UTKFace crops with a masked loss."""
    import torch

    torch.set_num_threads(threads)
    report = train_starter(
        out_dir,
        resolution=resolution,
        quick=quick,
        budget_minutes=budget_minutes,
        data_dir=data_dir,
        work_dir=work_dir,
        seed=seed,
        progress=False,
        reuse_prior=reuse_prior,
        vgg16=vgg16,
        device=device,
        steps_scale=steps_scale,
        stage_steps=stage_steps,
        stage_minutes=stage_minutes,
        rm_pairs=rm_pairs,
        pair_workers=pair_workers,
        prior_masked_share=prior_masked_share,
    )
    ev = report.evaluation.ablation if report.evaluation is not None else None
    return {
        "manifest": report.manifest_uri,
        "stages": report.stages,
        "guidance_scale": report.guidance_scale,
        # mean 8-bit RGB PSNR per method on the test split (the pack's ablation.parquet)
        "evaluation": dict(zip(ev["method"], ev["psnr"], strict=True)) if ev is not None else {},
    }


@flow(name="train-prior")
def train_prior_flow(
    work_dir: str,
    resolution: int = 64,
    quick: bool = False,
    budget_minutes: float = 75.0,
    data_dir: str | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    s = _setup(resolution, quick, budget_minutes, data_dir, seed, threads, device)
    return _summary(train_prior(s.images, Path(work_dir) / "prior", s.plan.prior))


@flow(name="train-rm")
def train_rm_flow(
    work_dir: str,
    resolution: int = 64,
    quick: bool = False,
    budget_minutes: float = 75.0,
    data_dir: str | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    rm_pairs: str = "pool",
    pair_workers: int = 0,
) -> dict[str, Any]:
    """`rm_pairs`: "pool" (the recipe's RM/SE pool) or "fresh" (a new degradation per sample, made by
    `pair_workers` processes; StarterPlan.rm_pairs)."""
    s = _setup(resolution, quick, budget_minutes, data_dir, seed, threads, device)
    plan = replace(s.plan, rm_pairs=rm_pairs, pair_workers=pair_workers)
    pairs = recipe_rm_pairs(s.data, s.train_files, s.pools(), plan, seed)
    return _summary(train_rm(s.images, Path(work_dir) / "rm", plan.rm, pairs=pairs))


@flow(name="train-sde")
def train_sde_flow(
    work_dir: str,
    resolution: int = 64,
    quick: bool = False,
    budget_minutes: float = 75.0,
    data_dir: str | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    s = _setup(resolution, quick, budget_minutes, data_dir, seed, threads, device)
    return _summary(train_sde(s.images, Path(work_dir) / "sde", s.plan.sde))


@flow(name="train-se")
def train_se_flow(
    work_dir: str,
    resolution: int = 64,
    quick: bool = False,
    budget_minutes: float = 75.0,
    data_dir: str | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Needs finished RM and SDE stages in `work_dir`."""
    s = _setup(resolution, quick, budget_minutes, data_dir, seed, threads, device)
    plan, images, work, pool = s.plan, s.images, Path(work_dir), s.pools().restore
    rm = train_rm(images, work / "rm", plan.rm, pairs=pool)
    sde = train_sde(images, work / "sde", plan.sde)
    tm = transfer_model(rm.model, plan.rm.swinir)
    result = train_se(images, work / "se", plan.se, rm=rm.model, sde=sde.model, tm=tm, pool=pool)
    return {**_summary(result.loop), "tau": result.tau}


@flow(name="train-dgsa")
def train_dgsa_flow(
    work_dir: str,
    resolution: int = 64,
    quick: bool = False,
    budget_minutes: float = 75.0,
    data_dir: str | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    vgg16: str | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Needs finished prior, RM, SDE and SE stages in `work_dir`; builds the DSST table itself.
    `vgg16`: VGG16 weights, adds the DISTS term to the loss. `guidance_scale`: the ζ whose guidance DGSA
    learns to modulate — give the ζ the pack will sample with (`train-starter` tunes ζ on held-out faces
    before DGSA and records it in the manifest's sampler); None: the plan's default."""
    s = _setup(resolution, quick, budget_minutes, data_dir, seed, threads, device)
    plan, images, work, pools = s.plan, s.images, Path(work_dir), s.pools()
    prior = train_prior(images, work / "prior", plan.prior)
    rm = train_rm(images, work / "rm", plan.rm, pairs=pools.restore)
    perceptual = dists_loss(vgg16) if vgg16 else None
    config = plan.dgsa if guidance_scale is None else replace(plan.dgsa, guidance_scale=guidance_scale)
    stages = replace(
        recipe_stages(images, work, plan, pools),
        dgsa=lambda nets: train_dgsa(
            images, work / "dgsa", config, nets=nets, pool=pools.base, perceptual=perceptual
        ),
    )
    chain = run_recipe_chain(plan, prior.model, rm.model, stages)
    assert chain.dgsa is not None
    return {**_summary(chain.dgsa), "guidance_scale": config.guidance_scale}


@flow(name="train-complete")
def train_complete_flow(
    base: str,
    out: str,
    data: str,
    steps: dict[str, int] | None = None,
    batch_sizes: dict[str, int] | None = None,
    seed: int = 0,
    resume: bool = False,
    quick: bool = False,
    checkpoint_every: int = 200,
    checkpoint_uri: str | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    device: str = "cpu",
    weights_dir: str | None = None,
    precision: str | None = None,
    checkpointing: bool = True,
    limit: int | None = None,
    vgg16: str | None = None,
    degrade_resolution: int = 512,
    threads: int = 1,
) -> dict[str, Any]:
    """`dynface train complete` as a flow (dynface.train.complete.complete): BASE's prior and RM frozen,
    SDE, SE, DGSA and the DSST table trained on `data`, written to the pack `out`. `steps`: per stage,
    e.g. {"dgsa": 5000}; `workers`/`ray_address`: data-parallel under Ray Train."""
    import torch

    from app.train_parallel import ray_data_parallel
    from dynface.train.complete import complete, report_json
    from dynface.train.complete_plan import memory_for

    torch.set_num_threads(threads)
    report = complete(
        base,
        out,
        data=data,
        steps=steps,
        batch_sizes=batch_sizes,
        seed=seed,
        resume=resume,
        quick=quick,
        checkpoint_every=checkpoint_every,
        checkpoint_uri=checkpoint_uri,
        workers=workers,
        data_parallel=ray_data_parallel(
            workers, ray_address, use_gpu=device.startswith("cuda"), threads=threads
        ),
        device=device,
        weights_dir=weights_dir,
        memory=memory_for(device, precision, checkpointing=checkpointing),
        degrade_resolution=degrade_resolution,
        limit=limit,
        vgg16=vgg16,
        progress=False,
    )
    return report_json(report)
