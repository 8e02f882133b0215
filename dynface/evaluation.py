"""The evaluation protocol: build CelebA-Test-style sets, restore with any pack and method variants,
score every face, and summarise (the ablation table of the model card).

Sets (spec §6.3/§6.4): HQ faces (a folder/URI, or given LQ/HQ pairs) are loaded at 512 px, degraded
with the DifFace random pipeline (`protocol="random"`, hflip/gray off) or the deterministic CelebA-Test
grid (`protocol="grid"`), and both LQ and GT are resized to the pack's resolution (bicubic).
Full-reference metrics are computed at that resolution for PSNR/SSIM; identity distance and LMD use
dlib models, which need larger faces, so both images are first upscaled (bicubic) to `id_size`.
The Fréchet distance compares the restored set with the GT set on the named feature extractor
(dlib's 128-D face descriptor unless FID Inception weights are supplied), and is always labelled; it is
reported only where the faces are at least twice the feature dimensions (dynface.evaluation_summary).
Supplied weights (dynface.metrics.supplied) add the ArcFace angle, LPIPS and DISTS, computed on the same
`id_size` faces.

Protocol (issue 16): faces belong to the train / validation / test split of the pack's sha256-prefix
rule (dynface.splits); every tuning decision goes through `tune_on_validation`, which refuses any other
split; reported numbers come from the test split, over several degradation seeds (one `EvalSet` per
seed), as means with 95 % bootstrap intervals over faces and paired intervals for differences.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from dynface.evaluation_summary import Frechet, excludes_zero, frechet_or_reason, summarise
from dynface.images.degrade import DIFFACE_RANGES, celeba_test_grid, degrade_pair, random_test_params
from dynface.images.folders import iter_images
from dynface.images.imageio import content_hash
from dynface.metrics.arrays import resize_u8
from dynface.metrics.fid import FeatureExtractor, dlib_descriptor_extractor
from dynface.metrics.fidelity import psnr, ssim
from dynface.metrics.identity import ID_SIZE, IdentityEmbedder, identity_distance, landmark_distance
from dynface.metrics.supplied import SuppliedMetrics
from dynface.restorer import Restorer
from dynface.splits import DEFAULT_SPLIT_RULE, SplitName, SplitRule

# The ablation ladder: row label -> method ("lq" is the degraded input itself).
ABLATION: tuple[tuple[str, str], ...] = (
    ("LQ input", "lq"),
    ("RM only", "rm_only"),
    ("DifFace-style fixed start", "difface"),
    ("DBLM only", "dblm"),
    ("+DSST", "dblm_dsst"),
    ("+DGSA", "dblm_dsst_dgsa"),
    ("full (+multi-guidance, kernel update)", "full"),
)
# Diagnostic rows after the ladder: "<method>@gt_rm" runs the method with RM's output replaced by the
# ground truth. Not a restorer (it reads the answer), but it splits the error of the full method into
# what a better RM could remove and what the prior and sampler lose on their own.
ORACLE_RM = "@gt_rm"
DIAGNOSTICS: tuple[tuple[str, str], ...] = (
    ("full with RM output := ground truth (oracle bound)", "full" + ORACLE_RM),
)
DEFAULT_METHODS: tuple[str, ...] = tuple(m for _, m in ABLATION + DIAGNOSTICS)
DEFAULT_SEEDS: tuple[int, ...] = (2025, 2026, 2027)  # degradation seeds of every reported table


@dataclass(frozen=True)
class EvalSet:
    names: tuple[str, ...]
    lq: np.ndarray  # (N, R, R, 3) uint8
    gt: np.ndarray  # (N, R, R, 3) uint8
    protocol: str
    splits: tuple[SplitName, ...] = ()  # each face's split (dynface.splits); () when unknown
    seed: int = 2025  # the degradation seed


_resize_u8 = resize_u8  # the one resize of LQ/GT to the pack and of faces to ID_SIZE


def build_eval_set(
    hq_uri: str,
    *,
    resolution: int,
    protocol: str = "random",
    limit: int | None = None,
    seed: int = 2025,
    names: Sequence[str] | None = None,
    split: SplitName | None = None,
    rule: SplitRule = DEFAULT_SPLIT_RULE,
) -> EvalSet:
    """Degrade the HQ faces under `hq_uri` (recursive) at 512 px; LQ and GT at `resolution`.

    `names`, when given, keeps only files whose name is listed (e.g. a pack's holdout.txt); `split`
    keeps only the files of that split under `rule` (by the sha256 of their bytes). `limit` applies last.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(hq_uri)
    root = root.rstrip("/")
    exts = (".png", ".jpg", ".jpeg", ".webp")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(exts))
    if names is not None:
        # Entries are file names or paths relative to any parent of the files (e.g. MANIFEST.csv's).
        wanted = [n.strip("/") for n in names]
        paths = [p for p in paths if any(p == w or p.endswith("/" + w) for w in wanted)]
    digests = {p: content_hash(fs.cat_file(p)) for p in paths}
    if split is not None:
        paths = [p for p in paths if rule.split_of(digests[p]) == split]
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no HQ images found under {hq_uri}" + (f" in the {split} split" if split else ""))
    kept = [p[len(root) + 1 :] if p.startswith(root + "/") else p for p in paths]
    faces = [next(iter_images(fs.unstrip_protocol(p), resolution=512)) for p in paths]
    lq, gt = degrade_faces(faces, resolution=resolution, protocol=protocol, seed=seed)
    splits = tuple(rule.split_of(digests[p]) for p in paths)
    return EvalSet(tuple(kept), lq, gt, protocol, splits, seed)


