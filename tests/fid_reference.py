"""The fixed random weights and inputs behind tests/fixtures/fid_inception_reference.npz.

Both our FID Inception (`dynface.metrics.nets.FIDInceptionV3`) and pytorch-fid's (`scripts/
make_fid_inception_reference.py`, which computed the stored features) load the same state dict made
here from a seeded numpy generator, so the stored features test our network against another
implementation of the published architecture, not against itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

WEIGHT_SEED = 2026
IMAGE_SEED = 11
IMAGE_SHAPE = (2, 64, 64, 3)  # two uint8 RGB images


def random_fid_state(template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deterministic weights for every key of `template` (a state dict), visited in sorted order:
    He-normal convolutions (activations stay alive through ~50 layers), BatchNorm scales near 1, small
    shifts and statistics, a small classifier."""
    rng = np.random.default_rng(WEIGHT_SEED)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(template):
        shape = tuple(template[name].shape)
        if name.endswith("num_batches_tracked"):
            value = np.zeros(shape, dtype=np.int64)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith("running_var"):
            value = 1.0 + 0.2 * rng.random(shape)
        elif name.startswith("fc."):
            value = 0.01 * rng.standard_normal(shape)
        elif name.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # biases and running means
            value = 0.1 * rng.standard_normal(shape)
        dtype = torch.int64 if value.dtype == np.int64 else torch.float32
        state[name] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
    return state


def reference_images() -> np.ndarray:
    """(2, 64, 64, 3) uint8: a smooth gradient face-sized image and its noisy copy."""
    rng = np.random.default_rng(IMAGE_SEED)
    ramp = np.linspace(0, 255, IMAGE_SHAPE[1])
    base = (ramp[:, None, None] * 0.6 + ramp[None, :, None] * 0.4) * np.array([1.0, 0.8, 0.6])
    noisy = base + rng.normal(0, 40, base.shape)
    return np.clip(np.rint(np.stack([base, noisy])), 0, 255).astype(np.uint8)
