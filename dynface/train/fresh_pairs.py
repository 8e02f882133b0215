"""Fresh training pairs: a new DifFace-range degradation for every sample of every batch, made at the
degrade resolution (512 px, as the Restorer sees a real crop) in DataLoader worker processes.

A fixed pool (dynface.train.data.PairPool) is cheap on a CPU but RM overfits it: past ~5,000 steps
on 8 pairs per face its held-out PSNR fell while its training loss still fell (MODEL_CARD run notes).
Fresh pairs never repeat; each costs ~80 ms of one CPU core at 512 px, so they pay off where workers run
beside the training step (a GPU machine's spare cores), or on a CPU that continues a trained RM.

Batch `step` is a pure function of (seed, step): a resumed run sees the batches it would have seen, and
the number of workers changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dynface.images.degrade import DIFFACE_RANGES, DegradationRanges, degrade_pair, sample_params
from dynface.train.data import FaceFile, faces_cache_key, load_image_u8, resize_bicubic


def face_array_file(
    data_dir: Path | str, faces: Sequence[FaceFile], resolution: int, *, cache_dir: Path | None = None
) -> Path:
    """An .npy file of the faces (N, R, R, 3) uint8 (PIL bicubic to R px; `data_dir` a folder or any
    fsspec URI, `faces` relative to it), cached in the system temp folder keyed by the files' sha256s:
    workers map it read-only instead of each holding a copy."""
    if not faces:
        raise ValueError("no faces to store")
    folder = cache_dir if cache_dir is not None else Path(tempfile.gettempdir()) / "dynface_train_cache"
    path = folder / f"faces_u8_{faces_cache_key(faces, resolution)}.npy"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # workers on one node may build it at once
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(faces), resolution, resolution, 3)
    )
    root = str(data_dir).rstrip("/")
    for i, face in enumerate(faces):
        with fsspec.open(f"{root}/{face.file}", "rb") as fh:  # a local folder or any fsspec URI
            arr[i] = load_image_u8(fh, resolution)
    arr.flush()
    del arr
    tmp.replace(path)
    return path


class FreshPairBatches(Dataset):
    """Item `step`: the (lq, gt) batch of that training step, each (B, 3, R, R) float32 in [0, 1].

    Every sample is a face drawn with replacement from `faces_file` (face_array_file), degraded at the
    file's resolution with `ranges` (hflip as drawn, gray never, like the pools) and resized to R px.
    """

    def __init__(
        self,
        faces_file: Path | str,
        resolution: int,
        batch_size: int,
        steps: int,
        seed: int,
        ranges: DegradationRanges = DIFFACE_RANGES,
    ) -> None:
        if batch_size < 1 or steps < 0:
            raise ValueError("batch_size must be >= 1 and steps >= 0")
        self.faces_file = Path(faces_file)
        self.resolution = resolution
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.ranges = dataclasses.replace(ranges, gray_prob=0.0)
        self._faces: np.ndarray | None = None  # opened lazily, once per process

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        if self._faces is None:
            self._faces = np.load(self.faces_file, mmap_mode="r")
        rng = np.random.default_rng([self.seed, step])
        pairs = [self._pair(idx, rng) for idx in rng.integers(0, self._faces.shape[0], size=self.batch_size)]
        return _chw(np.stack([p[0] for p in pairs])), _chw(np.stack([p[1] for p in pairs]))

    def rows(self, step: int, rows: range) -> tuple[Tensor, Tensor]:
        """Rows `rows` of step `step`'s batch, each (len(rows), 3, R, R). Unlike an item, every row is a
        pure function of (seed, step, row) alone: a data-parallel worker makes only its own rows, and the
        global batch is the same for any number of workers."""
        if self._faces is None:
            self._faces = np.load(self.faces_file, mmap_mode="r")
        pairs = []
        for row in rows:
            rng = np.random.default_rng([self.seed, step, row])
            pairs.append(self._pair(int(rng.integers(0, self._faces.shape[0])), rng))
        return _chw(np.stack([p[0] for p in pairs])), _chw(np.stack([p[1] for p in pairs]))

    def _pair(self, idx: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        assert self._faces is not None
        hq = self._faces[idx].astype(np.float32) / np.float32(255.0)
        lq, gt = degrade_pair(hq, sample_params(rng, self.ranges), rng=rng)
        return resize_bicubic(lq, self.resolution), resize_bicubic(gt, self.resolution)

    def __getstate__(self) -> dict[str, object]:
        # Workers reopen the memory map rather than receive a pickled copy of the faces.
        return {**self.__dict__, "_faces": None}


def _chw(batch: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


class FreshPairStream:
    """Batches of a `FreshPairBatches` in step order, `workers` processes ahead of the training loop.
    `batch(step)` restarts the stream when asked for a step out of order (a resumed run)."""

    def __init__(self, batches: FreshPairBatches, workers: int = 0) -> None:
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.batches = batches
        self.workers = workers
        self._iter: Iterator[tuple[Tensor, Tensor]] | None = None
        self._next = -1

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self._iter is None or step != self._next:
            self._iter = iter(self._loader(step))
            self._next = step
        lq, gt = next(self._iter)
        self._next += 1
        return lq, gt

    def _loader(self, start: int) -> DataLoader:
        extra = {"prefetch_factor": 4} if self.workers else {}
        return DataLoader(
            self.batches,
            batch_size=None,
            sampler=range(start, len(self.batches)),
            num_workers=self.workers,
            **extra,
        )
