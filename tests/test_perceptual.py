"""LPIPS and DISTS on our VGG16 against the reference packages' own code (lpips 0.1.4, DISTS_pytorch 0.1).

Neither package imports beside our torch build (they import torchvision), so the reference runs with a
stand-in `torchvision` module whose `vgg16()` returns a network holding the same random weights as ours:
the test compares the metric definitions (scaling, normalisation, pooling, heads, reductions), with the
real head weights the packages ship. The VGG16 layout itself is checked against torchvision's key names
and shapes, written out below.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from dynface.metrics import perceptual

REFERENCES_PRESENT = all(importlib.util.find_spec(p) for p in ("lpips", "DISTS_pytorch"))
needs_references = pytest.mark.skipif(
    not REFERENCES_PRESENT,
    reason="REFERENCE PACKAGES MISSING: install lpips==0.1.4 and dists-pytorch==0.1 with --no-deps "
    "(make venv does) to compare LPIPS/DISTS against them",
)

# torchvision.models.vgg16().features: conv layer index -> (out, in) channels.
TORCHVISION_VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip


@pytest.fixture(scope="module")
def vgg() -> perceptual.VGG16Features:
    torch.manual_seed(0)
    return perceptual.VGG16Features().eval()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory, vgg: perceptual.VGG16Features) -> str:
    """A torchvision-format VGG16 file with random weights (features plus a classifier tensor)."""
    state = {f"features.{k.split('.', 1)[1]}": v for k, v in vgg.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return str(path)


def _faces(n: int = 3, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1)
    base = rng.random((n, 3, size, size)).astype(np.float32)
    other = np.clip(base + rng.normal(0, 0.08, base.shape), 0, 1).astype(np.float32)
    return torch.from_numpy(base), torch.from_numpy(other)


def test_vgg16_layout_matches_torchvision(vgg: perceptual.VGG16Features) -> None:
    state = vgg.state_dict()
    expected = {f"features.{i}.{p}" for i in TORCHVISION_VGG16_CONVS for p in ("weight", "bias")}
    assert set(state) == expected
    for i, (cout, cin) in TORCHVISION_VGG16_CONVS.items():
        assert tuple(state[f"features.{i}.weight"].shape) == (cout, cin, 3, 3)
    taps = vgg.taps(torch.zeros(1, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in taps] == [
        (64, 64, 64),
        (128, 32, 32),
        (256, 16, 16),
        (512, 8, 8),
        (512, 4, 4),
    ]


def test_vgg16_loader_rejects_other_files(tmp_path, vgg_file: str) -> None:
    net = perceptual.load_vgg16_features(vgg_file)
    assert not any(p.requires_grad for p in net.parameters())
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not torchvision VGG16 weights"):
        perceptual.load_vgg16_features(str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="sha256"):
        perceptual.load_vgg16_features(vgg_file, sha256="0" * 64)


def test_l2_pool_is_a_hann_weighted_rms() -> None:
    x = torch.full((1, 2, 6, 6), 3.0)
    out = perceptual.l2_pool(x)
    assert out.shape == (1, 2, 3, 3)
    # Interior windows see only 3s: the weights sum to 1, so the RMS is 3. Border windows see zero padding.
    assert out[0, 0, 1, 1].item() == pytest.approx(3.0, abs=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx(3.0 * np.sqrt(9 / 16), abs=1e-5)


@pytest.fixture
def stand_in_torchvision(monkeypatch: pytest.MonkeyPatch, vgg: perceptual.VGG16Features):
    def vgg16(*args, **kwargs) -> perceptual.VGG16Features:
        clone = perceptual.VGG16Features()
        clone.load_state_dict(vgg.state_dict())
        return clone

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(vgg16=vgg16)
    tv.transforms = types.SimpleNamespace()
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    for name in [m for m in sys.modules if m.split(".")[0] in ("lpips", "DISTS_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    yield


@needs_references
def test_lpips_matches_the_reference_package(stand_in_torchvision, vgg_file: str) -> None:
    lpips_ref = importlib.import_module("lpips")
    ref = lpips_ref.LPIPS(net="vgg", version="0.1", verbose=False).eval()
    ours = perceptual.LPIPS.from_files(vgg_file)
    x, y = _faces()
    with torch.no_grad():
        expected = ref(x, y, normalize=True).reshape(-1)
        got = ours(x, y)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert ours(x, x).abs().max().item() < 1e-6


@needs_references
def test_dists_matches_the_reference_package(stand_in_torchvision, vgg_file: str) -> None:
    dists_ref = importlib.import_module("DISTS_pytorch.DISTS_pt")
    ref = dists_ref.DISTS(load_weights=False).eval()
    head = torch.load(perceptual.default_head_path("dists"), map_location="cpu", weights_only=True)
    ref.alpha.data, ref.beta.data = head["alpha"], head["beta"]
    ours = perceptual.DISTS.from_files(vgg_file)
    x, y = _faces()
    with torch.no_grad():
        expected = ref(x, y).reshape(-1)
        got = ours(x, y)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert ours(x, x).abs().max().item() < 1e-5


@needs_references
def test_dists_is_differentiable_and_scores_uint8_images(vgg_file: str) -> None:
    net = perceptual.DISTS.from_files(vgg_file)
    x, y = _faces(2)
    x.requires_grad_(True)
    net(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    imgs = [(x[i].detach().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(2)]
    refs = [(y[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(2)]
    scores = perceptual.score_images(net, imgs, refs, batch_size=1)
    assert scores.shape == (2,) and (scores > 0).all()
    assert perceptual.score_images(net, imgs, imgs).max() < 1e-5


def test_missing_heads_name_the_package(monkeypatch: pytest.MonkeyPatch, vgg_file: str) -> None:
    monkeypatch.setattr(perceptual, "default_head_path", lambda kind: None)
    with pytest.raises(FileNotFoundError, match="lpips==0.1.4"):
        perceptual.LPIPS.from_files(vgg_file)
    with pytest.raises(FileNotFoundError, match="dists-pytorch==0.1"):
        perceptual.DISTS.from_files(vgg_file)
