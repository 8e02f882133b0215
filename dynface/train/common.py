"""Shared training machinery: seeding, EMA, resumable checkpoints, the step loop and loss-curve PNGs.

Every trainer is a `loss_fn(rng, step) -> {"loss": scalar tensor, ...}` driven by `train_loop`. The loop
owns all mutable state (modules, optimizer, EMA copy, the numpy data generator and torch's global RNG) and
writes it to `<out_dir>/last.pt` every `ckpt_every` steps, so a run that is killed resumes from the last
checkpoint and, on a deterministic CPU, reaches bit for bit the state of an uninterrupted run.
"""

from __future__ import annotations

import copy
import io
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

LossFn = Callable[[np.random.Generator, int], dict[str, Tensor]]
LrSchedule = Callable[[int], float]
GradSync = Callable[[nn.Module], None]
CHECKPOINT_NAME = "last.pt"


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived during `train_loop`: it checkpointed at the step boundary, then raised this."""


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy's legacy state and torch; return a fresh numpy Generator for data draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def warmup_cosine(base_lr: float, *, warmup: int, total: int, final_frac: float = 0.1) -> LrSchedule:
    """lr(step): linear warm-up over `warmup` steps, then cosine from base_lr to final_frac·base_lr."""
    if base_lr <= 0 or warmup < 0 or total < 1 or not 0 <= final_frac <= 1:
        raise ValueError("need base_lr > 0, warmup >= 0, total >= 1, 0 <= final_frac <= 1")

    def lr_at(step: int) -> float:
        if step < warmup:
            return base_lr * (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    return lr_at


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with the usual warm-up min(decay, (1+step)/(10+step)): early averages forget fast."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


@dataclass(frozen=True)
class LoopConfig:
    """Step loop knobs. `budget_s` stops early (and counts as finished) once that much time is spent."""

    steps: int
    ckpt_every: int = 200
    seed: int = 0
    budget_s: float | None = None
    ema_decay: float | None = None  # None: no EMA copy
    grad_clip: float | None = 1.0
    fixed_batch: bool = False  # reseed every step: the same batch each step (overfit checks)
    stop_after: int | None = None  # end this call after that many new steps (time slicing, kill tests)
    progress: bool = True
    # "cpu" or e.g. "cuda": the loop moves the model there; loss functions put their batches on it too.
    # Resumes are bit-exact on CPU only (CUDA's RNG state is not checkpointed).
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.ckpt_every < 1:
            raise ValueError("steps must be >= 0 and ckpt_every >= 1")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must be in (0, 1)")


@dataclass(frozen=True)
class LoopResult:
    """After the loop: the trained module (EMA copy when enabled), the raw module and the history."""

    model: nn.Module
    raw: nn.Module
    step: int
    elapsed_s: float
    history: dict[str, list[float]]
    stopped_by: str  # "steps" | "budget" | "stop_after"

    def summary(self) -> dict[str, Any]:
        """What a training record keeps of a stage: steps, seconds, why it stopped, final losses."""
        return {
            "steps": self.step,
            "elapsed_s": round(self.elapsed_s, 1),
            "stopped_by": self.stopped_by,
            "final": {k: round(self.final(k), 6) for k in sorted(self.history)},
        }

    def final(self, key: str = "loss", window: int = 50) -> float:
        """Mean of the last `window` logged values of `key` (nan if none)."""
        vals = self.history.get(key, [])[-window:]
        return float(np.mean(vals)) if vals else float("nan")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _is_local(uri: str | Path) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def _local_path(uri: str | Path) -> Path:
    return Path(str(uri).removeprefix("file://"))


def save_state(obj: Any, uri: str | Path) -> None:
    """torch.save to a local path (atomically, via a temporary file) or any fsspec URI."""
    if _is_local(uri):
        path = _local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(obj, path)
        return
    import fsspec

    buf = io.BytesIO()
    torch.save(obj, buf)
    with fsspec.open(str(uri), "wb") as fh:  # object stores publish a file only once it is complete
        fh.write(buf.getvalue())


def state_exists(uri: str | Path) -> bool:
    if _is_local(uri):
        return _local_path(uri).is_file()
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri))
    return bool(fs.isfile(path))


def save_checkpoint(
    path: Path | str,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    rng: np.random.Generator,
    history: Mapping[str, list[float]],
    elapsed_s: float,
    stopped_by: str | None,
) -> None:
    """Everything needed to continue: weights, optimizer, EMA, both RNG states, history and time spent."""
    save_state(
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "torch_rng": torch.get_rng_state(),
            "np_rng": rng.bit_generator.state,
            "history": {k: list(v) for k, v in history.items()},
            "elapsed_s": elapsed_s,
            "stopped_by": stopped_by,
        },
        path,
    )


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, from a local path or any fsspec URI. Not weights-only:
    it holds numpy's generator state and the loss history; read only checkpoints this code wrote."""
    if _is_local(path):
        return torch.load(_local_path(path), map_location="cpu", weights_only=False)
    from dynface.checkpoints import read_bytes

    return torch.load(io.BytesIO(read_bytes(str(path))), map_location="cpu", weights_only=False)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM while the block runs (main thread only; elsewhere never set)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: event.set())
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_loss_curve(history: Mapping[str, list[float]], path: Path, *, title: str, smooth: int = 25) -> None:
    """PNG of every logged series (raw, faint) with a moving average on a log y-axis when positive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positive = True
    for i, (key, values) in enumerate(sorted(history.items())):
        if not values:
            continue
        arr = np.asarray(values, dtype=np.float64)
        positive &= bool(np.all(arr > 0))
        color = f"C{i % 10}"
        ax.plot(arr, color=color, alpha=0.25, linewidth=0.7)
        k = max(1, min(smooth, len(arr)))
        ma = np.convolve(arr, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(arr)), ma, color=color, label=f"{key} (last {ma[-1]:.4g})")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def train_loop(
    *,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    out_dir: Path,
    config: LoopConfig,
    lr_at: LrSchedule | None = None,
    checkpoint_uri: str | None = None,
    grad_sync: GradSync | None = None,
    writes: bool = True,
) -> LoopResult:
    """Run (or resume, from `<out_dir>/last.pt`) `config.steps` optimisation steps of `loss_fn`.

    `lr_at(step)` sets every parameter group's lr, times the group's optional "lr_scale" entry.
    `checkpoint_uri`: where the checkpoint lives instead (a local path or any fsspec URI).
    `grad_sync(model)` runs after every backward, before clipping (data-parallel training averages the
    workers' gradients there, app.train_parallel); `writes`: False on every data-parallel worker but
    the first, which alone writes the checkpoint and the loss curve. SIGINT/SIGTERM (main thread) end the
    run at the next step boundary with a checkpoint, then raise `TrainingInterrupted`.

    The model must already be seeded/initialised by the caller (call `seed_everything` before building
    it); on resume its weights, the optimizer, EMA and RNG states are replaced by the checkpoint's.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path: Path | str = checkpoint_uri if checkpoint_uri is not None else out_dir / CHECKPOINT_NAME
    model.to(config.device)  # parameters keep their identity, so the caller's optimizer still holds them
    rng = np.random.default_rng(config.seed)
    ema = copy.deepcopy(model).requires_grad_(False) if config.ema_decay is not None else None
    history: dict[str, list[float]] = {}
    step, elapsed, stopped_by = 0, 0.0, None
    if state_exists(ckpt_path):
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["np_rng"]
        history = {k: list(v) for k, v in state["history"].items()}
        # stopped_by is recomputed: a finished run given more steps or a larger budget continues.
        step, elapsed = int(state["step"]), float(state["elapsed_s"])

    def checkpoint() -> None:
        if not writes:
            return
        save_checkpoint(
            ckpt_path,
            step=step,
            model=model,
            optimizer=optimizer,
            ema=ema,
            rng=rng,
            history=history,
            elapsed_s=elapsed,
            stopped_by=stopped_by,
        )
        save_loss_curve(history, out_dir / "loss.png", title=f"{name}: training loss")

    model.train()
    bar = tqdm(total=config.steps, initial=step, desc=name, disable=not config.progress, mininterval=10)
    fixed_state = rng.bit_generator.state, torch.get_rng_state()
    first_step = step
    with _stop_on_signals() as interrupted:
        while stopped_by is None and step < config.steps:
            if interrupted.is_set():
                stopped_by = "interrupted"
                break
            if config.stop_after is not None and step - first_step >= config.stop_after:
                stopped_by = "stop_after"
                break
            if config.budget_s is not None and elapsed >= config.budget_s:
                stopped_by = "budget"
                break
            start = time.perf_counter()
            if config.fixed_batch:
                rng.bit_generator.state = fixed_state[0]
                torch.set_rng_state(fixed_state[1])
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step) * group.get("lr_scale", 1.0)
            losses = loss_fn(rng, step)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_sync is not None:
                grad_sync(model)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema_update(ema, model, ema_decay_at(step, config.ema_decay))
            for key, value in losses.items():
                history.setdefault(key, []).append(float(value.detach()))
            step += 1
            elapsed += time.perf_counter() - start
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(history['loss'][-20:]):.4g}", refresh=False)
            if step % config.ckpt_every == 0:
                checkpoint()
    bar.close()
    if stopped_by is None:
        stopped_by = "steps" if step >= config.steps else "budget"
    checkpoint()
    if stopped_by == "interrupted":
        raise TrainingInterrupted(f"{name}: stopped at step {step}; the checkpoint is at {ckpt_path}")
    model.eval()
    final = ema.eval() if ema is not None else model
    return LoopResult(
        model=final, raw=model, step=step, elapsed_s=elapsed, history=history, stopped_by=stopped_by
    )


def trainable_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_tensor_batch(images: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """(B, H, W, 3) float in [0, 1] -> (B, 3, H, W) float32 tensor on `device`."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)).to(device)


class StageConfig(Protocol):
    """What every stage's training config has: its schedule and its loop settings."""

    lr: float
    warmup: int
    steps: int

    def loop_config(self) -> LoopConfig: ...


def train_stage(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    out_dir: str | Path,
    config: StageConfig,
    **options: Any,
) -> LoopResult:
    """`train_loop` with the stage config's loop settings and its warm-up + cosine learning rate;
    `options`: train_loop's checkpoint_uri, grad_sync, writes."""
    return train_loop(
        name=name,
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        out_dir=Path(out_dir),
        config=config.loop_config(),
        lr_at=warmup_cosine(config.lr, warmup=config.warmup, total=config.steps),
        **options,
    )
