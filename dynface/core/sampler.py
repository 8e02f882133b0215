"""The guided DDIM sampling loop of DynFaceRestore (spec §5.2) over a batch.

Every sample carries its own start step, DDIM η, guidance levels and random stream, so a face
restores the same alone or in a batch (up to float rounding of batched kernels). At each global
step only the samples that have started run through the prior.

Built for a GPU: the batch is ordered once by start step, latest first, so the faces running at a step
are always the first n rows and every per-step tensor is a view, never a gather; each face draws its
noise from its own generator on the device; every coefficient is tabled once per run
(`Diffusion.ddim_schedule`); and the blur's kernel sizes are decided on the host from a host copy of
the kernel stds. A step therefore reads the device at most once: to refresh that copy after a
kernel-std update, and then only after the next step's prior has been queued (none without the
update). On the CPU the results are bit for bit those of the straightforward loop
(`benchmarks/sampler_before.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from dynface.core.blur import kernel_size_for_std
from dynface.core.diffusion import DDIMSchedule, Diffusion, space_timesteps
from dynface.core.guidance import (
    GuidanceTargets,
    LossNorm,
    gradient_from_residuals,
    kernel_std_step,
    level_norms,
    residuals,
    weighted_loss,
)

GuidanceMode = Literal["dps", "closed_form", "none"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class SamplerConfig:
    """Knobs of the sampling loop. Defaults are the spec's [choice] values."""

    mode: GuidanceMode = "dps"  # fp16 precision is refused with dps: its gradients underflow
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


class FaceNoise:
    """One generator per face on the device, each seeded by its face's seed: a face draws the same
    noise alone or in any batch. `draw(n)` gives the next (n, *shape) draw of faces 0..n−1 (on the CPU
    the stream of `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`)."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.shape = shape
        # Reused every step: a draw is consumed by the step that made it, before the next draw.
        self.buffer = torch.empty((len(seeds), *shape), dtype=torch.float32, device=device)

    def draw(self, n: int) -> Tensor:
        for i in range(n):
            torch.randn(self.shape, generator=self.generators[i], out=self.buffer[i])
        return self.buffer[:n]


class HostStds:
    """A host copy of the kernel stds (B, L), from which the blur's kernel sizes are decided.

    `refresh` queues the copy after an update (asynchronous on CUDA, into pinned memory); `values`
    waits for it only when read, i.e. after the next step's prior has been queued, so the GPU never
    idles on it. Invalid stds raise here, as the blur would."""

    def __init__(self, stds: Tensor, truncate: float = 3.0) -> None:
        self.truncate = truncate
        self.cuda = stds.device.type == "cuda"
        self._buffer = torch.empty(stds.shape, dtype=stds.dtype, pin_memory=self.cuda)
        self._event = torch.cuda.Event() if self.cuda else None
        self._values: np.ndarray | None = None
        self.refresh(stds)

    def refresh(self, stds: Tensor) -> None:
        self._buffer.copy_(stds.detach(), non_blocking=self.cuda)
        if self._event is not None:
            self._event.record()
        self._values = None

    def values(self) -> np.ndarray:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            values = self._buffer.numpy().copy()
            if not np.all(np.isfinite(values) & (values > 0)):
                raise ValueError("std must be finite and > 0")
            self._values = values
        return self._values

    def kernel_size(self, n: int, *, main_only: bool = False) -> int:
        """The blur's size for rows 0..n−1, all levels (or level 0): as `gaussian_blur` picks it."""
        values = self.values()[:n, :1] if main_only else self.values()[:n]
        return kernel_size_for_std(float(values.max()), self.truncate)


def start_indices(diffusion: Diffusion, t_start: Tensor, *, quirk: bool) -> tuple[Tensor, Tensor]:
    """(index the init is noised to, first index denoised from), both (B,) int64 on the spaced grid."""
    noise_idx = torch.as_tensor(
        np.asarray(diffusion.index_for_timestep(t_start.cpu().numpy()), dtype=np.int64)
    ).reshape(-1)
    first = (noise_idx - 1).clamp_min(0) if quirk else noise_idx
    return noise_idx, first


def rms_residual(
    x0: Tensor, targets: GuidanceTargets, stds: Tensor | None = None, *, size: int | None = None
) -> Tensor:
    """Per-sample RMS residual of the main level (level 0), (B,)."""
    main = GuidanceTargets(
        targets.targets[:, :1],
        (targets.stds if stds is None else stds)[:, :1],
        targets.t_starts[:, :1],
        targets.valid[:, :1],
        targets.weights[:, :1],
    )
    return _rms(level_norms(residuals(x0, main, size=size))[:, 0], x0)


def _rms(norms: Tensor, x0: Tensor) -> Tensor:
    return norms / x0[0].numel() ** 0.5


def _first_rows(targets: GuidanceTargets, stds: Tensor, n: int) -> GuidanceTargets:
    """The targets of rows 0..n−1 with the current stds, as views."""
    if n == targets.stds.shape[0]:
        return replace(targets, stds=stds)
    return GuidanceTargets(
        targets.targets[:n], stds[:n], targets.t_starts[:n], targets.valid[:n], targets.weights[:n]
    )


