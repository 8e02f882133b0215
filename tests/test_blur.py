"""Gaussian blur operator: kernel values, padding, adjoint, gradients in std, fft vs separable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynface.core.blur import (
    gaussian_blur,
    gaussian_blur_adjoint,
    gaussian_kernel1d,
    gaussian_transfer_sq,
    kernel_size_for_std,
)

PADDINGS = ("reflect", "replicate", "circular")
METHODS = ("separable", "fft")
NP_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _numpy_blur(x: np.ndarray, std: float, size: int, padding: str) -> np.ndarray:
    """Independent reference: np.pad + explicit 2-D correlation with the outer-product kernel."""
    r = size // 2
    taps = np.array([math.exp(-0.5 * (i - r) ** 2 / std**2) for i in range(size)])
    taps /= taps.sum()
    k2 = np.outer(taps, taps)
    h, w = x.shape[-2:]
    xp = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)], mode=NP_MODES[padding])
    out = np.zeros_like(x)
    for i in range(size):
        for j in range(size):
            out += k2[i, j] * xp[..., i : i + h, j : j + w]
    return out


def _dense_matrix(fn, shape: tuple[int, ...]) -> np.ndarray:
    """Matrix of a linear map on float64 tensors of `shape`, built column by column from basis images."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    return fn(basis).reshape(n, n).numpy().T


def test_kernel_size_for_std() -> None:
    assert kernel_size_for_std(10.0) == 61
    assert kernel_size_for_std(15.0) == 91
    assert kernel_size_for_std(4.0) == 25
    assert kernel_size_for_std(1.5) == 11
    assert kernel_size_for_std(0.2) == 3  # 2*ceil(0.6)+1 = 3
    assert kernel_size_for_std(0.0) == 3  # floor at 3
    assert kernel_size_for_std(2.0, truncate=4.0) == 17
    with pytest.raises(ValueError):
        kernel_size_for_std(-1.0)


def test_kernel_matches_hand_gaussian() -> None:
    std = torch.tensor([1.5, 0.7], dtype=torch.float64)
    k = gaussian_kernel1d(std, 9)
    assert k.shape == (2, 9)
    torch.testing.assert_close(k.sum(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-15)
    for row, s in zip(k, (1.5, 0.7), strict=True):
        hand = [math.exp(-((i - 4) ** 2) / (2 * s * s)) for i in range(9)]
        total = sum(hand)
        np.testing.assert_allclose(row.numpy(), [v / total for v in hand], rtol=1e-14, atol=1e-300)
    # A few values written out: std 1.5, centre tap 1/sum, sum over offsets -4..4.
    s15 = sum(math.exp(-(d**2) / 4.5) for d in range(-4, 5))
    assert k[0, 4].item() == pytest.approx(1.0 / s15, rel=1e-14)
    assert k[0, 4].item() == pytest.approx(0.26655997, rel=1e-7)
    assert k[0, 0].item() == pytest.approx(math.exp(-16 / 4.5) / s15, rel=1e-14)
    with pytest.raises(ValueError):
        gaussian_kernel1d(std, 8)
    with pytest.raises(ValueError):
        gaussian_kernel1d(torch.tensor([0.0, 1.0]), 9)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("method", METHODS)
def test_constant_image_stays_constant(padding: str, method: str) -> None:
    x = torch.full((2, 3, 12, 10), 0.37, dtype=torch.float64)
    y = gaussian_blur(x, torch.tensor([1.0, 5.0], dtype=torch.float64), padding=padding, method=method)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("padding", PADDINGS)
def test_separable_matches_dense_conv2d(padding: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 20, 17, generator=gen, dtype=torch.float64)
    std, size = 1.7, kernel_size_for_std(1.7)
    r = size // 2
    taps = gaussian_kernel1d(torch.tensor([std], dtype=torch.float64), size)[0]
    weight = torch.outer(taps, taps).expand(3, 1, size, size)
    reference = F.conv2d(F.pad(x, (r, r, r, r), mode=padding), weight, groups=3)
    out = gaussian_blur(x, std, padding=padding)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-13)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("h", "w", "std"), [(32, 32, 4.0), (8, 7, 4.0), (16, 9, 6.0), (11, 13, 0.8)])
