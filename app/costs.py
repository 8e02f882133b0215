"""What a restore will cost on a CPU, said before it starts, so nobody begins a 10,000-photo CPU run by
accident with a 512-px pack.

The per-step figures are measured by `benchmarks/sampler_step.py` with the full DifFace 512 networks
(random weights) on the project's CPU machine (2 cores, fp32, batch 1); the table they come from is
`benchmarks/results/sampler_step_cpu_512.txt`. Other resolutions scale with the pixel count.
"""

from __future__ import annotations

import numpy as np

from dynface.core.config import RestoreConfig
from dynface.core.diffusion import Diffusion
from dynface.core.dsst import DSSTTable

MEASURED_AT = 512
CPU_STEP_SECONDS = {"dps": 10.5, "closed_form": 6.3, "none": 6.3}  # per face, batch 1
CPU_PEAK_GIB = {"dps": 3.3, "closed_form": 0.56, "none": 0.56}  # per face, batch 1
SMALL_PACK = 256  # below this resolution a CPU run is cheap enough to go unannounced


def start_steps(
    config: RestoreConfig, *, dsst: DSSTTable | None, has_se: bool, resolution: int
) -> tuple[int, int]:
    """(fewest, most) start steps on the original grid a face of this pack can get."""
    fixed = {"difface": config.difface_t_start, "dblm": config.dblm_t_start, "rm_only": 0}.get(config.method)
    if fixed is not None or dsst is None:
        t = fixed if fixed is not None else 999
        return t, t
    if has_se:
        return int(dsst.t_starts.min()), int(dsst.t_starts.max())
    t = int(dsst.lookup(config.fixed_std * resolution / MEASURED_AT))
    return t, t


def cpu_cost_note(
    config: RestoreConfig, *, dsst: DSSTTable | None, has_se: bool, resolution: int, pack_name: str
) -> str | None:
    """One line on the time and memory per face on this CPU, or None for small packs."""
    if resolution < SMALL_PACK:
        return None
    diffusion = Diffusion.create(config.sampler.respacing)
    lo, hi = start_steps(config, dsst=dsst, has_se=has_se, resolution=resolution)
    steps = [int(np.asarray(diffusion.index_for_timestep(t))) + 1 if t > 0 else 0 for t in (lo, hi)]
    mode = config.sampler.mode if config.method != "difface" else "none"
    scale = (resolution / MEASURED_AT) ** 2
    per_step = CPU_STEP_SECONDS[mode] * scale
    seconds = [n * per_step for n in steps]
    span = f"{seconds[0]:.0f} s" if steps[0] == steps[1] else f"{seconds[0]:.0f}-{seconds[1]:.0f} s"
    count = f"{steps[0]}" if steps[0] == steps[1] else f"{steps[0]}-{steps[1]}"
    peak = CPU_PEAK_GIB[mode] * scale
    return (
        f"note: {resolution}-px pack '{pack_name}' on CPU: about {span} per face ({count} {mode} steps at"
        f" ~{per_step:.1f} s, respacing {config.sampler.respacing}), peak ~{peak:.1f} GiB"
        " per face in a batch (benchmarks/sampler_step.py, 2-core CPU). Use a GPU (--device cuda) for"
        " archives; see the README's performance section."
    )
