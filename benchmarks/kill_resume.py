"""Soak test of resume: `kill -9` of `dynface restore` at random moments, N times, then a run to the end.

Over an archive of generated aligned faces and a 32-px random pack, each cycle starts the CLI (its own
session, no Prefect server configured, as a user runs it) and kills it after a random delay; a final
run then completes the archive. Printed, after the final run:

- ok rows per image: must be exactly 1.00 for every image (nothing restored twice, nothing lost);
- orphan outputs: files under restored/ and faces/ that no ok row points to (must be 0);
- leftover processes: any process started by these runs still alive (must be 0);
- work folders left under DEST/.work (must be 0: a later run removes those of killed runs);
- runs by closing status (every killed run is marked abandoned by the next one).

    python benchmarks/kill_resume.py --cycles 10 --images 100
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from make_bad_inputs import synthetic_face  # noqa: E402

from app.cli import OFFLINE_ENV  # noqa: E402
from app.guardian import marked_processes  # noqa: E402
from catalogs import Catalog  # noqa: E402
from dynface.packs.writer import write_random_pack  # noqa: E402

SOAK_ENV = "DYNFACE_SOAK"


def make_archive(root: Path, n_images: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    src = root / "src"
    src.mkdir(parents=True)
    base = synthetic_face(48)
    for k in range(n_images):
        face = np.roll(base, int(rng.integers(-6, 7)), axis=1)
        face = np.clip(face.astype(int) + int(rng.integers(-20, 21)), 0, 255).astype(np.uint8)
        Image.fromarray(face).save(src / f"face_{k:04d}.png")
    return src


def run_cli(args: list[str], env: dict[str, str], log: Path, kill_after: float | None) -> int:
    with log.open("a") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        if kill_after is None:
            return process.wait()
        try:
            return process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            return process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=20.0, help="earliest kill after a start")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="latest kill after a start")
    parser.add_argument("--out", default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="dynface-soak-"))
    src = make_archive(root, args.images, args.seed)
    pack = write_random_pack(str(root / "pack"), resolution=32)
    dest = root / "out"
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(
        OFFLINE_ENV,
        PREFECT_LOGGING_LEVEL="WARNING",
        **{SOAK_ENV: tag},
        DYNFACE_RAY_HOME=str(root / "ray-home"),
    )
    cli = [str(Path(sys.executable).parent / "dynface"), "restore", str(src), str(dest), "--aligned"]
    cli += ["--pack", pack, "--option", "respacing=ddim20", "--shard-size", "10", "--wave-shards", "1"]
    rng = random.Random(args.seed)
    log = root / "cli.log"
    print(f"archive {src} ({args.images} images), {args.cycles} kill cycles, log {log}", flush=True)
    for cycle in range(args.cycles):
        delay = rng.uniform(args.min_seconds, args.max_seconds)
        t0 = time.monotonic()
        rc = run_cli(cli, env, log, kill_after=delay)
        print(
            f"cycle {cycle + 1}: killed after {delay:5.1f} s (exit {rc}, {time.monotonic() - t0:5.1f} s)",
            flush=True,
        )
    rc = run_cli(cli, env, log, kill_after=None)
    print(f"final run: exit {rc}", flush=True)
    time.sleep(5)  # the watchdogs poll once a second

    cat = Catalog(str(dest / "catalog"))
    images = cat.read("images")
    ok = images[images["status"] == "ok"]
    per_image = Counter(ok["relative_path"])
    counts = [per_image.get(f"face_{k:04d}.png", 0) for k in range(args.images)]
    referenced = set(ok["output_uri"]) | set(
        cat.read("faces", filters=[("status", "==", "ok")])["output_uri"]
    )
    outputs = [p for folder in ("restored", "faces") for p in (dest / folder).rglob("*") if p.is_file()]
    orphans = [p for p in outputs if str(p) not in referenced]
    work = [p for p in (dest / ".work").iterdir()] if (dest / ".work").exists() else []
    runs = cat.read("runs")
    closing = Counter(runs[runs["status"] != "running"]["status"])
    print()
    print(f"ok rows per image: mean {np.mean(counts):.2f}, min {min(counts)}, max {max(counts)}")
    print(f"orphan outputs: {len(orphans)}")
    print(f"leftover processes: {len(marked_processes(tag, SOAK_ENV))}")
    print(f"work folders left: {len(work)}")
    print(f"runs: {len(set(runs['run_id']))}, closing rows {dict(closing)}")
    good = rc == 0 and min(counts) == max(counts) == 1 and not orphans and not work
    return 0 if good and not marked_processes(tag, SOAK_ENV) else 1


if __name__ == "__main__":
    sys.exit(main())
