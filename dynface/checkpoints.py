"""Reading checkpoint files (local or fsspec URI) into plain state dicts, safely."""

from __future__ import annotations

import hashlib
import io

import fsspec
import torch
from torch import Tensor

# SwinIR checkpoints carry these deterministic buffers; our SwinIR registers the same persistent
# buffers, so they load strictly. `drop_swinir_buffers` removes them for implementations that do not.
SWINIR_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")


class ChecksumError(ValueError):
    """A weight file's sha256 differs from the one its manifest pins."""


def read_bytes(path_or_uri: str) -> bytes:
    with fsspec.open(str(path_or_uri), "rb") as f:
        return f.read()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(path_or_uri: str, *, block: int = 1 << 22) -> str:
    """sha256 hex of a file (local or fsspec URI), streamed in 4 MiB blocks."""
    digest = hashlib.sha256()
    with fsspec.open(str(path_or_uri), "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path_or_uri: str, *, sha256: str | None = None) -> dict[str, Tensor]:
    """Load a checkpoint as `{name: tensor}`, ready for `load_state_dict(strict=True)`.

    Accepts `.safetensors` files and torch pickles (read with `weights_only=True`). Unwraps a
    top-level `state_dict` (or `params_ema`/`params`, as BasicSR saves) and strips a leading
    `module.` from every key, as DataParallel-saved DifFace checkpoints carry it.
    """
    data = read_bytes(path_or_uri)
    if sha256 is not None and sha256_hex(data) != sha256.lower():
        raise ChecksumError(
            f"{path_or_uri}: sha256 {sha256_hex(data)} does not match the manifest's {sha256}"
        )
    if str(path_or_uri).endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        raw: object = load_safetensors(data)
    else:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path_or_uri}: expected a dict of tensors, got {type(raw).__name__}")
    for wrapper in ("state_dict", "params_ema", "params"):
        if wrapper in raw and isinstance(raw[wrapper], dict):
            raw = raw[wrapper]
            break
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{path_or_uri}: entry {key!r} is not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def drop_swinir_buffers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without SwinIR's derived buffers (they are rebuilt from window and grid size)."""
    return {k: v for k, v in state.items() if not k.endswith(SWINIR_BUFFER_SUFFIXES)}
