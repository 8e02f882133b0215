"""Training faces: which files, the fixed held-out split, decoding/caching, and synthetic LQ/GT pairs.

Framing decision (shared/data/README.md): the CelebA-HQ/FFHQ/PGDiff crops share FFHQ framing (face centred,
hair included), which is also how `lq_real_aligned` and our own aligner (dynface.images.faces) crop faces. The
UTKFace crops are framed much tighter; mixing them in would teach the prior a second, zoomed-in face
layout that inference never sees. Re-aligning them with our own aligner (`realign_tight_crop`) does not
rescue them: the original pixels cover only ~39 % of the FFHQ-framed crop (35–46 % on 40 crops sampled
by `scripts/measure_utk_coverage.py`), the rest would be padding. The starter's prior, DGSA and DSST
table therefore train on the FFHQ-framed files only (`EXCLUDED_SOURCES`; callers may pass `exclude=()` to
use everything). RM and SE, which restore and measure local structure, do train on the UTKFace crops as
they are: `extra_pool_faces` picks their training-split files for the RM/SE pair pool (`StarterPlan`).

Held-out split (fixed, independent of the framing choice): every file whose sha256 (of the file bytes,
as listed in MANIFEST.csv) starts with '0' or '1' is held out from all training (~1/8 of the files):
'0' is the validation split (tuning), '1' the test split (reported only), dynface.splits.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from dynface.images.degrade import (
    DIFFACE_RANGES,
    DegradationRanges,
    degrade_pair,
    params_for_resolution,
    sample_params,
)
from dynface.splits import DEFAULT_SPLIT_RULE, SplitName

HQ_FOLDER = "hq_aligned"
UTKFACE_SOURCE = "Mohanish-5744__Major_Ensemble_Gender"
EXCLUDED_SOURCES: tuple[str, ...] = (UTKFACE_SOURCE,)
HOLDOUT_PREFIXES: tuple[str, ...] = DEFAULT_SPLIT_RULE.held_out
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class FaceFile:
    """One HQ face file: path relative to the data folder, sha256 of its bytes, source folder, licence."""

    file: str
    sha256: str
    source: str
    licence: str = ""


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def list_faces(data_dir: Path | str, *, exclude: Sequence[str] = EXCLUDED_SOURCES) -> list[FaceFile]:
    """HQ faces under `data_dir`, sorted by file name.

    With `data_dir/MANIFEST.csv` (the shared data): the `hq_aligned` rows, sha256 and licence from the
    manifest. Otherwise (tests, user folders): every image under the folder, sha256 computed here. Files
    whose first folder below `hq_aligned/` (or below `data_dir`) is in `exclude` are dropped.
    """
    root = Path(data_dir)
    manifest = root / "MANIFEST.csv"
    faces: list[FaceFile] = []
    if manifest.is_file():
        with manifest.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row["role"] != HQ_FOLDER:
                    continue
                source = Path(row["file"]).parts[1]
                faces.append(FaceFile(row["file"], row["sha256"], source, row.get("licence", "")))
    else:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            rel = path.relative_to(root)
            source = rel.parts[0] if len(rel.parts) > 1 else ""
            faces.append(FaceFile(rel.as_posix(), _sha256_file(path), source))
    if not faces:
        raise ValueError(f"no face images found under {root}")
    return without_sources(sorted(faces, key=lambda f: f.file), exclude)


def without_sources(faces: Sequence[FaceFile], exclude: Sequence[str]) -> list[FaceFile]:
    """`faces` minus those whose source is in `exclude`, in the given order (filter one listing instead
    of listing the folder again: without MANIFEST.csv every listing hashes every image)."""
    return [f for f in faces if f.source not in exclude]


@dataclass(frozen=True, eq=False)
class Realigned:
    """crop: (size, size, 3) uint8 on our FFHQ template; mask: (size, size) bool, True where the crop shows
    the original image (elsewhere its reflection); coverage: the share of True in mask."""

    crop: np.ndarray
    mask: np.ndarray
    coverage: float


def realign_tight_crop(rgb: np.ndarray, size: int) -> Realigned | None:
    """Re-frame a tightly cropped face (H, W, 3) uint8 to our template: reflect-pad by half its size so
    the detector sees a margin, take the detected face nearest the centre (the padding mirrors faces
    too), align it with `dynface.images.faces`. None when no face is found."""
    from dynface.images.faces import DetectorConfig, alignment_transform, detect_faces, warp_affine

    h, w = rgb.shape[:2]
    pad = max(h, w) // 2
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    faces = detect_faces(padded, DetectorConfig(upsample_small=False, score_threshold=0.0))
    if not faces:
        return None
    centre = np.array([padded.shape[1], padded.shape[0]]) / 2
    face = min(faces, key=lambda f: float(np.linalg.norm(f.landmarks.mean(0) - centre)))
    affine = alignment_transform(face.landmarks, size)
    inside = np.zeros_like(padded)
    inside[pad : pad + h, pad : pad + w] = 255
    mask = warp_affine(inside, affine, (size, size))[..., 0] > 127
    return Realigned(crop=warp_affine(padded, affine, (size, size)), mask=mask, coverage=float(mask.mean()))


@dataclass(frozen=True, eq=False)
class MaskedFaces:
    """Re-aligned tight crops for a masked loss: images (N, R, R, 3) float32 in [0, 1] on our FFHQ
    template, masks (N, R, R) float32, 1 where the pixel is original (elsewhere reflection padding)."""

    images: np.ndarray
    masks: np.ndarray


def load_realigned_faces(
    data_dir: Path | str, faces: Sequence[FaceFile], resolution: int, *, cache: bool = True
) -> MaskedFaces | None:
    """`realign_tight_crop` of every file at `resolution`; files without a detected face are dropped
    (None when no file has one).
    Cached in the system temp folder like `load_faces` (re-alignment runs the face detector)."""

    def realign() -> dict[str, np.ndarray] | None:
        crops, masks = [], []
        for face in faces:
            with Image.open(Path(data_dir) / face.file) as im:
                found = realign_tight_crop(np.asarray(im.convert("RGB")), resolution)
            if found is not None:
                crops.append(found.crop.astype(np.float32) / np.float32(255.0))
                masks.append(found.mask.astype(np.float32))
        return {"images": np.stack(crops), "masks": np.stack(masks)} if crops else None

    arrays = _cached_arrays(f"realigned_{faces_cache_key(faces, resolution)}", realign, cache)
    return None if arrays is None else MaskedFaces(images=arrays["images"], masks=arrays["masks"])


def sample_masked_batch(
    images: np.ndarray, masked: MaskedFaces, batch_size: int, masked_count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(x (B, R, R, 3), weight (B, R, R)): `batch_size - masked_count` faces of `images` (weight 1) then
    `masked_count` re-aligned crops with their masks, drawn with replacement; each pair mirrored
    left-right with probability 1/2."""
    full = images[rng.integers(0, images.shape[0], size=batch_size - masked_count)]
    pick = rng.integers(0, masked.images.shape[0], size=masked_count)
    x = np.concatenate([full, masked.images[pick]])
    w = np.concatenate([np.ones(full.shape[:3], np.float32), masked.masks[pick]])
    flip = rng.random(batch_size) < 0.5
    x[flip] = x[flip, :, ::-1]
    w[flip] = w[flip, :, ::-1]
    return x, w


