"""Diffusion prior training: DifFace-style UNet, DDPM with learned-range variance (spec §4.3–4.4).

Loss = improved-diffusion RESCALED_MSE (`Diffusion.training_losses`: MSE on ε + VB term for σ), uniform
t over the 1000-step process, AdamW with linear warm-up then cosine decay, EMA of the weights. The EMA
copy is the prior that goes into a pack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dynface.core.diffusion import Diffusion
from dynface.models.unet import DifFaceUNet, build_unet
from dynface.train.common import (
    LoopConfig,
    LoopResult,
    seed_everything,
    to_tensor_batch,
    train_stage,
)
from dynface.train.data import MaskedFaces, sample_hq, sample_masked_batch


def prior_config(resolution: int, *, width: int = 32, attention: bool = True) -> dict[str, Any]:
    """The starter prior: 4 levels, mult [1, 2, 2, 2], one res block per level (≈1.7 M params at 64 px,
    PLATFORM.md), attention only at the coarsest level (8×8 at 64 px): at 16×16 it cost a third more per
    step on the 2-core CPU for a network that only gets ~2k steps."""
    mult = [1, 2, 2, 2] if resolution >= 32 else [1, 2]
    attn = [resolution // 8] if attention and resolution >= 32 else []
    return {
        "image_size": resolution,
        "in_channels": 3,
        "model_channels": width,
        "out_channels": 6,
        "num_res_blocks": 1,
        "attention_resolutions": attn,
        "dropout": 0.0,
        "channel_mult": mult,
        "num_head_channels": 32,
        "use_scale_shift_norm": True,
    }


@dataclass(frozen=True)
class PriorTrainConfig:
    unet: dict[str, Any]
    steps: int = 4000
    batch_size: int = 16
    lr: float = 2e-4  # a small network on a short schedule tolerates twice DifFace's 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    respacing: str = "1000"
    # Share of each batch taken from re-aligned tight crops (`train_prior(masked=...)`), whose loss counts
    # only their original pixels. 0: FFHQ-framed faces only (the starter recipe; MODEL_CARD run notes).
    masked_share: float = 0.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0))

    def __post_init__(self) -> None:
        if not 0.0 <= self.masked_share <= 1.0:
            raise ValueError(f"masked_share must be in [0, 1], got {self.masked_share}")

    def loop_config(self) -> LoopConfig:
        from dataclasses import replace

        return replace(self.loop, steps=self.steps, ema_decay=self.ema_decay)


def prior_loss(
    model: DifFaceUNet,
    diffusion: Diffusion,
    x0: Tensor,
    rng: np.random.Generator,
    pixel_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """x0 (B, 3, H, W) in [-1, 1]; uniform spaced index, Gaussian noise from torch's global RNG;
    `pixel_weight` (B, 1, H, W): see `Diffusion.training_losses`."""
    index = torch.from_numpy(rng.integers(0, diffusion.num_steps, size=x0.shape[0]).astype(np.int64))
    index = index.to(x0.device)
    noise = torch.randn_like(x0)
    terms = diffusion.training_losses(model, x0, index, noise, pixel_weight=pixel_weight)
    return {"loss": terms["loss"].mean(), "mse": terms["mse"].mean(), "vb": terms["vb"].mean()}


def train_prior(
    images: np.ndarray, out_dir: Path | str, config: PriorTrainConfig, masked: MaskedFaces | None = None
) -> LoopResult:
    """Train (or resume) the prior on HQ faces (N, R, R, 3) float32 in [0, 1]; returns the EMA model.

    `masked`: re-aligned tight crops (more identities, part of each crop padding) that fill
    `config.masked_share` of every batch, their loss counted on original pixels only."""
    if images.shape[1] != config.unet["image_size"]:
        raise ValueError(f"images are {images.shape[1]} px, the UNet expects {config.unet['image_size']}")
    masked_count = round(config.batch_size * config.masked_share) if masked is not None else 0
    if masked is not None and masked.images.shape[1:3] != images.shape[1:3]:
        raise ValueError("the masked crops and the faces differ in size")
    seed_everything(config.loop.seed)
    model = build_unet(config.unet)
    diffusion = Diffusion.create(config.respacing)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        if masked is None or masked_count == 0:
            x0 = to_tensor_batch(sample_hq(images, config.batch_size, rng), config.loop.device) * 2 - 1
            return prior_loss(model, diffusion, x0, rng)
        x, w = sample_masked_batch(images, masked, config.batch_size, masked_count, rng)
        x0 = to_tensor_batch(x, config.loop.device) * 2 - 1
        weight = torch.from_numpy(np.ascontiguousarray(w)).unsqueeze(1).to(x0.device)
        return prior_loss(model, diffusion, x0, rng, pixel_weight=weight)

    return train_stage("prior", model, opt, loss_fn, out_dir, config)