def degrade_faces(
    faces: Sequence[np.ndarray], *, resolution: int, protocol: str = "random", seed: int = 2025
) -> tuple[np.ndarray, np.ndarray]:
    """HQ faces (512 px, float in [0, 1]) -> (LQ, GT) uint8 at `resolution`, degraded under `protocol`."""
    n = len(faces)
    if protocol == "random":
        params = random_test_params(n, seed=seed, ranges=DIFFACE_RANGES)
    elif protocol == "grid":
        params = celeba_test_grid(max(n, 1), seed=seed)[:n]
    else:
        raise ValueError(f"unknown protocol {protocol!r} (random, grid)")
    rng = np.random.default_rng(seed)
    lqs, gts = [], []
    for face, p in zip(faces, params):
        lq, gt = degrade_pair(face, replace(p, hflip=False, gray=False), rng=rng)
        lqs.append(_resize_u8(lq, resolution))
        gts.append(_resize_u8(gt, resolution))
    return np.stack(lqs), np.stack(gts)


def score_faces(
    images: Sequence[np.ndarray],
    gt: Sequence[np.ndarray],
    *,
    id_size: int = ID_SIZE,
    embedder=None,
    supplied: SuppliedMetrics | None = None,
) -> pd.DataFrame:
    """Per-face PSNR/SSIM (8-bit, RGB and Y: `psnr` is RGB, the one convention of every report),
    identity distance and LMD (at id_size), plus the columns of any `supplied` metrics (at id_size)."""
    embedder = embedder or IdentityEmbedder()
    rows = []
    bigs, big_refs = [], []
    for img, ref in zip(images, gt):
        big, big_ref = _resize_u8(img, id_size), _resize_u8(ref, id_size)
        bigs.append(big)
        big_refs.append(big_ref)
        rows.append(
            {
                "psnr": psnr(img, ref),
                "psnr_y": psnr(img, ref, channel="y"),
                "ssim": ssim(img, ref),
                "ssim_y": ssim(img, ref, channel="y"),
                "identity_distance": identity_distance(big, big_ref, embedder),
                "lmd": landmark_distance(big, big_ref),
            }
        )
    table = pd.DataFrame(rows)
    if supplied is not None and rows:
        for column, values in supplied.score(bigs, big_refs).items():
            table[column] = values
    return table


@dataclass(frozen=True)
class Evaluation:
    per_face: pd.DataFrame  # one row per (method, face, seed): face, split, seed, method, psnr, ...
    ablation: pd.DataFrame  # one row per method on the reported split, with intervals (evaluation_summary)
    frechet: dict[str, Frechet]  # per method: the distance or why it is not computed
    sheet: dict[str, list[np.ndarray]]  # the first faces of every method (first seed), for the contact sheet


@dataclass(frozen=True)
class _SetScores:
    per_face: pd.DataFrame
    features: dict[str, np.ndarray]  # method -> restored features (N, dim); "gt" -> ground truth's
    sheet: dict[str, list[np.ndarray]]


