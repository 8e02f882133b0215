"""Evaluation protocol end to end on generated faces and a tiny random pack."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image

from app.cli import main as cli_main
from dynface.evaluation import (
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    build_eval_set,
    evaluate_variants,
    read_holdout_names,
    tune_on_validation,
)
from dynface.evaluation_summary import N_BOOT, frechet_or_reason, summarise
from dynface.metrics.fid import FeatureExtractor
from dynface.metrics.fidelity import psnr
from dynface.packs.writer import write_random_pack
from dynface.splits import DEFAULT_SPLIT_RULE, SplitRule, names_in_split

FAST = {"respacing": "ddim10", "mode": "closed_form"}


@pytest.fixture(scope="module")
def hq_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hq")
    base = synthetic_face(512)
    for i in range(3):
        shifted = np.roll(base, 6 * i, axis=1)
        Image.fromarray(shifted).save(folder / f"face_{i}.png")
    return folder


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shifted copies of one synthetic face, kept until two faces lie in each of validation and test
    (by the sha256 of their PNG bytes) and one in train."""
    folder = tmp_path_factory.mktemp("split_hq")
    base = synthetic_face(512)
    want = {"validation": 2, "test": 2, "train": 1}
    for shift in range(1, 400):  # each file is in validation or test with probability 1/16
        if not any(want.values()):
            break
        buf = io.BytesIO()
        Image.fromarray(np.roll(base, 3 * shift, axis=1)).save(buf, format="PNG")
        split = DEFAULT_SPLIT_RULE.split_of(hashlib.sha256(buf.getvalue()).hexdigest())
        if want[split]:
            want[split] -= 1
            (folder / f"{split}_{shift:03d}.png").write_bytes(buf.getvalue())
    assert not any(want.values()), f"no file of 400 fell in every split: {want} missing"
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


def test_cli_evaluate_writes_report_with_every_ablation_row(split_folder: Path, tmp_path: Path) -> None:
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    test_names = sorted(p.name for p in split_folder.glob("test_*.png"))
    listed = [*test_names, *sorted(p.name for p in split_folder.glob("validation_*.png"))]
    (tmp_path / "pack" / "holdout.txt").write_text("".join(f"{n}\n" for n in listed))
    assert read_holdout_names(str(tmp_path / "pack")) == listed
    out = tmp_path / "report"
    args = ["evaluate", "--pack", pack, "--hq", str(split_folder), "--holdout", str(tmp_path / "pack")]
    args += ["--out", str(out), "--option", "respacing=ddim10", "--option", "mode=closed_form"]
    args += ["--tune-guidance", "1,3"]
    assert cli_main(args) == 0
    outputs = ("report.md", "per_face.parquet", "ablation.parquet", "contact_sheet.png", "psnr_intervals.png")
    for name in outputs:
        assert (out / name).is_file(), name
    ablation = pd.read_parquet(out / "ablation.parquet")
    assert list(ablation["method"]) == list(DEFAULT_METHODS)
    assert DEFAULT_METHODS[-1] == "full@gt_rm"
    assert set(ablation["split"]) == {"test"} and set(ablation["n_seeds"]) == {len(DEFAULT_SEEDS)}
    assert set(ablation["n_faces"]) == {2}
    # 2 faces < 2·128 dlib dimensions: no number, a reason.
    assert ablation["frechet_distance"].isna().all()
    assert all(n.startswith("not computed: 2 faces < 2·128") for n in ablation["frechet_note"])
    per_face = pd.read_parquet(out / "per_face.parquet")
    reported = per_face[per_face["split"] == "test"]
    assert len(reported) == 2 * len(DEFAULT_SEEDS) * len(DEFAULT_METHODS)
    assert set(reported["face"]) == set(test_names)
    tuned = per_face[per_face["split"] == "validation"]
    assert len(tuned) == 2 * len(DEFAULT_SEEDS) * 2 and set(tuned["method"]) == {"full"}  # 2 ζ candidates
    assert not set(tuned["face"]) & set(reported["face"])
    # The LQ rows are the input scored by the metric functions directly, per seed.
    for seed in DEFAULT_SEEDS:
        ev = build_eval_set(str(split_folder), resolution=32, names=test_names, seed=seed, split="test")
        lq_rows = reported[(reported.method == "lq") & (reported.seed == seed)].sort_values("face")
        expected = [psnr(lq, gt) for lq, gt in zip(ev.lq, ev.gt)]
        assert np.allclose(lq_rows["psnr"], expected)
    steps = ablation.set_index("method")["mean_steps"]
    assert steps["lq"] == 0 and steps["rm_only"] == 0 and steps["full"] > 0
    text = (out / "report.md").read_text()
    assert "+DGSA" in text and "DifFace-style fixed start" in text and "oracle bound" in text
    assert "Chosen on the 2 validation faces" in text and "not computed" in text


