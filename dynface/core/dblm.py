"""DBLM: degraded face y -> RM(y) -> std* from SE -> blurred targets ý at std*, std*−1, std*−2.

ý_i = G(s_i) ⊛ (2·RM(y) − 1) in [-1, 1] (spec §2.3 item 2, §5.2). Levels below the pack's std_min
are dropped ([choice] §3.11); level 0 is always std* itself (clamped into the std range). Offsets
are given in pixels at 512 px and scaled to the pack's resolution (spec §3.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynface.core.blur import gaussian_blur
from dynface.core.calls import record_calls
from dynface.core.dsst import DSSTTable
from dynface.core.guidance import GuidanceTargets

REFERENCE_RESOLUTION = 512


@dataclass(frozen=True)
class DBLMOutput:
    restored: Tensor  # (B, 3, H, W) RM(y) clamped to [0, 1]
    std_hat: Tensor  # (B,) SE estimate (or the fixed std) in pixels at the pack's resolution
    targets: GuidanceTargets  # levels (B, L), targets in [-1, 1]


def restore_rm(y: Tensor, rm: nn.Module, *, flip_ensemble: bool = False) -> Tensor:
    """RM(y) clamped to [0, 1], y (B, 3, H, W) in [0, 1]. `flip_ensemble`: the mean of RM(y) and the
    mirror image of RM(mirror(y)) — the self-ensemble of the SR literature restricted to the flip, the
    one transform under which aligned faces stay faces (RM trains with random flips). Twice RM's cost."""
    restored = rm(y)
    if flip_ensemble:
        restored = (restored + rm(y.flip(-1)).flip(-1)) / 2
    return restored.clamp(0, 1)


def to_reference_std(std: Tensor | float, resolution: int) -> Tensor | float:
    """A std in pixels at `resolution` expressed in pixels at 512 (η = std/10 refers to that scale)."""
    return std * (REFERENCE_RESOLUTION / resolution)


