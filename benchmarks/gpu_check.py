"""The steps of the one prepared GPU check; benchmarks/gpu_check.sh runs each in its own process.

Every step prints a table and appends one JSON line of figures to `--results`. `--smoke` runs the same
code at tiny sizes so the plumbing is proven on a CPU (benchmarks/gpu_check_setup.py says which networks).

    python benchmarks/gpu_check.py STEP [--smoke] [--device cuda] [--budget SECONDS] [--results FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_setup import (  # noqa: E402
    Check,
    face_steps,
    faces_batch,
    first_faces,
    matmul_flops,
    networks,
    started_at,
)
from sampler_before import reference_loop  # noqa: E402
from step_counters import CudaSyncCounter, HostReadCounter, OpCounter  # noqa: E402

from dynface.core.diffusion import Diffusion  # noqa: E402
from dynface.core.sampler import SamplerConfig, StepInfo, sample  # noqa: E402
from dynface.core.speed import SpeedOptions, prepare_prior, set_backend_flags  # noqa: E402

# Dense bf16 tensor-core peaks by datasheet, TFLOP/s (leads: the steps also measure a large matmul).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
# What the lent machine's image provides (benchmarks/gpu_requirements.txt); the steps import nothing else.
MACHINE_PACKAGES = {
    "torch",
    "numpy",
    "yaml",
    "fsspec",
    "safetensors",
    "psutil",
    "tqdm",
    "PIL",
    "typing_extensions",
}
OURS = {
    "dynface",
    "step_counters",
    "gpu_check_setup",
    "sampler_before",
    "golden_device",
    "train_complete_step",
    "torchgen",
}


def torch_dependencies(installed: dict[str, list[str]]) -> set[str]:
    """Top-level modules of the distributions torch requires (wherever torch is, they are)."""
    names = {
        re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-")
        for r in importlib.metadata.requires("torch") or []
    }
    return {
        module
        for module, dists in installed.items()
        if any(d.lower().replace("_", "-") in names for d in dists)
    }


def step_env(check: Check) -> None:
    print(
        f"python {platform.python_version()} ({sys.executable}), "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )
    figures: dict = {"torch": torch.__version__, "python": platform.python_version()}
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        memory = props.total_memory / 2**30
        print(f"{props.name}: {memory:.0f} GiB, {props.multi_processor_count} SMs, CUDA {torch.version.cuda}")
        figures.update(gpu=props.name, memory_gib=memory)
    import golden_device  # noqa: F401 - the golden and train steps' imports count too
    import train_complete_step  # noqa: F401

    import dynface

    print(f"dynface from {Path(dynface.__file__).parent.parent}")

    installed = importlib.metadata.packages_distributions()  # top-level module -> its distributions
    imported = {m.split(".")[0] for m in sys.modules if not m.startswith("_")} & set(installed)
    outside = sorted(imported - MACHINE_PACKAGES - OURS - torch_dependencies(installed))
    print(f"third-party packages imported: {sorted(imported)}")
    print(f"beyond the lent machine's image: {outside or 'none'}")
    flops = matmul_flops(check)
    print(
        f"measured matmul ({'bf16 8192^3' if check.device.type == 'cuda' else 'fp32 512^3'}): "
        f"{flops / 1e12:.4g} TFLOP/s"
    )
    figures.update(outside_packages=outside, matmul_tflops=flops / 1e12)
    check.record("env", figures)
    if outside and check.smoke:  # on the GPU machine itself a missing package would already have failed
        raise SystemExit(f"not on the lent machine: {outside} (carry them as wheels, DEVELOPERS.md)")


def step_golden(check: Check) -> None:
    """Tier B of the golden vectors (tests/golden) on the device with TF32 off."""
    from golden_device import FULL, SMALL, TIER_B, run_case

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ok, figures = True, {}
    for case in SMALL if check.smoke else SMALL + FULL:
        r_max, r_l2 = run_case(case, check.device)
        passed = r_max <= TIER_B[0] and r_l2 <= TIER_B[1]
        ok &= passed
        figures[case] = {"max_ratio": r_max, "rel_l2": r_l2, "passed": passed}
        print(f"{case:<17} max ratio {r_max:.2e}  rel-L2 {r_l2:.2e}  {'tier B ok' if passed else 'FAIL'}")
    check.record("golden", figures)
    if not ok:
        raise SystemExit("a golden case failed tier B")


def step_syncs(check: Check) -> None:
    """Device waits per sampler step: CUDA's own count on a GPU, the project's count of host reads."""
    nets = networks(check)
    batch = faces_batch(nets, 4, check.device)
    diffusion = Diffusion.create("ddim25")
    precision = "bf16" if check.device.type == "cuda" else "fp32"
    print(f"4 faces at {nets.resolution} px, ddim25, dps {precision}; the most in any step after the first")
    figures = {}
    for label, update in (("full (kernel update)", True), ("no kernel update", False)):
        cfg = SamplerConfig(respacing="ddim25", precision=precision, kernel_update=update)
        counters = [HostReadCounter()] + ([CudaSyncCounter()] if check.device.type == "cuda" else [])
        per_step: list[list[int]] = [[] for _ in counters]

        def step_done(_info: StepInfo, counters=counters, per_step=per_step) -> None:
            for counter, seen in zip(counters, per_step):
                seen.append(counter.count - sum(seen))

        for counter in counters:
            counter.__enter__()
        try:
            sample(
                nets.prior,
                diffusion,
                batch,
                cfg,
                dgsa=nets.dgsa,
                std_range=nets.std_range,
                progress=step_done,
            )
        finally:
            for counter in reversed(counters):
                counter.__exit__(None, None, None)
        most = {type(c).__name__: max(seen[1:]) for c, seen in zip(counters, per_step)}
        figures[label] = most
        print(f"{label:<22} " + "  ".join(f"{name} {count}" for name, count in most.items()))
    check.record("syncs", figures)


def step_loops(check: Check) -> None:
    """Our sampler against the plain DifFace-style loop (CPU noise, fp32, one start step at a time)."""
    nets = networks(check)
    n, respacing = (4, "ddim10") if check.smoke else (8, "ddim25")
    batch = faces_batch(nets, n, check.device)
    diffusion = Diffusion.create(respacing)
    cfg = SamplerConfig(respacing=respacing, guidance_scale=10.0)
    kw = {"dgsa": nets.dgsa, "std_range": nets.std_range}
    for warm in (cfg, cfg.with_(precision="bf16")):  # cuDNN autotuning and allocator growth first
        sample(nets.prior, diffusion, started_at(batch, 0), warm, **kw)
    runs = {
        "reference (plain, fp32)": lambda: reference_loop(nets.prior, diffusion, batch, cfg, **kw),
        "ours fp32": lambda: sample(nets.prior, diffusion, batch, cfg, **kw),
        "ours bf16": lambda: sample(nets.prior, diffusion, batch, cfg.with_(precision="bf16"), **kw),
    }
    steps = face_steps(batch, diffusion)
    print(
        f"{n} faces at {nets.resolution} px, {respacing}, dps, "
        f"starts {batch.t_start.tolist()}, {steps} face-steps"
    )
    print(f"{'loop':<26} {'s/face-step':>12} {'x reference':>12}")
    figures: dict = {}
    base = None
    for label, run in runs.items():
        if check.left() < 10:
            print(f"{label:<26} skipped: out of time")
            continue
        per = check.timed(run) / steps
        base = base or per
        figures[label] = {"s_per_face_step": per, "x_reference": base / per}
        print(f"{label:<26} {per:>12.5f} {base / per:>11.2f}x")
    check.record("loops", figures)


FULL_HEADER = ("run", "s/face", "1st run", "GFLOP/f-step", "TFLOP/s", "%matmul", "%sheet", "GiB")
FULL_WIDTHS = (-18, 7, 8, 12, 8, 8, 7, 6)


def _row(cells: tuple) -> str:
    return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, FULL_WIDTHS))


def step_full(check: Check) -> None:
    """The full method at the paper's settings (ddim250, per-face start from DSST, dps): s/face amortised
    over one batch, FLOPs per face-step, share of the measured bf16 matmul rate, peak memory. Each row is
    printed as soon as it is measured; a run that would not fit in the time left is skipped."""
    nets = networks(check)
    n, respacing = (3, "ddim10") if check.smoke else (16, "ddim250")
    diffusion = Diffusion.create(respacing)
    batch = faces_batch(nets, n, check.device)
    kw = {"dgsa": nets.dgsa, "std_range": nets.std_range}
    steps = face_steps(batch, diffusion)
    matmul = matmul_flops(check) / 1e12
    name = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "cpu"
    sheet = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    starts = f"{batch.t_start.min().item()}..{batch.t_start.max().item()}"
    print(
        f"{n} faces at {nets.resolution} px, one batch, {respacing}, std* 2..14 px (at 512): starts {starts}"
    )
    print(
        f"{steps} face-steps; measured matmul {matmul:.4g} TFLOP/s"
        + (f", datasheet bf16 {sheet:.0f}" if sheet else "")
    )
    print(_row(FULL_HEADER))
    figures: dict = {"faces": n, "face_steps": steps, "matmul_tflops": matmul, "datasheet_tflops": sheet}
    first_bf16 = None
    # (label, mode, precision, run time expected relative to dps bf16)
    for label, mode, precision, relative in (
        ("dps bf16", "dps", "bf16", 1.0),
        ("closed_form bf16", "closed_form", "bf16", 0.6),
        ("dps fp32", "dps", "fp32", 3.0),
    ):
        needed = 2.2 * relative * first_bf16 + 5 if first_bf16 else 0.0
        if check.left() < needed:
            print(f"{label:<18} skipped: about {needed:.0f} s needed, {check.left():.0f} s left")
            continue
        cfg = SamplerConfig(mode=mode, respacing=respacing, guidance_scale=10.0, precision=precision)
        run = lambda cfg=cfg: sample(nets.prior, diffusion, batch, cfg, **kw)  # noqa: E731
        with OpCounter() as flops:
            sample(nets.prior, diffusion, started_at(first_faces(batch, 1), 0), cfg, **kw)
        gflop = flops.flops / 1e9
        first = check.timed(run)  # includes cuDNN autotuning of every new batch shape
        first_bf16 = first_bf16 or first
        figures[label] = {"first_s_per_face": first / n, "gflop_per_face_step": gflop}
        if check.left() < 1.2 * first + 3:
            print(
                _row((label, "-", f"{first / n:.3f}", f"{gflop:.1f}", "", "", "", ""))
                + "  no time for a 2nd run"
            )
            continue
        seconds, peak = check.timed_with_peak(run)
        tflops = gflop * steps / seconds / 1e3
        figures[label].update(
            s_per_face=seconds / n, tflops=tflops, share_of_matmul=tflops / matmul, peak_bytes=peak
        )
        print(
            _row((
                label, f"{seconds / n:.3f}", f"{first / n:.3f}", f"{gflop:.1f}", f"{tflops:.3g}",
                f"{100 * tflops / matmul:.1f}%", f"{100 * tflops / sheet:.1f}%" if sheet else "-",
                f"{peak / 2**30:.1f}" if peak is not None else "-",
            ))
        )  # fmt: skip
    check.record("full", figures)


def step_train(check: Check) -> None:
    """`train complete`'s stages (benchmarks/train_complete_step.py) on the DifFace 512 architecture with
    random weights: one training step's time and peak memory at batch 1, 2 and the largest batch the
    memory model lets into 80 % of the free memory (DGSA in bf16 autocast with the frozen UNet's blocks
    checkpointed), and what the default plan would take at the measured rate. Smoke: the quick plan's
    tiny networks on a 32-px random pack, the largest batch at most 4, DGSA in fp32 with checkpointing
    (its bf16 path: tests/test_train_complete.py)."""
    import tempfile

    from train_complete_step import STAGES, default_options, plan_for, run

    from dynface.packs.writer import write_random_pack

    device = str(check.device)
    options = default_options()
    if check.smoke:
        folder = tempfile.mkdtemp(prefix="gpu-check-train-")
        options.update(base=write_random_pack(folder, resolution=32, seed=0), quick=True)
    plan = plan_for(device, options)
    print(
        f"{'quick plan, 32-px random pack' if check.smoke else 'difface pack'} at {plan.resolution} px; "
        f"DGSA {plan.memory.precision}, checkpointing {plan.memory.checkpointing}, {plan.dgsa.mode} "
        f"guidance; one step = forward and backward, no optimizer update"
    )
    # the largest batch is measured on the CPU too (at most 4 faces there), so the smoke proves that path
    stages = run(device, STAGES, options, check.left, largest=True, max_batch=4 if check.smoke else 256)
    print(f"{'stage':<6} {'batch':>6} {'s/step':>9} {'s/face':>9} {'peak GiB':>9}")
    plan_hours: dict = {}
    for stage, entry in stages.items():
        if "points" not in entry:
            print(f"{stage:<6} {entry}")
            continue
        for batch, point in entry["points"].items():
            print(
                f"{stage:<6} {batch:>6} {point['step_s']:>9.4f} {point['step_s'] / batch:>9.4f} "
                f"{point['peak_bytes'] / 2**30:>9.3f}"
            )
        notes = {k: v for k, v in entry.items() if k not in ("points", "largest_batch")}
        largest = f"{stage:<6} largest batch by the memory model: {entry['largest_batch']}"
        print(f"{largest} {notes}" if notes else largest)
        biggest = max(entry["points"])
        config = getattr(plan, stage)
        faces = config.steps * config.batch_size
        plan_hours[stage] = faces * entry["points"][biggest]["step_s"] / biggest / 3600
    if plan_hours:
        print(
            f"{'quick' if check.smoke else 'default'} plan at the s/face of the largest measured batch "
            "(one device): " + ", ".join(f"{s} {h:.3g} h" for s, h in plan_hours.items())
        )
    check.record("train", {"options": options, "stages": stages, "plan_hours": plan_hours})
    failed = [stage for stage, entry in stages.items() if "failed" in entry]
    if failed:
        raise SystemExit(f"train stages failed: {failed}")


def _options_batch(check: Check):
    nets = networks(check)
    n, steps = (2, 3) if check.smoke else (8, 20)
    diffusion = Diffusion.create("ddim250")
    batch = started_at(faces_batch(nets, n, check.device), int(diffusion.timestep_map[steps - 1]))
    return nets, diffusion, batch, steps


# The options step's rows with SpeedOptions' defaults; the one in the compile step's precision (bf16 on a
# GPU, fp32 on a CPU) is what compile-one runs in eager mode.
EAGER_BF16, EAGER_FP32 = "bf16 eager (defaults)", "fp32, TF32 off (default)"
EAGER_ROW = {"cuda": EAGER_BF16, "cpu": EAGER_FP32}


def step_options(check: Check) -> None:
    """Per-step time of our sampler (dps, every face active) under each speed option of RestoreConfig."""
    nets, diffusion, batch, steps = _options_batch(check)
    kw = {"dgsa": nets.dgsa, "std_range": nets.std_range}
    # (label, precision, options, DGSA on). DGSA runs in fp32 beside a bf16 prior; the row without it
    # tells what that costs (about 22 GFLOP per face-step at 512, without tensor cores).
    variants = [
        (EAGER_BF16, "bf16", SpeedOptions(), True),
        ("bf16 channels_last", "bf16", SpeedOptions(channels_last=True), True),
        ("bf16 cudnn_benchmark off", "bf16", SpeedOptions(cudnn_benchmark=False), True),
        ("bf16 without DGSA", "bf16", SpeedOptions(), False),
        (EAGER_FP32, "fp32", SpeedOptions(), True),
        ("fp32, TF32 on", "fp32", SpeedOptions(tf32=True), True),
    ]
    print(f"{len(batch.seeds)} faces at {nets.resolution} px, {steps} dps steps, every face active")
    print(f"{'variant':<26} {'s/step':>9} {'x first':>8}")
    figures: dict = {}
    base = None
    for label, precision, options, use_dgsa in variants:
        if check.left() < 10:
            print(f"{label:<26} skipped: out of time")
            continue
        set_backend_flags(check.device, options)
        prior = prepare_prior(nets.prior, options)
        cfg = SamplerConfig(respacing="ddim250", precision=precision, use_dgsa=use_dgsa)
        sample(prior, diffusion, batch, cfg, **kw)  # warm-up: autotuning, allocator
        per = check.timed(lambda prior=prior, cfg=cfg: sample(prior, diffusion, batch, cfg, **kw)) / steps
        if options.channels_last:  # the conversion is in place: back to the default layout
            nets.prior.to(memory_format=torch.contiguous_format)
        base = base or per
        figures[label] = {"s_per_step": per, "x_first": base / per}
        print(f"{label:<26} {per:>9.4f} {base / per:>7.2f}x")
    set_backend_flags(check.device, SpeedOptions())
    check.record("options", figures)


def step_compile(check: Check) -> None:
    """torch.compile modes against eager (the options step's batch, bf16 on a GPU), each mode in its own
    process with what is left of the budget; compile time apart from the steady per-step time."""
    if check.smoke and os.environ.get("SMOKE_COMPILE") != "1":
        print("skipped in --cpu-smoke: CPU inductor builds take minutes here (SMOKE_COMPILE=1 runs them)")
        check.record("compile", {"skipped": "cpu smoke"})
        return
    figures: dict = {}
    print(f"{'mode':<28} {'compile s':>10} {'s/step':>9} {'x eager':>8}")
    base = _eager_measured(check)
    modes = ("default", "max-autotune-no-cudagraphs")
    if base is None:  # no options step in this run: eager is measured here first
        modes = ("eager", *modes)
    else:
        figures["eager"] = {"s_per_step": base, "from": "options step"}
        print(f"{'eager (options step)':<28} {'-':>10} {base:>9.4f} {1:>7.2f}x")
    for mode in modes:
        left = check.left() - 5
        if left < 30:
            print(f"{mode:<28} skipped: out of time")
            continue
        cmd = [sys.executable, __file__, "compile-one", "--mode", mode, "--device", str(check.device)]
        try:
            done = subprocess.run(
                cmd + (["--smoke"] if check.smoke else []), capture_output=True, text=True, timeout=left
            )
        except subprocess.TimeoutExpired:
            print(f"{mode:<28} did not finish within {left:.0f} s")
            figures[mode] = {"timeout_s": left}
            continue
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            print(f"{mode:<28} failed: {reason}")
            figures[mode] = {"failed": done.stderr[-2000:]}
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        base = base or result["s_per_step"]
        figures[mode] = result
        print(
            f"{mode:<28} {result['compile_s']:>10.1f} {result['s_per_step']:>9.4f} "
            f"{base / result['s_per_step']:>7.2f}x"
        )
    check.record("compile", figures)


def _eager_measured(check: Check) -> float | None:
    """Eager s/step on the compile step's batch and precision as this run's options step measured it
    (same batch, same defaults), so that the compile step's time goes to compiling; None if it did not."""
    if not check.results.is_file():
        return None
    for line in reversed(check.results.read_text().splitlines()):
        entry = json.loads(line)
        if entry.get("step") == "options" and entry.get("device") == str(check.device):
            row = entry.get(EAGER_ROW.get(check.device.type, ""))
            return row["s_per_step"] if row else None
    return None


def compile_one(check: Check, mode: str) -> None:
    nets, diffusion, batch, steps = _options_batch(check)
    options = SpeedOptions(compile_mode=None if mode == "eager" else mode)
    set_backend_flags(check.device, options)
    prior = prepare_prior(nets.prior, options)
    cfg = SamplerConfig(respacing="ddim250", precision="bf16" if check.device.type == "cuda" else "fp32")
    kw = {"dgsa": nets.dgsa, "std_range": nets.std_range}
    compile_s = check.timed(lambda: sample(prior, diffusion, batch, cfg, **kw))  # compiles and warms up
    per = check.timed(lambda: sample(prior, diffusion, batch, cfg, **kw)) / steps
    print(json.dumps({"compile_s": compile_s, "s_per_step": per}))


STEPS = {
    "env": step_env,
    "golden": step_golden,
    "syncs": step_syncs,
    "loops": step_loops,
    "full": step_full,
    "train": step_train,
    "options": step_options,
    "compile": step_compile,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=[*STEPS, "compile-one"])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=600.0, help="seconds this step may take")
    p.add_argument("--results", default=os.devnull, help="file to append the step's JSON line to")
    p.add_argument("--mode", default="default", help="compile-one: the torch.compile mode")
    args = p.parse_args(argv)
    if args.smoke:  # one thread: on a small shared CPU more threads only fight each other
        torch.set_num_threads(1)
    check = Check(torch.device(args.device), args.smoke, args.budget, Path(args.results), time.perf_counter())
    if args.step == "compile-one":
        compile_one(check, args.mode)
    else:
        STEPS[args.step](check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
