"""The starter recipe's sizes, steps and time budgets for every stage (one place, used by starter.py,
the flows and the command line)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dynface.train.common import LoopConfig
from dynface.train.data import UTKFACE_SOURCE
from dynface.train.dgsa import DGSATrainConfig
from dynface.train.prior import PriorTrainConfig, prior_config
from dynface.train.restorer_net import RMTrainConfig, swinir_config
from dynface.train.sde import SDETrainConfig, sde_config
from dynface.train.se import SETrainConfig

REFERENCE_STD_RANGE = (1.0, 15.0)  # spec §3.7, pixels at 512
RM_PAIR_SOURCES = ("pool", "fresh")
# Share of the wall-time budget per stage (serial run). The prior is the expensive, quality-deciding part.
BUDGET_SHARES = {"prior": 0.50, "rm": 0.30, "sde": 0.03, "se": 0.07, "dgsa": 0.10}


@dataclass(frozen=True)
class StarterPlan:
    resolution: int
    std_range: tuple[float, float]
    prior: PriorTrainConfig
    rm: RMTrainConfig
    sde: SDETrainConfig
    se: SETrainConfig
    dgsa: DGSATrainConfig
    sampler: dict[str, Any]
    quick: bool
    # Training pairs for RM, SE and DGSA: `pool_per_image` DifFace-range degradations of each face made
    # at `degrade_resolution` px and resized to the pack resolution (dynface.train.data.build_pair_pool).
    # 24, not 8: past ~5,000 steps RM overfits an 8-per-face pool (held-out PSNR fell while the training
    # loss still fell) and kept improving on 24 per face (MODEL_CARD run notes). ~7 min to build on a CPU.
    degrade_resolution: int = 512
    pool_per_image: int = 24
    # More faces for RM and SE only: `extra_pool_per_image` degradations of each training-split file of
    # `extra_pool_sources` (sources kept out of the prior for their framing, dynface.train.data). RM and
    # SE look at local structure, and RM is data-bound: continued 15 min on the recipe pool it reached
    # 25.08 dB held-out, on the recipe pool + 2 per UTKFace crop 25.18 dB (MODEL_CARD run notes). DGSA
    # stays on the FFHQ-framed pool because it trains through the prior's sampling.
    extra_pool_sources: tuple[str, ...] = (UTKFACE_SOURCE,)
    extra_pool_per_image: int = 2
    # RM's pairs: "pool" (the pools above, cheap on a CPU) or "fresh" (a new degradation of the same
    # faces for every sample, made by `pair_workers` DataLoader processes; dynface.train.fresh_pairs).
    # Fresh pairs cannot be overfitted, which matters where RM trains many steps (a GPU's step scale).
    # On a CPU they cost a core per training step (benchmarks/results/fresh_pairs_cpu.txt), and 1,808
    # fresh-pair steps continuing the sixth pack's RM (lr 2e-4, 40 min) gained only +0.05–0.08 dB RM-only
    # (30 held-out faces × 4 degradation draws): the CPU recipe keeps the pool.
    rm_pairs: str = "pool"
    pair_workers: int = 0

    def __post_init__(self) -> None:
        if self.rm_pairs not in RM_PAIR_SOURCES:
            raise ValueError(f"rm_pairs must be one of {', '.join(RM_PAIR_SOURCES)}, got {self.rm_pairs!r}")
        if self.pair_workers < 0:
            raise ValueError("pair_workers must be >= 0")

    def configs(self) -> dict[str, dict[str, Any]]:
        """Network configs as stored in the pack manifest."""
        return {
            "prior": self.prior.unet,
            "rm": self.rm.swinir,
            "tm": self.rm.swinir,
            "sde": self.sde.sde,
            "dgsa": self.dgsa.dgsa,
        }


def _loop(seed: int, budget_s: float | None, ckpt_every: int, progress: bool) -> LoopConfig:
    return LoopConfig(steps=0, ckpt_every=ckpt_every, seed=seed, budget_s=budget_s, progress=progress)


def starter_plan(
    resolution: int = 64,
    *,
    quick: bool = False,
    budget_minutes: float | None = 75.0,
    seed: int = 0,
    progress: bool = True,
) -> StarterPlan:
    """The full CPU recipe (≈75 min serial on 2 cores at 64 px), or tiny sizes/steps when `quick`."""
    if resolution % 32:
        raise ValueError("the starter recipe needs a resolution that is a multiple of 32")
    scale = resolution / 512
    std_range = (REFERENCE_STD_RANGE[0] * scale, REFERENCE_STD_RANGE[1] * scale)

    def budget(stage: str) -> float | None:
        return None if budget_minutes is None else budget_minutes * 60 * BUDGET_SHARES[stage]

    sampler = {
        # ddim25 (stride 40): 18–24 model steps from t_start ∈ [690, 925], affordable on 2 CPU cores.
        "respacing": "ddim25",
        "mode": "dps",
        "guidance_scale": 1.0,  # replaced by the tuned value when the pack is written
        "batch_size": 8,
        # RM's flip self-ensemble: +0.17 dB RM-only on the 5th run's held-out faces, at 2× RM's small cost.
        "rm_flip_ensemble": True,
    }
    if quick:
        unet = prior_config(resolution, width=32, attention=False)
        unet["channel_mult"] = [1, 1]
        lp = _loop(seed, None, 2, progress)
        swin = swinir_config(resolution, embed_dim=16, depths=(1,), image_residual=True)
        return StarterPlan(
            resolution=resolution,
            std_range=std_range,
            prior=PriorTrainConfig(unet=unet, steps=3, batch_size=2, warmup=1, loop=lp),
            rm=RMTrainConfig(swinir=swin, steps=3, batch_size=2, warmup=1, loop=lp),
            sde=SDETrainConfig(
                sde=sde_config(resolution, std_range, width=8), steps=3, batch_size=2, loop=lp
            ),
            se=SETrainConfig(std_range=std_range, steps=2, batch_size=2, grid_size=5, calib_pairs=4, loop=lp),
            dgsa=DGSATrainConfig(dgsa={"hidden": 8}, steps=2, batch_size=2, respacing="ddim10", loop=lp),
            sampler={**sampler, "respacing": "ddim10", "batch_size": 4},
            quick=True,
            degrade_resolution=2 * resolution,
            pool_per_image=2,
            extra_pool_per_image=1,
        )
    return StarterPlan(
        resolution=resolution,
        std_range=std_range,
        prior=PriorTrainConfig(
            unet=prior_config(resolution),
            steps=1800,
            batch_size=8,
            lr=2e-4,
            warmup=100,
            loop=_loop(seed, budget("prior"), 100, progress),
        ),
        rm=RMTrainConfig(
            # The input residual starts RM at the identity: a briefly trained RM without it stayed
            # below the LQ input (MODEL_CARD history).
            swinir=swinir_config(resolution, embed_dim=60, depths=(4, 4), image_residual=True),
            # lr 1e-3 reached in ~1,150 steps what 2e-4 reached in ~3,100 (10-minute CPU trials, issue
            # notes); the budget usually stops this stage before the step count on a CPU.
            steps=6000,
            batch_size=8,
            lr=1e-3,
            warmup=100,
            loop=_loop(seed, budget("rm"), 100, progress),
        ),
        sde=SDETrainConfig(
            sde=sde_config(resolution, std_range),
            steps=400,
            batch_size=16,
            loop=_loop(seed, budget("sde"), 100, progress),
        ),
        se=SETrainConfig(
            std_range=std_range, steps=300, batch_size=8, loop=_loop(seed, budget("se"), 50, progress)
        ),
        dgsa=DGSATrainConfig(
            dgsa={"hidden": 32},
            steps=300,
            batch_size=8,
            respacing=sampler["respacing"],
            loop=_loop(seed, budget("dgsa"), 25, progress),
        ),
        sampler=sampler,
        quick=False,
    )


STAGES = ("prior", "rm", "sde", "se", "dgsa")


def _each_stage(plan: StarterPlan, change: Callable[[Any], Any]) -> StarterPlan:
    """The same plan with every stage's training config passed through `change`."""
    return replace(plan, **{name: change(getattr(plan, name)) for name in STAGES})


