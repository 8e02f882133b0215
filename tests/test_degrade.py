"""Tests for dynface.images.degrade against hand computations and independent numpy references."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynface.images.degrade import (
    CODEFORMER_LARGE_RANGES,
    DIFFACE_RANGES,
    DegradationParams,
    DegradationRanges,
    bivariate_gaussian_kernel,
    celeba_test_grid,
    degrade,
    degrade_pair,
    filter2d_reflect101,
    jpeg_roundtrip,
    params_for_resolution,
    random_test_params,
    resize_linear,
    sample_params,
)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(1.0 / mse)


def _synthetic_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus edges plus mild texture, (size, size, 3) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    r = 0.5 + 0.4 * np.sin(6 * xx + 2 * yy)
    g = np.where((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1, 0.8, 0.2)
    b = 0.5 + 0.3 * np.cos(9 * yy)
    img = np.stack([r, g, b], axis=2) + 0.05 * rng.standard_normal((size, size, 3))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _face(data_dir: Path, size: int = 128) -> np.ndarray:
    with open(data_dir / "MANIFEST.csv", newline="") as fh:
        rows = [r["file"] for r in csv.DictReader(fh) if r["file"].startswith("hq_aligned/yangxy__GPEN/")]
    if not rows:
        pytest.skip("no FFHQ image in the shared data")
    with Image.open(data_dir / sorted(rows)[0]) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.float32) / 255.0


# --- kernel -------------------------------------------------------------------------------------------


def test_kernel_sums_to_one_and_shape() -> None:
    k = bivariate_gaussian_kernel(41, 7.3, 2.1, 0.6)
    assert k.shape == (41, 41) and k.dtype == np.float64
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(k >= 0)


def test_iso_kernel_is_outer_product_of_1d_gaussians() -> None:
    sigma, size = 2.7, 21
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    np.testing.assert_allclose(bivariate_gaussian_kernel(size, sigma, sigma, 0.0), np.outer(g, g), atol=1e-14)


def test_kernel_rotation_and_orientation() -> None:
    a, b = bivariate_gaussian_kernel(31, 5.0, 1.5, math.pi / 2), bivariate_gaussian_kernel(31, 1.5, 5.0, 0.0)
    np.testing.assert_allclose(a, b, atol=1e-12)
    k0 = bivariate_gaussian_kernel(31, 5.0, 1.5, 0.0)
    np.testing.assert_allclose(k0, b.T, atol=1e-12)
    c = 15
    assert k0[c, c + 5] > 100 * k0[c + 5, c]  # θ = 0: σx along columns (x to the right)
    k45 = bivariate_gaussian_kernel(31, 5.0, 1.5, math.pi / 4)
    np.testing.assert_allclose(k45, k45.T, atol=1e-14)
    assert k45[c + 3, c + 3] > 10 * k45[c + 3, c - 3]  # x and y grow together: main diagonal


def test_kernel_second_moments_match_covariance() -> None:
    sx, sy, th = 3.0, 1.5, 0.4
    k = bivariate_gaussian_kernel(41, sx, sy, th)
    yy, xx = np.mgrid[-20:21, -20:21]
    emp = np.array([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
    c, s = math.cos(th), math.sin(th)
    expected = np.array(
        [
            [c * c * sx**2 + s * s * sy**2, c * s * (sx**2 - sy**2)],
            [c * s * (sx**2 - sy**2), s * s * sx**2 + c * c * sy**2],
        ]
    )
    np.testing.assert_allclose(emp, expected, atol=1e-6)


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        DegradationParams(sigma_x=1.0, sigma_y=1.0, theta=0.0, kernel_size=40)
    with pytest.raises(ValueError):
        DegradationParams(sigma_x=0.0, sigma_y=1.0, theta=0.0)
    with pytest.raises(ValueError):
        DegradationParams(sigma_x=1.0, sigma_y=1.0, theta=0.0, jpeg_quality=101)
    with pytest.raises(ValueError):
        DegradationRanges(sigma=(2.0, 1.0), iso_prob=0.5, scale=(1, 2), noise=(0, 1), jpeg=(30, 40))


# --- blur and resize ----------------------------------------------------------------------------------


def test_blur_of_constant_image_is_constant() -> None:
    img = np.full((17, 23, 3), [0.2, 0.5, 0.9], dtype=np.float32)
    out = filter2d_reflect101(img, bivariate_gaussian_kernel(41, 6.0, 2.0, 1.0))  # kernel wider than image
    np.testing.assert_allclose(out, img, atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 11), (3, 2), (23, 29)])  # padded 13→15, 33→36: FFT sizes rounded up
def test_blur_is_correlation_with_reflect101(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    img = rng.random((*shape, 2)).astype(np.float32)
    kernel = rng.random((5, 5))  # asymmetric: correlation and convolution differ
    pad = np.pad(img.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode="reflect")  # numpy reflect = 101
    ref = np.zeros(img.shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            ref[i, j] = np.einsum("ab,abc->c", kernel, pad[i : i + 5, j : j + 5])
    np.testing.assert_allclose(filter2d_reflect101(img, kernel), ref, rtol=1e-5, atol=1e-6)


def test_resize_down_matches_hand_computed_inter_linear() -> None:
    img = np.zeros((4, 4, 1), dtype=np.float32)
    img[0, 1, 0], img[3, 3, 0] = 10.0, 40.0
    # 4 -> 2: source x = (d + 0.5) * 2 - 0.5 = 0.5, 2.5, i.e. the mean of each 2x2 block (no antialias).
    np.testing.assert_allclose(resize_linear(img, (2, 2))[..., 0], [[2.5, 0.0], [0.0, 10.0]], atol=1e-6)


def test_resize_up_matches_hand_computed_inter_linear() -> None:
    img = np.array([[0.0, 4.0], [8.0, 12.0]], dtype=np.float32)[..., None]
    # 2 -> 4: source x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (x1 clamped to the last pixel).
    expected = [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]
    np.testing.assert_allclose(resize_linear(img, (4, 4))[..., 0], expected, atol=1e-6)
    # Non-square target: (width, height) order.
    assert resize_linear(img, (5, 3)).shape == (3, 5, 1)


def test_down_up_of_constant_image_is_constant() -> None:
    img = np.full((64, 48, 3), 0.37, dtype=np.float32)
    small = resize_linear(img, (math.floor(48 / 3.7), math.floor(64 / 3.7)))
    np.testing.assert_allclose(resize_linear(small, (48, 64)), img, atol=1e-6)


# --- full pipeline ------------------------------------------------------------------------------------

_P = DegradationParams(
    sigma_x=3.0, sigma_y=1.2, theta=0.5, kernel_size=21, scale=3.3, noise_sigma=8.0, jpeg_quality=60
)


def test_output_is_8bit_same_shape_and_in_range() -> None:
    hq = _synthetic_image(64)
    lq = degrade(hq, _P, rng=np.random.default_rng(0))
    assert lq.shape == hq.shape and lq.dtype == np.float32
    assert lq.min() >= 0.0 and lq.max() <= 1.0
    np.testing.assert_allclose(lq * 255.0, np.rint(lq * 255.0), atol=1e-4)
    assert 20.0 < _psnr(lq, hq) < 40.0  # degraded, but still the same picture


def test_lq_size_is_floor_of_w_over_r() -> None:
    hq = np.random.default_rng(2).random((8, 8, 3)).astype(np.float32)
    # σ = 0.1 makes the kernel a delta; 8 / 5 -> a 1x1 LQ (ceil would give 2x2) sampled at source x = y = 3.5,
    # i.e. the mean of hq[3:5, 3:5]; resizing 1x1 back gives a constant image.
    p = DegradationParams(sigma_x=0.1, sigma_y=0.1, theta=0.0, kernel_size=3, scale=5.0)
    lq = degrade(hq, p, rng=np.random.default_rng(0))
    expected = np.rint(hq[3:5, 3:5].astype(np.float64).mean(axis=(0, 1)) * 255.0) / 255.0
    np.testing.assert_allclose(lq, np.broadcast_to(expected, hq.shape), atol=1e-6)


def test_determinism() -> None:
    hq = _synthetic_image(48)
    a = degrade(hq, _P, rng=np.random.default_rng(5))
    b = degrade(hq, _P, rng=np.random.default_rng(5))
    c = degrade(hq, _P, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    pa = [sample_params(np.random.default_rng(3)) for _ in range(2)]
    assert pa[0] == pa[1]
    assert sample_params(np.random.default_rng(4)) != pa[0]


def test_noise_std_matches_sigma() -> None:
    hq = np.full((128, 128, 3), 0.5, dtype=np.float32)
    p = DegradationParams(sigma_x=0.5, sigma_y=0.5, theta=0.0, kernel_size=3, noise_sigma=10.0)
    lq = degrade(hq, p, rng=np.random.default_rng(11)).astype(np.float64)
    assert lq.std() * 255.0 == pytest.approx(10.0, rel=0.015)  # sampling error of the std ~0.3%
    assert lq.mean() == pytest.approx(0.5, abs=1e-3)
    chan = lq.reshape(-1, 3) - 0.5
    assert abs(np.corrcoef(chan.T)[0, 1]) < 0.05  # colour noise: independent channels


def _check_jpeg_monotonic(hq: np.ndarray) -> None:
    qualities = (20, 40, 60, 80, 95)
    direct = [_psnr(jpeg_roundtrip(hq, q), hq) for q in qualities]
    assert all(a < b for a, b in zip(direct, direct[1:], strict=False)), direct
    p0 = DegradationParams(sigma_x=0.1, sigma_y=0.1, theta=0.0, kernel_size=3)
    via = [
        _psnr(
            degrade(
                hq, DegradationParams(**{**p0.to_dict(), "jpeg_quality": q}), rng=np.random.default_rng(0)
            ),
            hq,
        )
        for q in qualities
    ]
    assert all(a < b for a, b in zip(via, via[1:], strict=False)), via


def test_jpeg_psnr_monotonic_synthetic() -> None:
    _check_jpeg_monotonic(_synthetic_image(96))


@pytest.mark.data
def test_jpeg_psnr_monotonic_real_face(data_dir: Path) -> None:
    _check_jpeg_monotonic(_face(data_dir))


def test_gray_and_hflip_pair() -> None:
    hq = _synthetic_image(40)
    p = DegradationParams(
        sigma_x=1.0, sigma_y=1.0, theta=0.0, kernel_size=7, scale=2.0, jpeg_quality=80, gray=True
    )
    lq, gt = degrade_pair(hq, p, rng=np.random.default_rng(0))
    assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 0], lq[..., 2])
    luma = 0.299 * hq[..., 0] + 0.587 * hq[..., 1] + 0.114 * hq[..., 2]
    for ch in range(3):
        np.testing.assert_allclose(gt[..., ch], luma, atol=1e-6)
    flip = DegradationParams(sigma_x=1.0, sigma_y=1.0, theta=0.0, kernel_size=7, hflip=True)
    lq_f, gt_f = degrade_pair(hq, flip, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(gt_f, hq[:, ::-1])
    lq_n = degrade(hq, DegradationParams(**{**flip.to_dict(), "hflip": False}), rng=np.random.default_rng(0))
    # Blur of a flipped image = flipped blur (θ = 0); float summation order may move a rare 8-bit step.
    np.testing.assert_allclose(lq_f, lq_n[:, ::-1], atol=1.01 / 255)
    assert np.mean(lq_f == lq_n[:, ::-1]) > 0.99


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        degrade(np.zeros((8, 8), np.float32), _P, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        degrade(np.full((8, 8, 3), 2.0, np.float32), _P, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        degrade(
            np.zeros((8, 8, 3), np.float32),
            DegradationParams(1.0, 1.0, 0.0, 3, scale=9.0),
            rng=np.random.default_rng(0),
        )


# --- protocols ----------------------------------------------------------------------------------------


def test_celeba_test_grid() -> None:
    grid = celeba_test_grid()
    assert len(grid) == 4000
    first = grid[0]
    assert (first.jpeg_quality, first.scale, first.noise_sigma, first.sigma_x, first.theta) == (
        30,
        4.0,
        1.0,
        4.0,
        0.0,
    )
    # Entry 400: qf block of 800 -> 30; sf block of 80 -> index 5 -> 24; start of nf and σx and θ loops.
    e = grid[400]
    assert (e.jpeg_quality, e.scale, e.noise_sigma, e.sigma_x, e.theta) == (30, 24.0, 1.0, 4.0, 0.0)
    e = grid[17]  # nf index 1 -> 5; σx index 0; θ index 1 -> π/4
    assert (e.noise_sigma, e.sigma_x, e.theta) == (5.0, 4.0, math.pi / 4)
    e = grid[3999]
    assert (e.jpeg_quality, e.scale, e.noise_sigma, e.sigma_x, e.theta) == (
        70,
        40.0,
        20.0,
        16.0,
        3 * math.pi / 4,
    )
    sigma_y = [p.sigma_y for p in grid]
    assert set(sigma_y) == {4.0, 8.0, 12.0, 16.0}
    assert all(p.kernel_size == 41 and not p.hflip and not p.gray for p in grid)
    assert [p.jpeg_quality for p in grid].count(50) == 800
    assert celeba_test_grid() == grid
    assert celeba_test_grid(10) == grid[:10]
    assert [p.sigma_y for p in celeba_test_grid(seed=1)] != sigma_y
    with pytest.raises(ValueError):
        celeba_test_grid(4001)


@pytest.mark.parametrize("ranges", [DIFFACE_RANGES, CODEFORMER_LARGE_RANGES])
def test_random_test_params_ranges(ranges: DegradationRanges) -> None:
    params = random_test_params(ranges=ranges)
    assert len(params) == 3000
    assert params == random_test_params(ranges=ranges)
    lo, hi = ranges.sigma
    for p in params:
        assert lo <= p.sigma_x <= hi and lo <= p.sigma_y <= hi
        assert ranges.scale[0] <= p.scale <= ranges.scale[1]
        assert ranges.noise[0] <= p.noise_sigma <= ranges.noise[1]
        assert p.jpeg_quality is not None and ranges.jpeg[0] <= p.jpeg_quality <= ranges.jpeg[1]
        assert not p.hflip and not p.gray and p.kernel_size == ranges.kernel_size
        assert -math.pi <= p.theta <= math.pi
    iso = [p for p in params if p.theta == 0.0]
    assert all(p.sigma_x == p.sigma_y for p in iso)
    assert 0.45 < len(iso) / len(params) < 0.55
    qs = {p.jpeg_quality for p in params}
    assert min(qs) == ranges.jpeg[0] and max(qs) == ranges.jpeg[1]  # both ends reachable
    assert random_test_params(5, seed=1, ranges=ranges) != params[:5]


def test_sample_params_json_round_trip() -> None:
    import json

    p = sample_params(np.random.default_rng(0))
    assert DegradationParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_params_for_resolution() -> None:
    p = DegradationParams(
        sigma_x=12.0, sigma_y=4.0, theta=0.3, kernel_size=41, scale=32.0, noise_sigma=5.0, jpeg_quality=40
    )
    q = params_for_resolution(p, 128)
    assert (q.sigma_x, q.sigma_y, q.theta, q.kernel_size, q.scale) == (3.0, 1.0, 0.3, 11, 8.0)
    assert (q.noise_sigma, q.jpeg_quality) == (5.0, 40)
    assert math.floor(128 / q.scale) == math.floor(512 / p.scale)  # same LQ size
    assert params_for_resolution(p, 512) == p
    tiny = params_for_resolution(DegradationParams(1.0, 1.0, 0.0, 41, scale=2.0), 32)
    assert tiny.kernel_size == 3 and tiny.scale == 1.0
    assert params_for_resolution(p, 256).kernel_size == 21
