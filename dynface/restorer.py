"""`Restorer`: one object, one verb. Aligned face crops in, restored faces plus diagnostics out.

A face's numbers before sampling (std*, levels, start step, η, seed) are its `FacePlan`
(dynface.core.plan). `restore` plans the faces itself, or samples from plans made earlier by
`plan` (the pipeline's estimate stage, which loads only SE and the DSST table: `load_planner`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dynface.core.config import METHODS, Method, RestoreConfig
from dynface.core.dblm import guidance_targets, restore_rm, to_reference_std
from dynface.core.device import resolve_device
from dynface.core.diffusion import Diffusion
from dynface.core.memory import PeakMemory, available_bytes, batch_size_for_budget
from dynface.core.plan import SINGLE_LEVEL_METHODS, FacePlan, FacePlanner
from dynface.core.sampler import SampleBatch, SampleOutput, SamplerConfig, StepInfo, sample
from dynface.core.speed import prepare_prior, set_backend_flags
from dynface.packs.loading import LoadedPack, load_pack, load_planner_parts
from dynface.packs.manifest import PackManifest, read_manifest

log = logging.getLogger("dynface")

__all__ = [
    "METHODS",
    "FacePlan",
    "FaceResult",
    "Method",
    "RestoreConfig",
    "Restorer",
    "face_seed",
    "load_planner",
]


@dataclass(frozen=True)
class FaceResult:
    """A restored face and how it was made. Stds are pixels at the pack's resolution unless `_512`."""

    image: np.ndarray  # (H, W, 3) uint8, same size as the input crop
    method: str
    plan: FacePlan
    resolution: int  # the pack's
    std_final: tuple[float, ...]  # kernel stds of the valid levels after the updates
    n_steps: int
    guidance_residual: float | None  # RMS ‖ý − k ⊛ x0‖ of the main level for the result, [-1, 1] units
    timings: dict[str, float]

    @property
    def seed(self) -> int:
        return self.plan.seed

    @property
    def std_hat(self) -> float:
        return self.plan.std_hat_px

    @property
    def std_hat_512(self) -> float:
        return float(to_reference_std(self.plan.std_hat_px, self.resolution))

    @property
    def levels(self) -> tuple[float, ...]:
        """Guidance level stds used (initial, valid levels)."""
        return self.plan.levels_px

    @property
    def t_start(self) -> int:
        return self.plan.t_start

    @property
    def eta(self) -> float:
        return self.plan.eta


def face_seed(face: np.ndarray, base_seed: int) -> int:
    """Seed derived from the pixels, so a face gets the same noise alone, in a batch, or re-run."""
    digest = hashlib.sha256(np.ascontiguousarray(face).tobytes() + base_seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:7], "little")


