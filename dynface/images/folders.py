"""Reading a folder (or any fsspec prefix) of images as arrays, for statistics and training."""

from __future__ import annotations

import io
from collections.abc import Iterator

import fsspec
import numpy as np
from PIL import Image


def iter_images(
    uri: str,
    *,
    resolution: int,
    limit: int | None = None,
    exts: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp"),
) -> Iterator[np.ndarray]:
    """Images under a folder or prefix (recursive, sorted by path), RGB, resized to resolution×resolution
    (bicubic; non-square inputs are stretched, which suits aligned face crops) -> (H, W, 3) float32 in [0, 1].
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    fs, root = fsspec.core.url_to_fs(uri)
    wanted = tuple(e.lower() for e in exts)
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(wanted))
    if limit is not None:
        paths = paths[:limit]
    for path in paths:
        with fs.open(path, "rb") as fh:
            image = Image.open(io.BytesIO(fh.read())).convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        yield np.asarray(image, dtype=np.float32) / 255.0
