"""The torch Haar SWT against PyWavelets, by value and by gradient."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from dynface.train.swt import haar_swt2, swt_l1_loss


def _pywt_bands(x: np.ndarray) -> list[np.ndarray]:
    ((ca, (ch, cv, cd)),) = pywt.swt2(x, "haar", level=1, axes=(-2, -1))
    return [ca, ch, cv, cd]


@pytest.mark.parametrize("shape", [(8, 8), (2, 3, 8, 6), (1, 1, 4, 10)])
def test_matches_pywt_swt2(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).standard_normal(shape)
    ours = haar_swt2(torch.from_numpy(x)).numpy()
    for i, ref in enumerate(_pywt_bands(x)):
        np.testing.assert_allclose(ours[..., i, :, :], ref, atol=1e-12)


def test_hand_values() -> None:
    # A constant image has no detail and LL = 2c (two 1/√2 low-pass taps per axis).
    c = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    bands = haar_swt2(c)[0, 0]
    torch.testing.assert_close(bands[0], torch.full((4, 4), 0.6, dtype=torch.float64))
    assert float(bands[1:].abs().max()) == 0.0
    # A vertical step edge (columns 0-1 = 0, 2-3 = 1) only shows in the column-high-pass bands (HL).
    step = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4, dtype=torch.float64)
    b = haar_swt2(step)
    # hi along columns at n: (x[n] - x[n+1])/√2, then lo along rows doubles by √2 -> x[n] - x[n+1].
    torch.testing.assert_close(b[2, 0], torch.tensor([0.0, -1.0, 0.0, 1.0], dtype=torch.float64))
    assert float(b[1].abs().max()) == 0.0 and float(b[3].abs().max()) == 0.0


def test_loss_value_against_pywt() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 3, 8, 8)), rng.random((2, 3, 8, 8))
    gammas = (1.0, 0.5, 2.0, 0.25)
    ref = sum(g * np.abs(pa - pb).mean() for g, pa, pb in zip(gammas, _pywt_bands(a), _pywt_bands(b)))
    ours = swt_l1_loss(torch.from_numpy(a), torch.from_numpy(b), gammas)
    assert float(ours) == pytest.approx(ref, rel=1e-12)


def test_gradients_flow_and_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.rand(1, 2, 4, 4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(haar_swt2, (x,))
    assert torch.autograd.gradcheck(lambda p: swt_l1_loss(p, target), (x,))
    loss = swt_l1_loss(x, target)
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        swt_l1_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError):
        swt_l1_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), (1.0, 1.0))
