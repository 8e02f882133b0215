"""DifFace-compatible SwinIR: the restorer RM and the transfer model TM (spec §4.5).

An independent implementation of the SwinIR face restorer of DifFace (models/swinir.py at 5c9ab80)
with the same state_dict: parameter names, shapes and order, plus the persistent buffers
`relative_position_index` (every block) and `attn_mask` (shifted blocks), so the released
`swinir_restoration512_L1.pth` / `General_Face_ffhq512.pth` load with `strict=True`.

Supported: `upsampler='nearest+conv'` with `unshuffle=True`, `unshuffle_scale == sf` in {2, 4, 8}
(the input is pixel-unshuffled by sf, so the output has the input's size), `resi_connection='1conv'`,
`ape=False`, `patch_size=1`. Other reference options raise NotImplementedError.

`image_residual=True` (a DynFace extension, off for the released checkpoints) adds the input image to
the output, as SwinIR does for its denoising/JPEG models, and starts training from the identity.

Differences from the reference, both only where the reference cannot run or is undefined:
* Inputs whose H, W are not multiples of `sf * window` are reflect-padded at the bottom/right up to
  the next multiple, run, and the output is cropped back (the reference fails in the window
  partition there). Padding larger than the image repeats the reflection periodically.
* Stochastic depth (drop_path) is implemented here; it is the identity in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # stored as float32, as the reference does
MASK_VALUE = -100.0  # logit offset between tokens of different regions in a shifted window
NUM_FEAT = 64  # channels of the reference's upsampling tail
SUPPORTED_SF = (2, 4, 8)


@dataclass(frozen=True)
class SwinIRConfig:
    """SwinIR hyper-parameters under DifFace's `model_ir.params` keyword names."""

    img_size: int = 64  # token-grid size (after pixel-unshuffle) the stored attn_mask is built for
    patch_size: int = 1
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    use_checkpoint: bool = False
    sf: int = 4
    img_range: float = 1.0
    upsampler: str = ""
    resi_connection: str = "1conv"
    unshuffle: bool = False
    unshuffle_scale: int | None = None
    # DynFace extension, not a DifFace key: output = input + tail (no mean add-back), with conv_last
    # zero-initialised so an untrained net is the identity. For small restorers trained briefly
    # (the starter pack), which otherwise start far below the identity. Released checkpoints: False.
    image_residual: bool = False

    def __post_init__(self) -> None:
        # YAML gives lists and ints; normalise to the declared types so configs compare and hash.
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        object.__setattr__(self, "img_range", float(self.img_range))
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size", "sf"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SwinIRConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads}: non-empty, same length")
        if min(self.depths) < 1 or min(self.num_heads) < 1:
            raise ValueError("depths and num_heads entries must be >= 1")
        if any(self.embed_dim % h for h in self.num_heads):
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by every num_heads entry")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SwinIRConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.img_range <= 0 or self.mlp_ratio <= 0:
            raise ValueError("img_range and mlp_ratio must be > 0")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SwinIRConfig:
        """Config from DifFace's `model_ir.params` mapping; unknown keys raise ValueError."""
        unknown = sorted(set(params) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown SwinIR params: {unknown}")
        return cls(**params)

    def to_params(self) -> dict[str, Any]:
        """Plain (YAML/JSON-friendly) mapping; `from_params(to_params())` gives back this config."""
        out = asdict(self)
        out["depths"], out["num_heads"] = list(self.depths), list(self.num_heads)
        return out

    @property
    def window(self) -> int:
        """Window the blocks use: the reference shrinks it to img_size when img_size <= window_size."""
        return min(self.window_size, self.img_size)

    @property
    def shift(self) -> int:
        """Cyclic shift of odd blocks; 0 (no shifted blocks) when one window covers img_size."""
        return 0 if self.img_size <= self.window_size else self.window_size // 2

    @property
    def pad_multiple(self) -> int:
        """Input H and W are padded up to a multiple of this (unshuffle factor times window)."""
        return self.sf * self.window


# The released face restorer (spec §4.5, golden README §2.2).
FACE512 = SwinIRConfig(
    img_size=64, embed_dim=180, depths=(6,) * 8, num_heads=(6,) * 8, window_size=8, mlp_ratio=2.0,
    sf=8, upsampler="nearest+conv", resi_connection="1conv", unshuffle=True, unshuffle_scale=8,
)  # fmt: skip


def small_params(
    resolution: int, *, embed_dim: int, depths: tuple[int, ...], num_heads: int, image_residual: bool = False
) -> dict[str, Any]:
    """`model_ir.params` of a small same-size SwinIR at `resolution` (a multiple of 32): pixel-unshuffle
    by 4 in, nearest+conv ×4 out, window 8; the shape our starter and test packs use."""
    if resolution % 32:
        raise ValueError("a small SwinIR needs a resolution that is a multiple of 32")
    return {
        "img_size": resolution // 4,
        "patch_size": 1,
        "in_chans": 3,
        "embed_dim": embed_dim,
        "depths": list(depths),
        "num_heads": [num_heads] * len(depths),
        "window_size": 8,
        "mlp_ratio": 2,
        "sf": 4,
        "img_range": 1.0,
        "upsampler": "nearest+conv",
        "resi_connection": "1conv",
        "unshuffle": True,
        "unshuffle_scale": 4,
        "image_residual": image_residual,
    }


def _check_supported(cfg: SwinIRConfig) -> None:
    if cfg.upsampler != "nearest+conv":
        raise NotImplementedError(f"SwinIR upsampler {cfg.upsampler!r}: only 'nearest+conv' is implemented")
    if not cfg.unshuffle or cfg.unshuffle_scale != cfg.sf:
        raise NotImplementedError("SwinIR needs unshuffle=True with unshuffle_scale == sf (same-size output)")
    if cfg.sf not in SUPPORTED_SF:
        raise NotImplementedError(f"SwinIR sf={cfg.sf}: supported {SUPPORTED_SF}")
    if cfg.resi_connection != "1conv":
        raise NotImplementedError(f"SwinIR resi_connection {cfg.resi_connection!r}: only '1conv'")
    if cfg.ape or cfg.patch_size != 1:
        raise NotImplementedError("SwinIR: ape=True and patch_size != 1 are not implemented")


# ---------------------------------------------------------------------------------------------
# Pure helpers


def relative_position_index(window: int) -> Tensor:
    """(N, N) int64 with N = window²: row of the bias table for each (query, key) token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # (2, N), row-major tokens
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B·nW, window², C); windows row-major within each batch element."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B·nW, window², C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, *, device: Any = None) -> Tensor:
    """(nW, N, N) float32 additive mask of the shifted blocks for an h×w token grid.

    After the cyclic shift by -shift, each window may hold tokens from up to 3×3 regions of the
    un-shifted image; pairs from different regions get MASK_VALUE, others 0.
    """
    if not 0 < shift < window or h % window or w % window:
        raise ValueError(
            f"grid {h}x{w} must be multiples of window {window}; need 0 < shift {shift} < window"
        )

    def regions(n: int) -> Tensor:
        r = torch.zeros(n, dtype=torch.int64, device=device)
        r[n - window :] = 1
        r[n - shift :] = 2
        return r

    labels = regions(h)[:, None] * 3 + regions(w)[None, :]
    lw = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (nW, N)
    differ = lw[:, None, :] != lw[:, :, None]
    return torch.where(differ, MASK_VALUE, 0.0).to(torch.float32)


def reflect_pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """(B, C, H, W) reflect-padded at the bottom/right to multiples of `multiple`.

    Equals `F.pad(..., mode='reflect')` where that works (pad < size); longer pads keep reflecting
    (period 2·(n−1)), so any input size is accepted.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x

    def indices(n: int, total: int) -> Tensor:
        i = torch.arange(total, device=x.device)
        if n == 1:
            return torch.zeros_like(i)
        m = i % (2 * (n - 1))
        return torch.where(m < n, m, 2 * (n - 1) - m)

    return x.index_select(-2, indices(h, h + ph)).index_select(-1, indices(w, w + pw))


# ---------------------------------------------------------------------------------------------
# Modules (attribute names and registration order fix the state_dict keys and order)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability p (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, cfg: SwinIRConfig, heads: int) -> None:
        super().__init__()
        dim, window = cfg.embed_dim, cfg.window
        self.heads = heads
        self.scale = cfg.qk_scale or (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        self.attn_drop = nn.Dropout(cfg.attn_drop_rate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) additive or None -> (B·nW, N, C)."""
        bw, n, c = x.shape
        # q/k/v-major layout (3, heads, head_dim), as in the checkpoint's qkv weight rows.
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B·nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(bw, self.heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP block on (B, L, C) tokens."""

    def __init__(self, cfg: SwinIRConfig, heads: int, *, shifted: bool, drop_path: float) -> None:
        super().__init__()
        self.window = cfg.window
        self.shift = cfg.shift if shifted else 0
        self.grid = (cfg.img_size, cfg.img_size)
        if self.shift:
            # Registered before the children, so it precedes norm1 in the state_dict as in the reference.
            mask = shifted_window_mask(cfg.img_size, cfg.img_size, self.window, self.shift)
            self.register_buffer("attn_mask", mask)
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = WindowAttention(cfg, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.drop_rate)

    def forward(self, x: Tensor, grid: tuple[int, int], grid_mask: Tensor | None) -> Tensor:
        """x: (B, H·W, C) on an H×W grid; grid_mask: shifted-window mask for grids != img_size."""
        h, w = grid
        b, length, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self.attn_mask if grid == self.grid else grid_mask
        y = window_merge(self.attn(window_partition(y, self.window), mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, length, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlockGroup(nn.Module):
    """The `residual_group` of an RSTB: its Swin blocks, alternating plain and shifted."""

    def __init__(self, cfg: SwinIRConfig, heads: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.use_checkpoint = cfg.use_checkpoint
        blocks = [SwinBlock(cfg, heads, shifted=j % 2 == 1, drop_path=p) for j, p in enumerate(drop_paths)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, grid: tuple[int, int], grid_mask: Tensor | None) -> Tensor:
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, grid, grid_mask, use_reentrant=False)
            else:
                x = block(x, grid, grid_mask)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer block: blocks, then a 3×3 conv on the map, plus the input."""

    def __init__(self, cfg: SwinIRConfig, heads: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.residual_group = BlockGroup(cfg, heads, drop_paths)
        self.conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, 1, 1)

    def forward(self, x: Tensor, grid: tuple[int, int], grid_mask: Tensor | None) -> Tensor:
        y = _tokens_to_map(self.residual_group(x, grid, grid_mask), grid)
        return _map_to_tokens(self.conv(y)) + x


class TokenNorm(nn.Module):
    """`patch_embed` of the reference with patch_size 1: just the LayerNorm (or none)."""

    def __init__(self, dim: int, enabled: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if enabled else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


def _map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H·W, C)."""
    return x.flatten(2).transpose(1, 2)


def _tokens_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H·W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


class SwinIR(nn.Module):
    """SwinIR with pixel-unshuffle input and nearest+conv upsampling: same-size image restoration."""

    config: SwinIRConfig

    def __init__(self, config: SwinIRConfig) -> None:
        super().__init__()
        _check_supported(config)
        self.config = cfg = config
        s, dim = cfg.sf, cfg.embed_dim
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(s), nn.Conv2d(cfg.in_chans * s * s, dim, 3, 1, 1))
        self.patch_embed = TokenNorm(dim, cfg.patch_norm)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # Per-block stochastic depth rates rise linearly over all blocks, as in the reference.
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList(
            RSTB(cfg, heads, rates[a : a + d])
            for a, d, heads in zip(starts, cfg.depths, cfg.num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(0.01))
        self.num_up = int(math.log2(s))
        for i in range(1, self.num_up + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1))
        self.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        self.conv_last = nn.Conv2d(NUM_FEAT, cfg.in_chans, 3, 1, 1)
        mean = torch.tensor(RGB_MEAN if cfg.in_chans == 3 else (0.0,), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.apply(_init_weights)
        if cfg.image_residual:
            nn.init.zeros_(self.conv_last.weight)
            nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) image in [0, 1] -> (B, C, H, W) restored image, not clamped."""
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        x = reflect_pad_to_multiple(x, self.config.pad_multiple)
        mean = self.mean.to(x.dtype)
        feat = self.conv_first((x - mean) * self.config.img_range)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        y = self.conv_before_upsample(feat)
        for i in range(1, self.num_up + 1):
            conv = getattr(self, f"conv_up{i}")
            y = F.leaky_relu(conv(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
        y = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        base = x if self.config.image_residual else mean
        return (y / self.config.img_range + base)[..., :h, :w]

    def forward_features(self, feat: Tensor) -> Tensor:
        """(B, embed_dim, h, w) map after conv_first -> same shape after the RSTBs and `norm`."""
        cfg = self.config
        grid = (feat.shape[-2], feat.shape[-1])
        grid_mask = None
        if cfg.shift and grid != (cfg.img_size, cfg.img_size):
            # The stored masks only fit the img_size grid; build one for this grid, shared by all blocks.
            grid_mask = shifted_window_mask(*grid, cfg.window, cfg.shift, device=feat.device)
        x = self.pos_drop(self.patch_embed(_map_to_tokens(feat)))
        for layer in self.layers:
            x = layer(x, grid, grid_mask)
        return _tokens_to_map(self.norm(x), grid)


def _init_weights(m: nn.Module) -> None:
    """The reference's training init: truncated normal (std 0.02) linears and bias tables."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


def build_swinir(params: Mapping[str, Any]) -> SwinIR:
    """SwinIR from DifFace's `model_ir.params` mapping."""
    return SwinIR(SwinIRConfig.from_params(params))
