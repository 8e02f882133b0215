"""The evaluation report: Parquet tables, `report.md`, plots and a contact sheet, over fsspec."""

from __future__ import annotations

import io

import fsspec
import numpy as np
from PIL import Image

from dynface.evaluation import Evaluation, ablation_markdown


def _write(uri: str, data: bytes) -> None:
    with fsspec.open(uri, "wb") as f:
        f.write(data)


def _figure_png(draw) -> bytes:  # noqa: ANN001 - draw(fig) fills a matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def contact_sheet(sheet: dict[str, list[np.ndarray]], methods: list[str]) -> np.ndarray:
    """Rows = faces, columns = methods (then GT); every tile at the size of the first one."""
    cols = [m for m in methods if m in sheet] + ["gt"]
    n = len(sheet["gt"])
    size = sheet["gt"][0].shape[0]
    out = np.full((n * size, len(cols) * size, 3), 255, dtype=np.uint8)
    for j, m in enumerate(cols):
        for i, img in enumerate(sheet[m][:n]):
            tile = img if img.shape[0] == size else np.asarray(Image.fromarray(img).resize((size, size)))
            out[i * size : (i + 1) * size, j * size : (j + 1) * size] = tile
    return out


def write_report(evaluation: Evaluation, out_uri: str, *, title: str, notes: str = "") -> str:
    """Write the Parquet tables, plots, contact sheet and report.md under out_uri; returns report.md's URI."""
    out = out_uri.rstrip("/")
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    per_face, ablation = evaluation.per_face, evaluation.ablation
    buf = io.BytesIO()
    per_face.to_parquet(buf, index=False)
    _write(f"{out}/per_face.parquet", buf.getvalue())
    buf = io.BytesIO()
    ablation.to_parquet(buf, index=False)
    _write(f"{out}/ablation.parquet", buf.getvalue())
    methods = list(ablation["method"])
    reported = per_face[per_face["split"] == ablation["split"].iloc[0]] if len(ablation) else per_face

    def distributions(fig) -> None:  # noqa: ANN001
        for k, metric in enumerate(("psnr", "ssim", "identity_distance")):
            ax = fig.add_subplot(1, 3, k + 1)
            data = [reported.loc[reported.method == m, metric].dropna().to_numpy() for m in methods]
            ax.boxplot(data, tick_labels=methods)
            ax.set_title(metric)
            ax.tick_params(axis="x", labelrotation=70, labelsize=7)

    def std_hist(fig) -> None:  # noqa: ANN001
        full = reported[reported.method == "full"] if "full" in methods else reported[reported.n_steps > 0]
        ax = fig.add_subplot(1, 2, 1)
        ax.hist(full["std_hat_512"].dropna(), bins=20, color="tab:blue")
        ax.set_xlabel("std* (px at 512)")
        ax = fig.add_subplot(1, 2, 2)
        ax.hist(full["t_start"], bins=20, color="tab:orange")
        ax.set_xlabel("t_start")

    def psnr_with_intervals(fig) -> None:  # noqa: ANN001
        ax = fig.add_subplot(1, 1, 1)
        y = np.arange(len(ablation))
        mean = ablation["psnr"].to_numpy()
        low, high = ablation["psnr_ci_low"].to_numpy(), ablation["psnr_ci_high"].to_numpy()
        err = np.stack([mean - low, high - mean])
        ax.errorbar(mean, y, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(y, list(ablation["method"]))
        ax.invert_yaxis()
        ax.set_xlabel("PSNR (dB, RGB 8-bit), 95 % bootstrap interval over faces")

    _write(f"{out}/metric_distributions.png", _figure_png(distributions))
    _write(f"{out}/std_t_start_histograms.png", _figure_png(std_hist))
    _write(f"{out}/psnr_intervals.png", _figure_png(psnr_with_intervals))
    sheet = contact_sheet(evaluation.sheet, methods)
    png = io.BytesIO()
    Image.fromarray(sheet).save(png, format="PNG")
    _write(f"{out}/contact_sheet.png", png.getvalue())
    n_faces = int(ablation["n_faces"].iloc[0]) if len(ablation) else 0
    n_seeds = int(ablation["n_seeds"].iloc[0]) if len(ablation) else 0
    text = "\n".join(
        [
            f"# {title}",
            "",
            notes,
            "",
            f"{n_faces} faces × {n_seeds} degradation seeds per variant; each cell is the mean over faces"
            " (a face's score is its mean over seeds) with its 95 % bootstrap interval over faces. PSNR/SSIM"
            " on RGB 8-bit at the pack resolution (no mean/variance correction); identity distance ="
            " Euclidean distance of dlib face descriptors; LMD = dlib 68-point landmark distance (both at"
            " 256 px); Fréchet distance labelled with its feature extractor, computed only where the faces"
            " number at least twice its dimensions. Every number is a cell of `ablation.parquet`,"
            " recomputable from `per_face.parquet`.",
            "",
            ablation_markdown(ablation),
            "",
            "![metric distributions](metric_distributions.png)",
            "![std and t_start](std_t_start_histograms.png)",
            "![PSNR with intervals](psnr_intervals.png)",
            "",
            "Contact sheet (columns: " + ", ".join([m for m in methods] + ["gt"]) + "):",
            "",
            "![contact sheet](contact_sheet.png)",
            "",
        ]
    )
    _write(f"{out}/report.md", text.encode())
    return f"{out}/report.md"
