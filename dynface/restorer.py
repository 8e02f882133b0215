"""`Restorer`: one object, one verb. Aligned face crops in, restored faces plus diagnostics out."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dynface.core.dblm import DBLMOutput, plan_levels, run_dblm, to_reference_std
from dynface.core.device import resolve_device
from dynface.core.diffusion import Diffusion
from dynface.core.memory import PeakMemory, available_bytes, batch_size_for_budget
from dynface.core.sampler import SampleBatch, SampleOutput, SamplerConfig, StepInfo, sample
from dynface.core.speed import SpeedOptions, prepare_prior, set_backend_flags
from dynface.packs.loading import LoadedPack, load_pack

log = logging.getLogger("dynface")

Method = Literal["full", "dblm_dsst_dgsa", "dblm_dsst", "dblm", "difface", "rm_only"]
METHODS: tuple[str, ...] = ("full", "dblm_dsst_dgsa", "dblm_dsst", "dblm", "difface", "rm_only")


@dataclass(frozen=True)
class RestoreConfig:
    """How faces are restored. `method` picks the variant; the rest are the method's knobs.

    Methods (the ablation ladder of the paper plus two baselines):
      full            DBLM + DSST + DGSA + multi-guidance + kernel-std update (DynFaceRestore)
      dblm_dsst_dgsa  single guidance level, no kernel update
      dblm_dsst       single level, global guidance (A_t = 1)
      dblm            DPS-style global guidance toward ý from t = 999: no DSST, no DGSA
      difface         DifFace: RM(y) diffused to a fixed t = 400, unguided DDIM, η = 0.5
      rm_only         the restorer RM alone
    """

    method: Method = "full"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    offsets: tuple[float, ...] = (0.0, 1.0, 2.0)  # multi-guidance std offsets, pixels at 512
    level_weights: tuple[float, ...] | None = None  # None: equal, renormalised over active levels
    eta: float | None = None  # None: dynamic η = clip(std*/eta_divisor, 0, 1), std* at 512 px
    eta_divisor: float = 10.0
    fixed_std: float = 6.0  # pixels at 512: std* for packs without an SE network
    difface_t_start: int = 400
    dblm_t_start: int = 999
    init_from: Literal["blurred", "restored"] = "blurred"  # [choice] §3.10
    # RM(y) as the mean with the mirrored RM(mirror(y)) (dynface.core.dblm.restore_rm); off by default (the
    # reference DifFace restorer runs RM once), on in packs whose manifest's sampler sets it.
    rm_flip_ensemble: bool = False
    batch_size: int = 8  # 0: the largest batch whose measured peak memory fits (CUDA; 8 on CPU)
    seed: int = 12345
    # How the prior runs (dynface.core.speed; README, "Performance"): not what it computes.
    compile_mode: str | None = None  # torch.compile mode, None: eager
    channels_last: bool = False
    cudnn_benchmark: bool = True  # CUDA: autotune convolution algorithms
    tf32: bool = False  # CUDA: TF32 convolutions/matmuls in fp32 (~1e-3 relative per layer)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.batch_size < 0:
            raise ValueError("batch_size must be >= 0 (0 = automatic)")
        self.speed  # noqa: B018 - validates the speed options

    @property
    def speed(self) -> SpeedOptions:
        return SpeedOptions(self.compile_mode, self.channels_last, self.cudnn_benchmark, self.tf32)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RestoreConfig:
        """Flat dict (as stored in a pack's `sampler` section or given on a command line)."""
        own = {f.name for f in fields(cls)} - {"sampler"}
        sampler_keys = {f.name for f in fields(SamplerConfig)}
        unknown = set(values) - own - sampler_keys
        if unknown:
            raise ValueError(f"unknown restore options: {sorted(unknown)}")
        mine = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in own}
        return cls(**mine, sampler=SamplerConfig(**{k: v for k, v in values.items() if k in sampler_keys}))

    def merged(self, values: dict[str, Any]) -> RestoreConfig:
        base = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sampler"}
        base.update({f.name: getattr(self.sampler, f.name) for f in fields(SamplerConfig)})
        base.update(values)
        return RestoreConfig.from_dict(base)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sampler"}
        out.update({f.name: getattr(self.sampler, f.name) for f in fields(SamplerConfig)})
        return out


@dataclass(frozen=True)
class FaceResult:
    image: np.ndarray  # (H, W, 3) uint8, same size as the input crop
    method: str
    seed: int
    std_hat: float  # std* in pixels at the pack's resolution (nan for rm_only)
    std_hat_512: float  # the same in pixels at 512
    std_final: tuple[float, ...]  # kernel stds of the levels after the updates
    levels: tuple[float, ...]  # guidance level stds used (initial)
    t_start: int
    eta: float
    n_steps: int
    guidance_residual: float | None  # RMS ‖ý − k ⊛ x0‖ of the main level for the result, [-1, 1] units
    timings: dict[str, float]


