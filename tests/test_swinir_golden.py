"""SwinIR against the golden vectors of tests/golden (shared golden README §2.2, §2.4, §3, §7, §8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _golden import (
    TIER_A,
    TIER_B,
    assert_close_tier,
    fill_by_rule,
    load_expected,
    load_manifest,
    rule_weight,
)

from dynface.checkpoints import SWINIR_BUFFER_SUFFIXES, drop_swinir_buffers, load_state_dict
from dynface.models.swinir import (
    FACE512,
    SwinIR,
    SwinIRConfig,
    build_swinir,
    relative_position_index,
    shifted_window_mask,
)


def _config(golden_dir: Path, case: str) -> dict:
    return json.loads((golden_dir / f"{case}_keys.json").read_text())["config"]


def _forward(model: SwinIR, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).double().numpy()


def _case(golden_dir: Path, case: str) -> tuple[torch.Tensor, np.ndarray]:
    x = torch.from_numpy(np.load(golden_dir / f"{case}_x.npy"))
    return x, load_expected(golden_dir, case)


@pytest.fixture(scope="module")
def small_ckpt(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(str(golden_dir / "swinir_small_ckpt.pth"))


@pytest.fixture(scope="module")
def small_model(golden_dir: Path, small_ckpt: dict[str, torch.Tensor]) -> SwinIR:
    model = build_swinir(_config(golden_dir, "swinir_small")).eval()
    model.load_state_dict(small_ckpt, strict=True)
    return model


@pytest.fixture(scope="module")
def face512_model(golden_dir: Path) -> SwinIR:
    """The full restorer with rule weights; its buffers are its own (not loaded)."""
    model = build_swinir(_config(golden_dir, "swinir_face512")).eval()
    fill_by_rule(model, load_manifest(golden_dir, "swinir_face512"))
    return model


def _check_manifest(
    model: SwinIR, entries: list[dict], *, n_params: int, n_buffers: int, n_elems: int
) -> None:
    entries = sorted(entries, key=lambda e: e["state_dict_index"])
    state = model.state_dict()
    assert list(state) == [e["name"] for e in entries]
    for e in entries:
        t = state[e["name"]]
        assert tuple(t.shape) == tuple(e["shape"]), e["name"]
        assert str(t.dtype).removeprefix("torch.") == e["dtype"], e["name"]
    params = [e for e in entries if e["kind"] == "parameter"]
    buffers = [e for e in entries if e["kind"] == "buffer"]
    assert (len(params), len(buffers)) == (n_params, n_buffers)
    assert all(name.endswith(SWINIR_BUFFER_SUFFIXES) for name in (e["name"] for e in buffers))
    named = list(model.named_parameters())
    assert [n for n, _ in named] == [e["name"] for e in sorted(params, key=lambda e: e["param_index"])]
    assert sum(p.numel() for _, p in named) == n_elems
    for e in buffers:  # our buffers are computed, not loaded: compare with the reference's fingerprints
        v = state[e["name"]].double()
        fp = e["fingerprint"]
        assert v.sum().item() == fp["sum"] and v.abs().sum().item() == fp["abs_sum"], e["name"]
        assert v.flatten()[:4].tolist() == fp["first"], e["name"]


def test_manifest_full_config(golden_dir: Path, face512_model: SwinIR) -> None:
    assert face512_model.config == FACE512 == SwinIRConfig.from_params(_config(golden_dir, "swinir_face512"))
    entries = load_manifest(golden_dir, "swinir_face512")
    _check_manifest(face512_model, entries, n_params=660, n_buffers=72, n_elems=15_792_587)
    # fill_by_rule used the manifest order; spot-check the rule's fingerprints on a few tensors
    state = face512_model.state_dict()
    for e in [x for x in entries if x["kind"] == "parameter"][::97]:
        v = state[e["name"]].double()
        assert v.flatten()[:4].tolist() == e["fingerprint"]["first"], e["name"]
        assert abs(v.sum().item() - e["fingerprint"]["sum"]) <= 1e-6 * e["fingerprint"]["abs_sum"]


def test_manifest_small_config(golden_dir: Path) -> None:
    model = build_swinir(_config(golden_dir, "swinir_small"))
    entries = load_manifest(golden_dir, "swinir_small")
    _check_manifest(model, entries, n_params=76, n_buffers=6, n_elems=241_835)


def test_buffers_equal_reference_checkpoint(small_ckpt: dict[str, torch.Tensor]) -> None:
    mask = small_ckpt["layers.0.residual_group.blocks.1.attn_mask"]
    assert mask.dtype == torch.float32 and torch.equal(shifted_window_mask(16, 16, 8, 4), mask)
    index = small_ckpt["layers.1.residual_group.blocks.0.attn.relative_position_index"]
    assert index.dtype == torch.int64 and torch.equal(relative_position_index(8), index)


def test_input_rule_and_checkpoint_weights(golden_dir: Path, small_ckpt: dict[str, torch.Tensor]) -> None:
    x, _ = _case(golden_dir, "swinir_small")
    k = np.arange(x.numel(), dtype=np.float64)
    z = np.sin((k + 1.0) * 3.1416 + 0.5) * 12345.678
    np.testing.assert_array_equal(x.numpy().ravel(), (z - np.floor(z)).astype(np.float32))
    for e in load_manifest(golden_dir, "swinir_small"):
        if e["kind"] == "parameter":
            want = rule_weight(e["param_index"], e["name"], tuple(e["shape"]))
            np.testing.assert_array_equal(small_ckpt[e["name"]].numpy(), want, err_msg=e["name"])


@pytest.mark.parametrize(("dtype", "tier"), [(torch.float32, TIER_B), (torch.float64, TIER_A)])
def test_small_checkpoint_forward(
    golden_dir: Path, small_ckpt: dict, dtype: torch.dtype, tier: tuple
) -> None:
    """Loader path: released on-disk format -> strict load -> forward (stored masks, 16x16 grid)."""
    model = build_swinir(_config(golden_dir, "swinir_small")).eval()
    model.load_state_dict(small_ckpt, strict=True)
    x, expected = _case(golden_dir, "swinir_small")
    model = model.to(dtype)  # float64 keeps the float32 RGB mean values (README §5)
    assert_close_tier(_forward(model, x.to(dtype)), expected, tier)


def test_small_checkpoint_without_buffers(
    golden_dir: Path, small_ckpt: dict[str, torch.Tensor], small_model: SwinIR
) -> None:
    model = build_swinir(_config(golden_dir, "swinir_small")).eval()
    result = model.load_state_dict(drop_swinir_buffers(small_ckpt), strict=False)
    buffer_names = [k for k in small_ckpt if k.endswith(SWINIR_BUFFER_SUFFIXES)]
    assert sorted(result.missing_keys) == sorted(buffer_names) and len(buffer_names) == 6
    assert result.unexpected_keys == []
    x, expected = _case(golden_dir, "swinir_small")
    y = _forward(model, x)
    np.testing.assert_array_equal(y, _forward(small_model, x))
    assert_close_tier(y, expected, TIER_B)


@pytest.mark.slow
def test_face512_recomputed_mask(golden_dir: Path, face512_model: SwinIR) -> None:
    """2x3x128x128: 16x16 token grid != img_size 64, so the shifted-window masks are recomputed."""
    x, expected = _case(golden_dir, "swinir_face512")
    assert_close_tier(_forward(face512_model, x), expected, TIER_B)


@pytest.mark.slow
def test_face512_native_512(golden_dir: Path, face512_model: SwinIR) -> None:
    """1x3x512x512: native 64x64 grid with the stored masks (~180 GFLOP, one forward)."""
    x, expected = _case(golden_dir, "swinir_face512_512")
    assert_close_tier(_forward(face512_model, x), expected, TIER_B)


def test_pad_and_crop(golden_dir: Path, small_model: SwinIR) -> None:
    """72x72 is reflect-padded (bottom/right) to 128x128, run, and cropped back."""
    x72 = _case(golden_dir, "swinir_small")[0][:1, :, 20:92, 10:82].contiguous()
    y72 = _forward(small_model, x72)
    assert y72.shape == (1, 3, 72, 72)
    padded = np.pad(x72.numpy(), ((0, 0), (0, 0), (0, 56), (0, 56)), mode="reflect")
    y128 = _forward(small_model, torch.from_numpy(padded))
    np.testing.assert_allclose(y72, y128[..., :72, :72], rtol=0, atol=1e-6)
    # the padding matters: the output is not that of a zero-padded input
    zero_padded = np.pad(x72.numpy(), ((0, 0), (0, 0), (0, 56), (0, 56)))
    assert np.abs(_forward(small_model, torch.from_numpy(zero_padded))[..., :72, :72] - y72).max() > 1e-3


def test_gradient_matches_finite_difference(golden_dir: Path, small_ckpt: dict[str, torch.Tensor]) -> None:
    """float64 autograd vs a central difference along one random direction in input and weights."""
    model = build_swinir(_config(golden_dir, "swinir_small")).double().eval()
    model.load_state_dict(small_ckpt, strict=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 56, 56, generator=gen, dtype=torch.float64)  # 56 -> padded to 64: 8x8 grid
    r = torch.randn(1, 3, 56, 56, generator=gen, dtype=torch.float64)
    params = list(model.parameters())
    # small weight directions: the 8-block residual stream makes the loss strongly curved in the weights
    dirs = [0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    x.requires_grad_(True)
    (model(x) * r).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    analytic = (x.grad * dx).sum() + sum((p.grad * d).sum() for p, d in zip(params, dirs, strict=True))

    def loss_at(h: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, dirs, strict=True):
                p.add_(h * d)
            value = (model(x + h * dx) * r).sum().item()
            for p, d in zip(params, dirs, strict=True):
                p.sub_(h * d)
            return value

    # h small enough that no LeakyReLU kink is crossed (measured: relative error ~1e-9 at this h)
    h = 1e-6
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert abs(analytic.item() - numeric) <= 1e-5 * abs(numeric)
