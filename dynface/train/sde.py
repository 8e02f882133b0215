"""SDE pre-training (spec §3.9): regress the std of an isotropic Gaussian blur from k_std ⊛ x0.

std ~ U[std_min, std_max] per sample (pixels at the working resolution), L1 loss on the std.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dynface.core.blur import gaussian_blur
from dynface.models.se import StdEstimatorNet, build_sde
from dynface.train.common import (
    LoopConfig,
    LoopResult,
    seed_everything,
    to_tensor_batch,
    train_stage,
)
from dynface.train.data import sample_hq


def sde_config(resolution: int, std_range: tuple[float, float], *, width: int = 16) -> dict[str, Any]:
    """A small SDE reading the image at its own resolution (no resize at 64 px)."""
    return {
        "width": width,
        "num_stages": 3,
        "input_size": resolution,
        "std_min": float(std_range[0]),
        "std_max": float(std_range[1]),
    }


@dataclass(frozen=True)
class SDETrainConfig:
    sde: dict[str, Any]
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0))

    def loop_config(self) -> LoopConfig:
        return replace(self.loop, steps=self.steps, ema_decay=None)


def blurred_batch(
    x0: Tensor, rng: np.random.Generator, std_range: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """x0 (B, 3, H, W) in [0, 1] -> (k_std ⊛ x0 (B, 3, H, W), std (B,)), std ~ U[std_range]."""
    std = torch.from_numpy(rng.uniform(*std_range, size=x0.shape[0]).astype(np.float32)).to(x0.device)
    return gaussian_blur(x0, std), std


def sde_loss(sde: StdEstimatorNet, blurred: Tensor, std: Tensor) -> dict[str, Tensor]:
    """L1 between SDE(blurred) and the true std, in pixels."""
    return {"loss": F.l1_loss(sde(blurred), std)}


def train_sde(images: np.ndarray, out_dir: Path | str, config: SDETrainConfig) -> LoopResult:
    """Train (or resume) the SDE on HQ faces (N, R, R, 3) float32 in [0, 1]."""
    seed_everything(config.loop.seed)
    model = build_sde(config.sde)
    std_range = (config.sde["std_min"], config.sde["std_max"])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        x0 = to_tensor_batch(sample_hq(images, config.batch_size, rng), config.loop.device)
        blurred, std = blurred_batch(x0, rng, std_range)
        return sde_loss(model, blurred, std)

    return train_stage("sde", model, opt, loss_fn, out_dir, config)
