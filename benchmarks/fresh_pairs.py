"""Throughput of RM's training pairs: fresh 512-px degradations (dynface.train.fresh_pairs) with 0..N
worker processes and draws from a fixed pool, each as a ratio to the starter recipe's RM training step
measured in the same run (≥ 1: the source keeps up with training). Run it where you plan a training run
(e.g. on the GPU machine, with --device cuda, before choosing --pair-workers).

python benchmarks/fresh_pairs.py --workers 0 1 2 --batches 24
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynface.models.swinir import build_swinir
from dynface.train.common import to_tensor_batch
from dynface.train.data import PairPool, list_faces
from dynface.train.fresh_pairs import FreshPairBatches, FreshPairStream, face_array_file
from dynface.train.plan import starter_plan
from dynface.train.restorer_net import rm_loss


def _synthetic_faces(folder: Path, n: int, size: int) -> None:
    """Generated stand-ins (smooth gradients plus noise): the degradation cost does not depend on content."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        face = np.stack([0.3 + 0.4 * xx, 0.2 + 0.3 * yy, 0.5 * xx * yy + 0.2], -1)
        face = np.clip(face + 0.05 * rng.standard_normal(face.shape), 0, 1)
        Image.fromarray((face * 255).round().astype(np.uint8)).save(folder / f"face{i:02d}.png")


def _rate(draw, batches: int) -> float:
    draw(0)  # start-up (worker processes, memory map) is not counted
    start = time.perf_counter()
    for step in range(1, batches + 1):
        draw(step)
    return batches / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    p.add_argument("--device", default="cpu", help="where the RM training step runs (cuda on a GPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plan = starter_plan(64)
    batch = plan.rm.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        _synthetic_faces(Path(tmp) / "faces", 16, 512)
        faces = face_array_file(Path(tmp), list_faces(Path(tmp)), 512, cache_dir=Path(tmp) / "cache")
        rng = np.random.default_rng(0)
        pool = PairPool(
            lq=rng.random((512, 64, 64, 3), np.float32), gt=rng.random((512, 64, 64, 3), np.float32)
        )
        pool_rate = _rate(lambda step: pool.sample(batch, rng), args.batches * 10)
        rows = [("pool draw", pool_rate)]
        for workers in args.workers:
            stream = FreshPairStream(FreshPairBatches(faces, 64, batch, args.batches + 1, seed=0), workers)
            rows.append((f"fresh, {workers} workers", _rate(stream.batch, args.batches)))
        model = build_swinir(plan.rm.swinir).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(step: int) -> None:
            lq, gt = pool.sample(batch, rng)
            loss = rm_loss(model, to_tensor_batch(lq, args.device), to_tensor_batch(gt, args.device))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.device != "cpu":
                torch.cuda.synchronize()

        rows.append(
            (
                f"RM train step ({args.device}, {args.threads} thr.)",
                _rate(train_step, max(4, args.batches // 4)),
            )
        )
    print(f"batches of {batch} pairs at 64 px (fresh pairs degraded at 512 px); torch {torch.__version__}")
    step_rate = rows[-1][1]
    print(f"{'source':<34} {'batches/s':>10} {'vs RM step':>11}")
    for name, rate in rows:
        print(f"{name:<34} {rate:>10.2f} {rate / step_rate:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