def guidance_stds(
    std_hat: Tensor, *, offsets: Sequence[float], resolution: int, std_range: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """Level stds (B, L) and validity (B, L) from std* (B,): s_i = std* − offset_i·res/512."""
    lo, hi = std_range
    scale = resolution / REFERENCE_RESOLUTION
    base = std_hat.clamp(lo, hi)
    offs = torch.as_tensor(list(offsets), dtype=base.dtype, device=base.device) * scale
    stds = base.unsqueeze(1) - offs.unsqueeze(0)
    valid = stds >= lo - 1e-9
    valid[:, 0] = True
    return stds.clamp(lo, hi), valid


def blurred_targets(restored: Tensor, stds: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] and stds (B, L) -> ý (B, L, 3, H, W) in [-1, 1]."""
    b, n_levels = stds.shape
    rep = (2 * restored - 1).unsqueeze(1).expand(b, n_levels, *restored.shape[1:])
    return gaussian_blur(rep.reshape(b * n_levels, *restored.shape[1:]), stds.reshape(-1)).view(
        b, n_levels, *restored.shape[1:]
    )


@dataclass(frozen=True)
class LevelPlan:
    """What SE + DSST decide before any sampling: std* and the guidance levels with their starts."""

    std_hat: Tensor  # (B,) pixels at the pack's resolution
    stds: Tensor  # (B, L) level stds
    valid: Tensor  # (B, L) bool
    t_starts: Tensor  # (B, L) int64


@torch.no_grad()
def plan_levels(
    y: Tensor,
    se: nn.Module | None,
    dsst: DSSTTable | None,
    *,
    resolution: int,
    std_range: tuple[float, float],
    offsets: Sequence[float] = (0.0, 1.0, 2.0),
    fixed_std: float | None = None,
    fixed_t_start: int | None = None,
    std_hat: Tensor | None = None,
) -> LevelPlan:
    """std* (SE on y, or `std_hat` when already known, or `fixed_std` without SE) -> levels and starts.

    RM is not run here: the pipeline's estimate stage needs only these numbers to bucket faces."""
    if std_hat is not None:
        std_hat = std_hat.to(device=y.device, dtype=y.dtype)
    elif se is not None:
        std_hat = se(y).to(y.dtype)
        record_calls("se", y.shape[0])
    elif fixed_std is not None:
        std_hat = torch.full((y.shape[0],), float(fixed_std), dtype=y.dtype, device=y.device)
    else:
        raise ValueError("DBLM needs an SE network or a fixed_std")
    stds, valid = guidance_stds(std_hat, offsets=offsets, resolution=resolution, std_range=std_range)
    if fixed_t_start is not None:
        t_starts = torch.full_like(stds, int(fixed_t_start), dtype=torch.long)
    elif dsst is not None:
        t_starts = torch.as_tensor(dsst.lookup(stds.cpu().numpy()), dtype=torch.long, device=y.device)
        record_calls("dsst", y.shape[0])
    else:
        raise ValueError("DBLM needs a DSST table or a fixed_t_start")
    return LevelPlan(std_hat=std_hat, stds=stds, valid=valid, t_starts=t_starts)


@torch.no_grad()
def run_dblm(
    y: Tensor,
    rm: nn.Module,
    se: nn.Module | None,
    dsst: DSSTTable | None,
    *,
    resolution: int,
    std_range: tuple[float, float],
    offsets: Sequence[float] = (0.0, 1.0, 2.0),
    weights: Sequence[float] | None = None,
    fixed_std: float | None = None,
    fixed_t_start: int | None = None,
    std_hat: Tensor | None = None,
    rm_flip_ensemble: bool = False,
    restored: Tensor | None = None,
) -> DBLMOutput:
    """y (B, 3, H, W) in [0, 1] at the pack's resolution.

    Without an SE network `fixed_std` (pixels at the pack's resolution) stands in for std*; without a
    DSST table `fixed_t_start` gives every level the same start. `std_hat` (B,): std* computed earlier
    on the same y (the pipeline's estimate stage), so SE is not run again. `rm_flip_ensemble`: see
    `restore_rm`. `restored` (B, 3, H, W) in [0, 1]: RM's output given from elsewhere (another
    restorer, or the ground truth for the evaluation's oracle bound); RM is not run then.
    """
    plan = plan_levels(
        y,
        se,
        dsst,
        resolution=resolution,
        std_range=std_range,
        offsets=offsets,
        fixed_std=fixed_std,
        fixed_t_start=fixed_t_start,
        std_hat=std_hat,
    )
    if restored is None:
        restored = restore_rm(y, rm, flip_ensemble=rm_flip_ensemble)
    elif restored.shape != y.shape:
        raise ValueError(f"restored images are {tuple(restored.shape)}, the inputs {tuple(y.shape)}")
    else:
        restored = restored.to(device=y.device, dtype=y.dtype)
    weights_t = None if weights is None else torch.as_tensor(list(weights), dtype=y.dtype)
    targets = guidance_targets(
        restored, stds=plan.stds, t_starts=plan.t_starts, valid=plan.valid, weights=weights_t
    )
    return DBLMOutput(restored=restored, std_hat=plan.std_hat, targets=targets)


def guidance_targets(
    restored: Tensor, *, stds: Tensor, t_starts: Tensor, valid: Tensor, weights: Tensor | None = None
) -> GuidanceTargets:
    """ý levels from RM(y) (B, 3, H, W) in [0, 1] and the planned levels (B, L); weights (L,) or None
    (equal). Everything lands on `restored`'s device."""
    device = restored.device
    stds = stds.to(device=device, dtype=restored.dtype)
    w = torch.ones_like(stds) if weights is None else weights.to(device=device, dtype=restored.dtype)
    return GuidanceTargets(
        targets=blurred_targets(restored, stds),
        stds=stds,
        t_starts=t_starts.to(device),
        valid=valid.to(device),
        weights=w.expand_as(stds).clone(),
    )
