"""RM training: a small SwinIR restorer on synthetic (LQ, GT) pairs with the DifFace ranges, L1 loss.

The same SwinIR config also serves as the Transfer Model (TM) of SE (dynface.train.se), which starts from
the trained RM weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dynface.models.swinir import build_swinir, small_params
from dynface.train.common import (
    LoopConfig,
    LoopResult,
    seed_everything,
    to_tensor_batch,
    train_stage,
)
from dynface.train.data import PairPool, draw_pairs
from dynface.train.fresh_pairs import FreshPairStream

RMPairs = PairPool | FreshPairStream


def swinir_config(
    resolution: int,
    *,
    embed_dim: int = 48,
    depths: tuple[int, ...] = (3, 3),
    image_residual: bool = False,
) -> dict[str, Any]:
    """A small DifFace-style SwinIR (pixel-unshuffle 4 in, nearest+conv ×4 out) at `resolution`;
    `image_residual` adds the input to the output (starts as the identity, see models/swinir.py)."""
    heads = 4 if embed_dim % 4 == 0 else 2
    return small_params(
        resolution, embed_dim=embed_dim, depths=depths, num_heads=heads, image_residual=image_residual
    )


@dataclass(frozen=True)
class RMTrainConfig:
    swinir: dict[str, Any]
    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0))

    def loop_config(self) -> LoopConfig:
        return replace(self.loop, steps=self.steps, ema_decay=None)


def rm_loss(model: torch.nn.Module, lq: Tensor, gt: Tensor) -> dict[str, Tensor]:
    """lq, gt (B, 3, H, W) in [0, 1]: L1(RM(lq), gt)."""
    loss = F.l1_loss(model(lq), gt)
    return {"loss": loss}


def train_rm(
    images: np.ndarray,
    out_dir: Path | str,
    config: RMTrainConfig,
    *,
    pairs: RMPairs | None = None,
    init: dict[str, Tensor] | None = None,
) -> LoopResult:
    """Train (or resume) RM on HQ faces (N, R, R, 3) float32 in [0, 1]: pairs from `pairs` (a fixed
    pool, or a stream of fresh degradations, dynface.train.fresh_pairs) when given, else degraded on the
    fly at R px. `init` warm-starts the weights (ignored when resuming)."""
    seed_everything(config.loop.seed)
    model = build_swinir(config.swinir)
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        dev = config.loop.device
        if isinstance(pairs, FreshPairStream):
            lq_t, gt_t = pairs.batch(step)
            return rm_loss(model, lq_t.to(dev), gt_t.to(dev))
        lq, gt = draw_pairs(images, config.batch_size, rng, pairs)
        return rm_loss(model, to_tensor_batch(lq, dev), to_tensor_batch(gt, dev))

    return train_stage("rm", model, opt, loss_fn, out_dir, config)
