"""A picture of a DSST table: t_start against std (matplotlib, Agg backend)."""

from __future__ import annotations

import io

from dynface.core.dsst import DSSTTable
from dynface.core.dsst_files import write_file


def plot_dsst_table(table: DSSTTable, path_or_uri: str) -> None:
    """PNG of t_start against std: raw and clamped curves with the t_range band (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = table.t_range
    ax.axhspan(lo, hi, color="tab:green", alpha=0.15, label=f"t_range [{lo}, {hi}]")
    ax.plot(table.stds, table.raw_t_starts, color="tab:gray", linestyle="--", label="raw")
    ax.plot(table.stds, table.t_starts, color="tab:blue", label="clamped")
    ax.set_xlabel(f"std (px at {table.resolution})")
    ax.set_ylabel("t_start")
    ax.set_title(f"DSST ({table.reduction}, tol {table.tol:.4g}, {table.n_images} images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_file(path_or_uri, buffer.getvalue())