def test_matches_numpy_reference_including_large_kernels(
    padding: str, method: str, h: int, w: int, std: float
) -> None:
    # (8, 7, 4.0) and (16, 9, 6.0) have half-widths (12, 18) >= the image sides: numpy's mode="reflect"
    # repeats the reflection, which is the behaviour we promise.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, h, w, generator=gen, dtype=torch.float64)
    size = kernel_size_for_std(std)
    reference = _numpy_blur(x.numpy(), std, size, padding)
    out = gaussian_blur(x, std, padding=padding, method=method)
    np.testing.assert_allclose(out.numpy(), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("std", [1.2, 1.5, 2.0])
def test_matches_scipy_gaussian_filter(std: float) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    # scipy's radius int(3*std+0.5) equals our ceil(3*std) for these stds, so the kernels coincide.
    x = np.random.default_rng(3).standard_normal((24, 19))
    reference = ndimage.gaussian_filter(x, std, mode="mirror", truncate=3.0)
    out = gaussian_blur(torch.from_numpy(x)[None, None], std)[0, 0].numpy()
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-12)


def test_large_kernel_matches_stepwise_torch_reflect() -> None:
    # Repeated torch reflect padding, each step by the current side minus one, reaches the same extension.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 5, 6, generator=gen, dtype=torch.float64)
    std, size = 3.0, kernel_size_for_std(3.0)
    r = size // 2
    padded = x
    for dim in (-1, -2):
        left = r
        while left > 0:
            step = min(left, padded.shape[dim] - 1)
            pads = (step, step, 0, 0) if dim == -1 else (0, 0, step, step)
            padded = F.pad(padded, pads, mode="reflect")
            left -= step
    taps = gaussian_kernel1d(torch.tensor([std], dtype=torch.float64), size)[0]
    reference = F.conv2d(padded, torch.outer(taps, taps)[None, None])
    torch.testing.assert_close(gaussian_blur(x, std), reference, rtol=0, atol=1e-13)


ADJOINT_CASES = [(6, 5, 0.8), (32, 32, 4.0), (8, 7, 4.0), (16, 9, 6.0), (12, 12, 2.5)]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("h", "w", "std"), ADJOINT_CASES)
def test_adjoint_identity(padding: str, method: str, h: int, w: int, std: float) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    stds = torch.tensor([std, 0.55 * std], dtype=torch.float64)
    lhs = float((gaussian_blur(x, stds, padding=padding, method=method) * y).sum())
    rhs = float((x * gaussian_blur_adjoint(y, stds, padding=padding, method=method)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("method", METHODS)
def test_adjoint_is_matrix_transpose(padding: str, method: str) -> None:
    shape = (1, 1, 6, 5)
    for std in (0.9, 4.0):  # 4.0: half-width 12 exceeds both sides
        kw = {"padding": padding, "method": method}
        forward = _dense_matrix(lambda b, s=std, kw=kw: gaussian_blur(b, s, **kw), shape)
        adjoint = _dense_matrix(lambda b, s=std, kw=kw: gaussian_blur_adjoint(b, s, **kw), shape)
        np.testing.assert_allclose(adjoint, forward.T, rtol=0, atol=1e-13)
        np.testing.assert_allclose(forward.sum(axis=1), 1.0, rtol=0, atol=1e-13)  # rows: weights sum to 1
        if padding == "circular":
            np.testing.assert_allclose(forward, forward.T, rtol=0, atol=1e-13)
        else:
            # Borders fold back onto interior pixels: the operator is not symmetric, so Kᵀ really differs.
            assert np.abs(forward - forward.T).max() > 1e-3


def test_adjoint_matches_autograd_vjp() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 9, 14, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, 9, 14, generator=gen, dtype=torch.float64)
    stds = torch.tensor([2.2, 3.9], dtype=torch.float64)
    (vjp,) = torch.autograd.grad((gaussian_blur(x, stds) * y).sum(), x)
    torch.testing.assert_close(gaussian_blur_adjoint(y, stds), vjp, rtol=0, atol=1e-13)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("method", METHODS)
def test_std_gradient_matches_finite_differences(padding: str, method: str) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 14, 11, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 3, 14, 11, generator=gen, dtype=torch.float64)
    base = torch.tensor([1.3, 2.6], dtype=torch.float64)
    size = 19  # fixed so that std ± h uses the same support

    def loss(stds: torch.Tensor) -> torch.Tensor:
        out = gaussian_blur(x, stds, size=size, padding=padding, method=method)
        return ((out - target) ** 2).sum()

    stds = base.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(stds), stds)
    step = 1e-5
    for i in range(2):
        bump = torch.zeros(2, dtype=torch.float64)
        bump[i] = step
        fd = (loss(base + bump) - loss(base - bump)).item() / (2 * step)
        assert abs(grad[i].item() - fd) <= 1e-6 * abs(fd)
        assert abs(fd) > 1e-3  # the check is not vacuous


