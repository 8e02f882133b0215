"""Metrics against independent references: torchmetrics, hand computations, scipy, known shifts."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dynface.metrics import nets as metric_nets
from dynface.metrics.fid import (
    FeatureExtractor,
    dlib_descriptor_extractor,
    fid,
    frechet_distance,
    inception_extractor,
)
from dynface.metrics.fidelity import psnr, ssim, y_channel
from dynface.metrics.identity import (
    IdentityEmbedder,
    identity_distance,
    identity_similarity,
    landmark_distance,
)
from dynface.metrics.pair import report_pair, score_pair

GPEN = "hq_aligned/yangxy__GPEN/examples__ffhq-10__{:05d}.png"


def _tm_psnr(x: np.ndarray, y: np.ndarray) -> float:
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    return float(peak_signal_noise_ratio(t(x), t(y), data_range=255.0))


def _tm_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """x, y: (H, W, C) float in [0, 255]. torchmetrics 1.9 averages its SSIM map over the whole
    (reflect-padded) image; BasicSR/VQFR average over windows inside the image, so crop the map."""
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).permute(2, 0, 1)[None]
    _, full = structural_similarity_index_measure(
        t(x), t(y), gaussian_kernel=True, kernel_size=11, sigma=1.5, data_range=255.0, return_full_image=True
    )
    return float(full[..., 5:-5, 5:-5].mean())


def _hand_y(img: np.ndarray) -> np.ndarray:
    rgb = img.astype(np.float64) / 255.0
    return (16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2])[..., None]


def _degrade(img: np.ndarray, seed: int) -> np.ndarray:
    """Blur, Gaussian noise, JPEG q30 (numpy and PIL only)."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    noisy = np.clip(blurred + np.random.default_rng(seed).normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=30)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def faces(data_dir) -> list[np.ndarray]:
    """Three FFHQ faces from GPEN's examples at 512 x 512, uint8 RGB."""
    out = []
    for i in range(3):
        img = Image.open(data_dir / GPEN.format(i)).convert("RGB")
        out.append(np.asarray(img.resize((512, 512), Image.Resampling.LANCZOS)))
    return out


# --------------------------------------------------------------------------------- PSNR / SSIM


def _check_against_torchmetrics(img: np.ndarray, ref: np.ndarray, crop: int = 0) -> None:
    c = (slice(crop, -crop), slice(crop, -crop)) if crop else (slice(None), slice(None))
    x, y = img.astype(np.float64)[c], ref.astype(np.float64)[c]
    assert psnr(img, ref, crop_border=crop) == pytest.approx(_tm_psnr(x, y), abs=1e-4)
    assert ssim(img, ref, crop_border=crop) == pytest.approx(_tm_ssim(x, y), abs=1e-4)
    yx, yy = _hand_y(img)[c], _hand_y(ref)[c]
    assert psnr(img, ref, channel="y", crop_border=crop) == pytest.approx(_tm_psnr(yx, yy), abs=1e-4)
    assert ssim(img, ref, channel="y", crop_border=crop) == pytest.approx(_tm_ssim(yx, yy), abs=1e-4)


def test_psnr_ssim_match_torchmetrics_on_synthetic_images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 5, 3)).repeat(13, axis=1)[:, :60]  # blocky, so SSIM is not ~0
    ref = np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    img = np.clip(ref + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
    _check_against_torchmetrics(img, ref)
    _check_against_torchmetrics(img, ref, crop=4)
    # float inputs in [0, 1] mean the same image
    assert psnr(img / 255.0, ref / 255.0) == pytest.approx(psnr(img, ref), abs=1e-9)
    assert ssim(img.astype(np.float32) / 255, ref) == pytest.approx(ssim(img, ref), abs=1e-6)


def test_psnr_ssim_match_torchmetrics_on_degraded_real_faces(faces):
    for k, face in enumerate(faces[:2]):
        ref = np.asarray(Image.fromarray(face).resize((256, 256), Image.Resampling.LANCZOS))
        img = _degrade(ref, seed=k)
        _check_against_torchmetrics(img, ref)
        assert 20.0 < psnr(img, ref) < 40.0 and 0.4 < ssim(img, ref) < 0.98


def test_y_channel_by_hand():
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 200, 30]]], dtype=np.uint8)
    hand = [16.0, 235.0, 16 + 65.481, 16 + 65.481 * 10 / 255 + 128.553 * 200 / 255 + 24.966 * 30 / 255]
    np.testing.assert_allclose(y_channel(img)[0], hand, atol=1e-9)
    np.testing.assert_allclose(y_channel(img / 255.0), y_channel(img), atol=1e-9)


def test_identical_images():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(img, img) == math.inf and psnr(img, img, channel="y") == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value():
    ref = np.full((16, 16, 3), 100, dtype=np.uint8)
    img = ref + np.uint8(5)  # MSE 25 everywhere
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)


