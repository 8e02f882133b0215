"""The guided DDIM sampling loop of DynFaceRestore (spec §5.2) over a batch.

Every sample carries its own start step, DDIM η, guidance levels and random stream, so a face
restores the same alone or in a batch (up to float rounding of batched kernels). At each global
step only the samples that have started run through the prior.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from dynface.core.diffusion import Diffusion, space_timesteps
from dynface.core.guidance import (
    GuidanceTargets,
    LossNorm,
    closed_form_gradient,
    guidance_loss,
    kernel_std_step,
    level_norms,
    residuals,
)

GuidanceMode = Literal["dps", "closed_form", "none"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class SamplerConfig:
    """Knobs of the sampling loop. Defaults are the spec's [choice] values."""

    mode: GuidanceMode = "dps"
    respacing: str = "ddim250"
    guidance_scale: float = 1.0  # ζ of spec §3.5
    loss_norm: LossNorm = "l2"  # [choice] unsquared DPS norm; "l2_squared" as alternative
    use_dgsa: bool = True
    kernel_update: bool = True
    kernel_step: float = 0.05  # step on the per-pixel RMS residual, in pixels per unit gradient
    difface_start_quirk: bool = False  # noise to index k but denoise from k-1, as DifFace does
    clip_denoised: bool = True
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.mode not in ("dps", "closed_form", "none"):
            raise ValueError(f"unknown guidance mode {self.mode!r}")
        if self.loss_norm not in ("l2", "l2_squared"):
            raise ValueError(f"unknown loss norm {self.loss_norm!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {self.precision!r}")
        space_timesteps(1000, self.respacing)  # a respacing that does not parse is refused here

    def with_(self, **changes: object) -> SamplerConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class SampleBatch:
    """One batch to sample. init (B, 3, H, W) in [-1, 1] is diffused to each sample's t_start (B,)."""

    init: Tensor
    t_start: Tensor
    eta: Tensor
    seeds: Sequence[int]
    targets: GuidanceTargets | None = None


@dataclass(frozen=True)
class StepInfo:
    step: int  # 0-based global step
    total: int
    timestep: int
    n_active: int


