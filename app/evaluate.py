"""`dynface evaluate` and the `evaluate` flow: the evaluation protocol run end to end, report written."""

from __future__ import annotations

from collections.abc import Sequence

from app.report import write_report
from dynface.evaluation import (
    DEFAULT_METHODS,
    Evaluation,
    build_eval_set,
    evaluate_variants,
    read_holdout_names,
)
from dynface.metrics.supplied import MetricWeights, SuppliedMetrics
from dynface.restorer import Restorer


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
    seed: int = 2025,
    weights: MetricWeights | None = None,
) -> tuple[str, Evaluation]:
    """Build the set, restore with every method, write the report; returns (report URI, evaluation)."""
    restorer = Restorer.from_pack(pack, overrides=overrides)
    names = read_holdout_names(holdout) if holdout else None
    eval_set = build_eval_set(
        hq, resolution=restorer.resolution, protocol=protocol, limit=limit, seed=seed, names=names
    )
    supplied = SuppliedMetrics.load(weights)
    evaluation = evaluate_variants(restorer, eval_set, methods=methods, supplied=supplied)
    notes = (
        f"Pack `{restorer.pack.manifest.name}` ({restorer.pack.manifest.uri}), resolution"
        f" {restorer.resolution} px, protocol `{protocol}` (seed {seed}) on {len(eval_set.names)} HQ faces"
        f" from `{hq}`{' (held-out split ' + holdout + ')' if holdout else ''}."
        + (f" Supplied-weight metrics: {', '.join(supplied.columns)}." if supplied.columns else "")
    )
    report = write_report(evaluation, out, title="DynFace evaluation", notes=notes)
    return report, evaluation
