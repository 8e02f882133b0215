"""`RestoreConfig`: how faces are restored (the method variant and every knob of it), one typed value."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from dynface.core.sampler import SamplerConfig
from dynface.core.speed import SpeedOptions

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
