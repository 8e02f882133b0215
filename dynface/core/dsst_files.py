"""DSST tables as files: save/load at a local path or fsspec URI, and a table built from an image folder."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np

from dynface.core.diffusion import linear_betas
from dynface.core.dsst import DSSTTable, build_dsst_table, psd_and_count
from dynface.images.folders import iter_images


def save_dsst_table(table: DSSTTable, uri: str) -> None:
    """Write `table.to_json()` to a local path or any fsspec URI (parent folders are created)."""
    write_file(uri, table.to_json().encode("utf-8"))


def load_dsst_table(uri: str) -> DSSTTable:
    with fsspec.open(uri, "r", encoding="utf-8") as fh:
        return DSSTTable.from_json(fh.read())


def write_file(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def build_dsst_table_from_images(
    uri: str,
    alphas_cumprod: np.ndarray,
    *,
    resolution: int,
    std_min: float,
    std_max: float,
    limit: int | None = None,
    **kw: Any,
) -> DSSTTable:
    """Mean PSD of the images under uri (see iter_images), then build_dsst_table (kw passed on)."""
    psd, count = psd_and_count(iter_images(uri, resolution=resolution, limit=limit))
    return build_dsst_table(
        psd,
        alphas_cumprod,
        resolution=resolution,
        std_min=std_min,
        std_max=std_max,
        n_images=count,
        source=uri,
        **kw,
    )


def pack_dsst_table(
    images: Iterable[np.ndarray], *, resolution: int, std_range: tuple[float, float], source: str
) -> DSSTTable:
    """A pack's table from its training faces (H, W, 3) at `resolution`: their mean power spectrum, the
    pack's std range on a 0.1-px-at-512 grid, tol calibrated so that the largest std starts at the top
    of the range (spec §3.6–3.7; the training recipes' tables)."""
    psd, count = psd_and_count(images)
    return build_dsst_table(
        psd,
        np.cumprod(1.0 - linear_betas()),
        resolution=resolution,
        std_min=std_range[0],
        std_max=std_range[1],
        std_step=0.1 * resolution / 512,
        tol=None,
        n_images=count,
        source=source,
    )
