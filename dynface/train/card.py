"""MODEL_CARD.md for a trained starter pack, rendered from the facts of the run (no free-form claims)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dynface.core.dsst import DSSTTable
from dynface.evaluation import Tuning, ablation_markdown
from dynface.evaluation_summary import excludes_zero
from dynface.splits import DEFAULT_SPLIT_RULE
from dynface.train.data import FaceFile
from dynface.train.se import SETrainConfig


@dataclass(frozen=True)
class CardFacts:
    resolution: int
    std_range: tuple[float, float]
    stages: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    tau: float
    label_quantiles: tuple[float, float, float]
    dsst: DSSTTable
    sampler: dict[str, Any]
    tuning: Tuning | None  # ζ chosen on the validation split
    evaluation: pd.DataFrame | None  # ablation.parquet of the recipe's check on the test split
    train_files: list[FaceFile]
    n_holdout: int
    se: SETrainConfig
    dgsa_mode: str
    dgsa_scale: float
    pool: str
    excluded_sources: tuple[str, ...] | None
    hardware: str
    quick: bool
    prior_params: int  # parameters of the trained prior
    on_gpu: bool = False  # trained on a GPU (hardware names it)
    notes: tuple[str, ...] = ()
    dgsa_dists_weight: float | None = None  # None: no VGG16 weights supplied, SWT-only loss
    extra_files: tuple[FaceFile, ...] = ()  # faces used only in the RM/SE pair pool
    extra_pool: str = ""  # how those faces' pairs were made, e.g. "4738 pairs (2 per face, ...)"
    rm_fresh_pairs: str = ""  # how RM's fresh pairs were made, when this run's RM steps used them
    prior_masked: str = ""  # the re-aligned crops in the prior's batches, when this run's prior used them


def _licences(files: Sequence[FaceFile], used_for: str) -> list[str]:
    counts = Counter(f.source for f in files)
    licence = {f.source: f.licence for f in files}
    # Licence strings contain "|" separators: escape them so the Markdown table keeps its columns.
    escaped = {src: (text or "see the data folder").replace("|", "\\|") for src, text in licence.items()}
    return [f"| `{src}` | {n} | {used_for} | {escaped[src]} |" for src, n in sorted(counts.items())]


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _method_lines(facts: CardFacts) -> list[str]:
    pc, rc, se, d = facts.configs["prior"], facts.configs["rm"], facts.se, facts.dsst
    lo, hi = facts.std_range
    q = facts.label_quantiles
    residual = ", input residual: output = input + net" if rc.get("image_residual") else ""
    return [
        f"- **prior**: DifFace-style UNet (width {pc['model_channels']}, mult {pc['channel_mult']},",
        f"  attention at {pc['attention_resolutions']}), DDPM T=1000 linear β, learned-range variance,",
        "  RESCALED_MSE loss, uniform t, AdamW with warm-up and cosine decay; the EMA (0.999) is shipped.",
        *(
            [f"  Its batches also held {facts.prior_masked}, the loss counted on their original pixels only."]
            if facts.prior_masked
            else []
        ),
        f"- **RM**: SwinIR (embed {rc['embed_dim']}, depths {rc['depths']}{residual}), L1 loss.",
        "  Training pairs",
        f"  (RM, SE, DGSA): a fixed pool of {facts.pool} with DifFace ranges (spec §6.1);",
        *(
            [f"  RM and SE also draw from {facts.extra_pool} of the RM/SE-only faces (Data);"]
            if facts.extra_pool
            else []
        ),
        *(
            [f"  RM's steps in this run drew {facts.rm_fresh_pairs} instead (StarterPlan.rm_pairs);"]
            if facts.rm_fresh_pairs
            else []
        ),
        f"  LQ and GT then resized to {facts.resolution} px, the way the Restorer sees real 512-px crops.",
        f"- **SDE**: pre-trained on (k_std ⊛ x0, std), std ~ U[{lo:.4g}, {hi:.4g}] px, L1 loss.",
        "- **SE = TM + SDE**: TM initialised from RM; loss",
        f"  MSE(TM(y), k_std* ⊛ x0) + {se.std_weight:g}·L1(SDE(TM(y)), std*),",
        f"  SDE at {se.sde_lr_scale:g}× the learning rate.",
        "  **std\\* definition** (spec §3.8, first option): std*(y, x0) = min{std on a",
        f"  {se.grid_size}-point grid over the std range : PSNR(k_std ⊛ RM(y), k_std ⊛ x0) ≥ τ}},",
        f"  std_max when no grid std reaches τ. τ = {facts.tau:.2f} dB, tuned so the median label sits",
        f"  mid-range (labels of {se.calib_pairs} calibration pairs, 10/50/90 %:",
        f"  {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} px).",
        "- **DGSA**: one guided DDIM step of the frozen prior on the pack's sampling grid (spec §3.14),",
        f"  guidance in `{facts.dgsa_mode}` mode with ζ = {facts.dgsa_scale:g} during training;",
        *_dgsa_loss_lines(facts.dgsa_dists_weight),
        f"- **DSST**: mean power spectrum of the {d.n_images} training faces at {facts.resolution} px,",
        f"  max reduction, tol calibrated to {d.tol:.4g} (std_max starts at t = {d.t_range[1]});",
        f"  t_start {int(d.t_starts[0])} … {int(d.t_starts[-1])} over the std range (`curves/dsst.png`).",
    ]


def _dgsa_loss_lines(dists_weight: float | None) -> list[str]:
    if dists_weight is not None:
        return [
            f"  loss = 1-level Haar SWT sub-band L1 (γ = 1, 1, 1, 1) + {dists_weight:g}·DISTS"
            " (VGG16 weights supplied)."
        ]
    return [
        "  loss = 1-level Haar SWT sub-band L1 (γ = 1, 1, 1, 1). **SWT only, no DISTS term**: no VGG16",
        "  weights were supplied (`--vgg16 vgg16-397923af.pth` adds the term).",
    ]


def _extra_use(facts: CardFacts, *, table: bool = False) -> str:
    if facts.prior_masked:
        return "RM and SE pairs, prior (re-aligned, masked loss)" if table else "RM, SE and the masked prior"
    return "RM and SE pairs only" if table else "RM and SE only"


def evaluation_lines(ablation: pd.DataFrame, resolution: int) -> list[str]:
    """The recipe's check on the test split: its table (ablation.parquet) and the verdict on the target."""
    first = ablation.iloc[0]
    lines = [
        f"{int(first['n_faces'])} test-split HQ faces at 512 px × {int(first['n_seeds'])} degradation seeds"
        f" (DifFace random pipeline, no flip/gray), LQ and GT resized to {resolution} px; 8-bit RGB PSNR.",
        "Means with 95 % bootstrap intervals over faces; the same numbers are in `ablation.parquet`,",
        "recomputable from `per_face.parquet`.",
        "",
        ablation_markdown(ablation),
    ]
    return lines + target_verdict(ablation)


