"""SDE, SE and DGSA trained on fresh pairs, one shard of every global batch per data-parallel worker.

The losses, models and optimisers are the starter's (dynface.train.sde / se / dgsa); what differs is
where a batch comes from. Row r of step s's global batch — its face, degradation, blur std, diffusion
step and noise — is a pure function of (seed, stage, s, r) (`FreshPairBatches.rows`, `row_rngs`), so a
worker makes only its own rows and the same global batch trains the same weights with 1 or N workers
(to float tolerance: the gradient average is summed in another order) and after any resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dynface.core.blur import gaussian_blur
from dynface.core.diffusion import Diffusion
from dynface.models.dgsa import DGSA, build_dgsa
from dynface.models.se import StdEstimator, build_sde
from dynface.models.unet import AttentionBlock, DifFaceUNet, ResBlock
from dynface.train.common import (
    GradSync,
    LoopConfig,
    LoopResult,
    seed_everything,
    train_stage,
)
from dynface.train.dgsa import (
    DGSATrainConfig,
    FrozenNets,
    Perceptual,
    dgsa_loss,
    dgsa_targets,
    guided_step_x0,
)
from dynface.train.fresh_pairs import FreshPairBatches
from dynface.train.sde import SDETrainConfig, sde_loss
from dynface.train.se import (
    SEResult,
    SETrainConfig,
    calibrate_tau,
    restored_psnr,
    se_loss,
    se_optimizer,
    std_grid,
    std_star,
)

StageTrainConfig = SDETrainConfig | SETrainConfig | DGSATrainConfig
STREAMS = {"sde": 1, "se": 2, "se_calibration": 3, "dgsa": 4}  # one data stream per stage
PRECISIONS = ("fp32", "bf16")


class StageStopped(RuntimeError):
    """A stage ended before its last step (`StageRun.stop`): later stages must not start on it."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__(f"{stage} stopped at step {step}; rerun with resume to continue")
        self.stage, self.step = stage, step


@dataclass(frozen=True)
class Shard:
    """Worker `rank` of `world` data-parallel workers takes the rank-th equal block of every batch."""

    rank: int = 0
    world: int = 1

    def rows(self, batch_size: int) -> range:
        if batch_size % self.world:
            raise ValueError(f"the global batch {batch_size} does not split over {self.world} workers")
        n = batch_size // self.world
        return range(self.rank * n, (self.rank + 1) * n)


@dataclass(frozen=True)
class DGSAMemory:
    """How the DGSA step fits a GPU: bf16 autocast, and the frozen UNet's blocks recomputed in the
    backward instead of kept (gradient checkpointing)."""

    precision: str = "fp32"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True, eq=False)
class StageRun:
    """What every stage of one run shares: the faces, the seed, the worker's shard and where
    checkpoints (any fsspec URI; `<checkpoints>/<stage>/last.pt`) and loss curves (local) go."""

    faces_file: Path  # dynface.train.fresh_pairs.face_array_file: uint8 faces at the degrade resolution
    resolution: int
    seed: int
    checkpoints: str
    work: Path
    device: str = "cpu"
    shard: Shard = Shard()
    grad_sync: GradSync | None = None
    ckpt_every: int = 200
    progress: bool = True
    stop: tuple[str, int] | None = None  # (stage, n): end that stage's call after n new steps

    def batches(self, stage: str, batch_size: int, steps: int) -> FreshPairBatches:
        return FreshPairBatches(
            self.faces_file, self.resolution, batch_size, steps, seed=self.seed * 16 + STREAMS[stage]
        )

    def row_rngs(self, stage: str, step: int, rows: Sequence[int]) -> list[np.random.Generator]:
        """The generators of a stage's per-row draws besides the pair (blur std, step, noise)."""
        return [np.random.default_rng([self.seed, STREAMS[stage], step, row, 1]) for row in rows]

    def pairs(self, batches: FreshPairBatches, step: int) -> tuple[range, Tensor, Tensor]:
        rows = self.shard.rows(batches.batch_size)
        lq, gt = batches.rows(step, rows)
        return rows, lq.to(self.device), gt.to(self.device)

    def loop(self, stage: str, steps: int) -> LoopConfig:
        stop = self.stop[1] if self.stop is not None and self.stop[0] == stage else None
        return LoopConfig(
            steps=steps,
            ckpt_every=self.ckpt_every,
            seed=self.seed,
            progress=self.progress and self.shard.rank == 0,
            device=self.device,
            stop_after=stop,
        )

    def train(
        self,
        stage: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[np.random.Generator, int], dict[str, Tensor]],
        config: StageTrainConfig,
    ) -> LoopResult:
        """`train_stage` with this run's loop, checkpoint URI and gradient averaging; raises
        StageStopped when the stage ends before its last step."""
        result = train_stage(
            stage,
            model,
            optimizer,
            loss_fn,
            self.work / stage,
            replace(config, loop=self.loop(stage, config.steps)),
            checkpoint_uri=f"{self.checkpoints.rstrip('/')}/{stage}/last.pt",
            grad_sync=self.grad_sync,
            writes=self.shard.rank == 0,
        )
        if result.stopped_by != "steps":
            raise StageStopped(stage, result.step)
        return result


