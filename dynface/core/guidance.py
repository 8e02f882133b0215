"""Guidance terms of the DynFaceRestore step: data fidelity to the blurred targets ý_i.

Each sample b has up to L guidance levels i (std*, std*−1, std*−2; spec §3.11) with target ý_bi,
kernel std σ_bi, start step t_bi and a validity flag. At a step with original timestep t, level i is
active when t ≤ t_bi; active weights are renormalised to sum 1 per sample. The per-sample loss is
the unsquared norm ([choice] §3.5) L_b = Σ_i w_bi ‖ý_bi − G(σ_bi) ⊛ x0_b‖₂, or its square.

`size` (every function that blurs): the blur's kernel size decided by the caller on the host from stds
it has checked there, so that no device value is read back (the sampler's GPU steps); None: the blur
picks it from the largest std, reading the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dynface.core.blur import gaussian_blur, gaussian_blur_adjoint

LossNorm = Literal["l2", "l2_squared"]


@dataclass(frozen=True)
class GuidanceTargets:
    """Blurred targets of a batch. targets (B, L, C, H, W) in [-1, 1]; stds, t_starts, valid (B, L)."""

    targets: Tensor
    stds: Tensor
    t_starts: Tensor
    valid: Tensor
    weights: Tensor  # (B, L) base weights before activation/renormalisation

    def select(self, rows: Tensor) -> GuidanceTargets:
        return GuidanceTargets(
            self.targets[rows], self.stds[rows], self.t_starts[rows], self.valid[rows], self.weights[rows]
        )


def active_weights(targets: GuidanceTargets, t: Tensor) -> Tensor:
    """(B, L) weights of the levels active at original timesteps t (B,), each row summing to 1 (or 0)."""
    active = targets.valid & (t.view(-1, 1) <= targets.t_starts)
    w = torch.where(active, targets.weights, torch.zeros_like(targets.weights))
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-12), w)


def _blur_levels(x0: Tensor, stds: Tensor, size: int | None = None) -> Tensor:
    """x0 (B, C, H, W), stds (B, L) -> G(σ_bi) ⊛ x0_b as (B, L, C, H, W)."""
    b, n_levels = stds.shape
    rep = x0.unsqueeze(1).expand(b, n_levels, *x0.shape[1:]).reshape(b * n_levels, *x0.shape[1:])
    blurred = gaussian_blur(rep, stds.reshape(-1), size=size, validate=size is None)
    return blurred.view(b, n_levels, *x0.shape[1:])


def residuals(
    x0: Tensor, targets: GuidanceTargets, stds: Tensor | None = None, *, size: int | None = None
) -> Tensor:
    """ý_bi − G(σ_bi) ⊛ x0_b, (B, L, C, H, W)."""
    return targets.targets - _blur_levels(x0, targets.stds if stds is None else stds, size)


def level_norms(res: Tensor) -> Tensor:
    """‖r_bi‖₂ per sample and level, (B, L)."""
    return res.flatten(2).norm(dim=2)


def weighted_loss(norms: Tensor, targets: GuidanceTargets, t: Tensor, *, norm: LossNorm = "l2") -> Tensor:
    """L_b (B,) from the level norms ‖r_bi‖ (B, L): Σ_i w_bi ‖r_bi‖ (or ‖r_bi‖²) over the active levels."""
    if norm == "l2_squared":
        norms = norms.square()
    return (active_weights(targets, t) * norms).sum(dim=1)


def guidance_loss(
    x0: Tensor,
    targets: GuidanceTargets,
    t: Tensor,
    *,
    norm: LossNorm = "l2",
    stds: Tensor | None = None,
    size: int | None = None,
) -> Tensor:
    """Per-sample loss L_b (B,), differentiable in x0 and in `stds` (defaults to targets.stds)."""
    return weighted_loss(level_norms(residuals(x0, targets, stds, size=size)), targets, t, norm=norm)


def closed_form_gradient(
    x0: Tensor,
    targets: GuidanceTargets,
    t: Tensor,
    sqrt_alpha_bar: Tensor | float,
    *,
    norm: LossNorm = "l2",
    size: int | None = None,
) -> Tensor:
    """∇_{x_t} L with the Jacobian ∂x0/∂x_t ≈ I/√ᾱ_t (spec §3.3): no UNet backward.

    For L = ‖r‖: ∇_{x0} = −Gᵀ r/‖r‖; for L = ‖r‖²: −2 Gᵀ r. x0 (B, C, H, W); sqrt_alpha_bar (B,) or
    one number for the whole batch.
    """
    res = residuals(x0, targets, size=size)
    return gradient_from_residuals(res, level_norms(res), targets, t, sqrt_alpha_bar, norm=norm, size=size)


def gradient_from_residuals(
    res: Tensor,
    norms: Tensor,
    targets: GuidanceTargets,
    t: Tensor,
    sqrt_alpha_bar: Tensor | float,
    *,
    norm: LossNorm = "l2",
    size: int | None = None,
) -> Tensor:
    """`closed_form_gradient` from residuals r (B, L, C, H, W) and their norms (B, L) already computed."""
    b, n_levels = targets.stds.shape
    scale = active_weights(targets, t)
    if norm == "l2":
        scale = scale / norms.clamp_min(1e-12)
    else:
        scale = 2 * scale
    weighted = res * scale.view(b, n_levels, 1, 1, 1)
    back = gaussian_blur_adjoint(
        weighted.flatten(0, 1), targets.stds.reshape(-1), size=size, validate=size is None
    )
    grad_x0 = -back.view(b, n_levels, *res.shape[2:]).sum(dim=1)
    if isinstance(sqrt_alpha_bar, Tensor):
        return grad_x0 / sqrt_alpha_bar.view(-1, 1, 1, 1).to(grad_x0.dtype)
    return grad_x0 / sqrt_alpha_bar


def kernel_std_step(
    x0: Tensor,
    targets: GuidanceTargets,
    t: Tensor,
    *,
    step_size: float,
    std_range: tuple[float, float],
    size: int | None = None,
) -> Tensor:
    """One gradient step on every level's kernel std (spec Eq. (7), §3.12), x0 detached.

    The loss is the per-pixel RMS residual of each level so the step size does not depend on the
    resolution. Levels not yet active keep their std. Returns the new stds (B, L).
    """
    stds = targets.stds.detach().clone().requires_grad_(True)
    res = residuals(x0.detach(), targets, stds, size=size)
    rms = res.flatten(2).square().mean(dim=2).sqrt()
    active = targets.valid & (t.view(-1, 1) <= targets.t_starts)
    (grad,) = torch.autograd.grad((rms * active).sum(), stds)
    new = stds.detach() - step_size * grad
    new = torch.where(active, new.clamp(*std_range), targets.stds)
    return new