@dataclass(frozen=True)
class FaceEstimate:
    """The DBLM stage's numbers for one face: what `restore` starts sampling from."""

    std_hat: float  # pixels at the pack's resolution
    std_hat_512: float
    t_start: int
    eta: float
    levels: tuple[float, ...]  # guidance level stds (pixels at the pack's resolution)


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


def _valid_levels(stds: Tensor, valid: Tensor) -> tuple[float, ...]:
    """The stds (L,) of the levels flagged valid (L,), as plain floats."""
    return tuple(float(s) for s, v in zip(stds, valid) if v)


class Restorer:
    """Holds a loaded pack on a device. `restore(faces)` is the only verb."""

    def __init__(self, pack: LoadedPack, config: RestoreConfig, device: torch.device) -> None:
        self.pack = pack
        self.config = config
        self.device = device
        self.resolution = pack.manifest.resolution
        self.std_range = pack.manifest.std_range
        self.diffusion = Diffusion.create(config.sampler.respacing)
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
        pack: str | LoadedPack = "starter",
        *,
        config: RestoreConfig | None = None,
        overrides: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> Restorer:
        """Load a pack (name, manifest path/URI or loaded) with its stored sampler defaults applied."""
        loaded = pack if isinstance(pack, LoadedPack) else load_pack(pack)
        cfg = config if config is not None else RestoreConfig().merged(dict(loaded.manifest.sampler))
        if overrides:
            cfg = cfg.merged(overrides)
        dev = resolve_device(device)
        return cls(loaded, cfg, dev)

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
        y = self._input_batch([np.full((res, res, 3), 127, dtype=np.uint8)] * batch)
        dblm = self._dblm(y)
        if self.config.method == "rm_only":
            return None
        targets = replace(dblm.targets, t_starts=torch.zeros_like(dblm.targets.t_starts))
        zero = torch.zeros(batch, dtype=torch.long)
        probe = SampleBatch(
            init=targets.targets[:, 0], t_start=zero, eta=self._eta(dblm.std_hat), seeds=list(range(batch)),
            targets=targets,
        )  # fmt: skip
        return sample(
            self.prior,
            self.diffusion,
            probe,
            self._sampler_config(),
            dgsa=self.pack.dgsa,
            std_range=self.std_range,
        )

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

    # -- stages ---------------------------------------------------------------------------------
    def _dblm_args(self) -> dict[str, Any]:
        cfg = self.config
        method = cfg.method
        single = method in ("dblm_dsst_dgsa", "dblm_dsst", "dblm")
        fixed_t = {"difface": cfg.difface_t_start, "dblm": cfg.dblm_t_start}.get(method)
        return {
            "se": self.pack.se,
            "dsst": None if fixed_t is not None else self.pack.dsst,
            "resolution": self.resolution,
            "std_range": self.std_range,
            "offsets": cfg.offsets[:1] if single else cfg.offsets,
            "fixed_std": cfg.fixed_std * self.resolution / 512,
            "fixed_t_start": fixed_t,
        }

    def _dblm(self, y: Tensor, std_hat: Tensor | None = None, restored: Tensor | None = None) -> DBLMOutput:
        cfg = self.config
        single = cfg.method in ("dblm_dsst_dgsa", "dblm_dsst", "dblm")
        weights = None if single or cfg.level_weights is None else cfg.level_weights
        return run_dblm(
            y,
            self.pack.rm,
            weights=weights,
            std_hat=std_hat,
            rm_flip_ensemble=cfg.rm_flip_ensemble,
            restored=restored,
            **self._dblm_args(),
        )

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

    def _eta(self, std_hat: Tensor) -> Tensor:
        cfg = self.config
        if cfg.method == "difface":
            return torch.full_like(std_hat, 0.5 if cfg.eta is None else cfg.eta)
        if cfg.eta is not None:
            return torch.full_like(std_hat, cfg.eta)
        return (to_reference_std(std_hat, self.resolution) / cfg.eta_divisor).clamp(0, 1)

    def _input_batch(self, faces: Sequence[np.ndarray]) -> Tensor:
        """Crops -> (B, 3, R, R) in [0, 1] at the pack's resolution, on the device."""
        res = (self.resolution, self.resolution)
        return torch.stack([_resize(_to_tensor(f).unsqueeze(0), res)[0] for f in faces]).to(self.device)

    def estimate(self, faces: Sequence[np.ndarray]) -> list[FaceEstimate]:
        """SE + DSST only (no RM, no sampling): std*, start step, η and guidance levels per face."""
        out: list[FaceEstimate] = []
        bs = self.config.batch_size or self.auto_batch_size()
        for start in range(0, len(faces), bs):
            chunk = faces[start : start + bs]
            plan = plan_levels(self._input_batch(chunk), **self._dblm_args())
            no_sampling = self.config.method == "rm_only"
            t_start = plan.t_starts.max(dim=1).values
            eta = self._eta(plan.std_hat)
            for i in range(len(chunk)):
                std_hat = float(plan.std_hat[i])
                out.append(
                    FaceEstimate(
                        std_hat=std_hat,
                        std_hat_512=float(to_reference_std(std_hat, self.resolution)),
                        t_start=0 if no_sampling else int(t_start[i]),
                        eta=0.0 if no_sampling else float(eta[i]),
                        levels=_valid_levels(plan.stds[i], plan.valid[i]),
                    )
                )
        return out

    # -- the verb -------------------------------------------------------------------------------
    def restore(
        self,
        faces: Sequence[np.ndarray],
        *,
        seeds: Sequence[int] | None = None,
        std_hats: Sequence[float] | None = None,
        restored: Sequence[np.ndarray] | None = None,
        progress: Callable[[StepInfo], None] | None = None,
    ) -> list[FaceResult]:
        """Restore aligned face crops ((H, W, 3) uint8 or float in [0, 1]); results in input order.

        std_hats: std* per face from an earlier `estimate` on the same crops (skips SE here).
        restored: RM's output per face, given instead of running RM (same form as `faces`): the output
        of another restorer, or the ground truth for the oracle bound of `dynface evaluate`."""
        if seeds is not None and len(seeds) != len(faces):
            raise ValueError("one seed per face")
        if std_hats is not None and len(std_hats) != len(faces):
            raise ValueError("one std_hat per face")
        if restored is not None and len(restored) != len(faces):
            raise ValueError("one restored image per face")
        seeds = [face_seed(f, self.config.seed) for f in faces] if seeds is None else list(seeds)

        def run(chunk: list[int]) -> list[FaceResult]:
            known = None if std_hats is None else [float(std_hats[i]) for i in chunk]
            given = None if restored is None else [restored[i] for i in chunk]
            return self._restore_batch(
                [faces[i] for i in chunk], [seeds[i] for i in chunk], known, given, progress
            )

        return self._in_batches(len(faces), run)

    def _restore_batch(
        self,
        faces: list[np.ndarray],
        seeds: list[int],
        std_hats: list[float] | None,
        restored: list[np.ndarray] | None,
        progress: Callable[[StepInfo], None] | None,
    ) -> list[FaceResult]:
        t0 = time.perf_counter()
        sizes = [f.shape[:2] for f in faces]
        y = self._input_batch(faces)
        known = None if std_hats is None else torch.tensor(std_hats, dtype=torch.float32)
        given = None if restored is None else self._input_batch(restored)
        dblm = self._dblm(y, known, given)
        t1 = time.perf_counter()
        cfg = self.config
        if cfg.method == "rm_only":
            images = dblm.restored
            out = None
            eta = torch.zeros_like(dblm.std_hat)
            t_start = torch.zeros(len(faces), dtype=torch.long)
        else:
            targets = dblm.targets
            t_start = targets.t_starts.max(dim=1).values
            init = 2 * dblm.restored - 1 if (cfg.method == "difface" or cfg.init_from == "restored") else None
            if init is None:
                # [choice] §3.10: diffuse the target whose start is latest (the most blurred level).
                pick = targets.t_starts.argmax(dim=1)
                init = targets.targets[torch.arange(len(faces)), pick]
            eta = self._eta(dblm.std_hat)
            batch = SampleBatch(init=init, t_start=t_start, eta=eta, seeds=seeds, targets=targets)
            out = sample(
                self.prior,
                self.diffusion,
                batch,
                self._sampler_config(),
                dgsa=self.pack.dgsa,
                std_range=self.std_range,
                progress=progress,
            )
            images = (out.images + 1) / 2
        t2 = time.perf_counter()
        results = []
        n = len(faces)
        for i, size in enumerate(sizes):
            valid = dblm.targets.valid[i]
            levels = _valid_levels(dblm.targets.stds[i], valid)
            std_final = _valid_levels(out.stds_final[i], valid) if out is not None else levels
            std_hat = float(dblm.std_hat[i])
            results.append(
                FaceResult(
                    image=_to_uint8(_resize(images[i : i + 1].float().cpu(), tuple(size))[0]),
                    method=cfg.method,
                    seed=int(seeds[i]),
                    std_hat=std_hat,
                    std_hat_512=float(to_reference_std(std_hat, self.resolution)),
                    std_final=std_final,
                    levels=levels,
                    t_start=int(t_start[i]),
                    eta=float(eta[i]),
                    n_steps=int(out.n_steps[i]) if out is not None else 0,
                    guidance_residual=(
                        float(out.final_residual[i])
                        if out is not None and out.final_residual is not None
                        else None
                    ),
                    timings={"dblm_s": (t1 - t0) / n, "sample_s": (t2 - t1) / n},
                )
            )
        return results


def restore_config_fields() -> list[str]:
    """Names accepted by `RestoreConfig.from_dict` (for CLIs and flow parameters)."""
    return sorted(
        {f.name for f in fields(RestoreConfig)} - {"sampler"} | {f.name for f in fields(SamplerConfig)}
    )
