"""Step time and peak memory of each `train complete` stage for the DifFace 512 architecture.

Random weights (the official files' shapes: 160 M-parameter UNet, 15.8 M-parameter SwinIR as RM and TM),
the stage configs of `dynface.train.complete_plan.complete_plan` for the `difface` pack. One training
step = forward and backward of the stage's loss (no optimizer update), at batch 1 and 2; the linear
memory model of dynface.core.memory gives the largest batch that fits 80 % of the free memory, and on a
GPU that batch is measured too (after an untimed warm-up step at batch 1, so lazy CUDA set-up is not
timed). CPU points each run in a fresh process (peak RSS never goes down). `--base PACK --quick` measures
another pack's architecture with the quick plan's tiny stage networks (the GPU check's CPU smoke test).

    python benchmarks/train_complete_step.py [--device cuda] [--stages sde,se,dgsa] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from collections.abc import Callable
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


def default_options(threads: int | None = None) -> dict[str, Any]:
    """The measured configuration: the difface pack's architecture and plan, DGSA in bf16 on CUDA with
    checkpointing, the pack's guidance mode."""
    return {
        "precision": None,
        "checkpointing": True,
        "mode": None,
        "threads": threads or torch.get_num_threads(),
        "base": "difface",
        "quick": False,
    }


def plan_for(device: str, options: dict[str, Any]) -> CompletePlan:
    memory = memory_for(device, options["precision"], checkpointing=options["checkpointing"])
    plan = complete_plan(read_manifest(options["base"]), quick=options["quick"], memory=memory)
    mode = options["mode"]
    return replace(plan, dgsa=replace(plan.dgsa, mode=mode)) if mode else plan


def _timed(
    device: str, step: Callable[[], None], model: torch.nn.Module, repeats: int
) -> tuple[float, float]:
    """(peak bytes, seconds) of the last of `repeats` steps; gradients are dropped before each, as an
    optimizer's zero_grad does, so every step allocates them afresh."""
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            step()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
    return float(peak.peak_bytes), seconds


def measure(
    stage: str, batch: int, device: str, options: dict[str, Any], warmup: bool = False
) -> tuple[float, float]:
    """(peak bytes, seconds) of one training step of `stage` at `batch` (top level: runs in a subprocess);
    `warmup`: one untimed step first."""
    torch.set_num_threads(options["threads"])
    torch.manual_seed(0)
    plan = plan_for(device, options)
    configs = {name: spec.config for name, spec in read_manifest(options["base"]).components.items()}
    res = plan.resolution
    repeats = 2 if warmup else 1
    gt = torch.rand(batch, 3, res, res, device=device)
    lq = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    if stage == "sde":
        with torch.device(device):
            sde = build_sde(plan.sde.sde).to(device)
        std = torch.full((batch,), 5.0, device=device)
        return _timed(device, lambda: sde_loss(sde, gt, std)["loss"].backward(), sde, repeats)
    with torch.device(device):  # built where they run: seconds instead of a minute for the UNet on a GPU
        rm = build_swinir(configs["rm"]).to(device).eval().requires_grad_(False)
        se = StdEstimator(build_sde(plan.sde.sde), transfer_model(rm, configs["rm"])).to(device)
        prior = build_unet(configs["prior"]).to(device) if stage == "dgsa" else None
    if stage == "se":
        grid = std_grid(plan.std_range, plan.se.grid_size).to(device)

        def se_step() -> None:
            star = std_star(restored_psnr(rm, lq, gt, grid), grid, 30.0)
            se_loss(se, lq, gt, star, plan.se.std_weight)["loss"].backward()

        return _timed(device, se_step, se, repeats)
    alphas = np.cumprod(1.0 - linear_betas())
    lo, hi = plan.std_range
    dsst = build_dsst_table(
        power_law_psd(res), alphas, resolution=res, std_min=lo, std_max=hi, std_step=0.5 * res / 512
    )
    assert prior is not None
    nets = FrozenNets(prior=prior, rm=rm, se=se, dsst=dsst, std_range=plan.std_range, resolution=res)
    for _ in range(repeats):  # each call trains a new DGSA network: no gradients carry over
        peak, seconds = dgsa_step_peak(nets, plan.dgsa, batch, memory=plan.memory, device=device)
    return peak, seconds


def _point(peak: float, seconds: float) -> dict[str, Any]:
    return {"peak_bytes": int(peak), "peak_gib": round(peak / 2**30, 3), "step_s": seconds}


