"""The per-face plan: everything decided about a face before sampling (spec §2.3 items 1–3, §3.6–3.9).

std* comes from SE (or, for a pack without one, the `fixed_std` fallback); the guidance levels are
std* − offsets; DSST gives every level its start step and the face starts at the latest of them; η
follows std*. `FacePlanner` needs only the SE network and the DSST table, so the pipeline's estimate
stage loads nothing else, and `Restorer.restore(faces, plans=...)` samples from the plans as they
are: no SE and no DSST lookup a second time. Units: pixels at the pack's resolution (`_px`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dynface.core.config import RestoreConfig
from dynface.core.dblm import plan_levels, to_reference_std
from dynface.core.dsst import DSSTTable

StdSource = Literal["se", "fixed"]
SINGLE_LEVEL_METHODS = ("dblm_dsst_dgsa", "dblm_dsst", "dblm")


@dataclass(frozen=True)
class FacePlan:
    """One face's plan. Level tuples hold all L levels (invalid ones too: below the pack's std_min)."""

    seed: int  # the face's noise stream
    std_hat_px: float  # std*
    std_source: StdSource  # "se": SE's estimate; "fixed": the pack has no SE, fixed_std stood in
    level_stds_px: tuple[float, ...]
    level_valid: tuple[bool, ...]
    level_t_starts: tuple[int, ...]
    t_start: int  # where sampling starts: the latest valid level's start (0 when nothing is sampled)
    eta: float

    def __post_init__(self) -> None:
        n = len(self.level_stds_px)
        if n == 0 or len(self.level_valid) != n or len(self.level_t_starts) != n:
            raise ValueError("a plan needs one std, validity and start per level, and at least one level")
        if not self.level_valid[0]:
            raise ValueError("level 0 (std* itself) is always valid")
        if self.std_source not in ("se", "fixed"):
            raise ValueError(f"std_source must be 'se' or 'fixed', got {self.std_source!r}")

    @property
    def levels_px(self) -> tuple[float, ...]:
        """The stds of the valid levels."""
        return tuple(s for s, v in zip(self.level_stds_px, self.level_valid, strict=True) if v)

    def to_row(self) -> dict[str, Any]:
        """Flat dict for a work table (column names carry the unit)."""
        return {
            "seed": self.seed,
            "std_hat_px": self.std_hat_px,
            "std_source": self.std_source,
            "level_stds_px": list(self.level_stds_px),
            "level_valid": list(self.level_valid),
            "level_t_starts": list(self.level_t_starts),
            "t_start": self.t_start,
            "eta": self.eta,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FacePlan:
        return cls(
            seed=int(row["seed"]),
            std_hat_px=float(row["std_hat_px"]),
            std_source=row["std_source"],
            level_stds_px=tuple(float(v) for v in row["level_stds_px"]),
            level_valid=tuple(bool(v) for v in row["level_valid"]),
            level_t_starts=tuple(int(v) for v in row["level_t_starts"]),
            t_start=int(row["t_start"]),
            eta=float(row["eta"]),
        )


PLAN_COLUMNS: tuple[str, ...] = (
    "seed",
    "std_hat_px",
    "std_source",
    "level_stds_px",
    "level_valid",
    "level_t_starts",
    "t_start",
    "eta",
)


@dataclass(frozen=True, eq=False)
class FacePlanner:
    """SE + DSST under a RestoreConfig: faces (B, 3, R, R) in [0, 1] at the pack's resolution -> plans."""

    se: nn.Module | None
    dsst: DSSTTable | None
    resolution: int
    std_range: tuple[float, float]
    config: RestoreConfig

    def _fixed_t_start(self) -> int | None:
        cfg = self.config
        return {"difface": cfg.difface_t_start, "dblm": cfg.dblm_t_start}.get(cfg.method)

    def eta(self, std_hat_px: Tensor) -> Tensor:
        """η per face: fixed when configured (0.5 for DifFace), else std* at 512 px / eta_divisor, clipped."""
        cfg = self.config
        if cfg.method == "difface":
            return torch.full_like(std_hat_px, 0.5 if cfg.eta is None else cfg.eta)
        if cfg.eta is not None:
            return torch.full_like(std_hat_px, cfg.eta)
        return (to_reference_std(std_hat_px, self.resolution) / cfg.eta_divisor).clamp(0, 1)

    @torch.no_grad()
    def plan(self, y: Tensor, seeds: Sequence[int]) -> list[FacePlan]:
        cfg = self.config
        if len(seeds) != y.shape[0]:
            raise ValueError("one seed per face")
        fixed_t = self._fixed_t_start()
        levels = plan_levels(
            y,
            self.se,
            None if fixed_t is not None else self.dsst,
            resolution=self.resolution,
            std_range=self.std_range,
            offsets=cfg.offsets[:1] if cfg.method in SINGLE_LEVEL_METHODS else cfg.offsets,
            fixed_std=cfg.fixed_std * self.resolution / 512,
            fixed_t_start=fixed_t,
        )
        sampled = cfg.method != "rm_only"
        valid_starts = torch.where(levels.valid, levels.t_starts, torch.zeros_like(levels.t_starts))
        t_start = valid_starts.max(dim=1).values
        eta = self.eta(levels.std_hat)
        source: StdSource = "se" if self.se is not None else "fixed"
        return [
            FacePlan(
                seed=int(seeds[i]),
                std_hat_px=float(levels.std_hat[i]),
                std_source=source,
                level_stds_px=tuple(float(s) for s in levels.stds[i]),
                level_valid=tuple(bool(v) for v in levels.valid[i]),
                level_t_starts=tuple(int(t) for t in levels.t_starts[i]),
                t_start=int(t_start[i]) if sampled else 0,
                eta=float(eta[i]) if sampled else 0.0,
            )
            for i in range(y.shape[0])
        ]