def test_oracle_rows_take_the_ground_truth_as_rm_output(hq_folder: Path, tmp_path: Path) -> None:
    from dynface.restorer import Restorer

    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    restorer = Restorer.from_pack(
        pack, overrides={"respacing": "ddim10", "mode": "closed_form"}, device="cpu"
    )
    ev = build_eval_set(str(hq_folder), resolution=32, limit=2)
    result = evaluate_variants(restorer, ev, methods=("rm_only", "rm_only@gt_rm"))
    per_face = result.per_face.set_index("method")
    assert np.isinf(per_face.loc["rm_only@gt_rm", "psnr"]).all()  # RM's output is the answer
    assert np.isfinite(per_face.loc["rm_only", "psnr"]).all()
    with pytest.raises(ValueError, match="@gt_rm"):
        evaluate_variants(restorer, ev, methods=("full@gt",))


def test_cli_evaluate_adds_the_metrics_of_supplied_weights(split_folder: Path, tmp_path: Path) -> None:
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
    args = ["evaluate", "--pack", pack, "--hq", str(split_folder), "--seeds", "2025", "--out", str(out)]
    args += ["--methods", "lq,rm_only", "--arcface", str(tmp_path / "arcface.pth")]
    args += ["--vgg16", str(tmp_path / "vgg16.pth"), "--fid-inception", str(tmp_path / "inception.pth")]
    assert cli_main(args) == 0
    per_face = pd.read_parquet(out / "per_face.parquet")
    for column in ("ida_rad", "ida_deg", "lpips", "dists"):
        assert per_face[column].notna().all(), column
    np.testing.assert_allclose(np.degrees(per_face["ida_rad"]), per_face["ida_deg"])
    ev = build_eval_set(str(split_folder), resolution=32, seed=2025, split="test")
    lq = per_face[per_face.method == "lq"].sort_values("face")
    arcface = metric_nets.ArcFaceIdentity.from_file(str(tmp_path / "arcface.pth"))
    big = [_resize_u8(x, 256) for x in ev.lq]
    big_gt = [_resize_u8(x, 256) for x in ev.gt]
    np.testing.assert_allclose(
        lq["ida_rad"], [arcface.angle(a, b)[0] for a, b in zip(big, big_gt)], atol=1e-6
    )
    lpips = perceptual.LPIPS.from_files(str(tmp_path / "vgg16.pth"))
    np.testing.assert_allclose(lq["lpips"], perceptual.score_images(lpips, big, big_gt), rtol=1e-5)
    ablation = pd.read_parquet(out / "ablation.parquet")
    assert {"ida_rad", "ida_deg", "lpips", "dists", "lpips_ci_low"} <= set(ablation.columns)
    assert all("inception" in name for name in ablation["fd_extractor"])
    text = (out / "report.md").read_text()
    assert "LPIPS" in text and "DISTS" in text and "IDA (rad)" in text


