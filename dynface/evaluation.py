"""The evaluation protocol: build CelebA-Test-style sets, restore with any pack and method variants,
score every face, and summarise (the ablation table of the model card).

Sets (spec §6.3/§6.4): HQ faces (a folder/URI, or given LQ/HQ pairs) are loaded at 512 px, degraded
with the DifFace random pipeline (`protocol="random"`, hflip/gray off) or the deterministic CelebA-Test
grid (`protocol="grid"`), and both LQ and GT are resized to the pack's resolution (bicubic).
Full-reference metrics are computed at that resolution for PSNR/SSIM; identity distance and LMD use
dlib models, which need larger faces, so both images are first upscaled (bicubic) to `id_size`.
The Fréchet distance compares the restored set with the GT set on the named feature extractor
(dlib's 128-D face descriptor unless FID Inception weights are supplied), and is always labelled.
Supplied weights (dynface.metrics.supplied) add the ArcFace angle, LPIPS and DISTS, computed on the same
`id_size` faces.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from PIL import Image

from dynface.images.degrade import DIFFACE_RANGES, celeba_test_grid, degrade_pair, random_test_params
from dynface.images.folders import iter_images
from dynface.metrics.fid import FeatureExtractor, dlib_descriptor_extractor, frechet_distance
from dynface.metrics.fidelity import psnr, ssim
from dynface.metrics.identity import IdentityEmbedder, identity_distance, landmark_distance
from dynface.metrics.supplied import SuppliedMetrics
from dynface.restorer import Restorer

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


@dataclass(frozen=True)
class EvalSet:
    names: tuple[str, ...]
    lq: np.ndarray  # (N, R, R, 3) uint8
    gt: np.ndarray  # (N, R, R, 3) uint8
    protocol: str


def _resize_u8(img: np.ndarray, size: int) -> np.ndarray:
    arr = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC))


def build_eval_set(
    hq_uri: str,
    *,
    resolution: int,
    protocol: str = "random",
    limit: int | None = None,
    seed: int = 2025,
    names: Sequence[str] | None = None,
) -> EvalSet:
    """Degrade the HQ faces under `hq_uri` (recursive) at 512 px; LQ and GT at `resolution`.

    `names`, when given, keeps only files whose name is listed (e.g. a pack's holdout.txt).
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
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no HQ images found under {hq_uri}")
    kept = [p[len(root) + 1 :] if p.startswith(root + "/") else p for p in paths]
    faces = [next(iter_images(fs.unstrip_protocol(p), resolution=512)) for p in paths]
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
    return EvalSet(tuple(kept), np.stack(lqs), np.stack(gts), protocol)


def score_faces(
    images: Sequence[np.ndarray],
    gt: Sequence[np.ndarray],
    *,
    id_size: int = 256,
    embedder=None,
    supplied: SuppliedMetrics | None = None,
) -> pd.DataFrame:
    """Per-face PSNR/SSIM (RGB and Y, 8-bit), identity distance and LMD (at id_size), plus the
    columns of any `supplied` metrics (also at id_size)."""
    embedder = embedder or IdentityEmbedder()
    rows = []
    bigs, big_refs = [], []
    for img, ref in zip(images, gt):
        big, big_ref = _resize_u8(img, id_size), _resize_u8(ref, id_size)
        bigs.append(big)
        big_refs.append(big_ref)
        rows.append(
            {
                "psnr_rgb": psnr(img, ref),
                "psnr_y": psnr(img, ref, channel="y"),
                "ssim_rgb": ssim(img, ref),
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
    per_face: pd.DataFrame  # one row per (method, face)
    summary: pd.DataFrame  # one row per method
    sheet: dict[str, list[np.ndarray]]  # the first faces of every method, for the contact sheet


def evaluate_variants(
    restorer: Restorer,
    eval_set: EvalSet,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    extractor: FeatureExtractor | None = None,
    id_size: int = 256,
    sheet_faces: int = 6,
    supplied: SuppliedMetrics | None = None,
) -> Evaluation:
    """Per-face table and per-variant summary for every method; "lq" scores the input itself, and a
    method named with the `ORACLE_RM` suffix is given the ground truth as RM's output."""
    supplied = supplied or SuppliedMetrics()
    extractor = extractor or supplied.extractor or dlib_descriptor_extractor()
    embedder = IdentityEmbedder()
    gt_big = [_resize_u8(g, id_size) for g in eval_set.gt]
    gt_feats = extractor(gt_big)
    per_face, summary = [], []
    sheet: dict[str, list[np.ndarray]] = {"gt": list(eval_set.gt[:sheet_faces])}
    for method in methods:
        t0 = time.perf_counter()
        if method == "lq":
            images = list(eval_set.lq)
            extra = {"std_hat_512": math.nan, "t_start": 0, "n_steps": 0}
            diag = [extra] * len(images)
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
        scores.insert(0, "name", list(eval_set.names))
        scores.insert(0, "method", method)
        scores = pd.concat([scores, pd.DataFrame(diag)], axis=1)
        per_face.append(scores)
        fd = frechet_distance(extractor([_resize_u8(i, id_size) for i in images]), gt_feats)
        summary.append(
            {
                "method": method,
                "psnr_rgb": scores["psnr_rgb"].mean(),
                "ssim_rgb": scores["ssim_rgb"].mean(),
                "psnr_y": scores["psnr_y"].mean(),
                "identity_distance": scores["identity_distance"].mean(),
                "lmd": scores["lmd"].mean(),
                "frechet_distance": fd,
                "fd_extractor": extractor.name,
                "mean_steps": float(scores["n_steps"].mean()),
                "seconds_per_face": seconds,
                "n_faces": len(images),
                **{c: float(scores[c].mean()) for c in supplied.columns},
            }
        )
    return Evaluation(pd.concat(per_face, ignore_index=True), pd.DataFrame(summary), sheet)


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


def ablation_markdown(summary: pd.DataFrame) -> str:
    """The summary as the model card's ablation table (rows in ABLATION order)."""
    label = {m: name for name, m in ABLATION + DIAGNOSTICS}
    columns = ["setting", "method", "PSNR", "SSIM", "identity dist.", "LMD (px)", "Fréchet dist."]
    columns += ["extractor", "steps", "s/face"]
    supplied = [c for c in SUPPLIED_COLUMNS if c in summary.columns]
    columns += [SUPPLIED_COLUMNS[c] for c in supplied]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, r in summary.iterrows():
        cells = [
            _label(label, r["method"]),
            f"`{r['method']}`",
            f"{r['psnr_rgb']:.2f}",
            f"{r['ssim_rgb']:.3f}",
            f"{r['identity_distance']:.3f}",
            f"{r['lmd']:.2f}",
            f"{r['frechet_distance']:.3f}",
            r["fd_extractor"],
            f"{r['mean_steps']:.0f}",
            f"{r['seconds_per_face']:.2f}",
            *(f"{r[c]:.3f}" for c in supplied),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
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
