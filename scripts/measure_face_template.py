"""Measure where dlib's 5 landmarks fall on FFHQ-aligned 512 faces (the DLIB5_TEMPLATE_512 constant).

Usage: python scripts/measure_face_template.py /path/to/shared/data

Runs the HOG detector and 5-point predictor (dynface.images.faces.detect_faces) on the FFHQ and CelebA-HQ
crops of hq_aligned/ resized to 512 with PIL Lanczos, keeps images with exactly one face, and prints
the per-source and overall mean landmark positions (numbers only; no image leaves the data folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dynface.images.faces import FFHQ_TEMPLATE_512, DetectorConfig, detect_faces

# FFHQ / CelebA-HQ framing only: UTKFace crops are tighter and PGDiff's references are of unknown alignment.
SOURCES = (
    "yangxy__GPEN",
    "DPS2022__diffusion-posterior-sampling",
    "wyhuai__DDNM",
    "santaz-sahithi__InterfaceGAN",
)


def measure(folder: Path) -> tuple[np.ndarray, int]:
    """(N, 5, 2) landmarks of the single-face images of one source folder, and the file count."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    found = []
    config = DetectorConfig(upsample_small=False)
    for path in files:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB").resize((512, 512), Image.Resampling.LANCZOS))
        faces = detect_faces(rgb, config)
        if len(faces) == 1:
            found.append(faces[0].landmarks)
    return np.array(found).reshape(-1, 5, 2), len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="the shared data folder (holding hq_aligned/)")
    args = parser.parse_args(argv)
    all_marks = []
    for source in SOURCES:
        marks, n_files = measure(args.data_dir / "hq_aligned" / source)
        all_marks.append(marks)
        mean = marks.mean(axis=0) if len(marks) else np.full((5, 2), np.nan)
        print(f"{source}: {len(marks)}/{n_files} single-face images, mean:\n{np.round(mean, 2)}")
    marks = np.concatenate(all_marks)
    mean, std = marks.mean(axis=0), marks.std(axis=0)
    print(f"\nALL: {len(marks)} images\nmean:\n{np.round(mean, 3)}\nstd:\n{np.round(std, 2)}")
    eyes = np.stack([mean[2:4].mean(axis=0), mean[0:2].mean(axis=0)])
    print(f"eye centres (image-left, image-right) from corner means: {np.round(eyes, 2).tolist()}")
    print(f"FFHQ template eye centres: {FFHQ_TEMPLATE_512[:2].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
