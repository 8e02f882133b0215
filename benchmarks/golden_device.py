"""Golden forward checks of the UNet and SwinIR on any device (TF32 off), printing the tier ratios.

Reads the golden vectors shipped in tests/golden, so it runs on a machine that has only the repository.
The small cases load the released-format checkpoints; `--full` adds the full-size networks (the
released configs with rule weights: the 160 M-parameter UNet at 128 px and SwinIR at 128 px).

python benchmarks/golden_device.py --device cuda --full
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _golden import GOLDEN_DIR, TIER_B, fill_by_rule, load_expected, load_manifest  # noqa: E402

from dynface.checkpoints import load_state_dict  # noqa: E402
from dynface.models.swinir import build_swinir  # noqa: E402
from dynface.models.unet import build_unet  # noqa: E402

# case -> (config's case, network builder, checkpoint file or None for rule weights, has timesteps)
CASES = {
    "unet_small": ("unet_small", build_unet, "unet_small_ckpt.pth", True),
    "swinir_small": ("swinir_small", build_swinir, "swinir_small_ckpt.pth", False),
    "unet_ffhq512_128": ("unet_ffhq512", build_unet, None, True),
    "swinir_face512": ("swinir_face512", build_swinir, None, False),
}
SMALL, FULL = ("unet_small", "swinir_small"), ("unet_ffhq512_128", "swinir_face512")


def ratios(y: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    return float(np.abs(y - e).max() / np.abs(e).max()), float(np.linalg.norm(y - e) / np.linalg.norm(e))


def run_case(case: str, device: torch.device) -> tuple[float, float]:
    """(max ratio, rel-L2) of the case's forward on `device` against the reference output."""
    config_case, build, checkpoint, has_t = CASES[case]
    g = GOLDEN_DIR
    config = json.loads((g / f"{config_case}_keys.json").read_text())["config"]
    if checkpoint is not None:
        model = build(config)
        model.load_state_dict(load_state_dict(str(g / checkpoint)), strict=True)
    elif build is build_unet:  # 160 M parameters: skip their default init, the rule overwrites them
        with torch.device("meta"):
            model = build(config)
        model.to_empty(device="cpu")
        model.reset_frequencies()
        fill_by_rule(model, load_manifest(g, config_case))
    else:  # SwinIR computes its buffers at construction
        model = build(config)
        fill_by_rule(model, load_manifest(g, config_case))
    model = model.to(device).eval()
    x = torch.from_numpy(np.load(g / f"{case}_x.npy")).to(device)
    with torch.no_grad():
        y = model(x, torch.from_numpy(np.load(g / f"{case}_t.npy")).to(device)) if has_t else model(x)
    return ratios(y.double().cpu().numpy(), load_expected(g, case))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="also the full-size networks (rule weights)")
    args = p.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    for case in SMALL + (FULL if args.full else ()):
        t0 = time.perf_counter()
        r_max, r_l2 = run_case(case, torch.device(args.device))
        passed = r_max <= TIER_B[0] and r_l2 <= TIER_B[1]
        ok &= passed
        verdict = "tier B ok" if passed else "FAIL"
        took = time.perf_counter() - t0
        print(f"{case:<17} {args.device}: max ratio {r_max:.2e}, rel-L2 {r_l2:.2e}: {verdict} ({took:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
