"""SE = TM + SDE trained end to end on the std* label of spec §3.8 ([choice], first definition):

    std*(y, x0) = min{ std ∈ grid : PSNR(k_std ⊛ RM(y), k_std ⊛ x0) ≥ τ }      (std_max when none)

i.e. the least blur under which the restorer's output agrees with the ground truth to τ dB. PSNR is in
[0, 1] units over the whole image. τ is tuned once on a fixed calibration set so that the median std*
sits at the middle of the std range (std* then spans the range instead of piling up at one end).

Loss (§3.9): MSE(TM(y), k_{std*} ⊛ x0) + λ·L1(SDE(TM(y)), std*), TM initialised from the trained RM,
SDE from its pre-training and updated at a lower learning rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynface.core.blur import gaussian_blur
from dynface.models.se import StdEstimator
from dynface.train.common import (
    LoopConfig,
    LoopResult,
    seed_everything,
    to_tensor_batch,
    train_stage,
)
from dynface.train.data import PairPool, draw_pairs


def std_grid(std_range: tuple[float, float], size: int) -> Tensor:
    """(size,) float32 evenly spaced stds over the closed range."""
    if size < 2:
        raise ValueError("the std grid needs at least 2 points")
    return torch.linspace(float(std_range[0]), float(std_range[1]), size)


def blurred_psnr(restored: Tensor, x0: Tensor, grid: Tensor) -> Tensor:
    """PSNR(k_s ⊛ restored, k_s ⊛ x0) in dB for every sample and grid std: (B, 3, H, W) x2 -> (B, G)."""
    b, g = restored.shape[0], grid.shape[0]
    both = torch.cat([restored, x0]).unsqueeze(1).expand(2 * b, g, *x0.shape[1:]).reshape(-1, *x0.shape[1:])
    stds = grid.to(x0.dtype).repeat(2 * b)
    blurred = gaussian_blur(both, stds).view(2, b, g, *x0.shape[1:])
    mse = (blurred[0] - blurred[1]).square().flatten(2).mean(2).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)


def std_star(psnr: Tensor, grid: Tensor, tau: float) -> Tensor:
    """(B,) least grid std whose PSNR reaches tau; the largest grid std where none does."""
    ok = psnr >= tau
    first = torch.where(
        ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], grid.numel() - 1, dtype=torch.long)
    )
    return grid[first]


def calibrate_tau(psnr: Tensor, grid: Tensor, *, candidates: Tensor | None = None) -> float:
    """τ whose median std* is closest to the middle of the grid (ties: the smaller τ)."""
    cands = torch.arange(20.0, 50.01, 0.25) if candidates is None else candidates
    mid = 0.5 * float(grid[0] + grid[-1])
    errors = [abs(float(std_star(psnr, grid, float(t)).median()) - mid) for t in cands]
    return float(cands[int(np.argmin(errors))])


@dataclass(frozen=True)
class SETrainConfig:
    std_range: tuple[float, float]
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-4
    sde_lr_scale: float = 0.1
    std_weight: float = 0.01  # λ: L1 in pixels against an MSE in [0, 1]² units
    warmup: int = 20
    grid_size: int = 29
    tau: float | None = None  # None: calibrate_tau on `calib_pairs` fixed pairs
    calib_pairs: int = 128
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0))

    def loop_config(self) -> LoopConfig:
        return replace(self.loop, steps=self.steps, ema_decay=None)


@dataclass(frozen=True)
class SEResult:
    loop: LoopResult
    se: StdEstimator
    tau: float
    label_quantiles: tuple[float, float, float]  # 10/50/90 % of std* on the calibration pairs


@torch.no_grad()
def restored_psnr(rm: nn.Module, lq: Tensor, gt: Tensor, grid: Tensor) -> Tensor:
    """(B, G) PSNR of RM's output against the ground truth under every grid blur (`blurred_psnr`)."""
    return blurred_psnr(rm(lq).clamp(0, 1), gt, grid)


def se_loss(se: StdEstimator, lq: Tensor, gt: Tensor, star: Tensor, std_weight: float) -> dict[str, Tensor]:
    """lq, gt (B, 3, H, W) in [0, 1], star (B,) labels: MSE(TM(y), k⊛x0) + λ·L1(SDE(TM(y)), std*)."""
    assert se.transfer is not None
    z = se.transfer(lq)
    mse = F.mse_loss(z, gaussian_blur(gt, star))
    l1 = F.l1_loss(se.sde(z.clamp(0, 1)), star)
    return {"loss": mse + std_weight * l1, "mse": mse.detach(), "std_l1": l1.detach()}


def se_optimizer(se: StdEstimator, config: SETrainConfig) -> torch.optim.Optimizer:
    """AdamW over TM at the full lr and the pre-trained SDE at `sde_lr_scale` times it."""
    assert se.transfer is not None
    return torch.optim.AdamW(
        [
            {"params": list(se.transfer.parameters()), "lr": config.lr},
            {"params": list(se.sde.parameters()), "lr": config.lr, "lr_scale": config.sde_lr_scale},
        ]
    )


def train_se(
    images: np.ndarray,
    out_dir: Path | str,
    config: SETrainConfig,
    *,
    rm: nn.Module,
    sde: nn.Module,
    tm: nn.Module,
    pool: PairPool | None = None,
) -> SEResult:
    """Train SE = StdEstimator(sde, tm) with std* labels from the frozen `rm` (TM should start as RM)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = config.loop.device
    rm = rm.eval().requires_grad_(False).to(dev)
    grid = std_grid(config.std_range, config.grid_size).to(dev)
    # Calibration pairs come from their own generator so the training stream is the same with a given τ.
    calib_rng = np.random.default_rng(config.loop.seed + 1)
    psnrs = []
    for start in range(0, config.calib_pairs, 16):
        lq, gt = draw_pairs(images, min(16, config.calib_pairs - start), calib_rng, pool)
        psnrs.append(restored_psnr(rm, to_tensor_batch(lq, dev), to_tensor_batch(gt, dev), grid).cpu())
    psnr = torch.cat(psnrs)
    tau = calibrate_tau(psnr, grid.cpu()) if config.tau is None else float(config.tau)
    labels = std_star(psnr, grid.cpu(), tau)
    q = tuple(float(v) for v in torch.quantile(labels, torch.tensor([0.1, 0.5, 0.9])))
    (out / "tau.json").write_text(json.dumps({"tau": tau, "label_quantiles_10_50_90": q}, indent=1))

    seed_everything(config.loop.seed)
    se = StdEstimator(sde, tm)
    opt = se_optimizer(se, config)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        lq, gt = draw_pairs(images, config.batch_size, rng, pool)
        lq_t, gt_t = to_tensor_batch(lq, dev), to_tensor_batch(gt, dev)
        star = std_star(restored_psnr(rm, lq_t, gt_t, grid), grid, tau)
        return se_loss(se, lq_t, gt_t, star, config.std_weight)

    result = train_stage("se", se, opt, loss_fn, out, config)
    return SEResult(loop=result, se=result.model, tau=tau, label_quantiles=q)  # type: ignore[arg-type]