def test_scalar_tensor_std_gradient_and_gradcheck() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 1, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    std = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    for method in METHODS:
        assert torch.autograd.gradcheck(
            lambda a, s, m=method: gaussian_blur(a, s, size=7, method=m),
            (x, std),
            eps=1e-6,
            atol=1e-8,
            fast_mode=True,
        )


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(("h", "w", "std"), [(32, 32, 4.0), (40, 33, 2.3), (10, 12, 5.0)])
def test_fft_matches_separable_float32(padding: str, h: int, w: int, std: float) -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(3, 3, h, w, generator=gen)
    stds = torch.tensor([std, 1.0, 0.5 * std])
    sep = gaussian_blur(x, stds, padding=padding, method="separable")
    fft = gaussian_blur(x, stds, padding=padding, method="fft")
    assert sep.dtype == fft.dtype == torch.float32
    torch.testing.assert_close(fft, sep, rtol=0, atol=1e-5)
    y = torch.rand(3, 3, h, w, generator=gen)
    sep_t = gaussian_blur_adjoint(y, stds, padding=padding, method="separable")
    fft_t = gaussian_blur_adjoint(y, stds, padding=padding, method="fft")
    torch.testing.assert_close(fft_t, sep_t, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_std_equals_separate_calls(method: str) -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.rand(3, 3, 18, 15, generator=gen, dtype=torch.float64)
    stds = torch.tensor([0.6, 3.1, 1.9], dtype=torch.float64)
    size = kernel_size_for_std(3.1)
    batched = gaussian_blur(x, stds, method=method)  # default size follows the largest std
    batched_t = gaussian_blur_adjoint(x, stds, method=method)
    for i in range(3):
        alone = gaussian_blur(x[i : i + 1], float(stds[i]), size=size, method=method)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-14)
        alone_t = gaussian_blur_adjoint(x[i : i + 1], float(stds[i]), size=size, method=method)
        torch.testing.assert_close(batched_t[i : i + 1], alone_t, rtol=0, atol=1e-14)
    # A scalar std equals the same value repeated per sample.
    torch.testing.assert_close(
        gaussian_blur(x, 1.9), gaussian_blur(x, torch.full((3,), 1.9, dtype=torch.float64))
    )


def test_transfer_sq_matches_dft_of_blur_kernel() -> None:
    # The blur of a unit impulse on a circle is the kernel; its DFT power must follow exp(-4π²σ²f²).
    n, std = 64, 3.0
    impulse = torch.zeros(1, 1, 1, n, dtype=torch.float64)
    impulse[..., 0] = 1.0
    # Rows are identical, so the circular blur along H leaves them unchanged; row 1 is the 1-D result.
    kernel = gaussian_blur(impulse.expand(1, 1, 3, n).contiguous(), std, size=41, padding="circular")[0, 0, 1]
    power = np.abs(np.fft.fft(kernel.numpy())) ** 2
    freq = np.abs(np.fft.fftfreq(n))
    np.testing.assert_allclose(power, gaussian_transfer_sq(std, freq), rtol=0, atol=1e-6)
    assert gaussian_transfer_sq(0.0, freq) == pytest.approx(np.ones(n))
    both = gaussian_transfer_sq(np.array([1.0, 2.0]), np.array([[0.0, 0.1], [0.25, 0.5]]))
    assert both.shape == (2, 2, 2)
    assert both[1, 0, 1] == pytest.approx(math.exp(-4 * math.pi**2 * 4.0 * 0.01), rel=1e-14)


def test_argument_validation() -> None:
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError):
        gaussian_blur(x, 1.0, padding="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        gaussian_blur(x, 1.0, method="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        gaussian_blur(x, 1.0, size=8)
    with pytest.raises(ValueError):
        gaussian_blur(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        gaussian_blur(x, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        gaussian_blur(x[0], 1.0)
    with pytest.raises(ValueError):
        gaussian_blur_adjoint(torch.zeros(1, 1, 1, 8), 1.0)  # reflect needs sides >= 2
