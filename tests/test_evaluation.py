"""Evaluation protocol end to end on generated faces and a tiny random pack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image

from app.cli import main as cli_main
from dynface.evaluation import DEFAULT_METHODS, build_eval_set, evaluate_variants, read_holdout_names
from dynface.metrics.fidelity import psnr
from dynface.packs.writer import write_random_pack


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
    assert list(summary["method"]) == list(DEFAULT_METHODS)
    assert DEFAULT_METHODS[-1] == "full@gt_rm"
    assert set(summary["fd_extractor"]) == {"dlib-face-descriptor-128"}
    per_face = pd.read_parquet(out / "per_face.parquet")
    assert len(per_face) == 2 * len(DEFAULT_METHODS)
    # The LQ row is the input scored by the metric functions directly.
    ev = build_eval_set(str(hq_folder), resolution=32, names=["face_0.png", "face_2.png"])
    lq_rows = per_face[per_face.method == "lq"].sort_values("name")
    expected = [psnr(lq, gt) for lq, gt in zip(ev.lq, ev.gt)]
    assert np.allclose(lq_rows["psnr_rgb"], expected)
    steps = summary.set_index("method")["mean_steps"]
    assert steps["lq"] == 0 and steps["rm_only"] == 0 and steps["full"] > 0
    text = (out / "report.md").read_text()
    assert "+DGSA" in text and "DifFace-style fixed start" in text and "oracle bound" in text


def test_oracle_rows_take_the_ground_truth_as_rm_output(hq_folder: Path, tmp_path: Path) -> None:
    from dynface.restorer import Restorer

    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    restorer = Restorer.from_pack(
        pack, overrides={"respacing": "ddim10", "mode": "closed_form"}, device="cpu"
    )
    ev = build_eval_set(str(hq_folder), resolution=32, limit=2)
    result = evaluate_variants(restorer, ev, methods=("rm_only", "rm_only@gt_rm"))
    per_face = result.per_face.set_index("method")
    assert np.isinf(per_face.loc["rm_only@gt_rm", "psnr_rgb"]).all()  # RM's output is the answer
    assert np.isfinite(per_face.loc["rm_only", "psnr_rgb"]).all()
    with pytest.raises(ValueError, match="@gt_rm"):
        evaluate_variants(restorer, ev, methods=("full@gt",))


def test_cli_evaluate_adds_the_metrics_of_supplied_weights(hq_folder: Path, tmp_path: Path) -> None:
    """ArcFace, VGG16 and FID Inception files (random weights here) each add their columns; values are
    the library's own metric functions on the same id_size faces."""
    import torch

    from dynface.evaluation import _resize_u8
    from dynface.metrics import nets as metric_nets
    from dynface.metrics import perceptual

    if perceptual.default_head_path("lpips") is None or perceptual.default_head_path("dists") is None:
        pytest.skip("LPIPS/DISTS HEADS MISSING: install lpips==0.1.4 and dists-pytorch==0.1 with --no-deps")
    torch.manual_seed(0)
    torch.save(metric_nets.ArcFaceResNet18().state_dict(), tmp_path / "arcface.pth")
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in perceptual.VGG16Features().state_dict().items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(metric_nets.FIDInceptionV3().state_dict(), tmp_path / "inception.pth")
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    out = tmp_path / "report"
    args = ["evaluate", "--pack", pack, "--hq", str(hq_folder), "--limit", "2", "--out", str(out)]
    args += ["--methods", "lq,rm_only", "--arcface", str(tmp_path / "arcface.pth")]
    args += ["--vgg16", str(tmp_path / "vgg16.pth"), "--fid-inception", str(tmp_path / "inception.pth")]
    assert cli_main(args) == 0
    per_face = pd.read_parquet(out / "per_face.parquet")
    for column in ("ida_rad", "ida_deg", "lpips", "dists"):
        assert per_face[column].notna().all(), column
    np.testing.assert_allclose(np.degrees(per_face["ida_rad"]), per_face["ida_deg"])
    ev = build_eval_set(str(hq_folder), resolution=32, limit=2)
    lq = per_face[per_face.method == "lq"].sort_values("name")
    arcface = metric_nets.ArcFaceIdentity.from_file(str(tmp_path / "arcface.pth"))
    big = [_resize_u8(x, 256) for x in ev.lq]
    big_gt = [_resize_u8(x, 256) for x in ev.gt]
    np.testing.assert_allclose(
        lq["ida_rad"], [arcface.angle(a, b)[0] for a, b in zip(big, big_gt)], atol=1e-6
    )
    lpips = perceptual.LPIPS.from_files(str(tmp_path / "vgg16.pth"))
    np.testing.assert_allclose(lq["lpips"], perceptual.score_images(lpips, big, big_gt), rtol=1e-5)
    summary = pd.read_parquet(out / "summary.parquet")
    assert {"ida_rad", "ida_deg", "lpips", "dists"} <= set(summary.columns)
    assert all("inception" in name for name in summary["fd_extractor"])
    text = (out / "report.md").read_text()
    assert "LPIPS" in text and "DISTS" in text and "IDA (rad)" in text