def _to_tensor(face: np.ndarray) -> Tensor:
    if face.ndim != 3 or face.shape[2] != 3:
        raise ValueError(f"faces must be (H, W, 3) arrays, got {face.shape}")
    arr = face.astype(np.float32) / 255.0 if face.dtype == np.uint8 else face.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def _to_uint8(x: Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def config_for(manifest: PackManifest, overrides: dict[str, Any] | None = None) -> RestoreConfig:
    """The pack's stored sampler defaults, then `overrides`."""
    cfg = RestoreConfig().merged(dict(manifest.sampler))
    return cfg.merged(overrides) if overrides else cfg


def load_planner(
    pack: str | PackManifest,
    *,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> tuple[FacePlanner, torch.device]:
    """A FacePlanner with only the pack's SE network and DSST table loaded (no prior, no RM)."""
    manifest = pack if isinstance(pack, PackManifest) else read_manifest(pack)
    se, dsst = load_planner_parts(manifest)
    dev = resolve_device(device)
    if se is not None:
        se.to(dev)
    planner = FacePlanner(
        se=se,
        dsst=dsst,
        resolution=manifest.resolution,
        std_range=manifest.std_range,
        config=config_for(manifest, overrides),
    )
    return planner, dev


def input_batch(faces: Sequence[np.ndarray], resolution: int, device: torch.device) -> Tensor:
    """Crops ((H, W, 3) uint8 or float in [0, 1]) -> (B, 3, R, R) in [0, 1] at `resolution`, on `device`."""
    res = (resolution, resolution)
    return torch.stack([_resize(_to_tensor(f).unsqueeze(0), res)[0] for f in faces]).to(device)


def plan_faces(
    planner: FacePlanner,
    faces: Sequence[np.ndarray],
    *,
    device: torch.device,
    batch_size: int,
    seeds: Sequence[int] | None = None,
) -> list[FacePlan]:
    """Plans for aligned crops, in batches of `batch_size`; seeds default to `face_seed` of the pixels."""
    if seeds is not None and len(seeds) != len(faces):
        raise ValueError("one seed per face")
    seeds = [face_seed(f, planner.config.seed) for f in faces] if seeds is None else list(seeds)
    plans: list[FacePlan] = []
    for start in range(0, len(faces), batch_size):
        chunk = faces[start : start + batch_size]
        y = input_batch(chunk, planner.resolution, device)
        plans.extend(planner.plan(y, seeds[start : start + batch_size]))
    return plans


class Restorer:
    """Holds a loaded pack on a device. `restore(faces)` is the only verb; `plan` is its first half."""

    def __init__(self, pack: LoadedPack, config: RestoreConfig, device: torch.device) -> None:
        self.pack = pack
        self.config = config
        self.device = device
        self.resolution = pack.manifest.resolution
        self.std_range = pack.manifest.std_range
        self.diffusion = Diffusion.create(config.sampler.respacing)
        self.planner = FacePlanner(
            se=pack.se, dsst=pack.dsst, resolution=self.resolution, std_range=self.std_range, config=config
        )
        self._auto_batch: int | None = None
        self._batch_cap: int | None = None  # lowered when a batch ran out of device memory
        for net in pack.networks().values():
            net.to(device)
        set_backend_flags(device, config.speed)
        self.prior = prepare_prior(pack.prior, config.speed)
        sampler = self._sampler_config()
        if sampler.precision == "fp16" and sampler.mode == "dps" and config.method != "rm_only":
            raise ValueError("precision fp16 with dps guidance underflows (no loss scaling): use bf16")

    @classmethod
    def from_pack(
        cls,
        pack: str | PackManifest | LoadedPack = "starter",
        *,
        config: RestoreConfig | None = None,
        overrides: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> Restorer:
        """Load a pack (name, manifest path/URI, resolved manifest or loaded pack) with its stored sampler
        defaults applied."""
        loaded = pack if isinstance(pack, LoadedPack) else load_pack(pack)
        cfg = config if config is not None else config_for(loaded.manifest)
        if overrides:
            cfg = cfg.merged(overrides)
        return cls(loaded, cfg, resolve_device(device))

    def with_config(self, **overrides: Any) -> Restorer:
        return Restorer(self.pack, self.config.merged(overrides), self.device)

    def auto_batch_size(self, *, budget_fraction: float = 0.8, max_batch: int = 64) -> int:
        """Largest batch whose peak memory fits `budget_fraction` of the free device memory.

        Measured on CUDA with `memory_probe` (one step of the configured method) at batch 1 and 2 after
        a warm-up probe (cuDNN workspaces and allocator pools are cold at first): memory is linear in
        the batch. On CPU the allocator gives no reliable in-process peak, so a fixed 8 is used.
        """
        if self.device.type != "cuda":
            return 8
        if self._auto_batch is None:
            self.memory_probe(1)
            peaks = []
            for b in (1, 2):
                with PeakMemory(self.device) as pm:
                    self.memory_probe(b)
                peaks.append(pm.peak_bytes)
            budget = int(available_bytes(self.device) * budget_fraction)
            self._auto_batch = batch_size_for_budget(*peaks, budget, max_batch=max_batch).batch_size
        return self._auto_batch

    def batch_size(self) -> int:
        """Faces per batch: the configured size, or the automatic one (0), lowered after running out of
        device memory."""
        size = self.config.batch_size or self.auto_batch_size()
        return size if self._batch_cap is None else min(size, self._batch_cap)

    def memory_probe(self, batch: int) -> SampleOutput | None:
        """One sampler step of the configured method on `batch` gray faces, every guidance level active
        (t = 0), DBLM included: what a batch of that size holds at its peak."""
        res = self.resolution
        faces = [np.full((res, res, 3), 127, dtype=np.uint8)] * batch
        plans = [
            replace(p, t_start=0, level_t_starts=(0,) * len(p.level_t_starts))
            for p in plan_faces(self.planner, faces, device=self.device, batch_size=batch, seeds=range(batch))
        ]
        y = input_batch(faces, res, self.device)
        rm_out = restore_rm(y, self.pack.rm, flip_ensemble=self.config.rm_flip_ensemble)
        if self.config.method == "rm_only":
            return None
        return self._sample(rm_out, plans, None)

    def _in_batches(self, n: int, run: Callable[[list[int]], list[FaceResult]]) -> list[FaceResult]:
        """run(indices) over consecutive batches of `batch_size()` faces. A batch that runs out of device
        memory is retried at half the size, and the smaller size is kept (a batch of one re-raises)."""
        results: list[FaceResult] = []
        size = self.batch_size()
        while len(results) < n:
            indices = list(range(len(results), min(len(results) + size, n)))
            try:
                results.extend(run(indices))
            except torch.OutOfMemoryError:
                if len(indices) == 1:
                    raise
                size = len(indices) // 2
                self._batch_cap = size
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of device memory at a batch of %d faces: retrying at %d", len(indices), size)
        return results

    def _sampler_config(self) -> SamplerConfig:
        cfg, method = self.config, self.config.method
        s = cfg.sampler
        if method == "difface":
            return s.with_(mode="none")
        if method in ("dblm", "dblm_dsst"):
            return s.with_(use_dgsa=False, kernel_update=False)
        if method == "dblm_dsst_dgsa":
            return s.with_(kernel_update=False)
        return s

    def _level_weights(self) -> Tensor | None:
        cfg = self.config
        if cfg.method in SINGLE_LEVEL_METHODS or cfg.level_weights is None:
            return None
        return torch.as_tensor(list(cfg.level_weights), dtype=torch.float32)

    # -- the two halves -------------------------------------------------------------------------
    def plan(self, faces: Sequence[np.ndarray], *, seeds: Sequence[int] | None = None) -> list[FacePlan]:
        """SE + DSST only (no RM, no sampling): each face's std*, levels, start step, η and seed."""
        return plan_faces(self.planner, faces, device=self.device, batch_size=self.batch_size(), seeds=seeds)

    def restore(
        self,
        faces: Sequence[np.ndarray],
        *,
        plans: Sequence[FacePlan] | None = None,
        seeds: Sequence[int] | None = None,
        restored: Sequence[np.ndarray] | None = None,
        progress: Callable[[StepInfo], None] | None = None,
    ) -> list[FaceResult]:
        """Restore aligned face crops ((H, W, 3) uint8 or float in [0, 1]); results in input order.

        plans: one `FacePlan` per face from an earlier `plan` (or the pipeline's estimate stage) on the
        same crops and config; SE and DSST are not run again. Without plans the faces are planned here
        (seeds: one per face, default `face_seed` of the pixels; not allowed with plans, which hold them).
        restored: RM's output per face, given instead of running RM (same form as `faces`): the output
        of another restorer, or the ground truth for the oracle bound of `dynface evaluate`."""
        if plans is not None and len(plans) != len(faces):
            raise ValueError("one plan per face")
        if plans is not None and seeds is not None:
            raise ValueError("plans carry their seeds; pass plans or seeds, not both")
        if restored is not None and len(restored) != len(faces):
            raise ValueError("one restored image per face")

        def run(chunk: list[int]) -> list[FaceResult]:
            crops = [faces[i] for i in chunk]
            if plans is None:
                seed_chunk = None if seeds is None else [seeds[i] for i in chunk]
                chunk_plans = self.plan(crops, seeds=seed_chunk)
            else:
                chunk_plans = [plans[i] for i in chunk]
            given = None if restored is None else [restored[i] for i in chunk]
            return self._restore_batch(crops, chunk_plans, given, progress)

        return self._in_batches(len(faces), run)

    def _sample(
        self, rm_out: Tensor, plans: list[FacePlan], progress: Callable[[StepInfo], None] | None
    ) -> SampleOutput:
        """The guided sampler over one batch: RM's output (B, 3, R, R) in [0, 1] and the faces' plans."""
        cfg = self.config
        targets = guidance_targets(
            rm_out,
            stds=torch.tensor([p.level_stds_px for p in plans], dtype=rm_out.dtype),
            t_starts=torch.tensor([p.level_t_starts for p in plans], dtype=torch.long),
            valid=torch.tensor([p.level_valid for p in plans], dtype=torch.bool),
            weights=self._level_weights(),
        )
        t_start = torch.tensor([p.t_start for p in plans], dtype=torch.long)
        if cfg.method == "difface" or cfg.init_from == "restored":
            init = 2 * rm_out - 1
        else:
            # [choice] §3.10: diffuse the target whose start is latest (the most blurred level).
            pick = targets.t_starts.argmax(dim=1)
            init = targets.targets[torch.arange(len(plans)), pick]
        eta = torch.tensor([p.eta for p in plans], dtype=torch.float32, device=rm_out.device)
        seeds = [p.seed for p in plans]
        batch = SampleBatch(init=init, t_start=t_start, eta=eta, seeds=seeds, targets=targets)
        return sample(
            self.prior,
            self.diffusion,
            batch,
            self._sampler_config(),
            dgsa=self.pack.dgsa,
            std_range=self.std_range,
            progress=progress,
        )

    def _restore_batch(
        self,
        faces: list[np.ndarray],
        plans: list[FacePlan],
        restored: list[np.ndarray] | None,
        progress: Callable[[StepInfo], None] | None,
    ) -> list[FaceResult]:
        t0 = time.perf_counter()
        sizes = [f.shape[:2] for f in faces]
        y = input_batch(faces, self.resolution, self.device)
        cfg = self.config
        if restored is None:
            rm_out = restore_rm(y, self.pack.rm, flip_ensemble=cfg.rm_flip_ensemble)
        else:
            rm_out = input_batch(restored, self.resolution, self.device)
        t1 = time.perf_counter()
        out = None
        if cfg.method == "rm_only":
            images = rm_out
        else:
            out = self._sample(rm_out, plans, progress)
            images = (out.images + 1) / 2
        t2 = time.perf_counter()
        n = len(faces)
        results = []
        for i, (size, plan) in enumerate(zip(sizes, plans, strict=True)):
            valid = torch.tensor(plan.level_valid)
            std_final = plan.levels_px
            if out is not None:
                std_final = tuple(float(s) for s, v in zip(out.stds_final[i], valid, strict=True) if v)
            residual = None
            if out is not None and out.final_residual is not None:
                residual = float(out.final_residual[i])
            results.append(
                FaceResult(
                    image=_to_uint8(_resize(images[i : i + 1].float().cpu(), tuple(size))[0]),
                    method=cfg.method,
                    plan=plan,
                    resolution=self.resolution,
                    std_final=std_final,
                    n_steps=int(out.n_steps[i]) if out is not None else 0,
                    guidance_residual=residual,
                    timings={"dblm_s": (t1 - t0) / n, "sample_s": (t2 - t1) / n},
                )
            )
        return results
