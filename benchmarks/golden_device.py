"""Golden forward checks of the UNet and SwinIR on any device (TF32 off), printing the tier ratios.

python benchmarks/golden_device.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _golden import GOLDEN_DIR, load_expected, load_manifest  # noqa: E402

from dynface.checkpoints import load_state_dict  # noqa: E402
from dynface.models.swinir import build_swinir  # noqa: E402
from dynface.models.unet import build_unet  # noqa: E402


def ratios(y: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    return float(np.abs(y - e).max() / np.abs(e).max()), float(np.linalg.norm(y - e) / np.linalg.norm(e))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    g = GOLDEN_DIR  # shipped in the repository: runs on a machine without ../shared
    ok = True
    for case, build, has_t in (("unet_small", build_unet, True), ("swinir_small", build_swinir, False)):
        config = json.loads((g / f"{case}_keys.json").read_text())["config"]
        assert load_manifest(g, case)
        model = build(config)
        model.load_state_dict(load_state_dict(str(g / f"{case}_ckpt.pth")), strict=True)
        model = model.to(args.device).eval()
        x = torch.from_numpy(np.load(g / f"{case}_x.npy")).to(args.device)
        with torch.no_grad():
            if has_t:
                y = model(x, torch.from_numpy(np.load(g / f"{case}_t.npy")).to(args.device))
            else:
                y = model(x)
        r_max, r_l2 = ratios(y.double().cpu().numpy(), load_expected(g, case))
        passed = r_max <= 2e-5 and r_l2 <= 1e-5
        ok &= passed
        verdict = "tier B ok" if passed else "FAIL"
        print(f"{case:<14} {args.device}: max ratio {r_max:.2e}, rel-L2 {r_l2:.2e} -> {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
