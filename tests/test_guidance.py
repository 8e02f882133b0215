"""Guidance terms: weights, analytic gradient vs autograd, kernel-std step."""

from __future__ import annotations

import torch

from dynface.core.blur import gaussian_blur
from dynface.core.guidance import (
    GuidanceTargets,
    active_weights,
    closed_form_gradient,
    guidance_loss,
    kernel_std_step,
)


def _targets(b: int = 2, levels: int = 3, size: int = 16, seed: int = 0) -> GuidanceTargets:
    g = torch.Generator().manual_seed(seed)
    stds = torch.tensor([[1.5, 1.0, 0.5]] * b, dtype=torch.float64)[:, :levels]
    t_starts = torch.tensor([[900, 800, 700]] * b)[:, :levels]
    clean = torch.rand(b, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    tg = torch.stack([gaussian_blur(clean, stds[:, i]) for i in range(levels)], dim=1)
    valid = torch.ones(b, levels, dtype=torch.bool)
    valid[1, 2] = False
    return GuidanceTargets(tg, stds, t_starts, valid, torch.ones(b, levels, dtype=torch.float64))


def test_active_weights_renormalise_over_active_valid_levels() -> None:
    tg = _targets()
    w = active_weights(tg, torch.tensor([850, 750]))
    assert torch.allclose(w[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    w = active_weights(tg, torch.tensor([100, 100]))
    assert torch.allclose(w[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.all(active_weights(tg, torch.tensor([950, 999])) == 0)


def test_closed_form_gradient_matches_autograd_on_x0() -> None:
    tg = _targets()
    x0 = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    t = torch.tensor([100, 750])
    sqrt_ab = torch.tensor([0.5, 0.25], dtype=torch.float64)
    for norm in ("l2", "l2_squared"):
        x = x0.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(guidance_loss(x, tg, t, norm=norm).sum(), x)
        analytic = closed_form_gradient(x0, tg, t, sqrt_ab, norm=norm)
        expected = auto / sqrt_ab.view(-1, 1, 1, 1)
        assert torch.allclose(analytic, expected, atol=1e-10), norm


def test_kernel_std_step_moves_towards_true_std_and_respects_range() -> None:
    size = 24
    clean = torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = gaussian_blur(clean * 2 - 1, torch.tensor([1.2], dtype=torch.float64)).unsqueeze(1)
    tg = GuidanceTargets(
        target,
        torch.tensor([[2.0]], dtype=torch.float64),
        torch.tensor([[900]]),
        torch.ones(1, 1, dtype=torch.bool),
        torch.ones(1, 1, dtype=torch.float64),
    )
    # The target is x0 blurred by 1.2: an estimate above it must decrease, one below it must increase,
    # and a small step brings either closer to 1.2 without overshooting it.
    for start in (2.0, 0.7):
        tg_start = GuidanceTargets(tg.targets, torch.tensor([[start]], dtype=torch.float64), *tg_rest(tg))
        t = torch.tensor([500])
        new = float(kernel_std_step(clean * 2 - 1, tg_start, t, step_size=0.05, std_range=(0.5, 3.0)))
        assert (new < start) if start > 1.2 else (new > start), (start, new)
        assert abs(new - 1.2) < abs(start - 1.2), (start, new)
    new = kernel_std_step(clean * 2 - 1, tg, torch.tensor([500]), step_size=1.0, std_range=(0.5, 3.0))
    assert 0.5 <= float(new) < 2.0
    # Inactive (t above the level's start): unchanged.
    same = kernel_std_step(clean * 2 - 1, tg, torch.tensor([950]), step_size=1.0, std_range=(0.5, 3.0))
    assert float(same) == 2.0
    clamped = kernel_std_step(clean * 2 - 1, tg, torch.tensor([500]), step_size=1e6, std_range=(0.5, 3.0))
    assert float(clamped) == 0.5


def tg_rest(tg: GuidanceTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fields of `tg` after its stds (t_starts, valid, weights)."""
    return tg.t_starts, tg.valid, tg.weights
