"""The `starter` pack recipe: every stage in order, then DSST, ζ tuning and the pack itself.

Stages (each resumable from `<work_dir>/<stage>/last.pt`; a finished stage is only reloaded):
prior → RM → SDE → SE (TM from RM) → DSST table (training faces, calibrated tol) → DGSA → pack.
The pack is written with `write_pack`, then ζ (guidance_scale) is tuned on a few held-out faces with the
"full" method and the pack is rewritten with the chosen sampler defaults and the model card.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dynface.core.dsst import DSSTTable
from dynface.core.dsst_files import pack_dsst_table
from dynface.core.dsst_plot import plot_dsst_table
from dynface.evaluation import (
    DEFAULT_SEEDS,
    EvalSet,
    Evaluation,
    Tuning,
    build_eval_set,
    evaluate_variants,
    tune_on_validation,
)
from dynface.packs.writer import write_pack
from dynface.paths import shared_dir
from dynface.restorer import Restorer
from dynface.splits import DEFAULT_SPLIT_RULE, SplitName
from dynface.train.card import CardFacts, render_card
from dynface.train.chain import Chain, ChainStages, run_chain
from dynface.train.common import LoopResult, count_params
from dynface.train.data import (
    EXCLUDED_SOURCES,
    FaceFile,
    PairPool,
    build_file_pair_pool,
    build_pair_pool,
    extra_pool_faces,
    list_faces,
    load_faces,
    load_realigned_faces,
    merge_pools,
    split_faces,
    split_of,
    without_sources,
)
from dynface.train.dgsa import dists_loss, train_dgsa
from dynface.train.fresh_pairs import FreshPairBatches, FreshPairStream, face_array_file
from dynface.train.plan import (
    StarterPlan,
)
from dynface.train.prior import train_prior
from dynface.train.restorer_net import RMPairs, train_rm
from dynface.train.sde import train_sde
from dynface.train.se import train_se
from dynface.train.starter_options import StarterOptions

RECIPE_METHODS = ("lq", "rm_only", "full")  # the recipe's own check; `dynface evaluate` runs the ladder
TRAINING_FILE = "training.json"  # per-stage summaries next to the pack (read back by reuse_prior)


@dataclass(frozen=True)
class StarterReport:
    manifest_uri: str
    out_dir: str
    work_dir: str
    stages: dict[str, dict[str, Any]]  # steps, elapsed_s, stopped_by, final losses
    tau: float
    guidance_scale: float
    tuning: Tuning | None  # ζ chosen on the validation faces
    evaluation: Evaluation | None  # lq / rm_only / full on the test faces
    n_train: int
    n_holdout: int
    wall_s: float


def _stage_summary(result: LoopResult) -> dict[str, Any]:
    return result.summary()


def reused_prior(pack_dir: Path, plan: StarterPlan) -> tuple[LoopResult, dict[str, Any]]:
    """The prior of an existing pack (its config must match the plan's) and its recorded summary."""
    from dynface.packs.loading import load_pack

    loaded = load_pack(str(pack_dir / "manifest.json"))
    if loaded.manifest.components["prior"].config != plan.prior.unet:
        raise ValueError(f"{pack_dir}: its prior config differs from the plan's; cannot reuse it")
    record = pack_dir / TRAINING_FILE
    summary = json.loads(record.read_text())["prior"] if record.is_file() else {}
    summary = {**summary, "reused_from": pack_dir.name}
    model = loaded.prior
    result = LoopResult(
        model=model,
        raw=model,
        step=int(summary.get("steps", 0)),
        elapsed_s=float(summary.get("elapsed_s", 0.0)),
        history={},
        stopped_by=str(summary.get("stopped_by", "reused")),
    )
    return result, summary


def recipe_stages(
    images: np.ndarray, work: Path, plan: StarterPlan, pools: RecipePools, source: str = "training faces"
) -> ChainStages:
    """The starter's SDE, SE (on the RM/SE pool) and DSST stages for the shared chain, in `work`."""
    return ChainStages(
        sde=lambda: train_sde(images, work / "sde", plan.sde),
        se=lambda rm, sde, tm: train_se(
            images, work / "se", plan.se, rm=rm, sde=sde, tm=tm, pool=pools.restore
        ),
        dsst=lambda: build_starter_dsst(images, plan, source=source),
    )


def run_recipe_chain(plan: StarterPlan, prior: nn.Module, rm: nn.Module, stages: ChainStages) -> Chain:
    """The shared chain after the starter's prior and RM, DGSA running RM as the pack's sampler will."""
    return run_chain(
        prior=prior,
        rm=rm,
        rm_config=plan.rm.swinir,
        stages=stages,
        std_range=plan.std_range,
        resolution=plan.resolution,
        rm_flip_ensemble=bool(plan.sampler.get("rm_flip_ensemble", False)),
    )


def build_starter_dsst(images: np.ndarray, plan: StarterPlan, *, source: str) -> DSSTTable:
    """DSST table from the training faces' mean PSD at the pack resolution, tol calibrated (tol=None)."""
    return pack_dsst_table(iter(images), resolution=plan.resolution, std_range=plan.std_range, source=source)


@dataclass(frozen=True, eq=False)
class RecipeFaces:
    """The faces a starter run reads: every face of the data folder (excluded sources included: the extra
    pools come from them), the training and held-out splits of the kept ones, and the training faces at
    the pack resolution."""

    data: Path
    listing: list[FaceFile]
    train_files: list[FaceFile]
    held_files: list[FaceFile]
    images: np.ndarray
    excluded_sources: tuple[str, ...]  # kept out of both splits


def recipe_faces(options: StarterOptions) -> RecipeFaces:
    """The faces of `options.data()` split as the recipe splits them (dynface.splits, `exclude_sources`)."""
    data = options.data()
    listing = list_faces(data, exclude=())
    excluded = EXCLUDED_SOURCES if options.exclude_sources is None else options.exclude_sources
    train_files, held_files = split_faces(without_sources(listing, excluded))
    if not train_files:
        raise ValueError("every face is held out: nothing to train on")
    images = load_faces(data, train_files, options.resolution)
    return RecipeFaces(data, listing, train_files, held_files, images, tuple(excluded))


@dataclass(frozen=True, eq=False)
class RecipePools:
    """The recipe's training pairs: `base` from the training faces (DGSA; SE and RM through `restore`),
    `restore` = `base` + the pairs of `extra_files` (RM and SE)."""

    base: PairPool
    restore: PairPool
    extra_files: list[FaceFile]


def recipe_pools(
    data: Path, listing: Sequence[FaceFile], train_files: list[FaceFile], plan: StarterPlan, seed: int
) -> RecipePools:
    """The pair pools every training entry point uses (train_starter and the component flows).
    `listing`: every face of `data` (`list_faces(data, exclude=())`), where the extra sources are found."""
    base = build_pair_pool(
        load_faces(data, train_files, plan.degrade_resolution),
        plan.resolution,
        per_image=plan.pool_per_image,
        seed=seed,
    )
    # Faces kept out of the prior (framing) still train RM and SE; their pool gets its own seed.
    extra_files = extra_pool_faces(listing, plan.extra_pool_sources, train_files)
    if not extra_files or plan.extra_pool_per_image < 1:
        return RecipePools(base=base, restore=base, extra_files=[])
    extra = build_file_pair_pool(
        data,
        extra_files,
        plan.resolution,
        per_image=plan.extra_pool_per_image,
        seed=seed + 1,
        degrade_resolution=plan.degrade_resolution,
    )
    return RecipePools(base=base, restore=merge_pools(base, extra), extra_files=extra_files)


def recipe_rm_pairs(
    data: Path, train_files: Sequence[FaceFile], pools: RecipePools, plan: StarterPlan, seed: int
) -> RMPairs:
    """RM's training pairs under `plan.rm_pairs`: the RM/SE pool, or fresh degradations of the same
    faces (training split plus the RM/SE-only extra faces) with their own seed."""
    if plan.rm_pairs == "pool":
        return pools.restore
    faces = face_array_file(data, [*train_files, *pools.extra_files], plan.degrade_resolution)
    batches = FreshPairBatches(faces, plan.resolution, plan.rm.batch_size, plan.rm.steps, seed=seed + 2)
    return FreshPairStream(batches, workers=plan.pair_workers)


def write_holdout(path: Path, held: list[FaceFile]) -> None:
    """Names only (paths relative to the data folder), one per line, sorted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{f.file}\n" for f in sorted(held, key=lambda f: f.file)))


def _hardware(device: str, on_gpu: bool) -> str:
    cpu = (
        f"{platform.machine()} CPU ({os.cpu_count()} logical cores shared with other jobs), torch "
        f"{torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}"
    )
    if on_gpu:
        return f"{torch.cuda.get_device_name(torch.device(device))} GPU (training), host {cpu}"
    return cpu


def starter_notice(resolution: int) -> str:
    """The line `dynface restore` prints for a pack this recipe wrote."""
    return (
        f"the starter pack is a {resolution}-px demonstration model: it shows the method running end to"
        " end but does not improve real photographs; for real restoration use the difface pack"
        " (README, 'Packs: which weights are used')"
    )


def recipe_eval_sets(data: Path, names: Sequence[str], resolution: int, split: SplitName) -> list[EvalSet]:
    """The recipe's faces of one split, degraded once per evaluation seed (dynface.evaluation)."""
    return [
        build_eval_set(str(data), resolution=resolution, names=names, seed=seed, split=split)
        for seed in DEFAULT_SEEDS
    ]


def write_results(out: Path, evaluation: Evaluation | None, tuning: Tuning | None) -> None:
    """per_face.parquet (test rows, then the validation rows of the ζ search) and ablation.parquet."""
    frames = [x for x in (evaluation.per_face if evaluation else None, tuning.per_face if tuning else None)]
    frames = [f for f in frames if f is not None]
    if frames:
        pd.concat(frames, ignore_index=True).to_parquet(out / "per_face.parquet", index=False)
    if evaluation is not None:
        evaluation.ablation.to_parquet(out / "ablation.parquet", index=False)


def train_starter(out_dir: str | Path, options: StarterOptions | None = None) -> StarterReport:
    """Train every component and write the pack to `out_dir` (the knobs: StarterOptions).

    Held-out faces (sha256 prefix rule, dynface.splits) are listed in `<out_dir>/holdout.txt`; ζ is tuned
    on validation faces only and the test faces are restored once, at the end, and reported
    (`per_face.parquet`, `ablation.parquet`, the card's Evaluation). A reused prior (`reuse_prior`) comes
    with its recorded training summary (`training.json`) — the prior is most of the cost, and the other
    stages depend on it only through DGSA.
    """
    started = time.perf_counter()
    o = options if options is not None else StarterOptions()
    resolution, seed, device = o.resolution, o.seed, o.device
    on_gpu = torch.device(device).type == "cuda"
    out = Path(out_dir)
    work = o.work(out)
    plan = o.plan()
    faces = recipe_faces(o)
    data, listing, train_files, held_files, images = (
        faces.data,
        faces.listing,
        faces.train_files,
        faces.held_files,
        faces.images,
    )

    prior_masked = ""
    if o.reuse_prior is not None:
        prior, prior_summary = reused_prior(Path(o.reuse_prior), plan)
    else:
        masked = None
        if o.prior_masked_share > 0:
            crops = extra_pool_faces(listing, plan.extra_pool_sources, train_files)
            masked = load_realigned_faces(data, crops, resolution) if crops else None
        if masked is not None:
            plan = replace(plan, prior=replace(plan.prior, masked_share=o.prior_masked_share))
            prior_masked = (
                f"{o.prior_masked_share:.0%} re-aligned tight crops ({masked.images.shape[0]} of {len(crops)}"
                f" training-split files of {', '.join(plan.extra_pool_sources)} had a detected face)"
            )
        prior = train_prior(images, work / "prior", plan.prior, masked=masked)
        prior_summary = _stage_summary(prior)
    pools = recipe_pools(data, listing, train_files, plan, seed)
    pool, restore_pool, extra_files = pools.base, pools.restore, pools.extra_files
    rm = train_rm(images, work / "rm", plan.rm, pairs=recipe_rm_pairs(data, train_files, pools, plan, seed))
    # SDE → TM from RM → SE → DSST; DGSA follows once ζ is tuned (below).
    source = f"{len(train_files)} training faces ({data.name})"
    chain = run_recipe_chain(plan, prior.model, rm.model, recipe_stages(images, work, plan, pools, source))
    se, dsst = chain.se, chain.dsst
    plot_dsst_table(dsst, str(work / "dsst.png"))
    configs = plan.configs()
    networks: dict[str, tuple[Any, dict[str, Any]]] = {
        "prior": (prior.model, configs["prior"]),
        "rm": (rm.model, configs["rm"]),
        **chain.networks(configs),
    }

    def write(sampler: dict[str, Any], card: str | None) -> str:
        return write_pack(
            str(out),
            name="starter",
            resolution=resolution,
            std_range=plan.std_range,
            networks=networks,
            dsst=dsst,
            sampler=sampler,
            card=card,
            notice=starter_notice(resolution),
            splits=DEFAULT_SPLIT_RULE.to_manifest(),
        )

    # ζ first, with global guidance (A_t = 1, a pack without DGSA), so that DGSA then learns to modulate
    # the guidance scale the pack will actually use. ζ is chosen on validation faces only; the test faces
    # are restored once, at the end, and only reported.
    sampler = dict(plan.sampler)
    write_holdout(out / "holdout.txt", held_files)
    uri = write(sampler, None)
    validation = [f.file for f in held_files if split_of(f) == "validation"][: o.tune_faces]
    test = [f.file for f in held_files if split_of(f) == "test"][: o.eval_faces]
    tuning: Tuning | None = None
    if validation:
        tuning = tune_on_validation(
            Restorer.from_pack(str(out), device=device),
            recipe_eval_sets(data, validation, resolution, "validation"),
            [{"guidance_scale": float(z)} for z in o.scales],
        )
        sampler["guidance_scale"] = tuning.best["guidance_scale"]
    dgsa_config = replace(plan.dgsa, guidance_scale=float(sampler["guidance_scale"]))
    perceptual = dists_loss(o.vgg16, o.dists_head) if o.vgg16 else None
    chain = chain.then_dgsa(
        lambda nets: train_dgsa(
            images, work / "dgsa", dgsa_config, nets=nets, pool=pool, perceptual=perceptual
        )
    )
    networks = {**networks, **chain.networks(configs)}
    dgsa = chain.dgsa
    assert dgsa is not None
    uri = write(sampler, None)
    evaluation: Evaluation | None = None
    if test:
        restorer = Restorer.from_pack(str(out), device=device)
        test_sets = recipe_eval_sets(data, test, resolution, "test")
        evaluation = evaluate_variants(restorer, test_sets, methods=RECIPE_METHODS, sheet_faces=0)
    write_results(out, evaluation, tuning)
    stages = {
        "prior": prior_summary,
        "rm": _stage_summary(rm),
        "sde": _stage_summary(chain.sde),
        "se": _stage_summary(se.loop),
        "dgsa": _stage_summary(dgsa),
    }
    _copy_curves(work, out / "curves")
    if o.reuse_prior is not None:
        old_curve = Path(o.reuse_prior) / "curves" / "prior_loss.png"
        if old_curve.is_file() and old_curve.resolve() != (out / "curves" / "prior_loss.png").resolve():
            shutil.copyfile(old_curve, out / "curves" / "prior_loss.png")
    (out / TRAINING_FILE).write_text(json.dumps(stages, indent=1) + "\n")
    facts = CardFacts(
        resolution=resolution,
        std_range=plan.std_range,
        stages=stages,
        configs=configs,
        tau=se.tau,
        label_quantiles=se.label_quantiles,
        dsst=dsst,
        sampler=sampler,
        tuning=tuning,
        evaluation=evaluation.ablation if evaluation is not None else None,
        train_files=train_files,
        n_holdout=len(held_files),
        se=plan.se,
        dgsa_mode=plan.dgsa.mode,
        dgsa_scale=dgsa_config.guidance_scale,
        dgsa_dists_weight=dgsa_config.perceptual_weight if o.vgg16 else None,
        pool=f"{pool.lq.shape[0]} pairs ({plan.pool_per_image} per training face, degraded at "
        f"{plan.degrade_resolution} px)",
        notes=o.notes,
        excluded_sources=faces.excluded_sources or None,
        extra_files=tuple(extra_files),
        extra_pool=(
            f"{restore_pool.lq.shape[0] - pool.lq.shape[0]} pairs ({plan.extra_pool_per_image} per face, "
            f"degraded at {plan.degrade_resolution} px, numpy seed {seed + 1})"
            if extra_files
            else ""
        ),
        rm_fresh_pairs=(
            f"a fresh degradation per sample (the same faces, degraded at {plan.degrade_resolution} px, "
            f"numpy seed ({seed + 2}, step))"
            if plan.rm_pairs == "fresh"
            else ""
        ),
        prior_masked=prior_masked,
        hardware=_hardware(device, on_gpu),
        prior_params=count_params(prior.model),
        on_gpu=on_gpu,
        quick=o.quick,
    )
    (out / "MODEL_CARD.md").write_text(render_card(facts))
    where = "a GPU" if on_gpu else "CPU"
    short = f"Starter pack: small networks trained on {where} at {resolution} px; see MODEL_CARD.md"
    short += " (research use only)."
    uri = write(sampler, short)
    report = StarterReport(
        manifest_uri=uri,
        out_dir=str(out),
        work_dir=str(work),
        stages=stages,
        tau=se.tau,
        guidance_scale=float(sampler["guidance_scale"]),
        tuning=tuning,
        evaluation=evaluation,
        n_train=len(train_files),
        n_holdout=len(held_files),
        wall_s=time.perf_counter() - started,
    )
    (work / "report.json").write_text(json.dumps(report_json(report), indent=1))
    return report


def _copy_curves(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for stage in ("prior", "rm", "sde", "se", "dgsa"):
        src = work / stage / "loss.png"
        if src.is_file():
            shutil.copyfile(src, dest / f"{stage}_loss.png")
    if (work / "dsst.png").is_file():
        shutil.copyfile(work / "dsst.png", dest / "dsst.png")


def report_json(report: StarterReport) -> dict[str, Any]:
    data = {k: v for k, v in report.__dict__.items() if k not in ("evaluation", "tuning")}
    t, ev = report.tuning, report.evaluation
    data["tuning"] = None
    if t is not None:
        data["tuning"] = {
            "faces": list(t.faces),
            "candidates": list(t.candidates),
            "mean_psnr": list(t.mean_psnr),
        }
    data["evaluation"] = None
    if ev is not None:
        data["evaluation"] = {
            r["method"]: {"psnr": r["psnr"], "ci": [r["psnr_ci_low"], r["psnr_ci_high"]]}
            for _, r in ev.ablation.iterrows()
        }
    return data


def check_pack(
    pack_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    eval_faces: int = 20,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore every image of `<data>/lq_real_aligned` (raises if any fails or changes size) and report
    mean PSNR of LQ / rm_only / full on the first `eval_faces` test-split faces over the evaluation seeds
    (dynface.evaluation)."""
    from PIL import Image

    data = Path(data_dir) if data_dir is not None else shared_dir() / "data"
    restorer = Restorer.from_pack(str(pack_dir), device="cpu", overrides=overrides)
    files = sorted(p for p in (data / "lq_real_aligned").rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    faces = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    t0 = time.perf_counter()
    results = restorer.restore(faces)
    seconds = time.perf_counter() - t0
    if len(results) != len(faces):
        raise RuntimeError(f"restored {len(results)} of {len(faces)} real LQ faces")
    for path, face, res in zip(files, faces, results):
        if res.image.shape != face.shape or not np.isfinite(res.std_hat):
            raise RuntimeError(f"{path.name}: bad result (shape {res.image.shape}, std {res.std_hat})")
    held = [f.file for f in split_faces(list_faces(data))[1] if split_of(f) == "test"][:eval_faces]
    sets = recipe_eval_sets(data, held, restorer.resolution, "test")
    ablation = evaluate_variants(restorer, sets, methods=RECIPE_METHODS, sheet_faces=0).ablation
    return {
        "lq_real_restored": len(results),
        "lq_real_seconds": round(seconds, 1),
        "test_faces": len(held),
        "mean_psnr": {r["method"]: round(r["psnr"], 3) for _, r in ablation.iterrows()},
    }
