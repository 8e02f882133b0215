"""The sampling loop as it was before it was built for the GPU (git history: dynface/core/sampler.py at
f206949), kept as the baseline of `benchmarks/sampler_cpu_before_after.py` and `benchmarks/gpu_check.py`.

It is the plain per-step loop: every face's noise drawn on the CPU and copied over each step, the
running faces gathered by index and the targets re-indexed at every step, coefficient tables gathered
and validated on the host, the blur's kernel sizes read from the device (about 15 waits per step on a
GPU), and the main-level residual blurred once more for the history. Same arguments and result as
`dynface.core.sampler.sample`, which must reproduce it bit for bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from dynface.core.diffusion import Diffusion
from dynface.core.guidance import closed_form_gradient, guidance_loss, kernel_std_step
from dynface.core.sampler import (
    SampleBatch,
    SampleOutput,
    SamplerConfig,
    StepInfo,
    _autocast,
    rms_residual,
    start_indices,
)


def _noise(generators: Sequence[torch.Generator], rows: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    return torch.stack([torch.randn(shape, generator=generators[r], dtype=torch.float32) for r in rows])


def sample_before(
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


def reference_loop(
    prior: nn.Module,
    diffusion: Diffusion,
    batch: SampleBatch,
    config: SamplerConfig,
    *,
    dgsa: nn.Module | None = None,
    std_range: tuple[float, float] = (0.0, float("inf")),
) -> Tensor:
    """The DifFace-style baseline of `benchmarks/gpu_check.py`: the plain loop above in fp32, run once
    per group of faces sharing a start step (no batching across start steps); returns the images."""
    images = torch.empty_like(batch.init)
    fp32 = config.with_(precision="fp32")
    for t in torch.unique(batch.t_start.cpu()).tolist():
        rows = torch.nonzero(batch.t_start.cpu() == t).flatten()
        rows_d = rows.to(batch.init.device)
        group = SampleBatch(
            init=batch.init[rows_d],
            t_start=batch.t_start[rows],
            eta=batch.eta[rows_d],
            seeds=[batch.seeds[i] for i in rows.tolist()],
            targets=None if batch.targets is None else batch.targets.select(rows_d),
        )
        images[rows_d] = sample_before(prior, diffusion, group, fp32, dgsa=dgsa, std_range=std_range).images
    return images
