"""Per-step time and peak memory of the guided sampler with the full DifFace networks (random weights).

For `dps` and `closed_form` guidance, at batch 1 and at the largest batch that fits the memory budget,
prints seconds per step, seconds per step per face, peak memory, and the ratio against closed_form at
batch 1 measured in the same run. Every point runs in a fresh process so CPU peak memory (peak RSS)
is exact. CPU by default here; on a GPU machine pass --device cuda (see DEVELOPERS.md).

    python benchmarks/sampler_step.py                        # 512 px, 2 timed steps per point
    python benchmarks/sampler_step.py --resolution 128 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from dynface.core.diffusion import Diffusion
from dynface.core.guidance import GuidanceTargets
from dynface.core.memory import PeakMemory, available_bytes, batch_size_for_budget, measure_in_subprocess
from dynface.core.sampler import SampleBatch, SamplerConfig, sample
from dynface.models.dgsa import build_dgsa
from dynface.models.unet import build_unet
from dynface.packs.manifest import read_manifest


def make_batch(
    b: int, resolution: int, n_steps: int, diffusion: Diffusion, device: torch.device
) -> SampleBatch:
    g = torch.Generator().manual_seed(b)
    target = (torch.rand(b, 1, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
    t_start = int(diffusion.timestep_map[n_steps - 1])  # exactly n_steps model evaluations
    targets = GuidanceTargets(
        targets=target,
        stds=torch.full((b, 1), 6.0 * resolution / 512, device=device),
        t_starts=torch.full((b, 1), t_start, dtype=torch.long, device=device),
        valid=torch.ones(b, 1, dtype=torch.bool, device=device),
        weights=torch.ones(b, 1, device=device),
    )
    return SampleBatch(
        init=target[:, 0],
        t_start=torch.full((b,), t_start, dtype=torch.long),
        eta=torch.full((b,), 0.6, device=device),
        seeds=list(range(b)),
        targets=targets,
    )


def measure_point(
    mode: str, b: int, n_steps: int, resolution: int, device_name: str, precision: str
) -> tuple:
    """(seconds per step, peak bytes) of `n_steps` sampler steps at batch b, after one warm-up step."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # The DifFace prior exactly (image_size stays 512: it fixes where attention sits, not the input size).
    prior = build_unet(read_manifest("difface").components["prior"].config).to(device).eval()
    prior.requires_grad_(False)
    dgsa = build_dgsa({}).to(device).eval().requires_grad_(False)
    diffusion = Diffusion.create("ddim250")
    cfg = SamplerConfig(mode=mode, respacing="ddim250", precision=precision)

    def run(steps: int) -> float:
        batch = make_batch(b, resolution, steps, diffusion, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample(prior, diffusion, batch, cfg, dgsa=dgsa, std_range=(0.1, 100.0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if device.type == "cuda":
        run(1)  # warm-up: cuDNN autotuning and allocator growth; on CPU it would hide the RSS peak
    with PeakMemory(device) as pm:
        seconds = run(n_steps)
    return seconds / n_steps, pm.peak_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="timed sampler steps per point")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=64, help="cap on the largest batch")
    p.add_argument("--budget-gb", type=float, default=None, help="memory budget (default: 80%% of free)")
    args = p.parse_args(argv)
    budget = int(args.budget_gb * 2**30) if args.budget_gb else int(0.8 * available_bytes(args.device))
    print(f"device {args.device}, resolution {args.resolution}, precision {args.precision}")
    print(f"torch threads {torch.get_num_threads()}, memory budget {budget / 2**30:.1f} GiB\n")

    def point(mode: str, b: int, steps: int) -> tuple:
        return measure_in_subprocess(
            measure_point, mode, b, steps, args.resolution, args.device, args.precision
        )

    rows = []
    for mode in ("closed_form", "dps"):
        s1, m1 = point(mode, 1, args.steps)
        _, m2 = point(mode, 2, 1)
        est = batch_size_for_budget(m1, m2, budget, max_batch=args.max_batch)
        rows.append((mode, 1, s1, s1, m1))
        print(f"{mode}: {est.bytes_per_sample / 2**20:.0f} MiB per face -> largest batch {est.batch_size}")
        if est.batch_size > 1:
            sb, mb = point(mode, est.batch_size, args.steps)
            rows.append((mode, est.batch_size, sb, sb / est.batch_size, mb))
    base = rows[0][3]
    print(f"\n{'mode':<12} {'batch':>5} {'s/step':>9} {'s/step/face':>12} {'peak MiB':>9} {'x base':>7}")
    for mode, b, per_step, per_face, peak in rows:
        ratio = per_face / base
        print(f"{mode:<12} {b:>5} {per_step:>9.3f} {per_face:>12.3f} {peak / 2**20:>9.0f} {ratio:>7.2f}")
    print("x base: seconds per step per face relative to closed_form at batch 1 in this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
