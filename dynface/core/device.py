"""The one device resolution: `auto` means CUDA when this process sees a GPU, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """None or "auto" -> cuda when torch sees a GPU, else cpu; an explicit "cuda" without a GPU raises."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but torch sees no GPU")
    return resolved