def _per_face_fixture() -> pd.DataFrame:
    """3 methods × 4 faces × 2 seeds of hand-picked scores; face f3 of `full` misses its second seed, so
    a mean over rows and the mean over faces of per-face means differ."""
    rng = np.random.default_rng(3)
    rows = []
    for method, offset in (("lq", 20.0), ("rm_only", 21.0), ("full", 21.5)):
        for f in range(4):
            for seed in (1, 2):
                if method == "full" and f == 3 and seed == 2:
                    continue
                value = offset + f + 0.3 * seed + rng.normal(0, 0.1)
                rows.append(
                    {"face": f"f{f}", "split": "test", "seed": seed, "method": method, "psnr": value,
                     "ssim": value / 40, "identity_distance": 1 / value, "lmd": value / 10,
                     "psnr_y": value + 1, "ssim_y": value / 41, "n_steps": 0, "seconds": 0.5}
                )  # fmt: skip
    rows.append({**rows[0], "split": "validation", "face": "v0", "psnr": 99.0})  # never in the table
    return pd.DataFrame(rows)


def _bootstrap_by_hand(values: np.ndarray) -> tuple[float, float]:
    """The documented interval, written out: resample the faces N_BOOT times (seed 0), 2.5/97.5 %."""
    gen = np.random.default_rng(0)
    means = [values[gen.integers(0, len(values), len(values))].mean() for _ in range(N_BOOT)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_summary_means_intervals_and_frechet_match_an_independent_computation() -> None:
    per_face = _per_face_fixture()
    ablation = summarise(per_face, {}, split="test").set_index("method")
    assert list(ablation.index) == ["lq", "rm_only", "full"]
    for method in ("lq", "rm_only", "full"):
        rows = per_face[(per_face.method == method) & (per_face.split == "test")]
        by_face = {f: rows.loc[rows.face == f, "psnr"].to_numpy().mean() for f in sorted(set(rows.face))}
        values = np.array(list(by_face.values()))
        assert ablation.loc[method, "psnr"] == pytest.approx(values.mean(), abs=1e-12)
        lo, hi = _bootstrap_by_hand(values)
        assert ablation.loc[method, "psnr_ci_low"] == pytest.approx(lo, abs=1e-9)
        assert ablation.loc[method, "psnr_ci_high"] == pytest.approx(hi, abs=1e-9)
        assert ablation.loc[method, "n_faces"] == 4 and ablation.loc[method, "n_seeds"] == 2
    # full's mean is over faces, not rows (f3 has one seed there).
    full_rows = per_face[(per_face.method == "full") & (per_face.split == "test")]
    assert ablation.loc["full", "psnr"] != pytest.approx(full_rows["psnr"].mean(), abs=1e-6)

    # Paired: full − rm_only per face, then the mean and its interval.
    def face_means(method: str) -> np.ndarray:
        rows = per_face[(per_face.method == method) & (per_face.split == "test")]
        return np.array([rows.loc[rows.face == f, "psnr"].mean() for f in ("f0", "f1", "f2", "f3")])

    diff = face_means("full") - face_means("rm_only")
    assert ablation.loc["full", "step_from"] == "rm_only"
    assert ablation.loc["full", "psnr_step"] == pytest.approx(diff.mean(), abs=1e-12)
    lo, hi = _bootstrap_by_hand(diff)
    assert (
        ablation.loc["full", "psnr_step_ci_low"],
        ablation.loc["full", "psnr_step_ci_high"],
    ) == pytest.approx((lo, hi), abs=1e-9)
    vs_lq = face_means("rm_only") - face_means("lq")
    assert ablation.loc["rm_only", "psnr_vs_lq"] == pytest.approx(vs_lq.mean(), abs=1e-12)
    assert ablation.loc["rm_only", "step_from"] == ""  # the row above is the input itself

    # Fréchet distance: the closed form with scipy's matrix square root, where N ≥ 2·dim; else a reason.
    from scipy import linalg

    gen = np.random.default_rng(5)
    a, b = gen.normal(size=(8, 3)), gen.normal(1.0, 2.0, size=(8, 3))
    fd = frechet_or_reason(a, b, n_faces=8, extractor="x")
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert fd.value == pytest.approx(expected, rel=1e-6) and fd.note == ""
    few = frechet_or_reason(a, b, n_faces=5, extractor="x")
    assert np.isnan(few.value) and few.note.startswith("not computed: 5 faces < 2·3")


def test_evaluate_variants_pools_seeds_for_the_frechet_distance(split_folder: Path, tmp_path: Path) -> None:
    """A 1-D feature (mean brightness) makes N ≥ 2·dim with two faces: the table's value is the closed
    form on the restored and ground-truth features of every seed."""
    from dynface.restorer import Restorer

    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    restorer = Restorer.from_pack(
        pack, overrides={"respacing": "ddim10", "mode": "closed_form"}, device="cpu"
    )
    bright = FeatureExtractor("brightness", lambda imgs: np.array([[float(np.mean(i))] for i in imgs]))
    sets = [build_eval_set(str(split_folder), resolution=32, seed=s, split="test") for s in (1, 2)]
    ev = evaluate_variants(restorer, sets, methods=("lq", "rm_only"), extractor=bright, sheet_faces=1)
    ablation = ev.ablation.set_index("method")
    from dynface.evaluation import _resize_u8

    def feats(images: list[np.ndarray]) -> np.ndarray:
        return np.array([[np.mean(_resize_u8(i, 256))] for i in images])

    restored = feats([x for s in sets for x in s.lq])
    truth = feats([x for s in sets for x in s.gt])
    expected = (restored.mean() - truth.mean()) ** 2 + restored.var(ddof=1) + truth.var(ddof=1)
    expected -= 2 * np.sqrt(restored.var(ddof=1) * truth.var(ddof=1))
    assert ablation.loc["lq", "frechet_distance"] == pytest.approx(expected, rel=1e-6)
    assert ablation.loc["lq", "fd_extractor"] == "brightness" and ablation.loc["lq", "frechet_note"] == ""
    with pytest.raises(ValueError, match="share a seed"):
        evaluate_variants(restorer, [sets[0], sets[0]], methods=("lq",), extractor=bright)


def test_splits_are_disjoint_and_tuning_never_reads_the_test_split(
    split_folder: Path, tmp_path: Path
) -> None:
    from dynface.restorer import Restorer

    files = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(split_folder.glob("*.png"))]
    parts = {s: set(names_in_split(files, s)) for s in ("train", "validation", "test")}
    assert parts["validation"] and parts["test"] and parts["train"]
    assert not parts["validation"] & parts["test"] and not parts["train"] & (
        parts["validation"] | parts["test"]
    )
    assert set.union(*parts.values()) == {n for n, _ in files}
    for name, split in ((n, s) for s, names in parts.items() for n in names):
        assert name.startswith(split)  # the fixture named each file after the split the rule gives it
    with pytest.raises(ValueError, match="overlap"):
        SplitRule(validation=("0",), test=("0a",))
    assert SplitRule.from_manifest(DEFAULT_SPLIT_RULE.to_manifest()) == DEFAULT_SPLIT_RULE

    pack = write_random_pack(str(tmp_path / "pack"), resolution=32, seed=4)
    restorer = Restorer.from_pack(
        pack, overrides={"respacing": "ddim10", "mode": "closed_form"}, device="cpu"
    )
    validation = build_eval_set(str(split_folder), resolution=32, split="validation")
    test = build_eval_set(str(split_folder), resolution=32, split="test")
    mixed = build_eval_set(str(split_folder), resolution=32)
    assert set(validation.names) == parts["validation"] and set(test.names) == parts["test"]
    candidates = [{"guidance_scale": 1.0}, {"guidance_scale": 3.0}]
    for refused in (test, mixed, [validation, test]):
        with pytest.raises(ValueError, match="validation split only"):
            tune_on_validation(restorer, refused, candidates)
    tuning = tune_on_validation(restorer, validation, candidates)
    assert set(tuning.faces) == parts["validation"] and tuning.best in candidates
    assert set(tuning.per_face["face"]) == parts["validation"] and set(tuning.per_face["split"]) == {
        "validation"
    }
    assert tuning.mean_psnr[candidates.index(tuning.best)] == max(tuning.mean_psnr)