def _score_set(
    restorer: Restorer,
    eval_set: EvalSet,
    methods: Sequence[str],
    *,
    extractor: FeatureExtractor,
    embedder: IdentityEmbedder,
    id_size: int,
    sheet_faces: int,
    supplied: SuppliedMetrics,
) -> _SetScores:
    """Every method on one degraded set: per-face rows, Fréchet features and the contact-sheet faces."""
    features = {"gt": extractor([_resize_u8(g, id_size) for g in eval_set.gt])}
    sheet: dict[str, list[np.ndarray]] = {"gt": list(eval_set.gt[:sheet_faces])}
    splits = list(eval_set.splits) if eval_set.splits else [""] * len(eval_set.names)
    tables = []
    for method in methods:
        t0 = time.perf_counter()
        if method == "lq":
            images = list(eval_set.lq)
            diag = [{"std_hat_512": math.nan, "t_start": 0, "n_steps": 0}] * len(images)
        else:
            base, oracle = _split_oracle(method)
            given = list(eval_set.gt) if oracle else None
            results = restorer.with_config(method=base).restore(list(eval_set.lq), restored=given)
            images = [r.image for r in results]
            diag = [
                {"std_hat_512": r.std_hat_512, "t_start": r.t_start, "n_steps": r.n_steps} for r in results
            ]
        seconds = (time.perf_counter() - t0) / len(images)
        sheet[method] = images[:sheet_faces]
        scores = score_faces(images, eval_set.gt, id_size=id_size, embedder=embedder, supplied=supplied)
        head = pd.DataFrame(
            {"face": list(eval_set.names), "split": splits, "seed": eval_set.seed, "method": method}
        )
        tables.append(pd.concat([head, scores, pd.DataFrame(diag)], axis=1).assign(seconds=seconds))
        features[method] = extractor([_resize_u8(i, id_size) for i in images])
    return _SetScores(pd.concat(tables, ignore_index=True), features, sheet)


def evaluate_variants(
    restorer: Restorer,
    eval_sets: EvalSet | Sequence[EvalSet],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    extractor: FeatureExtractor | None = None,
    id_size: int = ID_SIZE,
    sheet_faces: int = 6,
    supplied: SuppliedMetrics | None = None,
    split: str = "test",
) -> Evaluation:
    """Every method on every set (one per degradation seed, the same faces), per-face rows for all of
    them and the ablation table of the `split` faces; "lq" scores the input itself, and a method named
    with the `ORACLE_RM` suffix is given the ground truth as RM's output."""
    sets = [eval_sets] if isinstance(eval_sets, EvalSet) else list(eval_sets)
    if len({s.seed for s in sets}) != len(sets):
        raise ValueError("one set per degradation seed: two sets share a seed")
    supplied = supplied or SuppliedMetrics()
    extractor = extractor or supplied.extractor or dlib_descriptor_extractor()
    embedder = IdentityEmbedder()
    scored = [
        _score_set(
            restorer, s, methods, extractor=extractor, embedder=embedder, id_size=id_size,
            sheet_faces=sheet_faces, supplied=supplied,
        )
        for s in sets
    ]  # fmt: skip
    per_face = pd.concat([s.per_face for s in scored], ignore_index=True)
    if not (per_face["split"] == split).any():
        per_face = per_face.assign(split=per_face["split"].replace("", split))
    n_faces = int(per_face.loc[per_face["split"] == split, "face"].nunique())
    frechet = {
        m: frechet_or_reason(
            np.concatenate([s.features[m] for s in scored]),
            np.concatenate([s.features["gt"] for s in scored]),
            n_faces=n_faces,
            extractor=extractor.name,
        )
        for m in methods
    }
    return Evaluation(per_face, summarise(per_face, frechet, split=split), frechet, scored[0].sheet)


@dataclass(frozen=True)
class Tuning:
    """A choice among option sets, made on validation faces only."""

    candidates: tuple[dict[str, Any], ...]
    mean_psnr: tuple[float, ...]  # per candidate: mean over the validation faces and seeds
    best: dict[str, Any]
    faces: tuple[str, ...]
    method: str
    per_face: pd.DataFrame  # face, split ("validation"), seed, method, options (JSON), psnr


def tune_on_validation(
    restorer: Restorer,
    validation: EvalSet | Sequence[EvalSet],
    candidates: Sequence[Mapping[str, Any]],
    *,
    method: str = "full",
) -> Tuning:
    """The candidate (restorer options: ζ, sampler settings, RM's flip ensemble, ...) with the highest
    mean 8-bit RGB PSNR of `method` on the validation faces. Sets holding any face of another split are
    refused: no tuning decision may look at the test split."""
    sets = [validation] if isinstance(validation, EvalSet) else list(validation)
    for s in sets:
        if not s.splits or any(split != "validation" for split in s.splits):
            raise ValueError("tuning reads the validation split only; this set holds other faces")
    if not candidates:
        raise ValueError("nothing to choose from")
    rows = []
    for options in candidates:
        tuned = restorer.with_config(method=method, **dict(options))
        label = json.dumps(dict(options), sort_keys=True)
        for s in sets:
            for name, r, g in zip(s.names, tuned.restore(list(s.lq)), s.gt, strict=True):
                rows.append(
                    {"face": name, "split": "validation", "seed": s.seed, "method": method,
                     "options": label, "psnr": psnr(r.image, g)}
                )  # fmt: skip
    table = pd.DataFrame(rows)
    labels = [json.dumps(dict(c), sort_keys=True) for c in candidates]
    scores = tuple(float(table.loc[table["options"] == lab, "psnr"].mean()) for lab in labels)
    best = dict(candidates[int(np.argmax(scores))])
    faces = tuple(dict.fromkeys(n for s in sets for n in s.names))
    return Tuning(tuple(dict(c) for c in candidates), scores, best, faces, method, table)


