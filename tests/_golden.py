"""Helpers for the golden vectors shipped in tests/golden (copied from the project's shared golden set;
section numbers refer to the shared set's README, see tests/golden/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

# Tier B (float32 strict) of the golden README, section 7.
TIER_B = (2e-5, 1e-5)
# Tier A (float64).
TIER_A = (1e-9, 1e-9)


def rule_weight(i: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Closed-form weight rule v1 of the golden README, section 3."""
    n = int(np.prod(shape)) if len(shape) else 1
    k = np.arange(n, dtype=np.float64)
    z = np.sin((k + 1.0) * 12.9898 + float(i + 1) * 78.233) * 43758.5453
    u = z - np.floor(z)
    if len(shape) == 1:
        w = 1.0 + (u - 0.5) * 0.2 if name.endswith(".weight") else (u - 0.5) * 0.2
    else:
        scale = 1.0 / math.sqrt(int(np.prod(shape[1:]))) if name.endswith(".weight") else 0.02
        w = (u - 0.5) * math.sqrt(12.0) * scale
    return w.reshape(shape).astype(np.float32)


def load_manifest(golden_dir: Path, case: str) -> list[dict]:
    """Manifest entries of a key file, in state_dict order."""
    data = json.loads((golden_dir / f"{case}_keys.json").read_text())
    return data["entries"]


def fill_by_rule(model: nn.Module, entries: list[dict]) -> None:
    """Assign rule weights to every parameter named in the manifest, checking names and shapes."""
    params = dict(model.named_parameters())
    wanted = [e for e in entries if e["kind"] == "parameter"]
    assert sorted(params) == sorted(e["name"] for e in wanted), "parameter names differ from the manifest"
    with torch.no_grad():
        for e in wanted:
            p = params[e["name"]]
            assert tuple(p.shape) == tuple(e["shape"]), e["name"]
            p.copy_(torch.from_numpy(rule_weight(e["param_index"], e["name"], tuple(e["shape"]))))


def load_expected(golden_dir: Path, case: str) -> np.ndarray:
    """The reference output of a case as float64: the float64 file where a float64 test needs it, else
    its float32 rounding (tests/golden/README.md)."""
    f64, f32 = golden_dir / f"{case}_expected_f64.npy", golden_dir / f"{case}_expected_f32.npy"
    if f64.is_file():
        return np.load(f64)
    return np.load(f32).astype(np.float64)


def assert_close_tier(y: np.ndarray, expected: np.ndarray, tier: tuple[float, float]) -> None:
    r_max, r_l2 = tier
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == expected.shape
    d = np.abs(y - expected)
    max_ratio = d.max() / np.abs(expected).max()
    l2_ratio = np.linalg.norm(y - expected) / np.linalg.norm(expected)
    assert max_ratio <= r_max and l2_ratio <= r_l2, f"max ratio {max_ratio:.3e}, rel-L2 {l2_ratio:.3e}"
