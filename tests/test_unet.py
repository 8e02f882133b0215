"""Small, non-golden tests of the DifFace UNet: config, validation, building blocks, autograd, precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _golden import rule_weight

from dynface.models.unet import (
    DifFaceUNet,
    GroupNorm32,
    UNetConfig,
    build_unet,
    qkv_attention,
    reference_frequencies,
    timestep_sinusoid,
)

# README §5 of the golden vectors: the reference's float32 frequencies for model_channels 32.
REF_FREQS_HEX = """
0x1.0000000000000p+0  0x1.1feb340000000p-1  0x1.43d1360000000p-2  0x1.6c310e0000000p-3
0x1.9999980000000p-4  0x1.ccab820000000p-5  0x1.030dc40000000p-5  0x1.235a720000000p-6
0x1.47ae140000000p-7  0x1.7089340000000p-8  0x1.9e7c660000000p-9  0x1.d22a500000000p-10
0x1.0624dc0000000p-10 0x1.26d4280000000p-11 0x1.4b96c20000000p-12 0x1.74eea60000000p-13
""".split()

TINY = {
    "image_size": 16,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "num_head_channels": 16,
}


def _tiny(**overrides) -> DifFaceUNet:
    """Tiny UNet with every parameter set by the golden weight rule (no zero layers, no RNG)."""
    model = build_unet({**TINY, **overrides})
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            p.copy_(torch.from_numpy(rule_weight(i, name, tuple(p.shape))))
    return model.eval()


def _x(b: int = 2, size: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = torch.arange(b * 3 * size * size, dtype=torch.float64)
    return torch.sin(k * 0.37 + 0.1).reshape(b, 3, size, size).to(dtype)


def test_frequencies_are_reference_float32_values() -> None:
    expected = np.array([float.fromhex(h) for h in REF_FREQS_HEX])
    np.testing.assert_array_equal(reference_frequencies(16).double().numpy(), expected)
    model = build_unet({**TINY}).double()
    assert model.freqs.dtype == torch.float64
    np.testing.assert_array_equal(model.freqs.numpy(), expected)
    assert "freqs" not in model.state_dict()


def test_sinusoid_is_cos_then_sin() -> None:
    t = torch.tensor([0, 7, 999])
    f = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    args = t.numpy()[:, None] * f.numpy()[None]
    out = timestep_sinusoid(t, f, 7)
    assert out.dtype == torch.float64 and out.shape == (3, 7)
    np.testing.assert_allclose(out[:, :3].numpy(), np.cos(args), atol=1e-15)
    np.testing.assert_allclose(out[:, 3:6].numpy(), np.sin(args), atol=1e-15)
    assert (out[:, 6] == 0).all()


def test_config_from_params_round_trips() -> None:
    cfg = UNetConfig.from_params({**TINY, "num_res_blocks": [1, 2], "dropout": 0})
    assert cfg.channel_mult == (1, 2) and cfg.num_res_blocks == (1, 2) and cfg.attention_resolutions == (8,)
    assert isinstance(cfg.dropout, float)
    params = json.loads(json.dumps(cfg.to_params()))
    assert params["channel_mult"] == [1, 2] and UNetConfig.from_params(params) == cfg
    assert UNetConfig.from_params(UNetConfig.from_params(TINY).to_params()).num_res_blocks == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"use_ema": True},
        {"num_classes": 10},
        {"num_res_blocks": [1, 1, 1]},
        {"dims": 3},
        {"channel_mult": "1,2"},
        {"model_channels": 16},
        {"num_head_channels": 24},
        {"dropout": 1.0},
    ],
)
def test_config_rejects(bad: dict) -> None:
    with pytest.raises(ValueError):
        build_unet({**TINY, **bad})


def test_forward_rejects_bad_inputs() -> None:
    model = build_unet(TINY)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.zeros(1, 3, 8, 9), torch.tensor([1]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.zeros(2, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.zeros(1, 4, 8, 8), torch.tensor([1]))


def test_reference_zero_init() -> None:
    model = build_unet(TINY)
    zero = [n for n, p in model.named_parameters() if not p.any()]
    assert "out.2.weight" in zero and "input_blocks.1.0.out_layers.3.weight" in zero
    assert "middle_block.1.proj_out.weight" in zero
    assert (model(_x(), torch.tensor([3, 500])) == 0).all()


def _np_attention(qkv: np.ndarray, heads: int, legacy: bool) -> np.ndarray:
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    out = np.zeros((b, heads * ch, t))
    for i in range(b):
        for h in range(heads):
            if legacy:  # rows [q_h, k_h, v_h] per head
                base = h * 3 * ch
                q, k, v = (qkv[i, base + j * ch : base + (j + 1) * ch] for j in range(3))
            else:  # rows [q (all heads), k, v]
                q, k, v = (qkv[i, j * heads * ch + h * ch : j * heads * ch + (h + 1) * ch] for j in range(3))
            logits = q.T @ k / np.sqrt(ch)  # (t, s)
            w = np.exp(logits - logits.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            out[i, h * ch : (h + 1) * ch] = v @ w.T
    return out


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_matches_numpy(legacy: bool) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * 2 * 4, 5, generator=g, dtype=torch.float64)
    expected = _np_attention(qkv.numpy(), 2, legacy)
    np.testing.assert_allclose(qkv_attention(qkv, 2, legacy=legacy).numpy(), expected, atol=1e-13)
    low = qkv_attention(qkv.bfloat16(), 2, legacy=legacy)  # SDPA keeps the softmax in float32
    assert low.dtype == torch.bfloat16
    np.testing.assert_allclose(low.double().numpy(), expected, atol=0.08)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_gives_sdpa_the_fused_kernels_layout(monkeypatch, dtype: torch.dtype) -> None:
    """4-D (batch, heads, tokens, channels) with unit-stride channels in every precision: what the fused
    SDPA kernels take (3-D or strided inputs fall back to the unfused math path)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append([(t.dim(), t.stride(-1), t.dtype) for t in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    qkv = torch.randn(2, 3 * 2 * 4, 5).to(dtype)
    for legacy in (True, False):
        assert qkv_attention(qkv, 2, legacy=legacy).shape == (2, 8, 5)
    assert seen == [[(4, 1, dtype)] * 3] * 2


def test_groupnorm_precision() -> None:
    norm = GroupNorm32(32, 64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = _x(1, 8).repeat(1, 22, 1, 1)[:, :64]
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = F.group_norm(x.bfloat16().float(), 32, norm.weight, norm.bias, 1e-5).bfloat16()
    assert torch.equal(y, ref)
    y64 = norm.double()(x.double())
    xg = x.double().numpy().reshape(1, 32, -1)
    z = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)
    w, b = norm.weight.detach().numpy(), norm.bias.detach().numpy()
    z = z.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]
    assert y64.dtype == torch.float64
    np.testing.assert_allclose(y64.detach().numpy(), z, atol=1e-12)


def test_gradient_wrt_input_matches_finite_difference() -> None:
    model = _tiny().double()
    x = _x(dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([10, 900])
    model(x, t).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    v = torch.cos(torch.arange(x.numel(), dtype=torch.float64)).reshape(x.shape)
    eps = 1e-6
    with torch.no_grad():
        fd = (model(x + eps * v, t).sum() - model(x - eps * v, t).sum()) / (2 * eps)
    assert abs(float((x.grad * v).sum()) - float(fd)) <= 1e-6 * abs(float(fd))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_under_autocast(dtype: torch.dtype) -> None:
    model = _tiny()
    x, t = _x(), torch.tensor([0, 999])
    with torch.no_grad():
        ref = model(x, t)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = model(xg, t)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y - ref).norm() / ref.norm() < 0.05
    y.sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_use_fp16_flag_runs_blocks_in_half() -> None:
    model = _tiny()
    half = _tiny(use_fp16=True)
    x, t = _x(), torch.tensor([0, 999])
    with torch.no_grad():
        ref, y = model(x, t), half(x, t)
    assert y.dtype == torch.float32 and not torch.equal(y, ref)
    assert (y - ref).norm() / ref.norm() < 0.01


def test_dropout_is_honoured() -> None:
    model = _tiny(dropout=0.5)
    x, t = _x(), torch.tensor([5, 6])
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))
        model.train()
        assert not torch.equal(model(x, t), model(x, t))