def target_verdict(ablation: pd.DataFrame) -> list[str]:
    """full − LQ with its paired interval, and whether it meets the +2 dB target (whole interval above)."""
    full = ablation[ablation["method"] == "full"]
    if not len(full) or "lq" not in set(ablation["method"]):
        return []
    r = full.iloc[0]
    gain, lo, hi = r["psnr_vs_lq"], r["psnr_vs_lq_ci_low"], r["psnr_vs_lq_ci_high"]
    verdict = "meets" if lo >= 2.0 else "does not meet"
    effect = "an effect" if excludes_zero(lo, hi) else "no effect (the interval includes 0)"
    return [
        "",
        f"full − LQ = {gain:+.2f} dB [{lo:+.2f}, {hi:+.2f}], {effect}: this {verdict} the target of"
        " +2 dB (met only when the whole interval lies above it).",
    ]


def render_card(facts: CardFacts) -> str:
    s = facts.stages
    total_s = sum(v["elapsed_s"] for v in s.values())
    res = facts.resolution
    where = "a GPU" if facts.on_gpu else "a CPU"
    rule = DEFAULT_SPLIT_RULE
    validation = " or ".join(repr(p) for p in rule.validation)
    test = " or ".join(repr(p) for p in rule.test)
    lines = [
        "# DynFace `starter` pack",
        "",
        "Small networks for every component of DynFaceRestore (prior, RM, SE = TM + SDE, DGSA, DSST",
        f"table), trained from scratch on {where} at {res}×{res}. It exists so the whole",
        "method runs end to end on a laptop; it is **not** a competitive face restorer (see Known limits).",
        "**Research/non-commercial use only** (training data licences below).",
        "",
        "## Data",
        "",
        f"{len(facts.train_files)} training faces"
        + (f" (and {len(facts.extra_files)} for {_extra_use(facts)})" if facts.extra_files else "")
        + f"; {facts.n_holdout} held out, names in `holdout.txt` (no images shipped): the",
        f"**validation** split (sha256 of the file starts with {validation}) takes every tuning decision,",
        f"the **test** split (sha256 starts with {test}) is only reported (rule in the manifest's `splits`).",
    ]
    if facts.excluded_sources:
        extra = sorted({f.source for f in facts.extra_files})
        lines += [
            f"Excluded from the prior: {', '.join(f'`{x}`' for x in facts.excluded_sources)}. The UTKFace",
            "crops are framed much tighter than FFHQ/CelebA-HQ and our aligner's crops; re-aligned with",
            "`dynface.images.faces` (`realign_tight_crop`), their pixels fill only ~39 % of the",
            "FFHQ-framed crop (35–46 %, `scripts/measure_utk_coverage.py`), the rest would be padding:",
            "the prior, DGSA and the DSST table keep one FFHQ framing.",
        ]
        if extra:
            lines += [
                f"The training-split files of {', '.join(f'`{x}`' for x in extra)} do train RM and SE",
                "(local restoration and blur estimation, where framing matters little and more identities",
                "help), as they are, without re-alignment.",
            ]
        if facts.prior_masked:
            lines += [
                "In this run they also trained the prior, re-aligned, with the loss counted on their",
                "original pixels only (Training, prior).",
            ]
    lines += [
        "Faces resized to the pack resolution with PIL bicubic (antialiased); random horizontal flips.",
        "",
        "| source folder | training files | used for | licence (MANIFEST.csv) |",
        "|---|---:|---|---|",
        *_licences(facts.train_files, "every stage"),
        *_licences(facts.extra_files, _extra_use(facts, table=True)),
        "",
        "All sources are restricted to non-commercial research use (CelebA terms, FFHQ CC BY-NC-SA 4.0,",
        "research test sets). The weights derive from these images: do not use them commercially.",
        "",
        "## Training",
        "",
        f"Hardware: {facts.hardware}.",
        f"Sum of stage times {_fmt_minutes(total_s)}.",
        "",
        "| stage | steps | time | stopped by | final losses (mean of last 50 steps) |",
        "|---|---:|---:|---|---|",
    ]
    for name, v in s.items():
        finals = ", ".join(f"{k} {val:.4g}" for k, val in v.get("final", {}).items())
        reused = f" (reused from the `{v['reused_from']}` pack)" if "reused_from" in v else ""
        stopped = v["stopped_by"] + reused
        row = f"| {name} | {v['steps']} | {_fmt_minutes(v['elapsed_s'])} | {stopped} | {finals} |"
        lines.append(row)
    lines += [
        "",
        *_method_lines(facts),
        "",
        f"Loss curves: `curves/*.png`. std is in pixels at {res} px (×{512 / res:g} for 512-px units).",
        "",
        "## Sampler defaults (stored in the manifest)",
        "",
        "`" + ", ".join(f"{k}={v}" for k, v in sorted(facts.sampler.items())) + "`",
    ]
    if facts.tuning:
        t = facts.tuning
        tried = ", ".join(
            f"ζ={c['guidance_scale']:g}: {p:.2f} dB" for c, p in zip(t.candidates, t.mean_psnr, strict=True)
        )
        lines += [
            "",
            f"guidance_scale ζ chosen before DGSA existed (`{t.method}` with A_t = 1) on the {len(t.faces)}"
            " validation faces (mean 8-bit RGB PSNR over the evaluation seeds; rows in `per_face.parquet`,"
            f" split `validation`): {tried}.",
        ]
    if facts.notes:
        lines += ["", "## Run notes", "", *[f"- {n}" for n in facts.notes]]
    lines += ["", "## Evaluation (test split)", ""]
    if facts.evaluation is not None and len(facts.evaluation):
        lines += evaluation_lines(facts.evaluation, res)
    else:
        lines.append("No test-split faces were available; nothing was evaluated.")
    lines += [
        "",
        "## Known limits",
        "",
        f"- {res} px only; a prior of {facts.prior_params / 1e6:.1f} M parameters trained "
        f"{s['prior']['steps']:,} steps ({_fmt_minutes(s['prior']['elapsed_s'])})",
        f"  on {where}: samples are blurry and identity is weak.",
        f"- {len(facts.train_files)} training faces for the prior (sources in the Data table; "
        f"{len(facts.extra_files)} more for RM/SE):",
        "  little diversity in age, ethnicity, pose and lighting.",
        "- Degradations are synthetic (Gaussian/anisotropic blur, downscale, noise, JPEG); real old",
        "  photos (scratches, colour fading) are out of distribution.",
        "- Held-out faces come from the same datasets as the training faces (different images).",
        "",
        "## Ablation",
        "",
        "_To be filled by the evaluation step (methods full / dblm_dsst_dgsa / dblm_dsst / dblm /",
        "difface / rm_only on the held-out faces)._",
        "",
    ]
    if facts.quick:
        lines.insert(2, "> **Quick test pack**: tiny networks, few steps; its outputs are meaningless.\n")
    return "\n".join(lines)


