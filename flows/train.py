"""Prefect flows for training: `train-starter` (the whole recipe), one flow per component, and
`train-complete` (a base pack's missing components).

Thin wrappers over `dynface.train`: every flow takes its paths and one `options` value (StarterOptions or
CompleteOptions; JSON from a deployment), trains or resumes in `work_dir/<stage>` (the component flows)
and returns a JSON-ready summary. Component flows that need earlier stages (SE needs
RM and SDE, DGSA needs prior, RM, SE and the DSST table) reload those stages' finished checkpoints from the
same `work_dir`, so run them in the recipe's order or use `train-starter`. RM, SE and DGSA train on the
recipe's pair pools (`recipe_pools`), as in `train-starter`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow

from dynface.train.chain import transfer_model
from dynface.train.common import LoopResult
from dynface.train.complete_plan import CompleteOptions
from dynface.train.dgsa import dists_loss, train_dgsa
from dynface.train.plan import StarterPlan
from dynface.train.prior import train_prior
from dynface.train.restorer_net import train_rm
from dynface.train.sde import train_sde
from dynface.train.se import train_se
from dynface.train.starter import (
    RecipeFaces,
    RecipePools,
    recipe_faces,
    recipe_pools,
    recipe_rm_pairs,
    recipe_stages,
    run_recipe_chain,
    train_starter,
)
from dynface.train.starter_options import StarterOptions

DEFAULT_OPTIONS = StarterOptions()
DEFAULT_COMPLETE = CompleteOptions()


@dataclass(frozen=True, eq=False)
class _Setup:
    plan: StarterPlan
    faces: RecipeFaces
    seed: int

    def pools(self) -> RecipePools:
        f = self.faces
        return recipe_pools(f.data, f.listing, f.train_files, self.plan, self.seed)


def _setup(options: StarterOptions, threads: int) -> _Setup:
    """The recipe's plan and faces for one component flow (no progress lines)."""
    import torch

    torch.set_num_threads(threads)
    return _Setup(replace(options, progress=False).plan(), recipe_faces(options), options.seed)


def _summary(result: LoopResult) -> dict[str, Any]:
    return {
        "steps": result.step,
        "elapsed_s": result.elapsed_s,
        "stopped_by": result.stopped_by,
        "loss": result.final(),
    }


@flow(name="train-starter")
def train_starter_flow(
    out_dir: str = "weights/starter", options: StarterOptions = DEFAULT_OPTIONS, threads: int = 1
) -> dict[str, Any]:
    """Every stage in order, then the pack (dynface.train.starter.train_starter); `options`: every knob
    of the run (dynface.train.starter_options.StarterOptions, e.g. {"resolution": 128, "device": "cuda",
    "stage_steps": {"prior": 6000}})."""
    import torch

    torch.set_num_threads(threads)
    report = train_starter(out_dir, replace(options, progress=False))
    ev = report.evaluation.ablation if report.evaluation is not None else None
    return {
        "manifest": report.manifest_uri,
        "stages": report.stages,
        "guidance_scale": report.guidance_scale,
        # mean 8-bit RGB PSNR per method on the test split (the pack's ablation.parquet)
        "evaluation": dict(zip(ev["method"], ev["psnr"], strict=True)) if ev is not None else {},
    }


# The component flows take the recipe's options too; each uses the fields its stage needs.
@flow(name="train-prior")
def train_prior_flow(
    work_dir: str, options: StarterOptions = DEFAULT_OPTIONS, threads: int = 1
) -> dict[str, Any]:
    s = _setup(options, threads)
    return _summary(train_prior(s.faces.images, Path(work_dir) / "prior", s.plan.prior))


@flow(name="train-rm")
def train_rm_flow(
    work_dir: str, options: StarterOptions = DEFAULT_OPTIONS, threads: int = 1
) -> dict[str, Any]:
    """RM on the recipe's pool, or on fresh pairs (`options.rm_pairs`, `options.pair_workers`)."""
    s = _setup(options, threads)
    pairs = recipe_rm_pairs(s.faces.data, s.faces.train_files, s.pools(), s.plan, s.seed)
    return _summary(train_rm(s.faces.images, Path(work_dir) / "rm", s.plan.rm, pairs=pairs))


@flow(name="train-sde")
def train_sde_flow(
    work_dir: str, options: StarterOptions = DEFAULT_OPTIONS, threads: int = 1
) -> dict[str, Any]:
    s = _setup(options, threads)
    return _summary(train_sde(s.faces.images, Path(work_dir) / "sde", s.plan.sde))


@flow(name="train-se")
def train_se_flow(
    work_dir: str, options: StarterOptions = DEFAULT_OPTIONS, threads: int = 1
) -> dict[str, Any]:
    """Needs finished RM and SDE stages in `work_dir`."""
    s = _setup(options, threads)
    plan, images, work, pool = s.plan, s.faces.images, Path(work_dir), s.pools().restore
    rm = train_rm(images, work / "rm", plan.rm, pairs=pool)
    sde = train_sde(images, work / "sde", plan.sde)
    tm = transfer_model(rm.model, plan.rm.swinir)
    result = train_se(images, work / "se", plan.se, rm=rm.model, sde=sde.model, tm=tm, pool=pool)
    return {**_summary(result.loop), "tau": result.tau}


@flow(name="train-dgsa")
def train_dgsa_flow(
    work_dir: str,
    options: StarterOptions = DEFAULT_OPTIONS,
    threads: int = 1,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Needs finished prior, RM, SDE and SE stages in `work_dir`; builds the DSST table itself.
    `options.vgg16`: VGG16 weights, adds the DISTS term to the loss. `guidance_scale`: the ζ whose
    guidance DGSA learns to modulate — give the ζ the pack will sample with (`train-starter` tunes ζ on
    held-out faces before DGSA and records it in the manifest's sampler); None: the plan's default."""
    s = _setup(options, threads)
    plan, images, work, pools = s.plan, s.faces.images, Path(work_dir), s.pools()
    prior = train_prior(images, work / "prior", plan.prior)
    rm = train_rm(images, work / "rm", plan.rm, pairs=pools.restore)
    perceptual = dists_loss(options.vgg16, options.dists_head) if options.vgg16 else None
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
    options: CompleteOptions = DEFAULT_COMPLETE,
    ray_address: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """`dynface train complete` as a flow (dynface.train.complete.complete): BASE's prior and RM frozen,
    SDE, SE, DGSA and the DSST table trained on `data`, written to the pack `out`. `options`: every knob
    (dynface.train.complete_plan.CompleteOptions, e.g. {"steps": {"dgsa": 5000}, "workers": 4});
    `options.workers` / `ray_address`: data-parallel under Ray Train."""
    from app.train_cli import run_completion

    return run_completion(
        base, out, data, replace(options, progress=False), ray_address=ray_address, threads=threads
    )
