"""Evaluation protocol end to end on generated faces and a tiny random pack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image

from dynface.cli import main as cli_main
from dynface.evaluation import ABLATION, build_eval_set, read_holdout_names
from dynface.metrics import psnr
from dynface.pack_writer import write_random_pack


@pytest.fixture(scope="module")
def hq_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hq")
    base = synthetic_face(512)
    for i in range(3):
        shifted = np.roll(base, 6 * i, axis=1)
        Image.fromarray(shifted).save(folder / f"face_{i}.png")
    return folder


def test_eval_set_is_seeded_and_at_pack_resolution(hq_folder: Path) -> None:
    a = build_eval_set(str(hq_folder), resolution=32, seed=1)
    b = build_eval_set(str(hq_folder), resolution=32, seed=1)
    c = build_eval_set(str(hq_folder), resolution=32, seed=2)
    assert a.lq.shape == a.gt.shape == (3, 32, 32, 3)
    assert a.names == ("face_0.png", "face_1.png", "face_2.png")
    assert np.array_equal(a.lq, b.lq) and not np.array_equal(a.lq, c.lq)
    assert np.array_equal(a.gt, c.gt)  # the ground truth does not depend on the degradation seed
    only = build_eval_set(str(hq_folder), resolution=32, names=["face_1.png"])
    assert only.names == ("face_1.png",)
    grid = build_eval_set(str(hq_folder), resolution=32, protocol="grid")
    assert grid.lq.shape == (3, 32, 32, 3)


def test_cli_evaluate_writes_report_with_every_ablation_row(hq_folder: Path, tmp_path: Path) -> None:
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    (tmp_path / "pack" / "holdout.txt").write_text("face_0.png\nface_2.png\n")
    assert read_holdout_names(str(tmp_path / "pack")) == ["face_0.png", "face_2.png"]
    out = tmp_path / "report"
    code = cli_main(
        [
            "evaluate",
            "--pack",
            pack,
            "--hq",
            str(hq_folder),
            "--holdout",
            str(tmp_path / "pack"),
            "--out",
            str(out),
            "--option",
            "respacing=ddim10",
            "--option",
            "mode=closed_form",
        ]
    )
    assert code == 0
    outputs = ("report.md", "per_face.parquet", "summary.parquet", "contact_sheet.png", "psnr_vs_frechet.png")
    for name in outputs:
        assert (out / name).is_file(), name
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary["method"]) == [m for _, m in ABLATION]
    assert set(summary["fd_extractor"]) == {"dlib-face-descriptor-128"}
    per_face = pd.read_parquet(out / "per_face.parquet")
    assert len(per_face) == 2 * len(ABLATION)
    # The LQ row is the input scored by the metric functions directly.
    ev = build_eval_set(str(hq_folder), resolution=32, names=["face_0.png", "face_2.png"])
    lq_rows = per_face[per_face.method == "lq"].sort_values("name")
    expected = [psnr(lq, gt) for lq, gt in zip(ev.lq, ev.gt)]
    assert np.allclose(lq_rows["psnr_rgb"], expected)
    steps = summary.set_index("method")["mean_steps"]
    assert steps["lq"] == 0 and steps["rm_only"] == 0 and steps["full"] > 0
    text = (out / "report.md").read_text()
    assert "+DGSA" in text and "DifFace-style fixed start" in text
