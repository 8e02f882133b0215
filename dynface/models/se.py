"""The SE network of DBLM: a Transfer Model (TM, a SwinIR) followed by the Std Estimator (SDE).

SDE is a small ResNet-style regressor ([choice] of spec §3.9): it looks at an image that is (ideally)
a clean face blurred by an isotropic Gaussian and returns that Gaussian's std in pixels of the working
resolution. The output is squashed into the configured [std_min, std_max] range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SDEConfig:
    """Std estimator hyper-parameters; `input_size` is the side the image is resized to first."""

    in_channels: int = 3
    width: int = 32
    num_stages: int = 4
    input_size: int = 256
    std_min: float = 1.0
    std_max: float = 15.0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SDEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown SDE config keys: {sorted(unknown)}")
        config = cls(**params)
        if not 0 < config.std_min < config.std_max:
            raise ValueError("SDE needs 0 < std_min < std_max")
        return config

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


class _ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.skip(x))


class StdEstimatorNet(nn.Module):
    """SDE: (B, 3, H, W) image in [0, 1] -> (B,) Gaussian std in pixels of the input's resolution."""

    def __init__(self, config: SDEConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Conv2d(config.in_channels, w, 3, padding=1)
        stages = []
        c = w
        for i in range(config.num_stages):
            c_out = w * 2 ** min(i, 3)
            stages.append(_ResidualBlock(c, c_out, stride=1 if i == 0 else 2))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = self.config.input_size
        # TM's output arrives channels-last (SwinIR's final convs); with it, this CPU torch build crashes
        # (segfault / double free) in the backward of the small stem at width 8. Contiguous is cheap here.
        x = x.contiguous()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        h = self.stages(F.relu(self.stem(x * 2 - 1)))
        z = self.head(h.mean(dim=(2, 3))).squeeze(1)
        lo, hi = self.config.std_min, self.config.std_max
        return lo + (hi - lo) * torch.sigmoid(z)


class StdEstimator(nn.Module):
    """SE = TM + SDE: degraded face y (B, 3, H, W) in [0, 1] -> std* (B,).

    `transfer` maps y to an estimate of k_{std*} ⊛ x0 (an image the SDE was trained on); without one
    the SDE reads y directly.
    """

    def __init__(self, sde: StdEstimatorNet, transfer: nn.Module | None = None) -> None:
        super().__init__()
        self.sde = sde
        self.transfer = transfer

    def forward(self, y: Tensor) -> Tensor:
        z = y if self.transfer is None else self.transfer(y).clamp(0, 1)
        return self.sde(z)


def build_sde(params: Mapping[str, Any]) -> StdEstimatorNet:
    return StdEstimatorNet(SDEConfig.from_params(params))
