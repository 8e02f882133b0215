"""Step time and peak memory of each `train complete` stage for the DifFace 512 architecture.

Random weights (the official files' shapes: 160 M-parameter UNet, 15.8 M-parameter SwinIR as RM and TM),
the stage configs of `dynface.train.complete_plan.complete_plan` for the `difface` pack. One training
step = forward and backward of the stage's loss (no optimizer update), at batch 1 and 2; the linear
memory model of dynface.core.memory gives the largest batch that fits 80 % of the free memory, and on a
GPU that batch is measured too. CPU points each run in a fresh process (peak RSS never goes down).

    python benchmarks/train_complete_step.py [--device cuda] [--stages sde,se,dgsa] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from dynface.core.diffusion import linear_betas
from dynface.core.dsst import build_dsst_table
from dynface.core.memory import PeakMemory, available_bytes, batch_size_for_budget, measure_in_subprocess
from dynface.models.se import StdEstimator, build_sde
from dynface.models.swinir import build_swinir
from dynface.models.unet import build_unet
from dynface.packs.manifest import read_manifest
from dynface.packs.writer import power_law_psd
from dynface.train.chain import transfer_model
from dynface.train.complete_plan import CompletePlan, complete_plan, memory_for
from dynface.train.dgsa import FrozenNets
from dynface.train.fresh_stages import dgsa_step_peak
from dynface.train.sde import sde_loss
from dynface.train.se import restored_psnr, se_loss, std_grid, std_star

STAGES = ("sde", "se", "dgsa")


def _plan(device: str, precision: str | None, checkpointing: bool, mode: str | None) -> CompletePlan:
    manifest = read_manifest("difface")
    plan = complete_plan(manifest, memory=memory_for(device, precision, checkpointing=checkpointing))
    return replace(plan, dgsa=replace(plan.dgsa, mode=mode)) if mode else plan


def _timed(device: str, step: Any) -> tuple[float, float]:
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return float(peak.peak_bytes), seconds


def measure(stage: str, batch: int, device: str, options: dict[str, Any]) -> tuple[float, float]:
    """(peak bytes, seconds) of one training step of `stage` at `batch` (top level: runs in a subprocess)."""
    torch.set_num_threads(options["threads"])
    torch.manual_seed(0)
    plan = _plan(device, options["precision"], options["checkpointing"], options["mode"])
    configs = {name: spec.config for name, spec in read_manifest("difface").components.items()}
    res = plan.resolution
    gt = torch.rand(batch, 3, res, res, device=device)
    lq = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    if stage == "sde":
        sde = build_sde(plan.sde.sde).to(device)
        std = torch.full((batch,), 5.0, device=device)
        return _timed(device, lambda: sde_loss(sde, gt, std)["loss"].backward())
    rm = build_swinir(configs["rm"]).to(device).eval().requires_grad_(False)
    se = StdEstimator(build_sde(plan.sde.sde), transfer_model(rm, configs["rm"])).to(device)
    if stage == "se":
        grid = std_grid(plan.std_range, plan.se.grid_size).to(device)

        def se_step() -> None:
            star = std_star(restored_psnr(rm, lq, gt, grid), grid, 30.0)
            se_loss(se, lq, gt, star, plan.se.std_weight)["loss"].backward()

        return _timed(device, se_step)
    prior = build_unet(configs["prior"]).to(device)
    alphas = np.cumprod(1.0 - linear_betas())
    dsst = build_dsst_table(
        power_law_psd(res), alphas, resolution=res, std_min=1.0, std_max=15.0, std_step=0.5
    )
    nets = FrozenNets(prior=prior, rm=rm, se=se, dsst=dsst, std_range=plan.std_range, resolution=res)
    return dgsa_step_peak(nets, plan.dgsa, batch, memory=plan.memory, device=device)


def run(device: str, stages: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    on_gpu = torch.device(device).type == "cuda"
    budget = int(available_bytes(device) * 0.8)
    out: dict[str, Any] = {}
    for stage in stages:
        points = {}
        for batch in (1, 2):
            call = (measure, stage, batch, device, options)
            peak, seconds = call[0](*call[1:]) if on_gpu else measure_in_subprocess(*call)
            points[batch] = {"peak_gib": round(peak / 2**30, 3), "step_s": round(seconds, 3)}
            print(f"{stage} batch {batch}: {seconds:.2f} s, peak {peak / 2**30:.2f} GiB", flush=True)
        est = batch_size_for_budget(points[1]["peak_gib"] * 2**30, points[2]["peak_gib"] * 2**30, budget)
        entry: dict[str, Any] = {"points": points, "largest_batch": est.batch_size}
        if on_gpu and est.batch_size > 2:
            peak, seconds = measure(stage, est.batch_size, device, options)
            points[est.batch_size] = {"peak_gib": round(peak / 2**30, 3), "step_s": round(seconds, 3)}
            print(f"{stage} batch {est.batch_size}: {seconds:.2f} s, peak {peak / 2**30:.2f} GiB", flush=True)
        out[stage] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="DGSA (bf16 on cuda)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--mode", choices=("dps", "closed_form"), default=None, help="DGSA guidance")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    options = {
        "precision": args.precision,
        "checkpointing": not args.no_checkpointing,
        "mode": args.mode,
        "threads": args.threads,
    }
    stages = tuple(s for s in args.stages.split(",") if s)
    where = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    )
    print(f"train complete, DifFace 512 with random weights, on {args.device} ({where}); options {options}")
    results = {"device": args.device, "hardware": where or platform.machine(), "options": options}
    results["stages"] = run(args.device, stages, options)
    plan = _plan(args.device, args.precision, not args.no_checkpointing, args.mode)
    results["plan"] = {
        s: {"steps": getattr(plan, s).steps, "batch": getattr(plan, s).batch_size} for s in STAGES
    }
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