@dataclass(frozen=True)
class _Order:
    """The batch ordered by first denoised index, latest first: the faces running at index k are rows
    0..active(k)−1. `rows` maps a sorted position to the caller's row."""

    rows: np.ndarray  # (B,) caller's row of each sorted position
    first: np.ndarray  # (B,) first index denoised, sorted (descending)

    @classmethod
    def of(cls, first_idx: np.ndarray) -> _Order:
        rows = np.argsort(-first_idx, kind="stable")
        return cls(rows=rows, first=first_idx[rows])

    @property
    def identity(self) -> bool:
        return bool(np.all(self.rows == np.arange(len(self.rows))))

    def active(self, k: int) -> int:
        return int(np.count_nonzero(self.first >= k))

    def to_sorted(self, x: Tensor) -> Tensor:
        return x if self.identity else x[torch.from_numpy(self.rows).to(x.device)]

    def to_caller(self, x: Tensor) -> Tensor:
        return x if self.identity else x[torch.from_numpy(np.argsort(self.rows)).to(x.device)]


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
    if guided and config.mode == "dps" and config.precision == "fp16":
        raise ValueError(
            "fp16 with dps guidance: its gradients (~1e-3) underflow without loss scaling; use bf16"
        )
    noise_idx, first_idx = start_indices(diffusion, batch.t_start, quirk=config.difface_start_quirk)
    order = _Order.of(first_idx.numpy())
    init = order.to_sorted(batch.init)
    targets = None
    if batch.targets is not None:
        targets = (
            batch.targets if order.identity else batch.targets.select(torch.from_numpy(order.rows).to(device))
        )
    schedule = diffusion.ddim_schedule(
        batch.eta.detach().cpu().numpy()[order.rows], device=device, dtype=init.dtype
    )
    shape = tuple(init.shape[1:])
    noise = FaceNoise([batch.seeds[i] for i in order.rows], shape, device)
    x = diffusion.q_sample(init, noise_idx[order.rows], noise.draw(b))
    stds = targets.stds.clone() if targets is not None else None
    host_stds = HostStds(stds) if stds is not None else None
    top = int(order.first[0])
    history = torch.full((top + 1, b), float("nan"), device=device)

    for step, k in enumerate(range(top, -1, -1)):
        n = order.active(k)
        x_t = x if n == b else x[:n]
        t = torch.full((n,), int(schedule.timesteps[k]), dtype=torch.long, device=device)
        tg = _first_rows(targets, stds, n) if targets is not None else None
        out, x0, grad, main_norm = _model_step(prior, schedule, x_t, t, k, tg, host_stds, config, guided)
        with torch.no_grad():
            x_prev = schedule.step(x0, out[:, :3], noise.draw(n), k)
            if grad is not None:
                if config.use_dgsa and dgsa is not None:
                    x_prev = x_prev - config.guidance_scale * dgsa(tg.targets[:, 0], x0, t).float() * grad
                else:
                    x_prev = x_prev - config.guidance_scale * grad
            if n == b:
                x = x_prev.detach()
            else:
                x[:n] = x_prev
        if tg is not None:
            if guided and config.kernel_update:
                with torch.enable_grad():
                    size = host_stds.kernel_size(n)
                    new = kernel_std_step(
                        x0, tg, t, step_size=config.kernel_step, std_range=std_range, size=size
                    )
                if n == b:
                    stds = new
                else:
                    stds[:n] = new
                host_stds.refresh(stds)
            with torch.no_grad():
                if main_norm is None:  # unguided: no guidance loss has computed the residuals
                    rms = rms_residual(x0, tg, size=host_stds.kernel_size(n, main_only=True))
                else:
                    rms = _rms(main_norm, x0)
                history[step, :n] = rms
        if progress is not None:
            progress(StepInfo(step=step, total=top + 1, timestep=int(schedule.timesteps[k]), n_active=n))

    images = x.clamp(-1, 1)
    final = None
    if targets is not None:
        with torch.no_grad():
            size = host_stds.kernel_size(b, main_only=True)
            final = order.to_caller(rms_residual(images, replace(targets, stds=stds), size=size))
    return SampleOutput(
        images=order.to_caller(images),
        stds_final=order.to_caller(stds) if stds is not None else None,
        n_steps=(first_idx + 1).to(torch.long),
        residual_history=order.to_caller(history.T).T.cpu().numpy().astype(np.float64),
        final_residual=final,
    )


def _model_step(
    prior: nn.Module,
    schedule: DDIMSchedule,
    x_t: Tensor,
    t: Tensor,
    k: int,
    tg: GuidanceTargets | None,
    host_stds: HostStds | None,
    config: SamplerConfig,
    guided: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The prior at step k and the guidance gradient: (model output, x̂0, ∇ or None, main-level norm or
    None). The prior is queued before the host copy of the stds is read for the blur's kernel size."""
    device = x_t.device
    if guided and config.mode == "dps":
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            with _autocast(device, config.precision):
                out = prior(x_in, t)
            out = out.float()
            x0 = schedule.predict_xstart(x_in, k, out[:, :3], clip=config.clip_denoised)
            norms = level_norms(residuals(x0, tg, size=host_stds.kernel_size(len(x_t))))
            loss = weighted_loss(norms, tg, t, norm=config.loss_norm)
            (grad,) = torch.autograd.grad(loss.sum(), x_in)
        return out.detach(), x0.detach(), grad, norms[:, 0].detach()
    with torch.no_grad(), _autocast(device, config.precision):
        out = prior(x_t, t)
    out = out.float()
    x0 = schedule.predict_xstart(x_t, k, out[:, :3], clip=config.clip_denoised)
    if not (guided and config.mode == "closed_form"):
        return out, x0, None, None
    size = host_stds.kernel_size(len(x_t))
    res = residuals(x0, tg, size=size)
    norms = level_norms(res)
    sqrt_ab = float(schedule.sqrt_alphas_cumprod[k])
    grad = gradient_from_residuals(res, norms, tg, t, sqrt_ab, norm=config.loss_norm, size=size)
    return out, x0, grad, norms[:, 0]