def row_noise(rngs: Sequence[np.random.Generator], shape: tuple[int, ...], device: str) -> Tensor:
    """(len(rngs), *shape) standard normal noise, row i from its own generator (any worker count)."""
    rows = []
    for rng in rngs:
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        rows.append(torch.randn(shape, generator=gen))
    return torch.stack(rows).to(device)


def train_sde_fresh(run: StageRun, config: SDETrainConfig) -> LoopResult:
    """SDE pre-training (dynface.train.sde): blurred ground truths, std ~ U[std range] per row."""
    seed_everything(run.seed)
    model = build_sde(config.sde)
    lo, hi = config.sde["std_min"], config.sde["std_max"]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    batches = run.batches("sde", config.batch_size, config.steps)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        rows, _, gt = run.pairs(batches, step)
        std = torch.tensor([r.uniform(lo, hi) for r in run.row_rngs("sde", step, rows)], dtype=torch.float32)
        std = std.to(run.device)
        return sde_loss(model, gaussian_blur(gt, std), std)

    return run.train("sde", model, opt, loss_fn, config)


@torch.no_grad()
def calibration_psnr(run: StageRun, rm: nn.Module, config: SETrainConfig, grid: Tensor) -> Tensor:
    """(calib_pairs, G) blurred PSNRs of RM on fixed fresh pairs of their own stream (every worker
    computes all of them: τ is the same everywhere)."""
    batches = run.batches("se_calibration", config.calib_pairs, 1)
    out = []
    for start in range(0, config.calib_pairs, 16):
        lq, gt = batches.rows(0, range(start, min(start + 16, config.calib_pairs)))
        out.append(restored_psnr(rm, lq.to(run.device), gt.to(run.device), grid).cpu())
    return torch.cat(out)


def train_se_fresh(
    run: StageRun, config: SETrainConfig, *, rm: nn.Module, sde: nn.Module, tm: nn.Module
) -> SEResult:
    """SE = TM + SDE with std* labels from the frozen `rm` (dynface.train.se), τ calibrated first."""
    rm = rm.eval().requires_grad_(False).to(run.device)
    grid = std_grid(config.std_range, config.grid_size).to(run.device)
    psnr = calibration_psnr(run, rm, config, grid)
    tau = calibrate_tau(psnr, grid.cpu()) if config.tau is None else float(config.tau)
    labels = std_star(psnr, grid.cpu(), tau)
    quantiles = tuple(float(v) for v in torch.quantile(labels, torch.tensor([0.1, 0.5, 0.9])))
    seed_everything(run.seed)
    se = StdEstimator(sde, tm)
    opt = se_optimizer(se, config)
    batches = run.batches("se", config.batch_size, config.steps)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        _, lq, gt = run.pairs(batches, step)
        star = std_star(restored_psnr(rm, lq, gt, grid), grid, tau)
        return se_loss(se, lq, gt, star, config.std_weight)

    loop = run.train("se", se, opt, loss_fn, config)
    return SEResult(loop=loop, se=loop.model, tau=tau, label_quantiles=quantiles)  # type: ignore[arg-type]


