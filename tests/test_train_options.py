"""The training commands build one options value from their arguments: every flag reaches it, and the
plan it makes applies them in the documented order."""

from __future__ import annotations

from app.cli import build_parser
from app.train_cli import RM_PAIR_SOURCES, complete_options, starter_options
from dynface.train.complete_plan import CompleteOptions
from dynface.train.plan import RM_PAIR_SOURCES as PLAN_RM_PAIR_SOURCES
from dynface.train.starter_options import StarterOptions


def test_train_starter_flags_reach_the_options() -> None:
    argv = ["train", "starter", "out", "--resolution", "32", "--quick", "--budget-minutes", "3"]
    argv += ["--data-dir", "d", "--work-dir", "w", "--seed", "4", "--no-progress"]
    argv += ["--note", "a", "--note", "b"]
    argv += ["--reuse-prior", "p", "--vgg16", "v", "--dists-head", "h", "--device", "cuda:1"]
    argv += ["--steps-scale", "2", "--stage-steps", "prior=7", "--stage-minutes", "rm=1.5"]
    argv += ["--rm-pairs", "fresh", "--pair-workers", "3", "--prior-masked-share", "0.25"]
    assert starter_options(build_parser().parse_args(argv)) == StarterOptions(
        resolution=32, quick=True, budget_minutes=3.0, data_dir="d", work_dir="w", seed=4, device="cuda:1",
        progress=False, steps_scale=2.0, stage_steps={"prior": 7}, stage_minutes={"rm": 1.5},
        rm_pairs="fresh", pair_workers=3, prior_masked_share=0.25, reuse_prior="p", vgg16="v",
        dists_head="h", notes=("a", "b"),
    )  # fmt: skip
    assert starter_options(build_parser().parse_args(["train", "starter", "out"])) == StarterOptions()
    assert RM_PAIR_SOURCES == PLAN_RM_PAIR_SOURCES  # the CLI's copy, kept free of torch


def test_train_complete_flags_reach_the_options() -> None:
    argv = ["train", "complete", "base", "out", "--data", "d", "--steps", "5", "--steps", "dgsa=9"]
    argv += ["--batch", "dgsa=0", "--seed", "2", "--resume", "--quick", "--checkpoint-every", "7"]
    argv += ["--checkpoint-uri", "s3://b/c", "--workers", "2", "--device", "cuda", "--weights-dir", "wd"]
    argv += ["--precision", "fp32", "--no-checkpointing", "--limit", "11", "--vgg16", "v"]
    argv += ["--degrade-resolution", "128"]
    assert complete_options(build_parser().parse_args(argv)) == CompleteOptions(
        steps={"sde": 5, "se": 5, "dgsa": 9}, batch_sizes={"dgsa": 0}, seed=2, resume=True, quick=True,
        checkpoint_every=7, checkpoint_uri="s3://b/c", workers=2, device="cuda", weights_dir="wd",
        precision="fp32", checkpointing=False, limit=11, vgg16="v", degrade_resolution=128,
    )  # fmt: skip
    base = ["train", "complete", "base", "out", "--data", "d"]
    assert complete_options(build_parser().parse_args(base)) == CompleteOptions()


def test_starter_plan_applies_the_scale_then_single_stages() -> None:
    plan = StarterOptions(
        resolution=32, quick=True, seed=3, device="cpu", steps_scale=3.0, stage_steps={"dgsa": 5},
        stage_minutes={"rm": 2.0}, rm_pairs="fresh", pair_workers=1,
    ).plan()  # fmt: skip
    quick = StarterOptions(resolution=32, quick=True).plan()
    assert plan.prior.steps == 3 * quick.prior.steps and plan.dgsa.steps == 5
    assert plan.rm.loop.budget_s == 120.0 and plan.prior.loop.seed == 3
    assert (plan.rm_pairs, plan.pair_workers) == ("fresh", 1)