def _split_oracle(method: str) -> tuple[str, bool]:
    """("full@gt_rm") -> ("full", True); ("full") -> ("full", False)."""
    base, sep, rest = method.partition("@")
    if sep and "@" + rest != ORACLE_RM:
        raise ValueError(f"unknown method suffix in {method!r}; the only one is {ORACLE_RM!r}")
    return base, bool(sep)


SUPPLIED_COLUMNS = {"ida_rad": "IDA (rad)", "ida_deg": "IDA (deg)", "lpips": "LPIPS", "dists": "DISTS"}


def _label(labels: dict[str, str], method: str) -> str:
    if method in labels:
        return labels[method]
    base, oracle = _split_oracle(method)
    name = labels.get(base, base)
    return f"{name} with RM output := ground truth" if oracle else name


def _ci(row: pd.Series, metric: str, digits: int) -> str:
    mean, lo, hi = row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _diff(row: pd.Series, key: str, digits: int) -> str:
    mean, lo, hi = row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"]
    if pd.isna(mean):
        return "–"
    verdict = "effect" if excludes_zero(lo, hi) else "no effect"
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {verdict}"


def ablation_markdown(ablation: pd.DataFrame) -> str:
    """The ablation table (means with 95 % bootstrap intervals over faces), then the paired differences
    along the ladder and against the input; every number is a cell of `ablation` (ablation.parquet)."""
    label = {m: name for name, m in ABLATION + DIAGNOSTICS}
    supplied = [c for c in SUPPLIED_COLUMNS if c in ablation.columns]
    columns = ["setting", "method", "PSNR (dB)", "SSIM", "identity dist.", "LMD (px)", "Fréchet dist."]
    columns += ["steps", "s/face", *(SUPPLIED_COLUMNS[c] for c in supplied)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, r in ablation.iterrows():
        fd = "not computed" if pd.isna(r["frechet_distance"]) else f"{r['frechet_distance']:.3f}"
        cells = [
            _label(label, r["method"]),
            f"`{r['method']}`",
            _ci(r, "psnr", 2),
            _ci(r, "ssim", 3),
            _ci(r, "identity_distance", 3),
            _ci(r, "lmd", 2),
            fd,
            f"{r['mean_steps']:.0f}",
            f"{r['seconds_per_face']:.2f}",
            *(_ci(r, c, 3) for c in supplied),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = sorted(
        {f"{r['fd_extractor']}: {r['frechet_note']}" for _, r in ablation.iterrows() if r["frechet_note"]}
    )
    lines += ["", *(f"Fréchet distance ({n})." for n in notes)]
    lines += [
        "",
        "Paired differences (mean of per-face differences, 95 % bootstrap interval over faces; an effect"
        " only when the interval excludes 0):",
        "",
        "| method | step from | ΔPSNR (dB) | ΔSSIM | Δidentity dist. | ΔLMD (px) | ΔPSNR vs input (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in ablation.iterrows():
        if r["method"] == "lq":
            continue
        step = f"`{r['step_from']}`" if r["step_from"] else "–"
        cells = [
            f"`{r['method']}`",
            step,
            _diff(r, "psnr_step", 2),
            _diff(r, "ssim_step", 3),
            _diff(r, "identity_distance_step", 3),
            _diff(r, "lmd_step", 2),
            _diff(r, "psnr_vs_lq", 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_holdout_names(pack_dir_or_file: str) -> list[str] | None:
    """File names listed in a pack's `holdout.txt` (None when the pack has none)."""
    import fsspec

    uri = pack_dir_or_file
    if not uri.endswith(".txt"):
        uri = uri.rsplit("/", 1)[0] if uri.endswith((".json", ".yaml", ".yml")) else uri.rstrip("/")
        uri = f"{uri}/holdout.txt"
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]