def replace_section(card: str, heading: str, body: list[str], *, new_heading: str | None = None) -> str:
    """`card` with the section under `## {heading}` (up to the next `## `) replaced by `body`, and the
    heading renamed to `new_heading` when given. Raises when the heading is missing."""
    marker = f"## {heading}\n"
    start = card.find(marker)
    if start < 0:
        raise ValueError(f"the card has no section {heading!r}")
    end = card.find("\n## ", start + len(marker))
    rest = card[end + 1 :] if end >= 0 else ""
    section = "\n".join([f"## {new_heading or heading}", "", *body, ""]) + ("\n" if rest else "")
    return card[:start] + section + rest


def ablation_section(ablation: pd.DataFrame, *, resolution: int, sampler: str, notes: list[str]) -> list[str]:
    """The card's Ablation: the whole ladder on the test split, from `ablation.parquet` only."""
    first = ablation.iloc[0]
    n, seeds = int(first["n_faces"]), int(first["n_seeds"])
    return [
        f"Test split ({n} faces), each degraded at 512 px with the DifFace random pipeline under {seeds}",
        f"seeds (`dynface evaluate`, protocol `random`), LQ and GT resized to {resolution} px; {sampler}.",
        "Each cell: the mean over faces (a face's value is its mean over the seeds) and its 95 % bootstrap",
        "interval over faces. PSNR/SSIM: RGB, 8-bit, no mean/variance correction. Identity distance:",
        "Euclidean distance of dlib 128-D face descriptors; LMD: dlib 68-point landmarks (both on 256-px",
        "bicubic upscales). s/face on the shared 2-core CPU (one torch thread). Every number is a cell of",
        "`ablation.parquet`, recomputable from `per_face.parquet`; regenerate with",
        "`dynface evaluate --pack weights/starter --holdout weights/starter`.",
        "",
        ablation_markdown(ablation),
        "",
        *notes,
    ]
