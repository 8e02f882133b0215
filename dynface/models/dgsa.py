"""DGSA: the Dynamic Guidance Scaling Adjuster, a 3-layer CNN giving a per-pixel guidance scale.

[choice] of spec §3.13: input concat[ý (3), x0_t (3), t/T map (1)] = 7 channels,
Conv3×3(7→h)–ReLU–Conv3×3(h→h)–ReLU–Conv3×3(h→1)–sigmoid, output A_t (B, 1, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DGSAConfig:
    hidden: int = 64
    num_timesteps: int = 1000
    init_bias: float = 2.0  # sigmoid(2) ≈ 0.88: an untrained DGSA starts close to global guidance

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DGSAConfig:
        unknown = set(params) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DGSA config keys: {sorted(unknown)}")
        return cls(**params)

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


class DGSA(nn.Module):
    def __init__(self, config: DGSAConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.net = nn.Sequential(
            nn.Conv2d(7, h, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(h, 1, 3, padding=1),
        )
        with torch.no_grad():
            last = self.net[-1]
            last.weight.mul_(0.1)
            last.bias.fill_(config.init_bias)

    def forward(self, target: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """target ý and x0_t (B, 3, H, W) in [-1, 1]; t (B,) original timesteps -> A_t (B, 1, H, W)."""
        b, _, h, w = x0.shape
        t_map = (t.to(x0.dtype) / self.config.num_timesteps).view(b, 1, 1, 1).expand(b, 1, h, w)
        return torch.sigmoid(self.net(torch.cat([target, x0, t_map], dim=1)))


def build_dgsa(params: Mapping[str, Any]) -> DGSA:
    return DGSA(DGSAConfig.from_params(params))