def run(
    device: str,
    stages: tuple[str, ...],
    options: dict[str, Any],
    time_left: Callable[[], float] | None = None,
    *,
    largest: bool | None = None,
    max_batch: int = 256,
) -> dict[str, Any]:
    """Per stage: the measured points ({batch: peak bytes and GiB, step seconds}) and the largest batch
    (at most `max_batch`) the memory model allows, or why not (a stage that fails is reported and the
    others still run). `largest`: measure that batch too (default: on a GPU only). With `time_left`
    (seconds), a stage that would not fit is skipped and the largest batch shrinks to what this stage's
    share of the time left allows; both are recorded."""
    on_gpu = torch.device(device).type == "cuda"
    budget = int(available_bytes(device) * 0.8)
    left = time_left or (lambda: float("inf"))
    out: dict[str, Any] = {}
    for index, stage in enumerate(stages):
        if left() < 10:
            print(f"{stage}: skipped, {left():.0f} s left", flush=True)
            out[stage] = {"skipped": "out of time"}
            continue
        try:
            entry = _stage(stage, device, options, budget, max_batch)
            out[stage] = entry
            if largest if largest is not None else on_gpu:
                _largest(stage, device, options, entry, share=left() / (len(stages) - index))
        except Exception as err:  # reported; the next stage still runs
            traceback.print_exc()
            out[stage] = {"failed": f"{type(err).__name__}: {err}"}
            if on_gpu:
                torch.cuda.empty_cache()
    return out


def _measured(stage: str, batch: int, device: str, options: dict[str, Any], warmup: bool) -> dict[str, Any]:
    """One point, in this process on a GPU and in a fresh one on the CPU (peak RSS never goes down)."""
    call = (measure, stage, batch, device, options, warmup)
    peak, seconds = (
        call[0](*call[1:]) if torch.device(device).type == "cuda" else measure_in_subprocess(*call)
    )
    print(f"{stage} batch {batch}: {seconds:.3f} s, peak {peak / 2**30:.3f} GiB", flush=True)
    return _point(peak, seconds)


def _stage(stage: str, device: str, options: dict[str, Any], budget: int, max_batch: int) -> dict[str, Any]:
    """Batch 1 and 2 (on a GPU after an untimed warm-up step) and the memory model's largest batch."""
    warmup = torch.device(device).type == "cuda"
    points = {batch: _measured(stage, batch, device, options, warmup and batch == 1) for batch in (1, 2)}
    peaks = points[1]["peak_bytes"], points[2]["peak_bytes"]
    est = batch_size_for_budget(*peaks, budget, max_batch=max_batch)
    return {"points": points, "largest_batch": est.batch_size}


def _largest(stage: str, device: str, options: dict[str, Any], entry: dict[str, Any], share: float) -> None:
    """Measure the entry's largest batch, or as many faces as `share` seconds allow (step time is about
    linear in the batch too; 10 s are kept for building the networks); an out-of-memory is recorded."""
    points = entry["points"]
    if entry["largest_batch"] <= 2:
        return
    per_face = max(points[2]["step_s"] - points[1]["step_s"], points[2]["step_s"] / 2, 1e-6)
    batch = min(entry["largest_batch"], int((share - 10) / (1.5 * per_face)))
    if batch <= 2:
        print(f"{stage} batch {entry['largest_batch']}: skipped, {share:.0f} s of time for it", flush=True)
        entry["largest_skipped"] = "out of time"
        return
    if batch < entry["largest_batch"]:
        entry["time_limited_batch"] = batch
    try:
        points[batch] = _measured(stage, batch, device, options, warmup=False)
    except torch.OutOfMemoryError as err:  # the linear model was optimistic: say so, go on
        entry["largest_oom"] = str(err).splitlines()[0]
        print(f"{stage} batch {batch}: out of memory", flush=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="DGSA (bf16 on cuda)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--mode", choices=("dps", "closed_form"), default=None, help="DGSA guidance")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--base", default="difface", help="the pack whose architecture is measured")
    parser.add_argument("--quick", action="store_true", help="the quick plan's tiny stage networks")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    options = {
        **default_options(args.threads),
        "precision": args.precision,
        "checkpointing": not args.no_checkpointing,
        "mode": args.mode,
        "base": args.base,
        "quick": args.quick,
    }
    stages = tuple(s for s in args.stages.split(",") if s)
    where = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    )
    print(
        f"train complete, the {args.base} architecture with random weights, on {args.device} ({where}); "
        f"options {options}"
    )
    results = {"device": args.device, "hardware": where or platform.machine(), "options": options}
    results["stages"] = run(args.device, stages, options)
    plan = plan_for(args.device, options)
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