@contextmanager
def checkpointed_blocks(prior: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block the frozen UNet's ResBlocks and attention blocks keep only their inputs and
    recompute the rest during the backward (activation memory of one block, not of the whole UNet).
    The blocks checkpoint in training mode only; the prior has no dropout, so that mode computes the
    same function."""
    if not enabled:
        yield
        return
    if not isinstance(prior, DifFaceUNet):
        raise TypeError(f"gradient checkpointing needs the DifFace UNet, got {type(prior).__name__}")
    if prior.config.dropout:
        raise ValueError("checkpointing the frozen prior in training mode needs dropout 0")
    blocks = [m for m in prior.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    saved = [(m.use_checkpoint, m.training) for m in blocks]
    for m in blocks:
        m.use_checkpoint, m.training = True, True
    try:
        yield
    finally:
        for m, (flag, mode) in zip(blocks, saved):
            m.use_checkpoint, m.training = flag, mode


def dgsa_step_loss(
    model: DGSA,
    nets: FrozenNets,
    diffusion: Diffusion,
    config: DGSATrainConfig,
    lq: Tensor,
    gt: Tensor,
    rngs: Sequence[np.random.Generator],
    *,
    memory: DGSAMemory = DGSAMemory(),
    perceptual: Perceptual | None = None,
) -> dict[str, Tensor]:
    """One DGSA training loss (dynface.train.dgsa) on lq, gt (B, 3, H, W) in [0, 1], row i's step index
    and noise drawn from rngs[i]."""
    dev = lq.device
    x0 = gt * 2 - 1
    targets, k_start, eta = dgsa_targets(nets, diffusion, lq, config.eta_divisor)
    index = torch.tensor([int(r.integers(1, max(int(k), 1) + 1)) for r, k in zip(rngs, k_start)]).to(dev)
    noise = (row_noise(rngs, tuple(x0.shape[1:]), str(dev)), row_noise(rngs, tuple(x0.shape[1:]), str(dev)))
    bf16 = memory.precision == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast, checkpointed_blocks(nets.prior, memory.checkpointing):
        x0_prev = guided_step_x0(model, nets, diffusion, x0, targets, index, eta, config, noise=noise)
    return dgsa_loss(x0_prev.float(), x0, config, perceptual)


def freeze(nets: FrozenNets, device: str) -> None:
    for net in (nets.prior, nets.rm, nets.se):
        if net is not None:
            net.eval().requires_grad_(False).to(device)


def train_dgsa_fresh(
    run: StageRun,
    config: DGSATrainConfig,
    *,
    nets: FrozenNets,
    memory: DGSAMemory = DGSAMemory(),
    perceptual: Perceptual | None = None,
) -> LoopResult:
    """DGSA through one guided step of the frozen prior (dynface.train.dgsa), on fresh pairs."""
    if nets.se is None:
        raise ValueError("DGSA trains on the trained SE's std*, not a fixed std: train SE first")
    freeze(nets, run.device)
    seed_everything(run.seed)
    model = build_dgsa(config.dgsa)
    diffusion = Diffusion.create(config.respacing)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    batches = run.batches("dgsa", config.batch_size, config.steps)

    def loss_fn(rng: np.random.Generator, step: int) -> dict[str, Tensor]:
        rows, lq, gt = run.pairs(batches, step)
        rngs = run.row_rngs("dgsa", step, rows)
        return dgsa_step_loss(
            model, nets, diffusion, config, lq, gt, rngs, memory=memory, perceptual=perceptual
        )

    return run.train("dgsa", model, opt, loss_fn, config)


def dgsa_step_peak(
    nets: FrozenNets,
    config: DGSATrainConfig,
    batch: int,
    *,
    memory: DGSAMemory = DGSAMemory(),
    device: str = "cpu",
    seed: int = 0,
) -> tuple[float, float]:
    """(peak bytes, seconds) of one DGSA training step (forward and backward, no optimizer update) on
    `batch` synthetic faces: what the memory model and the benchmark measure."""
    import time

    from dynface.core.memory import PeakMemory

    freeze(nets, device)
    torch.manual_seed(seed)
    model = build_dgsa(config.dgsa).to(device)
    diffusion = Diffusion.create(config.respacing)
    res = nets.resolution
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand((batch, 3, res, res), generator=gen).to(device)
    lq = (gt + 0.1 * torch.randn(gt.shape, generator=gen).to(device)).clamp(0, 1)
    rngs = [np.random.default_rng([seed, row]) for row in range(batch)]
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        loss = dgsa_step_loss(model, nets, diffusion, config, lq, gt, rngs, memory=memory)["loss"]
        loss.backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return float(peak.peak_bytes), seconds


def dgsa_batch_size(
    nets: FrozenNets,
    config: DGSATrainConfig,
    *,
    memory: DGSAMemory = DGSAMemory(),
    device: str = "cpu",
    budget_fraction: float = 0.8,
    max_batch: int = 64,
) -> int:
    """The largest per-worker DGSA batch that fits `budget_fraction` of the device's free memory: the
    sampler's linear memory model (dynface.core.memory) fitted to one training step at batch 1 and 2."""
    from dynface.core.memory import available_bytes, batch_size_for_budget

    budget = int(available_bytes(device) * budget_fraction)
    p1, _ = dgsa_step_peak(nets, config, 1, memory=memory, device=device)
    p2, _ = dgsa_step_peak(nets, config, 2, memory=memory, device=device)
    return batch_size_for_budget(p1, p2, budget, max_batch=max_batch).batch_size
