"""What one `train starter` run is asked for, as one typed value.

The library call (`train_starter(out, options)`), the Prefect flows (`options` parameter) and the command
line (`dynface train starter`) all build a StarterOptions and pass it whole, so a new knob is added here
once instead of being forwarded through every layer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from dynface.paths import shared_dir
from dynface.train.plan import StarterPlan, starter_plan, with_loop, with_stage, with_steps_scale

DEFAULT_SCALES = (1.0, 3.0, 10.0, 30.0)  # ζ candidates tuned on the validation faces


@dataclass(frozen=True)
class StarterOptions:
    """Every knob of a starter run. Paths are strings so the value is also a Prefect flow parameter.

    `data_dir`: the HQ faces (None: the shared data; a folder with MANIFEST.csv uses its `hq_aligned`
    rows, any other folder all its images). `work_dir`: checkpoints and loss curves (None: a folder in
    the system temp dir named after the pack). `steps_scale` multiplies every stage's steps (the budget
    still stops each stage); `stage_steps` / `stage_minutes` then replace single stages' steps / total
    time budgets, e.g. {"prior": 6000}. `rm_pairs`: "pool" or "fresh" (StarterPlan.rm_pairs), fresh pairs
    made by `pair_workers` processes. `prior_masked_share` > 0: that share of each prior batch comes from
    re-aligned crops with a masked loss. `reuse_prior`: a pack folder whose prior is taken instead of
    training one. `vgg16` (+ `dists_head`): adds DISTS to DGSA's loss. ζ is tuned over `scales` on the
    first `tune_faces` validation faces; the first `eval_faces` test faces are reported. `notes` go to the
    model card verbatim. `exclude_sources`: None keeps the recipe's exclusions (data.EXCLUDED_SOURCES).
    """

    resolution: int = 64
    quick: bool = False
    budget_minutes: float | None = 75.0
    data_dir: str | None = None
    work_dir: str | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    steps_scale: float = 1.0
    stage_steps: dict[str, int] = field(default_factory=dict)
    stage_minutes: dict[str, float] = field(default_factory=dict)
    rm_pairs: str = "pool"
    pair_workers: int = 0
    prior_masked_share: float = 0.0
    reuse_prior: str | None = None
    vgg16: str | None = None
    dists_head: str | None = None
    tune_faces: int = 8
    eval_faces: int = 20
    scales: tuple[float, ...] = DEFAULT_SCALES
    exclude_sources: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()

    def data(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else shared_dir() / "data"

    def work(self, out: Path) -> Path:
        """Where the stages checkpoint: never inside the repository by default."""
        if self.work_dir is not None:
            return Path(self.work_dir)
        return Path(tempfile.gettempdir()) / f"dynface_work_{out.name}"

    def plan(self) -> StarterPlan:
        """The recipe's plan with these options applied: seed and device in every stage's loop, the step
        scale, RM's pair source, then the single-stage replacements."""
        plan = with_loop(
            starter_plan(
                self.resolution, quick=self.quick, budget_minutes=self.budget_minutes, progress=self.progress
            ),
            seed=self.seed,
            device=self.device,
        )
        plan = with_steps_scale(plan, self.steps_scale) if self.steps_scale != 1.0 else plan
        plan = replace(plan, rm_pairs=self.rm_pairs, pair_workers=self.pair_workers)
        for name in sorted(set(self.stage_steps) | set(self.stage_minutes)):
            plan = with_stage(
                plan, name, steps=self.stage_steps.get(name), budget_minutes=self.stage_minutes.get(name)
            )
        return plan