def is_held_out(face: FaceFile) -> bool:
    return face.sha256.lower().startswith(HOLDOUT_PREFIXES)


def split_faces(faces: Sequence[FaceFile]) -> tuple[list[FaceFile], list[FaceFile]]:
    """(train, held_out) by the fixed sha256-prefix rule, each sorted by file name."""
    train = [f for f in faces if not is_held_out(f)]
    held = [f for f in faces if is_held_out(f)]
    return train, held


def split_of(face: FaceFile) -> SplitName:
    """train / validation / test by the fixed sha256-prefix rule (dynface.splits)."""
    return DEFAULT_SPLIT_RULE.split_of(face.sha256)


def load_image_u8(path: Path | BinaryIO, resolution: int) -> np.ndarray:
    """RGB (resolution, resolution, 3) uint8 from a path or an open binary file; PIL bicubic
    (antialiased when shrinking)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if rgb.size != (resolution, resolution):
            rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None)
        return np.asarray(rgb)


def load_image(path: Path, resolution: int) -> np.ndarray:
    """`load_image_u8` as float32 in [0, 1]."""
    return load_image_u8(path, resolution).astype(np.float32) / np.float32(255.0)


def faces_cache_key(faces: Sequence[FaceFile], resolution: int) -> str:
    """Cache key of decoded faces: the files' sha256s and the resolution."""
    return hashlib.sha256(("|".join(f.sha256 for f in faces) + f"@{resolution}").encode()).hexdigest()[:24]


