"""DGSA training (spec §3.14): learn the guidance scale map A_t through one guided step of the frozen prior.

Per batch: synthetic LQ y → DBLM (frozen RM and SE) → blurred target ý at std* with start t_std (DSST);
a spaced index k ~ U{1 … k(t_std)}; x_k = √ᾱ x0 + √(1−ᾱ) ε from the ground truth; x0_k = prior
prediction; guidance g_k (detached; "dps": through the UNet, "closed_form": spec §3.3);
x_{k−1} = DDIM(x_k, x0_k) − ζ·A_k ⊙ g_k; x0_{k−1} = prior prediction at k−1, with the gradient flowing to
A_k through the frozen prior. Loss = Σ_b γ_b ‖SWT(x0_{k−1})_b − SWT(x0)_b‖₁ + w·DISTS(x0_{k−1}, x0) when
VGG16 weights are supplied (`dists_loss`), SWT-only otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynface.core.dblm import run_dblm, to_reference_std
from dynface.core.diffusion import Diffusion
from dynface.core.dsst import DSSTTable
from dynface.core.guidance import GuidanceTargets, closed_form_gradient, guidance_loss
from dynface.models.dgsa import DGSA, build_dgsa
from dynface.train.common import (
    LoopConfig,
    LoopResult,
    seed_everything,
    to_tensor_batch,
    train_stage,
)
from dynface.train.data import PairPool, draw_pairs
from dynface.train.swt import swt_l1_loss

Perceptual = Callable[[Tensor, Tensor], Tensor]


def dists_loss(vgg16: str, head: str | None = None) -> Perceptual:
    """Mean DISTS between two (B, 3, H, W) batches in [−1, 1] (dynface.metrics.perceptual; frozen VGG16)."""
    from dynface.metrics.perceptual import DISTS

    net = DISTS.from_files(vgg16, head)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        net.to(x.device)
        return net(((x + 1) / 2).clamp(0, 1), ((y + 1) / 2).clamp(0, 1)).mean()

    return loss


@dataclass(frozen=True)
class DGSATrainConfig:
    dgsa: dict[str, Any]
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3  # spec §3.14 says ~1e-4 for long runs; a few hundred CPU steps need more
    warmup: int = 10
    respacing: str = "ddim50"  # the sampling grid the pack uses: the trained step is the deployed step
    mode: str = "dps"
    guidance_scale: float = 1.0  # ζ
    gammas: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    perceptual_weight: float = 1.0
    eta_divisor: float = 10.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0))

    def loop_config(self) -> LoopConfig:
        return replace(self.loop, steps=self.steps, ema_decay=None)


@dataclass(frozen=True, eq=False)
class FrozenNets:
    """The frozen networks DGSA training runs through: prior, RM and SE (SE may be None: fixed std)."""

    prior: nn.Module
    rm: nn.Module
    se: nn.Module | None
    dsst: DSSTTable
    std_range: tuple[float, float]
    resolution: int
    fixed_std: float | None = None
    rm_flip_ensemble: bool = False  # as the pack's sampler will run RM (dynface.core.dblm.restore_rm)


def guided_step_x0(
    dgsa: DGSA,
    nets: FrozenNets,
    diffusion: Diffusion,
    x0: Tensor,
    targets: GuidanceTargets,
    index: Tensor,
    eta: Tensor,
    config: DGSATrainConfig,
    noise: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """x0 (B, 3, H, W) in [-1, 1], single-level targets, spaced indices (B,) >= 1 -> x0_{k−1} (B, 3, H, W).

    Noise (forward diffusion, DDIM step) is `noise` when given, else drawn from torch's global RNG.
    Differentiable in DGSA's parameters only.
    """
    q_noise, step_noise = noise if noise is not None else (torch.randn_like(x0), torch.randn_like(x0))
    t = diffusion.model_timesteps(index)
    x_t = diffusion.q_sample(x0, index, q_noise)
    if config.mode == "dps":
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            out = nets.prior(x_in, t)
            x0_t = diffusion.predict_xstart(x_in, index, out[:, :3])
            (grad,) = torch.autograd.grad(guidance_loss(x0_t, targets, t).sum(), x_in)
    elif config.mode == "closed_form":
        with torch.no_grad():
            out = nets.prior(x_t, t)
            x0_t = diffusion.predict_xstart(x_t, index, out[:, :3])
            sqrt_ab = torch.as_tensor(diffusion.sqrt_alphas_cumprod, dtype=x0.dtype, device=x0.device)[index]
            grad = closed_form_gradient(x0_t, targets, t, sqrt_ab)
    else:
        raise ValueError(f"unknown guidance mode {config.mode!r}")
    out, x0_t, grad = out.detach(), x0_t.detach(), grad.detach()
    x_prev = diffusion.ddim_step(x_t, index, out, step_noise, eta=eta).prev_sample
    scale = dgsa(targets.targets[:, 0], x0_t, t)
    x_prev = x_prev - config.guidance_scale * scale * grad
    prev_index = index - 1
    out_prev = nets.prior(x_prev, diffusion.model_timesteps(prev_index))
    return diffusion.predict_xstart(x_prev, prev_index, out_prev[:, :3])


def dgsa_batch(
    nets: FrozenNets, diffusion: Diffusion, lq: Tensor, rng: np.random.Generator, eta_divisor: float
) -> tuple[GuidanceTargets, Tensor, Tensor]:
    """DBLM on lq (B, 3, H, W) in [0, 1] -> (single-level targets, spaced index (B,) >= 1, η (B,))."""
    targets, k_start, eta = dgsa_targets(nets, diffusion, lq, eta_divisor)
    index = torch.from_numpy(rng.integers(1, np.maximum(k_start, 1) + 1).astype(np.int64)).to(lq.device)
    return targets, index, eta


def dgsa_targets(
    nets: FrozenNets, diffusion: Diffusion, lq: Tensor, eta_divisor: float
) -> tuple[GuidanceTargets, np.ndarray, Tensor]:
    """DBLM on lq (B, 3, H, W) in [0, 1] -> (single-level targets, spaced start index (B,) of the DSST
    start, η (B,)); the trained step index is drawn from U{1 … start}."""
    dblm = run_dblm(
        lq,
        nets.rm,
        nets.se,
        nets.dsst,
        resolution=nets.resolution,
        std_range=nets.std_range,
        offsets=(0.0,),
        fixed_std=nets.fixed_std,
        rm_flip_ensemble=nets.rm_flip_ensemble,
    )
    k_start = np.asarray(
        diffusion.index_for_timestep(dblm.targets.t_starts[:, 0].cpu().numpy()), dtype=np.int64
    )
    eta = (to_reference_std(dblm.std_hat, nets.resolution) / eta_divisor).clamp(0, 1)
    return dblm.targets, k_start, eta


def dgsa_loss(
    x0_prev: Tensor, x0: Tensor, config: DGSATrainConfig, perceptual: Perceptual | None = None
) -> dict[str, Tensor]:
    """Σ_b γ_b ‖SWT(x0_{k−1})_b − SWT(x0)_b‖₁ (+ w·DISTS when `perceptual`), with its terms for the log."""
    swt = swt_l1_loss(x0_prev, x0, config.gammas)
    terms = {"swt": swt.detach()}
    loss = swt
    if perceptual is not None:
        p = perceptual(x0_prev, x0)
        terms["perceptual"] = p.detach()
        loss = loss + config.perceptual_weight * p
    return {"loss": loss, **terms}


def train_dgsa(
    images: np.ndarray,
    out_dir: Path | str,
    config: DGSATrainConfig,
    *,
    nets: FrozenNets,
    perceptual: Perceptual | None = None,
    pool: PairPool | None = None,
) -> LoopResult:
    """Train (or resume) DGSA on HQ faces (N, R, R, 3) float32 in [0, 1] with the frozen `nets`."""
    dev = config.loop.device
    for net in (nets.prior, nets.rm, nets.se):
        if net is not None:
            net.eval().requires_grad_(False).to(dev)
    seed_everything(config.loop.seed)
    model = build_dgsa(config.dgsa)
    diffusion = Diffusion.create(config.respacing)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        lq, gt = draw_pairs(images, config.batch_size, rng, pool)
        x0 = to_tensor_batch(gt, dev) * 2 - 1
        targets, index, eta = dgsa_batch(nets, diffusion, to_tensor_batch(lq, dev), rng, config.eta_divisor)
        x0_prev = guided_step_x0(model, nets, diffusion, x0, targets, index, eta, config)
        return dgsa_loss(x0_prev, x0, config, perceptual)

    return train_stage("dgsa", model, opt, loss_fn, out_dir, config)