def test_use_checkpoint_gives_same_gradients() -> None:
    grads = []
    for flag in (False, True):
        model = _tiny(use_checkpoint=flag).double().train()
        model(_x(dtype=torch.float64), torch.tensor([1, 2])).square().sum().backward()
        grads.append(model.input_blocks[1][0].in_layers[2].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_variants_build_and_run() -> None:
    """resblock_updown, no conv resampling, num_heads-based attention; shapes and key layout."""
    model = _tiny(resblock_updown=True, num_head_channels=-1, num_heads=2, num_heads_upsample=4)
    names = {n for n, _ in model.named_parameters()}
    assert "input_blocks.2.0.in_layers.2.weight" in names  # the Downsample is a ResBlock here
    assert model.input_blocks[3][1].heads == 2 and model.output_blocks[0][1].heads == 4
    assert model(_x(), torch.tensor([1, 2])).shape == (2, 6, 8, 8)
    plain = _tiny(conv_resample=False)
    assert not any(".op." in n or ".conv." in n for n, _ in plain.named_parameters())
    assert plain(_x(1, 16), torch.tensor([3])).shape == (1, 6, 16, 16)


def test_meta_init_then_reset_frequencies() -> None:
    with torch.device("meta"):
        model = build_unet(TINY)
    model.to_empty(device="cpu")
    model.reset_frequencies()
    np.testing.assert_array_equal(model.freqs.numpy(), reference_frequencies(16).numpy())
