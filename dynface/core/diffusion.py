"""Gaussian diffusion of DifFace's FFHQ-512 prior (improved-diffusion lineage) as pure math.

Everything here works on precomputed float64 numpy tables of a *respaced* process: index ``k`` runs over the
kept original timesteps ``timestep_map[k]`` (ascending), and the UNet is fed the original integer timestep
(``rescale_timesteps=False``). The network is never stored; it is passed to :meth:`Diffusion.training_losses`.

Conventions (method spec §4.3): linear β in [1e-4, 0.02] over T = 1000 steps, ε-prediction, learned-range
variance (model output ``(B, 2C, H, W) = [ε̂, v]``), x̂0 clamped to [-1, 1] by default. ``index`` is a
``(B,)`` int64 tensor, one spaced-grid index per sample; table values are gathered in float64 and cast to
the dtype and device of the state before any tensor arithmetic, so every step stays differentiable with
respect to ``x_t`` and ``model_output``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["DDIMSchedule", "Diffusion", "StepOutput", "linear_betas", "space_timesteps"]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """(T,) float64 linear β schedule, ``np.linspace(beta_start, beta_end, T)``."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, respacing: str | int) -> np.ndarray:
    """Sorted (N,) int64 original timesteps kept by a respacing.

    ``"ddimN"``: an evenly strided grid ``range(0, T, stride)`` with exactly N entries (stride 4 for
    ddim250 at T=1000). ``"N"``/``N``/``"a,b,..."``: the comma sections split [0, T) into equal parts and
    each keeps that many evenly spaced (rounded) steps. ``""`` or ``str(T)``: every step.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(respacing, bool) or not isinstance(respacing, (str, int)):
        raise ValueError(f"respacing must be a str or int, got {respacing!r}")
    spec = str(respacing).strip()
    if spec == "":
        return np.arange(num_timesteps, dtype=np.int64)
    if spec.startswith("ddim"):
        count = _parse_count(spec[4:], spec)
        # Search the stride that gives exactly `count` steps (stride T//count for divisors of T).
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return np.arange(0, num_timesteps, stride, dtype=np.int64)
        raise ValueError(f"no stride gives exactly {count} steps out of {num_timesteps}")
    counts = [_parse_count(part, spec) for part in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulated fractional position and Python's round() (half to even), as in the reference lineage,
        # so grids agree even where j·stride lands near a half.
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return np.array(sorted(set(kept)), dtype=np.int64)


def _parse_count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"bad respacing {spec!r}") from None
    if count < 1:
        raise ValueError(f"bad respacing {spec!r}: counts must be >= 1")
    return count


_TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@dataclass(frozen=True)
class StepOutput:
    """One reverse step: ``prev_sample`` and ``pred_xstart`` are (B, C, H, W); ``eps`` is the raw ε̂."""

    prev_sample: Tensor
    pred_xstart: Tensor
    eps: Tensor


@dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """The coefficients of one guided DDIM run, built once so that no step reads the device.

    Per-step scalars (index k on the spaced grid) live on the host as numpy arrays already rounded to
    the state's dtype, and enter the arithmetic as Python numbers; coefficients that depend on each
    sample's η are (B, K) tensors on the device, rows in the sampler's order. The values are bit for bit
    those `Diffusion.predict_xstart` / `ddim_step` gather for the same index and η
    (tests/test_diffusion.py), so a step computes exactly what those methods compute.
    """

    timesteps: np.ndarray  # (K,) original timesteps fed to the network
    sqrt_recip_alphas_cumprod: np.ndarray  # (K,)
    sqrt_recipm1_alphas_cumprod: np.ndarray  # (K,)
    sqrt_alphas_cumprod_prev: np.ndarray  # (K,)
    sqrt_alphas_cumprod: np.ndarray  # (K,)
    dir_coef: Tensor  # (B, K) √(1 − ᾱ_prev − σ²)
    noise_coef: Tensor  # (B, K) σ, 0 at k = 0

    def predict_xstart(self, x_t: Tensor, k: int, eps: Tensor, *, clip: bool = True) -> Tensor:
        """x̂0 at step k for every row of x_t (the same k for all)."""
        x0 = float(self.sqrt_recip_alphas_cumprod[k]) * x_t - float(self.sqrt_recipm1_alphas_cumprod[k]) * eps
        return x0.clamp(-1.0, 1.0) if clip else x0

    def step(self, x0: Tensor, eps: Tensor, noise: Tensor, k: int) -> Tensor:
        """The DDIM step from k for rows 0..n−1 (n = len(x0)): √ᾱ_prev·x̂0 + dir·ε̂ + σ·z."""
        n = x0.shape[0]
        shape = (n, *([1] * (x0.ndim - 1)))
        return (
            float(self.sqrt_alphas_cumprod_prev[k]) * x0
            + self.dir_coef[:n, k].view(shape) * eps
            + self.noise_coef[:n, k].view(shape) * noise
        )


@dataclass(frozen=True, eq=False)
class Diffusion:
    """Respaced diffusion; all tables float64 numpy of length num_steps, index k on the spaced grid."""

    timestep_map: np.ndarray  # (N,) int64 original timesteps, ascending
    base_alphas_cumprod: np.ndarray  # (T,) of the unspaced process (DSST uses it)
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    # "float32" rounds gathered coefficients to float32 and does the coefficient-only arithmetic (DDIM σ) in
    # float32 before meeting the state, as improved-diffusion's `_extract_into_tensor(...).float()` does. The
    # golden vectors were made that way, so only this mode reproduces them bit for bit in float64; the
    # default keeps exact float64 coefficients (they differ from the reference by ~1e-6 relative).
    coefficient_dtype: Literal["float64", "float32"] = "float64"

    def __post_init__(self) -> None:
        if self.coefficient_dtype not in ("float64", "float32"):
            raise ValueError(
                f"coefficient_dtype must be 'float64' or 'float32', got {self.coefficient_dtype!r}"
            )
        n = len(self.timestep_map)
        if n < 1 or any(len(getattr(self, f)) != n for f in _TABLES):
            raise ValueError("all tables must have the length of timestep_map (>= 1)")

    @classmethod
    def create(
        cls,
        respacing: str | int = "ddim250",
        *,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        coefficient_dtype: Literal["float64", "float32"] = "float64",
    ) -> Diffusion:
        """Build the tables of the process respaced to ``space_timesteps(num_timesteps, respacing)``."""
        base_ac = np.cumprod(1.0 - linear_betas(num_timesteps, beta_start, beta_end))
        kept = space_timesteps(num_timesteps, respacing)
        # Composition: β'_k = 1 − ᾱ(τ_k)/ᾱ(τ_{k−1}) with ᾱ(τ_{−1}) = 1, then the usual tables from β'.
        prev_kept = np.concatenate([[1.0], base_ac[kept][:-1]])
        betas = 1.0 - base_ac[kept] / prev_kept
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.concatenate([[1.0], ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The variance at k = 0 is 0; its log is replaced by the value at k = 1 (a one-step grid keeps β).
        clip_from = post_var[1:2] if len(post_var) > 1 else betas[:1]
        return cls(
            timestep_map=kept,
            base_alphas_cumprod=base_ac,
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.concatenate([clip_from, post_var[1:]])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            coefficient_dtype=coefficient_dtype,
        )

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    # ----------------------------------------------------------------------------------- indexing

    def index_for_timestep(self, t: int | np.ndarray) -> int | np.ndarray:
        """Largest spaced index k with ``timestep_map[k] <= t``; ``t`` in [0, T) (scalar or array)."""
        arr = np.asarray(t)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"t must be integer, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.base_alphas_cumprod)):
            raise ValueError(f"t out of range [0, {len(self.base_alphas_cumprod)})")
        k = np.searchsorted(self.timestep_map, arr, side="right") - 1
        return int(k) if k.ndim == 0 else k.astype(np.int64)

    def model_timesteps(self, index: Tensor) -> Tensor:
        """(B,) int64 original timesteps for the UNet, on ``index``'s device."""
        idx = self._check_index(index)
        return torch.from_numpy(self.timestep_map[idx].copy()).to(index.device)

    def _check_index(self, index: Tensor, batch: int | None = None) -> np.ndarray:
        if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError("index must be an integer tensor")
        if index.ndim != 1 or (batch is not None and index.shape[0] != batch):
            raise ValueError(f"index must have shape ({batch if batch is not None else 'B'},)")
        idx = index.detach().cpu().numpy().astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_steps):
            raise ValueError(f"index out of range [0, {self.num_steps})")
        return idx

    def _gather(self, values: np.ndarray | Tensor, x: Tensor) -> Tensor:
        """(B,) gathered values -> (B, 1, ..., 1) in x's dtype/device, broadcasting over C, H, W."""
        if isinstance(values, Tensor):
            out = values.to(getattr(torch, self.coefficient_dtype))
        else:
            out = torch.from_numpy(np.ascontiguousarray(values, dtype=self.coefficient_dtype))
        return out.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def _check_pair(self, x: Tensor, other: Tensor, what: str) -> None:
        if other.shape != x.shape:
            raise ValueError(f"{what} shape {tuple(other.shape)} != {tuple(x.shape)}")

    # ----------------------------------------------------------------------------------- forward

    def q_sample(self, x0: Tensor, index: Tensor, noise: Tensor) -> Tensor:
        """x_k = √ᾱ_k·x0 + √(1−ᾱ_k)·noise; all (B, C, H, W)."""
        self._check_pair(x0, noise, "noise")
        idx = self._check_index(index, x0.shape[0])
        a = self._gather(self.sqrt_alphas_cumprod[idx], x0)
        b = self._gather(self.sqrt_one_minus_alphas_cumprod[idx], x0)
        return a * x0 + b * noise

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, index: Tensor) -> Tensor:
        """Mean of q(x_{k−1} | x_k, x0), (B, C, H, W)."""
        self._check_pair(x_t, x0, "x0")
        idx = self._check_index(index, x_t.shape[0])
        c1 = self._gather(self.posterior_mean_coef1[idx], x_t)
        c2 = self._gather(self.posterior_mean_coef2[idx], x_t)
        return c1 * x0 + c2 * x_t

    # ----------------------------------------------------------------------------------- model output

    def split_output(self, model_output: Tensor, *, channels: int = 3) -> tuple[Tensor, Tensor | None]:
        """(B, 2C, H, W) -> (ε̂, v), each (B, C, H, W); an ε-only (B, C, H, W) output gives (ε̂, None)."""
        if model_output.ndim < 2:
            raise ValueError("model_output must be (B, C, ...)")
        c = model_output.shape[1]
        if c == 2 * channels:
            return model_output[:, :channels], model_output[:, channels:]
        if c == channels:
            return model_output, None
        raise ValueError(f"model_output has {c} channels, expected {channels} or {2 * channels}")

    def _split_for(self, x_t: Tensor, model_output: Tensor) -> tuple[Tensor, Tensor | None]:
        if model_output.ndim != x_t.ndim or model_output.shape[0] != x_t.shape[0]:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match x_t")
        if model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match x_t")
        return self.split_output(model_output, channels=x_t.shape[1])

    def predict_xstart(self, x_t: Tensor, index: Tensor, eps: Tensor, *, clip: bool = True) -> Tensor:
        """x̂0 = √(1/ᾱ)·x_t − √(1/ᾱ − 1)·ε, optionally clamped to [−1, 1]; (B, C, H, W)."""
        self._check_pair(x_t, eps, "eps")
        idx = self._check_index(index, x_t.shape[0])
        a = self._gather(self.sqrt_recip_alphas_cumprod[idx], x_t)
        b = self._gather(self.sqrt_recipm1_alphas_cumprod[idx], x_t)
        x0 = a * x_t - b * eps
        return x0.clamp(-1.0, 1.0) if clip else x0

    def predict_eps(self, x_t: Tensor, index: Tensor, x0: Tensor) -> Tensor:
        """ε consistent with x_t and x0: (√(1/ᾱ)·x_t − x0) / √(1/ᾱ − 1); (B, C, H, W)."""
        self._check_pair(x_t, x0, "x0")
        idx = self._check_index(index, x_t.shape[0])
        a = self._gather(self.sqrt_recip_alphas_cumprod[idx], x_t)
        b = self._gather(self.sqrt_recipm1_alphas_cumprod[idx], x_t)
        return (a * x_t - x0) / b

    def _log_variance(self, idx: np.ndarray, v: Tensor | None, x_t: Tensor) -> Tensor:
        """Learned range: frac·log β + (1−frac)·log β̃ with frac = (v+1)/2; fixed-large when v is None."""
        max_log = np.log(self.betas[idx])
        if v is None:
            # Fixed-large variance (improved-diffusion's choice when sigma is not learned and not small).
            large = np.log(np.concatenate([self.posterior_variance[1:2], self.betas[1:]]))
            large = large if len(large) == self.num_steps else np.log(self.betas)  # one-step grid
            return self._gather(large[idx], x_t).expand_as(x_t)
        lo = self._gather(self.posterior_log_variance_clipped[idx], x_t)
        hi = self._gather(max_log, x_t)
        frac = (v + 1.0) / 2.0
        return frac * hi + (1.0 - frac) * lo

    def p_mean_variance(
        self, x_t: Tensor, index: Tensor, model_output: Tensor, *, clip: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log_variance, pred_xstart) of p(x_{k−1} | x_k), each (B, C, H, W)."""
        idx = self._check_index(index, x_t.shape[0])
        eps, v = self._split_for(x_t, model_output)
        pred_xstart = self.predict_xstart(x_t, index, eps, clip=clip)
        mean = self.q_posterior_mean(pred_xstart, x_t, index)
        return mean, self._log_variance(idx, v, x_t), pred_xstart

    # ----------------------------------------------------------------------------------- reverse steps

    def ddpm_step(
        self, x_t: Tensor, index: Tensor, model_output: Tensor, noise: Tensor, *, clip: bool = True
    ) -> StepOutput:
        """Ancestral step: mean + exp(½·log_var)·z, no noise for samples at index 0."""
        self._check_pair(x_t, noise, "noise")
        idx = self._check_index(index, x_t.shape[0])
        eps, _ = self._split_for(x_t, model_output)
        mean, log_var, pred_xstart = self.p_mean_variance(x_t, index, model_output, clip=clip)
        nonzero = self._gather((idx != 0).astype(np.float64), x_t)
        prev = mean + nonzero * torch.exp(0.5 * log_var) * noise
        return StepOutput(prev_sample=prev, pred_xstart=pred_xstart, eps=eps)

    def ddim_step(
        self,
        x_t: Tensor,
        index: Tensor,
        model_output: Tensor,
        noise: Tensor,
        *,
        eta: float | Tensor = 0.0,
        clip: bool = True,
    ) -> StepOutput:
        """DifFace DDIM step with the raw ε̂; ``eta`` is a float or a (B,) tensor (per-sample η)."""
        self._check_pair(x_t, noise, "noise")
        idx = self._check_index(index, x_t.shape[0])
        eps, _ = self._split_for(x_t, model_output)
        if isinstance(eta, Tensor):
            if eta.shape != (x_t.shape[0],):
                raise ValueError(f"eta tensor must have shape ({x_t.shape[0]},)")
            eta_np = eta.detach().cpu().numpy().astype(np.float64)
        else:
            eta_np = np.full(len(idx), float(eta))
        if np.any(eta_np < 0):
            raise ValueError("eta must be >= 0")
        pred_xstart = self.predict_xstart(x_t, index, eps, clip=clip)
        sqrt_ab_prev, dir_coef, noise_coef = self._ddim_coefficients(idx, eta_np)
        prev = (
            self._gather(sqrt_ab_prev, x_t) * pred_xstart
            + self._gather(dir_coef, x_t) * eps
            + self._gather(noise_coef, x_t) * noise
        )
        return StepOutput(prev_sample=prev, pred_xstart=pred_xstart, eps=eps)

    def _ddim_coefficients(self, idx: np.ndarray, eta: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """(√ᾱ_prev, √(1 − ᾱ_prev − σ²), σ·[k > 0]) for broadcastable spaced indices and η, on the CPU in the
        coefficient dtype. Elementwise, so a (B, K) table holds bit for bit what B×K single steps get."""
        # Coefficient math on CPU in torch (not numpy): torch's float32 sqrt rounds differently from
        # numpy's, and the float32 mode must reproduce the reference's torch arithmetic bit for bit.
        cdt = getattr(torch, self.coefficient_dtype)
        eta_c = torch.from_numpy(np.asarray(eta, dtype=np.float64)).to(cdt)
        ab = torch.from_numpy(self.alphas_cumprod[idx]).to(cdt)
        ab_prev = torch.from_numpy(self.alphas_cumprod_prev[idx]).to(cdt)
        sigma = eta_c * torch.sqrt((1.0 - ab_prev) / (1.0 - ab)) * torch.sqrt(1.0 - ab / ab_prev)
        # 1 − ᾱ_prev − σ² >= 0 exactly for η <= 1; clamp the rounding (and η > 1) instead of a NaN.
        dir_coef = torch.sqrt((1.0 - ab_prev - sigma**2).clamp(min=0.0))
        nonzero = torch.from_numpy(np.asarray(idx) != 0).to(cdt)
        return torch.sqrt(ab_prev), dir_coef, nonzero * sigma

    def ddim_schedule(self, eta: np.ndarray, *, device: torch.device, dtype: torch.dtype) -> DDIMSchedule:
        """Every coefficient of a guided DDIM run over the whole grid, built once (see `DDIMSchedule`).

        eta (B,) per sample; the state is of `dtype` on `device`."""
        eta = np.asarray(eta, dtype=np.float64).reshape(-1)
        if np.any(eta < 0):
            raise ValueError("eta must be >= 0")
        steps = np.arange(self.num_steps)
        sqrt_ab_prev, dir_coef, noise_coef = self._ddim_coefficients(steps[None, :], eta[:, None])

        def host(values: np.ndarray | Tensor) -> np.ndarray:
            # The values `_gather` would give: rounded to the coefficient dtype, then to the state's.
            if not isinstance(values, Tensor):
                values = torch.from_numpy(np.asarray(values, dtype=self.coefficient_dtype))
            return values.to(dtype).numpy()

        return DDIMSchedule(
            timesteps=self.timestep_map.copy(),
            sqrt_recip_alphas_cumprod=host(self.sqrt_recip_alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=host(self.sqrt_recipm1_alphas_cumprod),
            sqrt_alphas_cumprod_prev=host(sqrt_ab_prev[0]),
            # The closed-form gradient divides by the float64 table cast to the state's dtype.
            sqrt_alphas_cumprod=torch.from_numpy(self.sqrt_alphas_cumprod).to(dtype).numpy(),
            dir_coef=dir_coef.to(dtype).to(device),
            noise_coef=noise_coef.to(dtype).to(device),
        )

    # ----------------------------------------------------------------------------------- training

    def training_losses(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        index: Tensor,
        noise: Tensor,
        *,
        pixel_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Rescaled-MSE loss with learned range; returns per-sample (B,) "mse", "vb" and "loss".

        ``vb`` is KL(q(x_{k−1}|x_k,x0) || p) in bits/dim, or the discretized decoder NLL at index 0, computed
        with ε̂ detached so that it trains only v; ``loss = mse + vb · T/1000`` with T the original steps.
        ``pixel_weight`` (B, 1, H, W), e.g. a 0/1 mask of the pixels that are real image, turns both
        per-sample means into weighted means (None: every pixel counts equally).
        """
        idx = self._check_index(index, x0.shape[0])
        x_t = self.q_sample(x0, index, noise)
        out = model(x_t, self.model_timesteps(index))
        eps, v = self._split_for(x_t, out)
        mse = _pixel_mean((noise - eps) ** 2, pixel_weight)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self._vb_bits(x0, x_t, index, idx, frozen, pixel_weight)
        vb = vb * (len(self.base_alphas_cumprod) / 1000.0)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def _vb_bits(
        self,
        x0: Tensor,
        x_t: Tensor,
        index: Tensor,
        idx: np.ndarray,
        output: Tensor,
        pixel_weight: Tensor | None = None,
    ) -> Tensor:
        true_mean = self.q_posterior_mean(x0, x_t, index)
        true_log_var = self._gather(self.posterior_log_variance_clipped[idx], x_t)
        mean, log_var, _ = self.p_mean_variance(x_t, index, output, clip=False)
        kl = _pixel_mean(_normal_kl(true_mean, true_log_var, mean, log_var), pixel_weight) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = _pixel_mean(nll, pixel_weight) / math.log(2.0)
        first = torch.from_numpy(idx == 0).to(x_t.device)
        return torch.where(first, nll, kl)


def _pixel_mean(values: Tensor, pixel_weight: Tensor | None) -> Tensor:
    """Per-sample mean of (B, C, H, W) values, weighted per pixel by (B, 1, H, W) when given."""
    if pixel_weight is None:
        return values.flatten(1).mean(1)
    w = pixel_weight.expand_as(values)
    return (values * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of Φ used by the improved-diffusion decoder term (kept for loss parity).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of 8-bit data in [−1, 1] (bin width 2/255) under a Gaussian."""
    inv_std = torch.exp(-log_scales)
    centred = x - means
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The edge bins extend to ±∞.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
