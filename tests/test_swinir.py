"""SwinIR config, helpers and training-mode behaviour on tiny CPU configs (no golden files needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynface.models.swinir import (
    FACE512,
    DropPath,
    SwinIR,
    SwinIRConfig,
    build_swinir,
    relative_position_index,
    shifted_window_mask,
)

TINY = dict(
    img_size=8, embed_dim=16, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2, sf=2,
    upsampler="nearest+conv", unshuffle=True, unshuffle_scale=2, drop_path_rate=0.0,
)  # fmt: skip


def _tiny(**overrides: object) -> SwinIR:
    torch.manual_seed(0)
    return build_swinir({**TINY, **overrides})


def test_config_params_round_trip() -> None:
    cfg = SwinIRConfig.from_params(TINY)
    assert cfg.depths == (2,) and cfg.num_heads == (2,) and cfg.mlp_ratio == 2.0
    params = cfg.to_params()
    assert params["depths"] == [2] and params["unshuffle_scale"] == 2
    assert SwinIRConfig.from_params(params) == cfg
    assert SwinIRConfig.from_params(FACE512.to_params()) == FACE512
    assert (FACE512.window, FACE512.shift, FACE512.pad_multiple) == (8, 4, 64)


@pytest.mark.parametrize(
    "bad",
    [{"not_a_key": 1}, {"depths": [2, 2]}, {"num_heads": [3]}, {"window_size": 0}, {"drop_path_rate": 1.0}],
)
def test_config_rejects_invalid(bad: dict) -> None:
    with pytest.raises(ValueError):
        SwinIRConfig.from_params({**TINY, **bad})


@pytest.mark.parametrize(
    "unsupported",
    [{"upsampler": "pixelshuffle"}, {"unshuffle": False}, {"unshuffle_scale": 4},
     {"sf": 3, "unshuffle_scale": 3}, {"resi_connection": "3conv"}, {"ape": True}],
)  # fmt: skip
def test_unsupported_options_raise(unsupported: dict) -> None:
    with pytest.raises(NotImplementedError):
        build_swinir({**TINY, **unsupported})


@pytest.mark.parametrize("sf", [2, 4, 8])
def test_upsampling_stages_and_shapes(sf: int) -> None:
    model = _tiny(sf=sf, unshuffle_scale=sf).eval()
    ups = sorted(k.split(".")[0] for k in model.state_dict() if k.startswith("conv_up"))
    assert sorted(set(ups)) == [f"conv_up{i}" for i in range(1, int(np.log2(sf)) + 1)]
    assert model.state_dict()["conv_first.1.weight"].shape == (16, 3 * sf * sf, 3, 3)
    x = torch.rand(1, 3, 4 * sf + 3, 4 * sf - 1)  # not multiples of sf*window: pad and crop
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_small_img_size_disables_shift() -> None:
    """Reference rule: img_size <= window_size -> window = img_size, no shifted blocks, no masks."""
    model = _tiny(img_size=2, window_size=4)
    state = model.state_dict()
    assert (model.config.window, model.config.shift, model.config.pad_multiple) == (2, 0, 4)
    assert not any(k.endswith("attn_mask") for k in state)
    assert state["layers.0.residual_group.blocks.1.attn.relative_position_bias_table"].shape == (9, 2)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 12, 8)).shape == (1, 3, 12, 8)


def test_relative_position_index_by_hand() -> None:
    # tokens (0,0),(0,1),(1,0),(1,1); index = (dr + 1) * 3 + (dc + 1) with d = query - key
    expected = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    assert relative_position_index(2).tolist() == expected


def _mask_by_slices(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """Independent construction: label 3x3 slice regions of the un-shifted grid, compare in windows."""
    labels = np.zeros((h, w))
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, hs in enumerate(slices):
        for j, ws in enumerate(slices):
            labels[hs, ws] = 3 * i + j
    win = (
        labels.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3).reshape(-1, window**2)
    )
    return np.where(win[:, None, :] != win[:, :, None], -100.0, 0.0)


@pytest.mark.parametrize(("h", "w", "window", "shift"), [(4, 4, 2, 1), (16, 8, 4, 2), (24, 16, 8, 4)])
def test_shifted_window_mask(h: int, w: int, window: int, shift: int) -> None:
    mask = shifted_window_mask(h, w, window, shift)
    assert mask.dtype == torch.float32 and mask.shape == (h * w // window**2, window**2, window**2)
    np.testing.assert_array_equal(mask.numpy(), _mask_by_slices(h, w, window, shift))
    assert (mask[0] == 0).all() and (mask[-1] == -100).sum() > 0  # top-left window intact, last one split
    with pytest.raises(ValueError):
        shifted_window_mask(h, w, window, 0)


def test_mean_buffer_is_float32_constant_and_not_saved() -> None:
    model = _tiny()
    assert "mean" not in model.state_dict()
    want = np.array([0.4488, 0.4371, 0.4040], dtype=np.float32).astype(np.float64)
    np.testing.assert_array_equal(model.double().mean.flatten().numpy(), want)


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        _tiny()(torch.rand(1, 1, 8, 8))


def test_drop_path() -> None:
    x = torch.ones(4000, 3)
    layer = DropPath(0.25).train()
    torch.manual_seed(0)
    y = layer(x)
    assert set(torch.unique(y).tolist()) == {0.0, np.float32(1.0 / 0.75).item()}
    assert all(len(torch.unique(row)) == 1 for row in y[:50])  # one draw per sample
    assert abs((y[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(layer.eval()(x), x)


def test_stochastic_depth_only_in_training() -> None:
    model = _tiny(drop_path_rate=0.5)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x)
        assert torch.equal(model(x), ref)
        model.train()
        outs = [model(x) for _ in range(4)]
    assert any((o - ref).abs().max() > 1e-4 for o in outs)
    # with no drop rates, training mode computes exactly the eval forward
    plain = _tiny()
    with torch.no_grad():
        np.testing.assert_allclose(plain.train()(x).numpy(), plain.eval()(x).numpy(), rtol=0, atol=1e-6)


def test_checkpointing_gives_same_gradients() -> None:
    x = torch.rand(2, 3, 16, 16)
    grads = []
    for use_checkpoint in (False, True):
        model = _tiny(use_checkpoint=use_checkpoint).train()
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_forward_backward() -> None:
    model = _tiny().eval()
    x = torch.rand(2, 3, 20, 12, requires_grad=True)  # padded to 24x16: a 12x8 grid, recomputed masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    assert y.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        ref = model(x)
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_image_residual_starts_as_identity_with_the_same_state_dict_layout() -> None:
    from dynface.train.restorer_net import swinir_config

    plain = build_swinir(swinir_config(64, embed_dim=16, depths=(1,))).eval()
    resid = build_swinir(swinir_config(64, embed_dim=16, depths=(1,), image_residual=True)).eval()
    assert list(plain.state_dict()) == list(resid.state_dict())
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(resid(x), x)  # conv_last starts at zero
    # A trained tail adds to the input instead of to the RGB mean.
    resid.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(resid(x) - x, plain(x) - plain.mean)