def load_faces(
    data_dir: Path | str, faces: Sequence[FaceFile], resolution: int, *, cache: bool = True
) -> np.ndarray:
    """(N, R, R, 3) float32 in [0, 1]. Decoded arrays are cached in the system temp folder (never the
    repository), keyed by the files' sha256s and the resolution."""
    if not faces:
        raise ValueError("no faces to load")
    cache_path = (
        Path(tempfile.gettempdir())
        / "dynface_train_cache"
        / f"faces_{faces_cache_key(faces, resolution)}.npy"
    )
    if cache and cache_path.is_file():
        arr = np.load(cache_path)
        if arr.shape == (len(faces), resolution, resolution, 3):
            return arr
    arr = np.stack([load_image(Path(data_dir) / f.file, resolution) for f in faces])
    if cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(cache_path)
    return arr


def random_hflip(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, H, W, 3): each image mirrored left-right with probability 1/2."""
    flip = rng.random(batch.shape[0]) < 0.5
    out = batch.copy()
    out[flip] = out[flip, :, ::-1]
    return out


def sample_hq(
    images: np.ndarray, batch_size: int, rng: np.random.Generator, *, hflip: bool = True
) -> np.ndarray:
    """(batch_size, H, W, 3) drawn with replacement from images (N, H, W, 3)."""
    batch = images[rng.integers(0, images.shape[0], size=batch_size)]
    return random_hflip(batch, rng) if hflip else batch.copy()


def degraded_pairs(
    images: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    *,
    ranges: DegradationRanges = DIFFACE_RANGES,
) -> tuple[np.ndarray, np.ndarray]:
    """(lq, gt), each (B, R, R, 3) float32: DifFace-range degradations (spec §6.1) given at 512 px and
    rescaled to the images' resolution R with `params_for_resolution` (σ, kernel and r scale by R/512)."""
    res = images.shape[1]
    lqs, gts = [], []
    for idx in rng.integers(0, images.shape[0], size=batch_size):
        params = params_for_resolution(sample_params(rng, ranges), res)
        lq, gt = degrade_pair(images[idx], params, rng=rng)
        lqs.append(lq)
        gts.append(gt)
    return np.stack(lqs), np.stack(gts)


@dataclass(frozen=True, eq=False)
class PairPool:
    """A fixed set of (lq, gt) pairs at the pack resolution, each (N, R, R, 3) float32 in [0, 1]."""

    lq: np.ndarray
    gt: np.ndarray

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(lq, gt) batches drawn with replacement, each pair mirrored left-right with probability 1/2."""
        idx = rng.integers(0, self.lq.shape[0], size=batch_size)
        flip = rng.random(batch_size) < 0.5
        lq, gt = self.lq[idx].copy(), self.gt[idx].copy()
        lq[flip], gt[flip] = lq[flip, :, ::-1], gt[flip, :, ::-1]
        return lq, gt


def resize_bicubic(img: np.ndarray, resolution: int) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> (R, R, 3) float32 via 8-bit PIL bicubic (antialiased when shrinking)."""
    pil = Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    out = pil.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(out, dtype=np.float32) / np.float32(255.0)


def build_pair_pool(
    hq: np.ndarray,
    resolution: int,
    *,
    per_image: int,
    seed: int,
    ranges: DegradationRanges = DIFFACE_RANGES,
    cache: bool = True,
) -> PairPool:
    """`per_image` DifFace-range degradations of every HQ face (N, S, S, 3), made at S px (512 for the
    spec's pipeline) and then resized to `resolution` — the way the Restorer sees a real 512-px crop.

    Degrading at 512 and shrinking averages noise and JPEG artefacts away (8× at 64 px), which
    `params_for_resolution` at 64 px does not: the two give very different LQ statistics. hflip/gray are
    drawn at sampling time (hflip) or not at all (gray). Cached in the system temp folder.
    """
    key = hq[:, ::16, ::16].tobytes() + f"{hq.shape}|{resolution}|{per_image}|{seed}|{ranges}".encode()
    return _cached_pool(key, lambda: _degrade_faces(iter(hq), resolution, per_image, seed, ranges), cache)


