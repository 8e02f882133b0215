"""Prefect flow `evaluate`: the evaluation protocol of dynface.evaluation as a deployable flow."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from app.evaluate import DEFAULT_SEEDS, run_evaluation
from dynface.evaluation import DEFAULT_METHODS, ablation_markdown
from dynface.metrics.supplied import MetricWeights


@flow(name="evaluate")
def evaluate(
    pack: str = "starter",
    hq: str = "../shared/data/hq_aligned",
    out: str = "out/evaluation",
    protocol: str = "random",
    limit: int | None = 40,
    methods: list[str] | None = None,
    holdout: str | None = None,
    options: dict | None = None,
    seeds: list[int] | None = None,
    split: str = "test",
    tune_guidance: list[float] | None = None,
    arcface: str | None = None,
    fid_inception: str | None = None,
    vgg16: str | None = None,
) -> str:
    """Restore a degraded CelebA-Test-style set with every method variant and write report.md: the
    `split` faces of the pack's rule over every degradation seed (default three), ζ optionally chosen
    among `tune_guidance` on the validation split first.
    `arcface`, `fid_inception`, `vgg16`: user-supplied weight files that add the identity angle, the
    Inception FID and LPIPS/DISTS (dynface.metrics.supplied)."""
    report, evaluation = run_evaluation(
        pack=pack,
        hq=hq,
        out=out,
        protocol=protocol,
        limit=limit,
        methods=tuple(methods) if methods else DEFAULT_METHODS,
        holdout=holdout,
        overrides=options,
        seeds=tuple(seeds) if seeds else DEFAULT_SEEDS,
        split=split,
        tune_guidance=tuple(tune_guidance or ()),
        weights=MetricWeights(arcface=arcface, fid_inception=fid_inception, vgg16=vgg16),
    )
    create_markdown_artifact(
        key="evaluation-summary",
        markdown=f"Report: `{report}`\n\n" + ablation_markdown(evaluation.ablation),
        description="DynFace evaluation",
    )
    return report
