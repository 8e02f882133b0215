"""DifFace-compatible diffusion UNet (spec §4.4, Appendix A), loadable from `iddpm_ffhq512_ema500000.pth`.

Module and parameter names follow DifFace's `UNetModel` so its state_dict loads strictly: 630
parameters for the FFHQ-512 config, no persistent buffers. Numerics follow the reference: GroupNorm
and the attention softmax run in at least float32, the sinusoid frequencies are the reference's
float32 values (kept as float32 values under `.double()`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

GROUPS = 32
GN_EPS = 1e-5
MAX_PERIOD = 10000.0
_REDUCED = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class UNetConfig:
    """DifFace YAML `model.params` (keyword names kept); `from_params` validates and normalises."""

    image_size: int
    in_channels: int = 3
    model_channels: int = 32
    out_channels: int = 6
    num_res_blocks: int | tuple[int, ...] = 2
    attention_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_fp16: bool = False
    use_checkpoint: bool = False
    num_classes: None = None

    def __post_init__(self) -> None:
        if self.num_classes is not None:
            raise ValueError("class-conditional UNets (num_classes) are not supported")
        if self.dims != 2:
            raise ValueError(f"only dims=2 is supported, got {self.dims}")
        if not self.channel_mult:
            raise ValueError("channel_mult must not be empty")
        if isinstance(self.num_res_blocks, tuple) and len(self.num_res_blocks) != len(self.channel_mult):
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        if min(self.res_blocks_per_level) < 1:
            raise ValueError("num_res_blocks entries must be >= 1")
        for mult in self.channel_mult:
            if mult < 1 or (self.model_channels * mult) % GROUPS:
                raise ValueError(f"model_channels*mult must be a positive multiple of {GROUPS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError("num_heads must be >= 1 when num_head_channels is -1")

    @property
    def res_blocks_per_level(self) -> tuple[int, ...]:
        if isinstance(self.num_res_blocks, int):
            return (self.num_res_blocks,) * len(self.channel_mult)
        return self.num_res_blocks

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> UNetConfig:
        """Build from a YAML-style mapping; lists become tuples, unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown UNet params: {unknown}")
        kw = dict(params)
        for key in ("attention_resolutions", "channel_mult"):
            if key in kw:
                kw[key] = _int_tuple(key, kw[key])
        if "num_res_blocks" in kw and not isinstance(kw["num_res_blocks"], int):
            kw["num_res_blocks"] = _int_tuple("num_res_blocks", kw["num_res_blocks"])
        if "dropout" in kw:
            kw["dropout"] = float(kw["dropout"])
        return cls(**kw)

    def to_params(self) -> dict[str, Any]:
        """JSON-serialisable params (tuples as lists); `from_params(c.to_params()) == c`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _int_tuple(key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise ValueError(f"{key} must be a list of ints, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{key} must be a list of ints, got {value!r}")
    return out


def reference_frequencies(half: int) -> Tensor:
    """(half,) float32 `exp(-ln(10000)·j/half)` evaluated in float32 exactly as the reference does."""
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(0, half, dtype=torch.float32) / half)


def timestep_sinusoid(t: Tensor, freqs: Tensor, dim: int) -> Tensor:
    """(B,) timesteps -> (B, dim) `[cos(t·f), sin(t·f)]`, zero-padded if dim is odd.

    Computed in float64 when freqs is float64 (Tier A), else in float32 like the reference.
    """
    dtype = torch.float64 if freqs.dtype == torch.float64 else torch.float32
    args = t.to(dtype)[:, None] * freqs.to(dtype)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for half/bfloat16 input, in the input dtype otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        cdtype = torch.float32 if x.dtype in _REDUCED else x.dtype
        w, b = self.weight.to(cdtype), self.bias.to(cdtype)
        return F.group_norm(x.to(cdtype), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(GROUPS, channels, eps=GN_EPS)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-init like the reference (`out_layers.3`, `proj_out`, `out.2`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest ×2, then a 3×3 conv if `use_conv`."""

    def __init__(self, channels: int, *, use_conv: bool) -> None:
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): stride-2 3×3 conv with padding 1, or 2×2 average pooling."""

    def __init__(self, channels: int, *, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """(B, C_in, H, W), emb (B, E) -> (B, C_out, H', W'); H' = H, 2H (up) or H/2 (down)."""

    def __init__(
        self, ch: int, emb_ch: int, out_ch: int, *, cfg: UNetConfig, up: bool = False, down: bool = False
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = cfg.use_scale_shift_norm
        self.use_checkpoint = cfg.use_checkpoint
        self.in_layers = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        # Resampling without conv has no parameters, so the key layout is unchanged.
        if up:
            self.h_upd, self.x_upd = Upsample(ch, use_conv=False), Upsample(ch, use_conv=False)
        elif down:
            self.h_upd, self.x_upd = Downsample(ch, use_conv=False), Downsample(ch, use_conv=False)
        emb_out = 2 * out_ch if cfg.use_scale_shift_norm else out_ch
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_ch), nn.SiLU(), nn.Dropout(cfg.dropout), _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers  # unpacked: slicing a Sequential builds a new module per call
        h = act(norm(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, act, drop, conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + e)
        return self.skip_connection(x) + conv(drop(act(h)))


def qkv_attention(qkv: Tensor, heads: int, *, legacy: bool) -> Tensor:
    """(B, 3·H·C, T) -> (B, H·C, T) softmax(qᵀk/√C)·v per head.

    legacy: rows are head-major [q_h, k_h, v_h]; otherwise [q (all heads), k, v]. Every precision runs
    SDPA on 4-D (batch, heads, tokens, channels) tensors with unit-stride channels, the layout its fused
    kernels take (flash / memory-efficient on CUDA, flash on CPU); they keep the softmax in float32 for
    half/bfloat16 inputs, as the reference's explicit float32 softmax does.
    """
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    tokens = qkv.transpose(1, 2).contiguous()  # (B, T, 3·H·C): channels innermost
    split = tokens.view(b, t, heads, 3, ch) if legacy else tokens.view(b, t, 3, heads, ch).transpose(2, 3)
    q, k, v = (split[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, C)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C)
    return out.permute(0, 1, 3, 2).reshape(b, heads * ch, t)


class AttentionBlock(nn.Module):
    """(B, C, H, W) -> same: x + proj_out(attention(qkv(GN(x)))) over the H·W tokens."""

    def __init__(self, channels: int, *, heads: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.heads = heads
        self.legacy = not cfg.use_new_attention_order
        self.use_checkpoint = cfg.use_checkpoint
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(x)), self.heads, legacy=self.legacy))
        return (x + h).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the ResBlocks it holds."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _heads(channels: int, num_heads: int, head_channels: int) -> int:
    if head_channels == -1:
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        return num_heads
    if channels % head_channels:
        raise ValueError(f"{channels} channels are not a multiple of num_head_channels={head_channels}")
    return channels // head_channels


