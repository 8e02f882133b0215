"""Copy the starter recipe's training faces (FFHQ-framed `hq_aligned` files, unchanged bytes) and their
MANIFEST.csv rows into a folder that can travel to a lent GPU machine (`benchmarks/gpu_train_starter.sh`).

    python scripts/stage_training_faces.py out/train_faces          # ~46 MB; `out/` is git-ignored

The copy keeps the data folder's layout, so `--data-dir out/train_faces` selects the same faces and the
same held-out split (sha256 rule) as `../shared/data`. The images are research/non-commercial material:
the folder must never be committed (it lives under the ignored `out/`).

The UTKFace crops that the recipe adds to RM/SE's pair pool (`StarterPlan.extra_pool_sources`) are not
staged: with them the folder would be ~64 MiB, the most the device tool carries. A pack trained from this
folder therefore trains RM and SE on the FFHQ-framed faces only, and its card's data table says so.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

from dynface.paths import shared_dir
from dynface.train.data import EXCLUDED_SOURCES, HQ_FOLDER


def stage(dest: Path, data: Path) -> int:
    with (data / "MANIFEST.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = [
            r for r in reader if r["role"] == HQ_FOLDER and Path(r["file"]).parts[1] not in EXCLUDED_SOURCES
        ]
    for row in rows:
        target = dest / row["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / row["file"], target)
        if hashlib.sha256(target.read_bytes()).hexdigest() != row["sha256"]:
            raise SystemExit(f"{row['file']}: sha256 differs from MANIFEST.csv")
    with (dest / "MANIFEST.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: stage_training_faces.py DEST")
    n = stage(Path(sys.argv[1]), shared_dir() / "data")
    print(f"{n} faces staged under {sys.argv[1]}")