def with_loop(plan: StarterPlan, **changes: Any) -> StarterPlan:
    """The same plan with `changes` (LoopConfig fields, e.g. seed=1, device="cuda") in every stage's loop."""
    return _each_stage(plan, lambda stage: replace(stage, loop=replace(stage.loop, **changes)))


def with_steps_scale(plan: StarterPlan, factor: float) -> StarterPlan:
    """Every stage's step count times `factor`: a GPU runs many times the CPU recipe's steps in its time
    budget, which still stops each stage (`budget_minutes`)."""
    if factor <= 0:
        raise ValueError("steps_scale must be > 0")
    return _each_stage(plan, lambda stage: replace(stage, steps=max(1, round(stage.steps * factor))))


def with_stage(
    plan: StarterPlan, name: str, *, steps: int | None = None, budget_minutes: float | None = None
) -> StarterPlan:
    """The same plan with one stage's step count and/or time budget replaced — e.g. to continue a stage
    from its checkpoint in the work dir for longer than the recipe's share of the budget allows (the
    budget counts the stage's total time, earlier sessions included)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if steps is not None and steps < 1 or budget_minutes is not None and budget_minutes <= 0:
        raise ValueError("a stage needs steps >= 1 and budget_minutes > 0")
    stage = getattr(plan, name)
    if steps is not None:
        stage = replace(stage, steps=steps)
    if budget_minutes is not None:
        stage = replace(stage, loop=replace(stage.loop, budget_s=budget_minutes * 60))
    return replace(plan, **{name: stage})


def parse_stage_values(items: list[str], cast: Callable[[str], Any]) -> dict[str, Any]:
    """Command-line `STAGE=VALUE` items (e.g. ["prior=6000"]) as {stage: cast(value)}."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in STAGES:
            raise ValueError(f"{item!r}: expected STAGE=VALUE with STAGE one of {', '.join(STAGES)}")
        out[name] = cast(value)
    return out
