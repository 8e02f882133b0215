"""How much of an FFHQ-framed crop a re-aligned UTKFace crop fills (why the starter's prior excludes them).

python scripts/measure_utk_coverage.py [N]      # N crops sampled evenly (default 40)
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from dynface.paths import shared_dir
from dynface.train.data import HQ_FOLDER, UTKFACE_SOURCE, realign_tight_crop

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    files = sorted((shared_dir() / "data" / HQ_FOLDER / UTKFACE_SOURCE).glob("*.jpg"))
    picked = files[:: max(1, len(files) // n)][:n]
    found = [realign_tight_crop(np.asarray(Image.open(f).convert("RGB")), 128) for f in picked]
    cover = np.array([r.coverage for r in found if r is not None])
    print(f"{len(picked)} UTKFace crops, {len(picked) - len(cover)} without a detected face; share of the")
    stats = f"mean {cover.mean():.2f}, min {cover.min():.2f}, max {cover.max():.2f}"
    print(f"FFHQ-framed crop showing original pixels: {stats}")