class DifFaceUNet(nn.Module):
    """DifFace/guided-diffusion UNet: x (B, C_in, H, W), t (B,) original timesteps -> (B, C_out, H, W)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        cfg = self.config = config
        mc = cfg.model_channels
        emb_ch = 4 * mc
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        # Non-persistent: the checkpoint has no buffers; `.double()` keeps the float32 values.
        self.register_buffer("freqs", reference_frequencies(mc // 2), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def attn(ch: int, num_heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads=_heads(ch, num_heads, cfg.num_head_channels), cfg=cfg)

        def res(ch: int, out_ch: int, **kw: bool) -> ResBlock:
            return ResBlock(ch, emb_ch, out_ch, cfg=cfg, **kw)

        # `ds` is DifFace's downsampling counter: it starts at image_size and halves per level.
        ds, ch = cfg.image_size, mc
        blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
        skip_chans = [ch]
        last = len(cfg.channel_mult) - 1
        for level, (mult, n_res) in enumerate(zip(cfg.channel_mult, cfg.res_blocks_per_level, strict=True)):
            for _ in range(n_res):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch, cfg.num_heads))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                down = (
                    res(ch, ch, down=True)
                    if cfg.resblock_updown
                    else Downsample(ch, use_conv=cfg.conv_resample)
                )
                blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds //= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, cfg.num_heads), res(ch, ch))

        blocks = []
        for level in range(last, -1, -1):
            mult, n_res = cfg.channel_mult[level], cfg.res_blocks_per_level[level]
            for i in range(n_res + 1):
                layers = [res(ch + skip_chans.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == n_res:
                    up = (
                        res(ch, ch, up=True)
                        if cfg.resblock_updown
                        else Upsample(ch, use_conv=cfg.conv_resample)
                    )
                    layers.append(up)
                    ds *= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def reset_frequencies(self) -> None:
        """Refill the non-persistent `freqs` buffer; needed after `to_empty()` (meta-device init)."""
        freqs = reference_frequencies(self.config.model_channels // 2)
        self.freqs = freqs.to(device=self.freqs.device, dtype=self.freqs.dtype)

    def embed_timesteps(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, 4·model_channels) `time_embed(sinusoid(t))`."""
        freqs = self.freqs
        if freqs.dtype in _REDUCED:  # `.half()` rounded them; t·f would be off by up to ~0.5 rad
            freqs = reference_frequencies(self.config.model_channels // 2).to(freqs.device)
        sinusoid = timestep_sinusoid(t, freqs, self.config.model_channels)
        return self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, C_in, H, W), t (B,) original timesteps 0…999 -> (B, out_channels, H, W) in x's dtype.

        H and W must be multiples of 2**(levels-1). With `use_fp16` the blocks run under float16
        autocast and the head in x's dtype, like the reference's `convert_to_fp16` path.
        """
        self._check_inputs(x, t)
        emb = self.embed_timesteps(t)
        # Never enter a disabled autocast here: that would switch off a caller's own autocast.
        fp16 = torch.autocast(x.device.type, dtype=torch.float16) if self.config.use_fp16 else nullcontext()
        with fp16:
            h, skips = x, []
            for block in self.input_blocks:
                h = block(h, emb)
                skips.append(h)
            h = self.middle_block(h, emb)
            for block in self.output_blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if self.config.use_fp16:
            h = h.to(x.dtype)
        return self.out(h).to(x.dtype)

    def _check_inputs(self, x: Tensor, t: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be multiples of {factor}, got {tuple(x.shape[2:])}")


def build_unet(params: Mapping[str, Any]) -> DifFaceUNet:
    """DifFaceUNet from DifFace YAML `model.params`."""
    return DifFaceUNet(UNetConfig.from_params(params))
