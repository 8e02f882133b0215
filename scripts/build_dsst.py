"""Build a DSST table (std -> t_start) from folders of HQ aligned faces, plus its PNG plot.

Example (the table shipped with the `difface` pack):
    python scripts/build_dsst.py --resolution 512 --std-min 1 --std-max 15 \
        --out weights/difface/dsst.json --plot docs/dsst_difface_512.png \
        ../shared/data/hq_aligned/santaz-sahithi__InterfaceGAN ../shared/data/hq_aligned/yangxy__GPEN ...
Only the statistics (numbers) are written; the images stay where they are.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from dynface.core.diffusion import linear_betas
from dynface.core.dsst import build_dsst_table, mean_power_spectrum
from dynface.core.dsst_files import save_dsst_table
from dynface.core.dsst_plot import plot_dsst_table
from dynface.images.folders import iter_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="folders or fsspec prefixes of HQ aligned faces")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--std-min", type=float, required=True)
    p.add_argument("--std-max", type=float, required=True)
    p.add_argument("--std-step", type=float, default=None, help="default 0.1 px at 512, scaled")
    p.add_argument("--tol", type=float, default=None, help="default: calibrated so std_max -> 925")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per source")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    images = itertools.chain.from_iterable(
        iter_images(src, resolution=args.resolution, limit=args.limit) for src in args.sources
    )
    counted = []

    def counting(it):  # noqa: ANN001, ANN202
        for im in it:
            counted.append(1)
            yield im

    psd = mean_power_spectrum(counting(images))
    table = build_dsst_table(
        psd,
        np.cumprod(1.0 - linear_betas()),
        resolution=args.resolution,
        std_min=args.std_min,
        std_max=args.std_max,
        std_step=args.std_step or 0.1 * args.resolution / 512,
        tol=args.tol,
        n_images=len(counted),
        source=", ".join(Path(s).name for s in args.sources),
    )
    save_dsst_table(table, args.out)
    if args.plot:
        plot_dsst_table(table, args.plot)
    print(
        f"{len(counted)} images, tol {table.tol:.5g}: t_start {table.t_starts.min()}..{table.t_starts.max()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
