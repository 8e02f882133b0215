"""Data-parallel training of the `train complete` stages with Ray Train (`TorchTrainer`).

One worker per GPU (or CPU workers where there is none). Every worker runs the same stage chain on
its shard of each global batch (dynface.train.fresh_stages.Shard); gradients are averaged over the
workers after every backward (`average_gradients`), so all workers hold the same weights and the run
equals a one-process run on the same global batch up to float summation order. The first worker alone
writes the checkpoints, which must therefore be on storage every node reaches (an fsspec URI such as
s3://… on a real cluster); the driver then reads the finished stages back from them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn


def average_gradients(model: nn.Module) -> None:
    """All-reduce every trainable parameter's gradient to the mean over the workers (a missing
    gradient counts as zero, so every worker takes part in every reduction)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the whole chain on this worker's shard; an early stop ends it quietly."""
    import ray.train
    import ray.train.torch

    from dynface.train.complete import train_stages
    from dynface.train.fresh_stages import Shard, StageStopped

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    shard = Shard(rank=ctx.get_world_rank(), world=ctx.get_world_size())
    device = str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"
    try:
        train_stages(config["job"], device=device, shard=shard, grad_sync=average_gradients)
    except StageStopped:
        pass


def train_on_ray(
    job: Any, *, workers: int, address: str | None = None, use_gpu: bool = False, threads: int = 1
) -> None:
    """Train `job`'s stages (a dynface.train.complete.CompleteJob) on `workers` Ray Train workers, on the
    cluster at `address` (or a local Ray started here, stopped again afterwards)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from app.raylocal import connect_ray

    conn = connect_ray(address, num_cpus=None if address else max(workers, 1))
    try:
        storage = Path(tempfile.gettempdir()) / "dynface_ray_train"
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"job": job, "use_gpu": use_gpu, "threads": threads},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(storage_path=str(storage), name="train-complete"),
        )
        trainer.fit()
    finally:
        conn.shutdown()


def ray_data_parallel(
    workers: int, address: str | None, *, use_gpu: bool = False, threads: int = 1
) -> Callable[[Any], None] | None:
    """The `data_parallel` runner that `dynface.train.complete.complete` takes: Ray Train on `workers`
    workers (at least one when only `address` is given); None when neither is asked for (one process)."""
    if not workers and not address:
        return None
    return partial(train_on_ray, workers=max(workers, 1), address=address, use_gpu=use_gpu, threads=threads)
