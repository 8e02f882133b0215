"""Per-step time of the sampler before and after it was built for the GPU, on this CPU, same outputs.

A batch of 8 faces at 64 px (the starter pack: its prior, DGSA, RM, SE and DSST), each face with its own
start step a few steps apart (so some steps run only part of the batch), ddim250, the full method.
The loop before (`benchmarks/sampler_before.py`) and after (`dynface.core.sampler.sample`) run
interleaved, `--repeats` times each per guidance mode; every pair must give bit-identical images, kernel
stds, residuals and residual history (asserted), and the script prints median seconds per step, wall
clock and process CPU time (the CPU time is what a shared machine's load does not inflate), with the
spread (min..max), and two counts per step that no load disturbs: operators dispatched (on a GPU, kernel
launches) and tensor values read to the host (on a GPU, waits on the device). Both loops run the same
networks, so the times compare the loops alone.

    python benchmarks/sampler_cpu_before_after.py            # ~5 min on the project's 2-core CPU
    python benchmarks/sampler_cpu_before_after.py --profile  # where a CPU step's time goes (one run each)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_before import sample_before  # noqa: E402
from step_counters import HostReadCounter, OpCounter  # noqa: E402

from dynface.core.dblm import run_dblm  # noqa: E402
from dynface.core.diffusion import Diffusion  # noqa: E402
from dynface.core.sampler import SampleBatch, SampleOutput, SamplerConfig, sample  # noqa: E402
from dynface.packs.loading import LoadedPack, load_pack  # noqa: E402
from dynface.paths import REPO_ROOT  # noqa: E402


def faces_batch(pack: LoadedPack, n: int, start: int, spread: int) -> SampleBatch:
    """The first n faces of samples/archive at the pack's resolution, through RM + SE (DBLM); start
    steps start, start − spread, start − 2·spread, ... (original timesteps)."""
    res = pack.manifest.resolution
    paths = sorted((REPO_ROOT / "samples" / "archive").glob("face_*.jpg"))[:n]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((res, res), Image.BICUBIC)) for p in paths]
    y = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    dblm = run_dblm(y, pack.rm, pack.se, pack.dsst, resolution=res, std_range=pack.manifest.std_range)
    t_start = torch.tensor([start - spread * i for i in range(n)])
    targets = dblm.targets
    t_starts = (
        t_start[:, None] - (targets.t_starts.max(dim=1, keepdim=True).values - targets.t_starts)
    ).clamp_min(0)
    return SampleBatch(
        init=targets.targets[:, 0],
        t_start=t_start,
        eta=(dblm.std_hat * 512 / res / 10).clamp(0, 1),
        seeds=list(range(n)),
        targets=type(targets)(targets.targets, targets.stds, t_starts, targets.valid, targets.weights),
    )


def identical(a: SampleOutput, b: SampleOutput) -> bool:
    return (
        torch.equal(a.images, b.images)
        and torch.equal(a.stds_final, b.stds_final)
        and torch.equal(a.final_residual, b.final_residual)
        and np.array_equal(a.residual_history, b.residual_history, equal_nan=True)
    )


LOOPS = {"before": sample_before, "after": sample}


def compare(pack: LoadedPack, batch: SampleBatch, mode: str, repeats: int) -> dict[str, dict[str, float]]:
    """Per loop: median and spread of wall and CPU seconds per step, ops and host reads per step."""
    diffusion = Diffusion.create("ddim250")
    n_steps = int(diffusion.index_for_timestep(int(batch.t_start.max()))) + 1
    cfg = SamplerConfig(mode=mode, respacing="ddim250", guidance_scale=10.0)
    kw = {"dgsa": pack.dgsa, "std_range": pack.manifest.std_range}
    rows: dict[str, dict[str, float]] = {}
    for name, loop in LOOPS.items():
        with HostReadCounter() as reads, OpCounter() as ops:
            loop(pack.prior, diffusion, batch, cfg, **kw)
        rows[name] = {"ops": ops.ops / n_steps, "reads": reads.count / n_steps}
    walls: dict[str, list[float]] = {name: [] for name in LOOPS}
    cpus: dict[str, list[float]] = {name: [] for name in LOOPS}
    reference = None
    for _ in range(repeats):
        for name, loop in LOOPS.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = loop(pack.prior, diffusion, batch, cfg, **kw)
            walls[name].append((time.perf_counter() - wall) / n_steps)
            cpus[name].append((time.process_time() - cpu) / n_steps)
            reference = reference or out
            assert identical(out, reference), f"{mode}: the {name} loop gave different outputs"
    for name in LOOPS:
        for key, values in (("wall", walls[name]), ("cpu", cpus[name])):
            rows[name].update(
                {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
            )
    return rows


# Operator families of a sampler step, by the aten operator names torch.profiler reports (first match).
FAMILIES = (
    ("convolutions (forward and backward)", ("conv",)),
    ("group norm and SiLU (forward and backward)", ("group_norm", "silu")),
    ("attention", ("attention", "bmm", "softmax")),
    ("copies, concatenations, resampling", ("copy_", "cat", "upsample", "index", "fill_", "empty")),
    ("element-wise arithmetic", ("add", "mul", "sub", "div", "neg", "pow", "sqrt", "exp", "where", "clamp")),
    ("reductions", ("sum", "mean", "norm", "max")),
)


def profile_shares(pack: LoadedPack, batch: SampleBatch, mode: str) -> dict[str, float]:
    """Share of the new loop's self CPU time per operator family (one profiled run after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    diffusion = Diffusion.create("ddim250")
    cfg = SamplerConfig(mode=mode, respacing="ddim250", guidance_scale=10.0)
    kw = {"dgsa": pack.dgsa, "std_range": pack.manifest.std_range}
    sample(pack.prior, diffusion, batch, cfg, **kw)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample(pack.prior, diffusion, batch, cfg, **kw)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue  # autograd wrappers: their aten operators are counted themselves
        family = next((f for f, keys in FAMILIES if any(k in event.key for k in keys)), "other operators")
        times[family] = times.get(family, 0.0) + event.self_cpu_time_total
    total = sum(times.values())
    return {family: t / total for family, t in sorted(times.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=8)
    p.add_argument("--start", type=int, default=80, help="latest start step (original timestep)")
    p.add_argument("--spread", type=int, default=4, help="timesteps between the faces' starts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the pipeline's CPU actors use 1)")
    p.add_argument("--profile", action="store_true", help="only the share of CPU time per operator family")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pack = load_pack("starter")
    batch = faces_batch(pack, args.faces, args.start, args.spread)
    if args.profile:
        print(f"share of the sampler's self CPU time per operator family ({args.faces} faces, starter pack)")
        for mode in ("dps", "closed_form"):
            for family, share in profile_shares(pack, batch, mode).items():
                print(f"{mode:<12} {share:>6.1%}  {family}")
        return 0
    res, cpu_name = pack.manifest.resolution, platform.processor() or platform.machine()
    n_steps = int(Diffusion.create("ddim250").index_for_timestep(args.start)) + 1
    print(
        f"starter pack, {args.faces} faces at {res} px, ddim250, full method, starts {batch.t_start.tolist()}"
    )
    print(f"{n_steps} steps per run, torch {torch.__version__}, {args.threads} thread(s), {cpu_name}")
    print(f"{args.repeats} interleaved runs of each loop per mode; outputs asserted bit-identical\n")
    head = f"{'mode':<12} {'loop':<7} {'wall s/step (min..max)':>24} {'cpu s/step (min..max)':>24}"
    print(f"{head} {'ops/step':>9} {'reads/step':>10}")
    for mode in ("dps", "closed_form"):
        rows = compare(pack, batch, mode, args.repeats)
        for name, r in rows.items():
            wall = f"{r['wall']:.4f} ({r['wall_min']:.3f}..{r['wall_max']:.3f})"
            cpu = f"{r['cpu']:.4f} ({r['cpu_min']:.3f}..{r['cpu_max']:.3f})"
            print(f"{mode:<12} {name:<7} {wall:>24} {cpu:>24} {r['ops']:>9.0f} {r['reads']:>10.1f}")
        before, after = rows["before"], rows["after"]
        ratios = [before[key] / after[key] for key in ("wall", "cpu", "ops")]
        print(f"{mode:<12} {'before/after':<12} {ratios[0]:>18.3f}x {ratios[1]:>23.3f}x {ratios[2]:>8.2f}x")
    print("\nall outputs bit-identical: yes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