def test_correct_mean_var_undoes_an_affine_shift():
    rng = np.random.default_rng(2)
    ref = rng.integers(40, 200, (40, 40, 3)).astype(np.float64)
    img = (0.8 * ref + 30.0) / 255.0  # per-channel affine change, no clipping
    plain = psnr(img, ref / 255.0)
    assert plain < 35.0
    # VQFR's two shift-then-scale passes recover an affine change exactly (up to round-off)
    assert psnr(img, ref / 255.0, correct_mean_var=True) > 100.0
    assert ssim(img, ref / 255.0, correct_mean_var=True) == pytest.approx(1.0, abs=1e-9)


def test_correct_mean_var_changes_nothing_when_statistics_match():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    img = ref[:, ::-1]  # a pixel permutation: same per-channel mean and std
    for channel in ("rgb", "y"):
        assert psnr(img, ref, channel=channel, correct_mean_var=True) == pytest.approx(
            psnr(img, ref, channel=channel), abs=1e-9
        )
    assert ssim(img, ref, correct_mean_var=True) == pytest.approx(ssim(img, ref), abs=1e-9)


def test_bad_inputs_raise():
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, np.zeros((16, 17, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(a.astype(np.float32) + 2.0, a)
    with pytest.raises(ValueError, match="channel"):
        ssim(a, a, channel="lab")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, crop_border=8)
    with pytest.raises(ValueError, match="constant"):
        psnr(a, a + np.uint8(1), correct_mean_var=True)


# --------------------------------------------------------------------------------- Frechet distance


def _with_exact_stats(n: int, mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    """(n, D) samples whose sample mean is `mean` and sample covariance (ddof 1) is diag(std^2)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(np.column_stack([np.ones(n), rng.normal(size=(n, len(mean)))]))
    return mean + q[:, 1:] * np.sqrt(n - 1) * std


def test_frechet_1d_closed_form():
    a = _with_exact_stats(50, np.array([1.5]), np.array([2.0]), seed=0)
    b = _with_exact_stats(70, np.array([-0.5]), np.array([0.5]), seed=1)
    assert frechet_distance(a, b) == pytest.approx(2.0**2 + (2.0 - 0.5) ** 2, rel=1e-10)


def test_frechet_diagonal_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0, -1.0]), np.array([0.5, 1.0, -2.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.5, 0.1])
    a, b = _with_exact_stats(40, mu_a, sd_a, seed=2), _with_exact_stats(30, mu_b, sd_b, seed=3)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n", [200, 12])  # full-rank covariances, then N < D (singular)
def test_frechet_matches_scipy_sqrtm(n):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(n)
    d = 16
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
    b = rng.normal(size=(n + 5, d)) @ rng.normal(size=(d, d)) * 0.7
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real  # the classic pytorch-fid formulation
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_symmetric_and_zero_on_identical_sets():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 8)), rng.normal(1.0, 2.0, size=(25, 8))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :4])


def test_fid_is_labelled_with_its_extractor():
    mean_colour = FeatureExtractor(
        name="mean-colour", fn=lambda ims: [im.reshape(-1, 3).mean(0) for im in ims]
    )
    rng = np.random.default_rng(6)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    value, name = fid(imgs, imgs, mean_colour)
    assert name == "mean-colour" and value == pytest.approx(0.0, abs=1e-9)
    value, _ = fid(imgs, [np.clip(im.astype(int) + 10, 0, 255).astype(np.uint8) for im in imgs], mean_colour)
    assert value > 50.0  # the mean moved by about 10 in each of 3 channels


# --------------------------------------------------------------------------------- dlib identity, LMD


def test_identity_same_person_closer_than_another(faces):
    same = identity_distance(faces[0], faces[0])
    assert same == pytest.approx(0.0, abs=1e-9)
    degraded = _degrade(faces[0], seed=7)
    d_same = identity_distance(degraded, faces[0])
    d_other = identity_distance(faces[1], faces[0])
    assert d_same < 0.3 < d_other
    assert identity_similarity(faces[0], faces[0]) == pytest.approx(1.0, abs=1e-12)
    assert -1.0 <= identity_similarity(faces[1], faces[0]) < 0.99


def test_identity_nan_without_landmarks(faces):
    off_image = IdentityEmbedder(box=(0.9, 0.9, 1.3, 1.3))  # a box mostly outside the crop
    assert off_image.embed(faces[0]) is None
    assert math.isnan(identity_distance(faces[0], faces[0], off_image))
    assert math.isnan(landmark_distance(faces[0], faces[0], box=off_image.box))


def test_landmark_distance_tracks_a_shift(faces):
    assert landmark_distance(faces[0], faces[0]) == 0.0
    shifted = np.roll(faces[0], 10, axis=1)  # 10 px to the right
    assert landmark_distance(shifted, faces[0]) == pytest.approx(10.0, abs=3.0)
    half = np.asarray(Image.fromarray(faces[0]).resize((256, 256), Image.Resampling.LANCZOS))
    assert landmark_distance(half, faces[0]) < 3.0  # measured at the reference's size


def test_dlib_descriptor_extractor(faces):
    ext = dlib_descriptor_extractor()
    feats = ext(faces[:2])
    assert ext.name == "dlib-face-descriptor-128" and feats.shape == (2, 128)
    assert np.linalg.norm(feats[0] - feats[1]) == pytest.approx(
        identity_distance(faces[0], faces[1]), abs=1e-9
    )


def test_score_pair_on_a_degraded_face(faces):
    gt = faces[2]
    restored = _degrade(gt, seed=8)
    scores = score_pair(restored, gt)
    assert set(scores) == {
        "psnr_rgb",
        "psnr_y",
        "ssim_rgb",
        "ssim_y",
        "psnr_rgb_cmv",
        "ssim_rgb_cmv",
        "identity_distance",
        "identity_similarity",
        "lmd",
    }
    assert scores["psnr_rgb"] == pytest.approx(_tm_psnr(restored, gt), abs=1e-4)
    assert scores["psnr_y"] == pytest.approx(_tm_psnr(_hand_y(restored), _hand_y(gt)), abs=1e-4)
    assert scores["psnr_y"] > scores["psnr_rgb"]  # chroma blurs and JPEG losses are not in Y
    assert 0.0 < scores["identity_distance"] < 0.4 and 0.95 < scores["identity_similarity"] <= 1.0
    assert 0.0 <= scores["lmd"] < 5.0
    assert report_pair(restored, gt).as_dict() == scores


# --------------------------------------------------------------------------------- learned metrics


def test_cv2_style_gray_and_resize_by_hand():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    np.testing.assert_array_equal(metric_nets.cv2_gray(px)[0], [76, 150, 29, 18])
    ramp = np.arange(64, dtype=np.float64).reshape(8, 8)
    # 8 -> 4: output pixel i reads source position 2 i + 0.5, halfway between two pixels
    np.testing.assert_allclose(
        metric_nets.resize_linear(ramp, 4, 4)[1], 8 * 2.5 + np.array([0.5, 2.5, 4.5, 6.5])
    )


def test_arcface_loads_dataparallel_file_and_measures_angles(tmp_path):
    torch.manual_seed(0)
    net = metric_nets.ArcFaceResNet18()
    path = tmp_path / "resnet18_110.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    arcface = metric_nets.ArcFaceIdentity.from_file(str(path))
    rng = np.random.default_rng(9)
    a, b = (rng.integers(0, 256, (100, 90, 3), dtype=np.uint8) for _ in range(2))
    assert arcface.embed([a, b, a]).shape == (3, 512)
    rad, deg = arcface.angle(a, a)
    assert rad == pytest.approx(0.0, abs=1e-6) and deg == pytest.approx(0.0, abs=1e-4)
    assert arcface.angle(a / 255.0, a)[0] == pytest.approx(0.0, abs=1e-6)  # float input, same 8-bit image
    rad, deg = arcface.angle(a, b)
    assert 0.0 < rad <= math.pi and deg == pytest.approx(math.degrees(rad))
    state = net.state_dict()
    del state["fc5.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="fc5.weight"):
        metric_nets.ArcFaceIdentity.from_file(str(tmp_path / "broken.pth"))


def test_fid_inception_architecture_and_loader(tmp_path):
    torch.manual_seed(0)
    net = metric_nets.FIDInceptionV3()
    # torchvision's InceptionV3 has 27,161,264 parameters: minus its 3,326,696-parameter auxiliary head,
    # plus 8 classes (1008 instead of 1000) of the 2048-wide classifier
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    # He-initialised convolutions keep activations alive through ~50 layers (PyTorch's default init lets
    # them fade to ~0, and then any input scaling would give the same features).
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(net.state_dict(), path)
    extractor = inception_extractor(str(path), batch_size=2)
    rng = np.random.default_rng(10)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    feats = extractor(imgs)
    assert feats.shape == (3, 2048) and np.all(feats >= 0.0)  # averages of ReLU outputs
    # pytorch-fid's preprocessing: uint8 -> [0, 1] once (the network maps it to [-1, 1] itself).
    with torch.no_grad():
        direct = (
            net.eval()(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0).double().numpy()
        )
    assert feats.std() > 1e-2
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-6)
    assert "inception" in extractor.name
    value, name = fid(imgs, imgs, extractor)
    assert value == pytest.approx(0.0, abs=1e-6) and name == extractor.name
    imagenet = metric_nets.FIDInceptionV3(num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match="not FID Inception weights"):
        inception_extractor(str(tmp_path / "imagenet.pth"))


def test_fid_inception_features_match_an_independent_implementation():
    """Seeded random weights (tests/fid_reference.py) in our network give the features pytorch-fid's own
    FID Inception computed with the same weights and images (tests/fixtures, made by
    scripts/make_fid_inception_reference.py): wiring, pooling, resize and input scaling all count."""
    from fid_reference import random_fid_state, reference_images

    stored = np.load(Path(__file__).parent / "fixtures" / "fid_inception_reference.npz")
    images = reference_images()
    np.testing.assert_array_equal(images, stored["images"])
    net = metric_nets.FIDInceptionV3()
    net.load_state_dict(random_fid_state(net.state_dict()), strict=True)
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    reference = stored["features"]
    assert reference.shape == (2, 2048) and reference.std() > 0.05
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