def build_file_pair_pool(
    data_dir: Path | str,
    faces: Sequence[FaceFile],
    resolution: int,
    *,
    per_image: int,
    seed: int,
    degrade_resolution: int = 512,
    ranges: DegradationRanges = DIFFACE_RANGES,
    cache: bool = True,
) -> PairPool:
    """`build_pair_pool` for many files: each face is decoded at `degrade_resolution` only while it is
    degraded (thousands of faces at 512 px would need gigabytes as one array). Cached like it, keyed by
    the files' sha256s."""
    if not faces:
        raise ValueError("no faces to degrade")
    key = (
        "|".join(f.sha256 for f in faces) + f"|{degrade_resolution}|{resolution}|{per_image}|{seed}|{ranges}"
    ).encode()
    hq = (load_image(Path(data_dir) / f.file, degrade_resolution) for f in faces)
    return _cached_pool(key, lambda: _degrade_faces(hq, resolution, per_image, seed, ranges), cache)


def _degrade_faces(
    hq: Iterator[np.ndarray], resolution: int, per_image: int, seed: int, ranges: DegradationRanges
) -> PairPool:
    rng = np.random.default_rng(seed)
    plain = dataclasses.replace(ranges, hflip_prob=0.0, gray_prob=0.0)
    lqs, gts = [], []
    for face in hq:
        gt_small = resize_bicubic(face, resolution)
        for _ in range(per_image):
            lq, _ = degrade_pair(face, sample_params(rng, plain), rng=rng)
            lqs.append(resize_bicubic(lq, resolution))
            gts.append(gt_small)
    return PairPool(lq=np.stack(lqs), gt=np.stack(gts))


def _cached_arrays(
    name: str, make: Callable[[], dict[str, np.ndarray] | None], cache: bool
) -> dict[str, np.ndarray] | None:
    """`make()`'s named arrays, stored as `<name>.npz` in the system temp folder's training cache (never
    the repository) and read back from there on later calls; None from `make` is not cached."""
    cache_path = Path(tempfile.gettempdir()) / "dynface_train_cache" / f"{name}.npz"
    if cache and cache_path.is_file():
        with np.load(cache_path) as stored:
            return {k: stored[k] for k in stored.files}
    arrays = make()
    if cache and arrays is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache_path)
    return arrays


def _cached_pool(key: bytes, make: Callable[[], PairPool], cache: bool) -> PairPool:
    def arrays() -> dict[str, np.ndarray]:
        pool = make()
        return {"lq": pool.lq, "gt": pool.gt}

    stored = _cached_arrays(f"pool_{hashlib.sha256(key).hexdigest()[:24]}", arrays, cache)
    assert stored is not None
    return PairPool(lq=stored["lq"], gt=stored["gt"])


def merge_pools(first: PairPool, second: PairPool) -> PairPool:
    """One pool holding the pairs of both (first's, then second's)."""
    return PairPool(lq=np.concatenate([first.lq, second.lq]), gt=np.concatenate([first.gt, second.gt]))


def extra_pool_faces(
    faces: Sequence[FaceFile], sources: Sequence[str], train: Sequence[FaceFile]
) -> list[FaceFile]:
    """The training-split files of `sources` among `faces` that are not already in `train`, in the order
    of `faces`."""
    taken = {f.file for f in train}
    return [f for f in split_faces(faces)[0] if f.source in sources and f.file not in taken]


def draw_pairs(
    images: np.ndarray, batch_size: int, rng: np.random.Generator, pool: PairPool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A training batch of (lq, gt): from `pool` when given, else on the fly at the images' resolution."""
    if pool is not None:
        return pool.sample(batch_size, rng)
    return degraded_pairs(images, batch_size, rng)
