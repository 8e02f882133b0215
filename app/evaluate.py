"""`dynface evaluate` and the `evaluate` flow: the evaluation protocol run end to end, report written.

Faces come from the pack's split rule (dynface.splits, recorded in its manifest): the reported table is
the `split` faces (test by default) over every degradation seed; an optional ζ search runs first on the
validation faces only (`tune_on_validation`) and its per-face scores join `per_face.parquet`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from app.report import write_report
from dynface.evaluation import (
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    Evaluation,
    Tuning,
    build_eval_set,
    evaluate_variants,
    read_holdout_names,
    tune_on_validation,
)
from dynface.metrics.supplied import MetricWeights, SuppliedMetrics
from dynface.restorer import Restorer
from dynface.splits import SplitRule


def run_evaluation(
    *,
    pack: str,
    hq: str,
    out: str,
    protocol: str = "random",
    limit: int | None = 40,
    methods: Sequence[str] = DEFAULT_METHODS,
    holdout: str | None = None,
    overrides: dict | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    split: str = "test",
    tune_guidance: Sequence[float] = (),
    weights: MetricWeights | None = None,
) -> tuple[str, Evaluation]:
    """Build the sets, (tune ζ on validation), restore with every method, write the report; returns
    (report URI, evaluation)."""
    if split == "validation" and tune_guidance:
        raise ValueError("ζ is tuned on the validation split: report another split")
    restorer = Restorer.from_pack(pack, overrides=overrides)
    rule = SplitRule.from_manifest(restorer.pack.manifest.splits)
    names = read_holdout_names(holdout) if holdout else None

    def sets(which: str) -> list:
        return [
            build_eval_set(
                hq, resolution=restorer.resolution, protocol=protocol, limit=limit, seed=seed, names=names,
                split=which, rule=rule,
            )
            for seed in seeds
        ]  # fmt: skip

    tuning = None
    if tune_guidance:
        candidates = [{"guidance_scale": float(z)} for z in tune_guidance]
        tuning = tune_on_validation(restorer, sets("validation"), candidates)
        restorer = restorer.with_config(**tuning.best)
    supplied = SuppliedMetrics.load(weights)
    evaluation = evaluate_variants(restorer, sets(split), methods=methods, supplied=supplied, split=split)
    if tuning is not None:
        rows = pd.concat([evaluation.per_face, tuning.per_face], ignore_index=True)
        evaluation = Evaluation(rows, evaluation.ablation, evaluation.frechet, evaluation.sheet)
    n_faces = int(evaluation.ablation["n_faces"].max()) if len(evaluation.ablation) else 0
    notes = (
        f"Pack `{restorer.pack.manifest.name}` ({restorer.pack.manifest.uri}), resolution"
        f" {restorer.resolution} px, protocol `{protocol}`, degradation seeds {', '.join(map(str, seeds))},"
        f" on the {n_faces} faces of the `{split}` split ({json.dumps(rule.to_manifest())}) from `{hq}`"
        + (f" listed in {holdout}" if holdout else "")
        + "."
        + (f" {tuning_sentence(tuning)}" if tuning else "")
        + (f" Supplied-weight metrics: {', '.join(supplied.columns)}." if supplied.columns else "")
    )
    report = write_report(evaluation, out, title="DynFace evaluation", notes=notes)
    return report, evaluation


def tuning_sentence(tuning: Tuning) -> str:
    tried = ", ".join(
        f"{', '.join(f'{k}={v:g}' for k, v in c.items())}: {p:.2f} dB"
        for c, p in zip(tuning.candidates, tuning.mean_psnr, strict=True)
    )
    chosen = ", ".join(f"{k}={v:g}" for k, v in tuning.best.items())
    return (
        f"Chosen on the {len(tuning.faces)} validation faces (`{tuning.method}`, mean PSNR): {tried};"
        f" kept {chosen}."
    )
