"""What the restore-archive pipeline costs on top of the model: the flow vs `Restorer.restore`, same faces.

N aligned synthetic faces (drawn here, at the pack's resolution, so no resize) are restored twice in
one process: by the `restore-archive` flow (Prefect, local Ray, a catalog; aligned mode; `num_actors`
sampling actors with one torch thread each) and by one `Restorer.restore` call with the same total
number of torch threads. Prints both wall times, the overhead ratio, faces/s, the flow's own stage
seconds, and the largest pixel difference between the two outputs (same seeds: should be ~0).

    python benchmarks/pipeline_overhead.py                 # 500 faces, starter pack if present
    python benchmarks/pipeline_overhead.py --n 60 --option respacing=ddim10
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from app.cli import apply_offline_env, parse_option
from dynface.packs.writer import write_random_pack
from dynface.paths import REPO_ROOT

STARTER_MANIFEST = REPO_ROOT / "weights" / "starter" / "manifest.json"


def synthetic_face(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: a cartoon face roughly where FFHQ alignment puts one, randomly tinted,
    shifted and noised so every face (and so every content-derived seed and image id) differs."""
    s = size / 64.0
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 200, 3)))
    d = ImageDraw.Draw(im)
    dx, dy = rng.uniform(-2, 2, 2) * s
    skin = tuple(int(v) for v in rng.integers(150, 240, 3))
    d.ellipse([14 * s + dx, 10 * s + dy, 50 * s + dx, 58 * s + dy], fill=skin)
    for ex in (24, 40):  # eyes
        d.ellipse([(ex - 3) * s + dx, 27 * s + dy, (ex + 3) * s + dx, 31 * s + dy], fill=(30, 30, 40))
    d.line([32 * s + dx, 31 * s + dy, 30 * s + dx, 40 * s + dy], fill=(120, 80, 70), width=max(1, int(s)))
    d.arc(
        [24 * s + dx, 40 * s + dy, 40 * s + dx, 50 * s + dy],
        20,
        160,
        fill=(150, 40, 50),
        width=max(1, int(2 * s)),
    )
    face = np.asarray(im, dtype=np.float64) + rng.normal(0, 6, (size, size, 3))
    return np.clip(np.rint(face), 0, 255).astype(np.uint8)


def write_faces(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"{k // 100:02d}" / f"face{k:05d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(synthetic_face(rng, size)).save(path)
        paths.append(path)
    return paths


def resolve_pack(pack: str | None, scratch: Path) -> tuple[str, str]:
    """(pack URI, description): the given one, else starter when its manifest exists, else random 32 px."""
    if pack:
        return pack, pack
    if STARTER_MANIFEST.is_file():
        return "starter", "starter"
    return write_random_pack(str(scratch / "random-pack"), resolution=32), "random 32-px pack (no starter)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500, help="number of faces (default 500)")
    parser.add_argument(
        "--pack", default=None, help="default: starter if weights/starter exists, else random"
    )
    parser.add_argument("--num-actors", type=int, default=1, help="pipeline sampling actors (default 1)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both runs (default cpu)")
    parser.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    apply_offline_env(quiet=True)
    from dynface.packs.manifest import read_manifest
    from dynface.restorer import Restorer
    from flows.restore_archive import restore_archive

    options = dict(args.option)
    with tempfile.TemporaryDirectory(prefix="dynface-bench-") as tmp:
        scratch = Path(tmp)
        pack, pack_text = resolve_pack(args.pack, scratch)
        resolution = read_manifest(pack).resolution
        paths = write_faces(scratch / "src", args.n, resolution, args.seed)
        faces = [np.asarray(Image.open(p).convert("RGB")) for p in paths]

        # The flow: wall time from the call to its return (includes Prefect and Ray start-up). The
        # driver's own stages (estimate, score, ...) get one torch thread: on a CPU-only machine the
        # sampling actors hold the other cores (tasks/sample.plan_actors leaves one to the driver).
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        summary = restore_archive(
            source=str(scratch / "src"), dest=str(scratch / "out"), pack=pack, aligned=True,
            device=args.device, shard_size=args.shard_size, num_actors=args.num_actors, options=options,
        )  # fmt: skip
        flow_seconds = time.perf_counter() - t0
        if summary.counts.get("ok") != args.n:
            print(f"pipeline did not restore every face: {summary.counts}", file=sys.stderr)
            return 1

        # The same faces, one Restorer call, the same total torch threads as the sampling actors.
        torch.set_num_threads(args.num_actors)
        restorer = Restorer.from_pack(pack, overrides=options, device=args.device)
        restorer.restore(faces[:1])  # warm-up (first-call allocations), not timed
        t0 = time.perf_counter()
        direct = restorer.restore(faces)
        direct_seconds = time.perf_counter() - t0

        max_diff = 0
        for path, res in zip(paths, direct, strict=True):
            image_id = hashlib.sha256(path.read_bytes()).hexdigest()
            piped = np.asarray(Image.open(scratch / "out" / "faces" / f"{image_id}_00.png").convert("RGB"))
            max_diff = max(max_diff, int(np.abs(piped.astype(int) - res.image.astype(int)).max()))

    cfg = restorer.config
    stages = sorted(summary.stage_seconds.items(), key=lambda kv: -kv[1])
    # "sample" runs in its own thread beside the driver's stages; the driver's timeline is the rest.
    driver = sum(sec for name, sec in summary.stage_seconds.items() if name != "sample")
    outside = flow_seconds - driver
    lines = [
        f"machine: {platform.node()} ({platform.machine()}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, device {args.device}",
        f"pack: {pack_text} ({resolution} px); method {cfg.method}, mode {cfg.sampler.mode}, "
        f"respacing {cfg.sampler.respacing}, batch_size {cfg.batch_size}; options {options or '{}'}",
        f"faces: {args.n} aligned {resolution}-px PNGs; shard_size {args.shard_size}; sampling actors "
        f"{args.num_actors} x 1 thread + the driver's stages on 1 thread; direct call {args.num_actors} "
        "torch thread(s)",
        f"restore-archive flow : {flow_seconds:8.1f} s  {args.n / flow_seconds:7.2f} faces/s",
        f"Restorer.restore     : {direct_seconds:8.1f} s  {args.n / direct_seconds:7.2f} faces/s",
        f"overhead ratio (flow / direct): {flow_seconds / direct_seconds:.2f}x "
        f"(+{flow_seconds - direct_seconds:.1f} s)",
        "flow stage seconds (sample overlaps the driver's stages; sample_wait = driver idle waiting "
        "for it): " + ", ".join(f"{name} {sec:.1f}" for name, sec in stages),
        f"flow seconds outside the stages (Prefect start-up, run rows, artifacts): {outside:.1f}",
        f"max |flow - direct| over all faces: {max_diff} (uint8 levels)",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
