"""How the prior runs, as opposed to what it computes: torch.compile, channels-last memory, cuDNN
autotuning and TF32 (options of `RestoreConfig`, measured by `benchmarks/gpu_check.sh`).

None of them changes the method; compile and channels_last change float rounding only (other kernels),
TF32 rounds convolution and matmul inputs to 10 mantissa bits on Ampere and later GPUs (about 1e-3
relative per layer, the golden README's tier D), which is why it is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedOptions:
    compile_mode: str | None = None  # None: eager; else a torch.compile mode
    channels_last: bool = False
    cudnn_benchmark: bool = True  # CUDA only: autotune convolution algorithms per input shape
    tf32: bool = False  # CUDA only: TF32 convolutions and matmuls in float32

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile_mode {self.compile_mode!r}: one of {COMPILE_MODES} or None")


class ChannelsLast(nn.Module):
    """The prior in channels-last memory (NHWC, what tensor-core convolutions read without a transpose);
    inputs are converted on the way in and outputs back to the default layout on the way out."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.prior(x.contiguous(memory_format=torch.channels_last), t).contiguous()


def prepare_prior(prior: nn.Module, options: SpeedOptions) -> nn.Module:
    """The prior as the sampler should call it. Channels-last converts the module's weights in place."""
    if options.channels_last:
        prior = ChannelsLast(prior)
    if options.compile_mode is not None:
        prior = torch.compile(prior, mode=options.compile_mode)
    return prior


def set_backend_flags(device: torch.device, options: SpeedOptions) -> None:
    """Process-wide cuDNN/TF32 switches for a CUDA device (torch has no per-module setting)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = options.tf32
    torch.backends.cuda.matmul.allow_tf32 = options.tf32