@dataclass(frozen=True)
class SampleOutput:
    images: Tensor  # (B, 3, H, W) in [-1, 1]
    stds_final: Tensor | None  # (B, L) kernel stds after the updates
    n_steps: Tensor  # (B,) model evaluations per sample
    residual_history: np.ndarray  # (steps, B) RMS residual of the main level (nan while inactive)
    final_residual: Tensor | None  # (B,) RMS residual ‖ý_0 − G(σ_0) ⊛ x0‖ / √n of the result


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _noise(generators: Sequence[torch.Generator], rows: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    return torch.stack([torch.randn(shape, generator=generators[r], dtype=torch.float32) for r in rows])


def start_indices(diffusion: Diffusion, t_start: Tensor, *, quirk: bool) -> tuple[Tensor, Tensor]:
    """(index the init is noised to, first index denoised from), both (B,) int64 on the spaced grid."""
    noise_idx = torch.as_tensor(
        np.asarray(diffusion.index_for_timestep(t_start.cpu().numpy()), dtype=np.int64)
    ).reshape(-1)
    first = (noise_idx - 1).clamp_min(0) if quirk else noise_idx
    return noise_idx, first


def rms_residual(x0: Tensor, targets: GuidanceTargets, stds: Tensor | None = None) -> Tensor:
    """Per-sample RMS residual of the main level (level 0), (B,)."""
    main = GuidanceTargets(
        targets.targets[:, :1],
        (targets.stds if stds is None else stds)[:, :1],
        targets.t_starts[:, :1],
        targets.valid[:, :1],
        targets.weights[:, :1],
    )
    res = residuals(x0, main)
    return level_norms(res)[:, 0] / res[0, 0].numel() ** 0.5


def sample(
    prior: nn.Module,
    diffusion: Diffusion,
    batch: SampleBatch,
    config: SamplerConfig,
    *,
    dgsa: nn.Module | None = None,
    std_range: tuple[float, float] = (0.0, float("inf")),
    progress: Callable[[StepInfo], None] | None = None,
) -> SampleOutput:
    device = batch.init.device
    b = batch.init.shape[0]
    if len(batch.seeds) != b or batch.t_start.shape != (b,) or batch.eta.shape != (b,):
        raise ValueError("seeds, t_start and eta must have one entry per sample")
    guided = config.mode != "none" and batch.targets is not None and config.guidance_scale > 0
    targets = batch.targets
    generators = [torch.Generator().manual_seed(int(s)) for s in batch.seeds]
    shape = tuple(batch.init.shape[1:])

    noise_idx, first_idx = start_indices(diffusion, batch.t_start, quirk=config.difface_start_quirk)
    x = diffusion.q_sample(batch.init, noise_idx.to(device), _noise(generators, range(b), shape).to(device))
    stds = targets.stds.clone() if targets is not None else None
    top = int(first_idx.max())
    history = np.full((top + 1, b), np.nan)
    timesteps = torch.as_tensor(diffusion.timestep_map, device=device)

    for step, k in enumerate(range(top, -1, -1)):
        rows = torch.nonzero(first_idx >= k).flatten()
        rows_l = rows.tolist()
        rows_d = rows.to(device)
        index = torch.full((len(rows_l),), k, dtype=torch.long, device=device)
        t = timesteps[index]
        x_t = x[rows_d]
        tg = None
        if targets is not None:
            assert stds is not None
            tg = replace(targets.select(rows_d), stds=stds[rows_d])

        grad = None
        if guided and config.mode == "dps":
            with torch.enable_grad():
                x_in = x_t.detach().requires_grad_(True)
                with _autocast(device, config.precision):
                    out = prior(x_in, t)
                out = out.float()
                eps = out[:, :3]
                x0 = diffusion.predict_xstart(x_in, index, eps, clip=config.clip_denoised)
                loss = guidance_loss(x0, tg, t, norm=config.loss_norm)
                (grad,) = torch.autograd.grad(loss.sum(), x_in)
            out, x0 = out.detach(), x0.detach()
        else:
            with torch.no_grad(), _autocast(device, config.precision):
                out = prior(x_t, t)
            out = out.float()
            x0 = diffusion.predict_xstart(x_t, index, out[:, :3], clip=config.clip_denoised)
            if guided and config.mode == "closed_form":
                sqrt_ab = torch.as_tensor(diffusion.sqrt_alphas_cumprod, device=device)[index]
                grad = closed_form_gradient(x0, tg, t, sqrt_ab, norm=config.loss_norm)

        with torch.no_grad():
            noise = _noise(generators, rows_l, shape).to(device)
            x_prev = diffusion.ddim_step(
                x_t, index, out, noise, eta=batch.eta[rows_d], clip=config.clip_denoised
            ).prev_sample
            if grad is not None:
                scale = torch.ones_like(x_prev[:, :1])
                if config.use_dgsa and dgsa is not None:
                    scale = dgsa(tg.targets[:, 0], x0, t).float()
                x_prev = x_prev - config.guidance_scale * scale * grad
            x[rows_d] = x_prev.detach()
        if tg is not None:
            if guided and config.kernel_update:
                with torch.enable_grad():
                    stds[rows_d] = kernel_std_step(
                        x0, tg, t, step_size=config.kernel_step, std_range=std_range
                    )
            with torch.no_grad():
                history[step, rows_l] = rms_residual(x0, tg).cpu().numpy()
        if progress is not None:
            progress(StepInfo(step=step, total=top + 1, timestep=int(t[0]), n_active=len(rows_l)))

    images = x.clamp(-1, 1)
    final = None
    if targets is not None:
        with torch.no_grad():
            final = rms_residual(images, replace(targets, stds=stds))
    return SampleOutput(
        images=images,
        stds_final=stds,
        n_steps=(first_idx + 1).to(torch.long),
        residual_history=history,
        final_residual=final,
    )
