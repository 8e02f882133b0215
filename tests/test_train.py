"""Training code: overfit checks on fixed batches, exact resume, std* labels, data split, quick pack."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynface.core.blur import gaussian_blur
from dynface.core.diffusion import linear_betas
from dynface.core.dsst import build_dsst_table, mean_power_spectrum
from dynface.models.se import StdEstimator
from dynface.models.swinir import build_swinir
from dynface.packs.loading import load_pack
from dynface.restorer import Restorer
from dynface.train.common import LoopConfig, ema_update, warmup_cosine
from dynface.train.data import (
    UTKFACE_SOURCE,
    build_file_pair_pool,
    build_pair_pool,
    extra_pool_faces,
    is_held_out,
    list_faces,
    load_faces,
    merge_pools,
    split_faces,
    split_of,
)
from dynface.train.dgsa import DGSATrainConfig, FrozenNets, train_dgsa
from dynface.train.prior import PriorTrainConfig, prior_config, train_prior
from dynface.train.restorer_net import RMTrainConfig, swinir_config, train_rm
from dynface.train.sde import SDETrainConfig, sde_config, train_sde
from dynface.train.se import SETrainConfig, blurred_psnr, calibrate_tau, std_star, train_se
from dynface.train.starter import train_starter
from dynface.train.starter_options import StarterOptions

STD_RANGE_32 = (1.0 / 16, 15.0 / 16)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _faces(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth synthetic 'faces': an ellipse on a gradient plus a little texture, (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.35)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.float64)
        base = np.stack([0.3 + 0.4 * blob, 0.2 + 0.3 * blob + 0.2 * xx, 0.5 * yy + 0.2], -1)
        out.append(np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1))
    return np.asarray(out, dtype=np.float32)


def _loop(tmp: Path, **kw) -> LoopConfig:
    return LoopConfig(steps=0, ckpt_every=2, seed=0, progress=False, **kw)


def _decreases(history: list[float]) -> bool:
    return history[-1] < history[0]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- common


def test_warmup_cosine_values() -> None:
    lr = warmup_cosine(1.0, warmup=4, total=14, final_frac=0.1)
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == pytest.approx(1.0)
    assert lr(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr(14) == pytest.approx(0.1) and lr(100) == pytest.approx(0.1)


def test_ema_update_hand_computed() -> None:
    ema, model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0), ema.bias.fill_(0.0), model.weight.fill_(3.0), model.bias.fill_(2.0)
    ema_update(ema, model, 0.75)
    assert ema.weight.item() == pytest.approx(1.5) and ema.bias.item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- trainers


def _prior_cfg(tmp: Path, steps: int, resolution: int = 16, **kw) -> PriorTrainConfig:
    unet = {**prior_config(16), "image_size": resolution}
    return PriorTrainConfig(unet=unet, steps=steps, batch_size=4, lr=1e-3, warmup=1, loop=_loop(tmp, **kw))


def test_prior_overfits_a_fixed_batch(tmp_path: Path) -> None:
    res = train_prior(_faces(4, 16), tmp_path, _prior_cfg(tmp_path, 6, fixed_batch=True))
    assert res.step == 6 and _decreases(res.history["loss"])
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "loss.png").stat().st_size > 1000


def test_prior_resumes_to_the_same_state(tmp_path: Path) -> None:
    images = _faces(4, 16)
    straight = train_prior(images, tmp_path / "a", _prior_cfg(tmp_path, 4))
    first = train_prior(images, tmp_path / "b", _prior_cfg(tmp_path, 4, stop_after=2))
    assert first.step == 2 and first.stopped_by == "stop_after"
    resumed = train_prior(images, tmp_path / "b", _prior_cfg(tmp_path, 4))
    assert resumed.step == 4 and resumed.history["loss"] == straight.history["loss"]
    _same_state(resumed.raw, straight.raw)
    _same_state(resumed.model, straight.model)  # the EMA copy too


def test_prior_with_masked_crops_mixes_batches_and_ignores_their_padding(tmp_path: Path) -> None:
    from dataclasses import replace

    from dynface.train.data import MaskedFaces, sample_masked_batch

    images = _faces(4, 16)
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 16, 16), np.float32)
    masks[:, 4:12, 4:12] = 1
    crops = rng.random((3, 16, 16, 3), dtype=np.float32)
    x, w = sample_masked_batch(images, MaskedFaces(crops, masks), 4, 2, np.random.default_rng(0))
    assert x.shape == (4, 16, 16, 3) and w.shape == (4, 16, 16)
    assert (w[:2] == 1).all() and w[2:].sum() == 2 * 64  # faces count everywhere, crops inside the mask
    cfg = replace(_prior_cfg(tmp_path, 4), masked_share=0.5)
    first = train_prior(images, tmp_path / "a", cfg, masked=MaskedFaces(crops, masks))
    # Padding still reaches the loss through the UNet's receptive field (only the sum is masked).
    noisy = crops.copy()
    noisy[:, :4] = 0.0
    second = train_prior(images, tmp_path / "b", cfg, masked=MaskedFaces(noisy, masks))
    assert first.step == second.step == 4 and np.isfinite(first.history["loss"]).all()
    assert first.history["loss"] != second.history["loss"]
    plain = train_prior(images, tmp_path / "c", _prior_cfg(tmp_path, 4))
    assert plain.history["loss"] != first.history["loss"]
    with pytest.raises(ValueError, match="masked_share"):
        replace(cfg, masked_share=1.5)


def _rm_cfg(tmp: Path, steps: int, **kw) -> RMTrainConfig:
    swin = swinir_config(32, embed_dim=16, depths=(1,))
    return RMTrainConfig(swinir=swin, steps=steps, batch_size=2, lr=2e-3, warmup=1, loop=_loop(tmp, **kw))


def test_rm_overfits_and_resumes(tmp_path: Path) -> None:
    images = _faces(3, 32)
    fit = train_rm(images, tmp_path / "fit", _rm_cfg(tmp_path, 6, fixed_batch=True))
    assert _decreases(fit.history["loss"])
    straight = train_rm(images, tmp_path / "a", _rm_cfg(tmp_path, 3))
    train_rm(images, tmp_path / "b", _rm_cfg(tmp_path, 3, stop_after=1))
    resumed = train_rm(images, tmp_path / "b", _rm_cfg(tmp_path, 3))
    assert resumed.history["loss"] == straight.history["loss"]
    _same_state(resumed.model, straight.model)


def _sde_cfg(tmp: Path, steps: int, **kw) -> SDETrainConfig:
    return SDETrainConfig(
        sde=sde_config(32, STD_RANGE_32, width=8), steps=steps, batch_size=4, lr=3e-3, loop=_loop(tmp, **kw)
    )


def test_sde_overfits_and_resumes(tmp_path: Path) -> None:
    images = _faces(3, 32)
    fit = train_sde(images, tmp_path / "fit", _sde_cfg(tmp_path, 8, fixed_batch=True))
    assert _decreases(fit.history["loss"])
    straight = train_sde(images, tmp_path / "a", _sde_cfg(tmp_path, 3))
    train_sde(images, tmp_path / "b", _sde_cfg(tmp_path, 3, stop_after=2))
    resumed = train_sde(images, tmp_path / "b", _sde_cfg(tmp_path, 3))
    _same_state(resumed.model, straight.model)


def _se_parts(images: np.ndarray, tmp: Path):
    rm = train_rm(images, tmp / "rm", _rm_cfg(tmp, 1)).model
    sde = train_sde(images, tmp / "sde", _sde_cfg(tmp, 1)).model
    tm = build_swinir(swinir_config(32, embed_dim=16, depths=(1,)))
    tm.load_state_dict(rm.state_dict())
    return rm, sde, tm


def test_se_overfits_and_resumes(tmp_path: Path) -> None:
    images = _faces(3, 32)

    def cfg(steps: int, **kw) -> SETrainConfig:
        return SETrainConfig(
            std_range=STD_RANGE_32,
            steps=steps,
            batch_size=2,
            lr=2e-3,
            warmup=1,
            grid_size=5,
            calib_pairs=4,
            loop=_loop(tmp_path, **kw),
        )

    rm, sde, tm = _se_parts(images, tmp_path)
    fit = train_se(images, tmp_path / "fit", cfg(6, fixed_batch=True), rm=rm, sde=sde, tm=tm)
    assert _decreases(fit.loop.history["loss"])
    assert STD_RANGE_32[0] <= fit.label_quantiles[0] <= fit.label_quantiles[2] <= STD_RANGE_32[1]
    runs = {}
    for name, stop in (("a", None), ("b", 1), ("b", None)):
        rm, sde, tm = _se_parts(images, tmp_path)
        runs[name] = train_se(images, tmp_path / name, cfg(3, stop_after=stop), rm=rm, sde=sde, tm=tm)
    assert runs["a"].tau == runs["b"].tau
    _same_state(runs["b"].se, runs["a"].se)


def _frozen_nets(images: np.ndarray, tmp: Path) -> FrozenNets:
    prior = train_prior(images, tmp / "prior", _prior_cfg(tmp, 1, resolution=32)).model
    rm, sde, tm = _se_parts(images, tmp)
    psd = mean_power_spectrum(iter(images))
    dsst = build_dsst_table(
        psd,
        np.cumprod(1 - linear_betas()),
        resolution=32,
        std_min=STD_RANGE_32[0],
        std_max=STD_RANGE_32[1],
        std_step=0.0625,
    )
    return FrozenNets(
        prior=prior, rm=rm, se=StdEstimator(sde, tm), dsst=dsst, std_range=STD_RANGE_32, resolution=32
    )


def test_dgsa_overfits_and_resumes(tmp_path: Path) -> None:
    images = _faces(3, 32)
    nets = _frozen_nets(images, tmp_path)

    def cfg(steps: int, mode: str = "closed_form", **kw) -> DGSATrainConfig:
        return DGSATrainConfig(
            dgsa={"hidden": 8},
            steps=steps,
            batch_size=2,
            lr=2e-2,
            warmup=1,
            respacing="ddim10",
            mode=mode,
            guidance_scale=5.0,
            loop=_loop(tmp_path, **kw),
        )

    fit = train_dgsa(images, tmp_path / "fit", cfg(5, mode="dps", fixed_batch=True), nets=nets)
    assert _decreases(fit.history["loss"])
    # The prior stays frozen: gradients reach DGSA only.
    assert all(not p.requires_grad for p in nets.prior.parameters())
    straight = train_dgsa(images, tmp_path / "a", cfg(3), nets=nets)
    train_dgsa(images, tmp_path / "b", cfg(3, stop_after=2), nets=nets)
    resumed = train_dgsa(images, tmp_path / "b", cfg(3), nets=nets)
    assert resumed.history["loss"] == straight.history["loss"]
    _same_state(resumed.model, straight.model)


def _random_vgg16_file(path: Path) -> str:
    from dynface.metrics.perceptual import VGG16Features

    torch.manual_seed(0)
    torch.save(VGG16Features().state_dict(), path)  # torchvision's key names: features.N.weight/bias
    return str(path)


def test_dgsa_loss_gets_the_dists_term_with_vgg16_weights(tmp_path: Path) -> None:
    from dynface.metrics.perceptual import default_head_path
    from dynface.train.dgsa import dists_loss

    if default_head_path("dists") is None:
        pytest.skip("DISTS HEAD MISSING: install dists-pytorch==0.1 with --no-deps (make venv does)")
    images = _faces(3, 32)
    nets = _frozen_nets(images, tmp_path)
    loss = dists_loss(_random_vgg16_file(tmp_path / "vgg16.pth"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() < 1e-5 < loss(x, -x).item()
    cfg = DGSATrainConfig(
        dgsa={"hidden": 8}, steps=2, batch_size=2, warmup=1, respacing="ddim10", mode="closed_form",
        perceptual_weight=0.5, loop=_loop(tmp_path),
    )  # fmt: skip
    result = train_dgsa(images, tmp_path / "dists", cfg, nets=nets, perceptual=loss)
    swt, dists, total = (np.array(result.history[k]) for k in ("swt", "perceptual", "loss"))
    assert (dists > 0).all()
    np.testing.assert_allclose(total, swt + 0.5 * dists, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- std* labels


def test_blurred_psnr_against_scipy() -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    a, b = rng.random((2, 3, 12, 12)), rng.random((2, 3, 12, 12))
    for s in (1.0, 2.0):
        # One std per call: a grid shares the largest std's kernel size (longer, near-zero tails), while
        # scipy truncates each std at its own 3σ radius (equal to ours when 3σ is an integer).
        grid = torch.tensor([s], dtype=torch.float64)
        ours = blurred_psnr(torch.from_numpy(a), torch.from_numpy(b), grid).numpy()
        fa = gaussian_filter(a, sigma=(0, 0, s, s), mode="mirror", truncate=3.0)
        fb = gaussian_filter(b, sigma=(0, 0, s, s), mode="mirror", truncate=3.0)
        ref = -10 * np.log10(((fa - fb) ** 2).reshape(2, -1).mean(1))
        np.testing.assert_allclose(ours[:, 0], ref, rtol=1e-9)


def test_std_star_and_tau_calibration() -> None:
    grid = torch.tensor([0.5, 1.0, 1.5, 2.0])
    psnr = torch.tensor([[20.0, 26.0, 31.0, 35.0], [31.0, 33.0, 36.0, 40.0], [10.0, 12.0, 14.0, 16.0]])
    assert std_star(psnr, grid, 30.0).tolist() == [1.5, 0.5, 2.0]  # the last: never reached -> std_max
    assert std_star(psnr, grid, 34.0).tolist() == [2.0, 1.5, 2.0]
    # Middle of the range is 1.25; tau = 26 gives labels [1.0, 0.5, 2.0] (median 1.0, error 0.25), and
    # no candidate makes the median land closer: the smallest such tau (≤ 26 in 0.25 steps) wins.
    tau = calibrate_tau(psnr, grid, candidates=torch.tensor([20.0, 26.0, 31.0, 36.0]))
    assert tau == 20.0 or float(std_star(psnr, grid, tau).median()) in (1.0, 1.5)
    assert calibrate_tau(psnr, grid, candidates=torch.tensor([36.0, 26.0])) == 26.0


def test_se_label_is_blur_of_ground_truth() -> None:
    # The TM target k_{std*} ⊛ x0 uses the per-sample label std (gaussian_blur with a (B,) std).
    x0 = torch.rand(2, 3, 16, 16)
    star = torch.tensor([0.5, 1.5])
    both = gaussian_blur(x0, star)
    torch.testing.assert_close(both[1:], gaussian_blur(x0[1:], 1.5))


# ---------------------------------------------------------------------------------------------- data + pack


def _write_faces(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(_faces(n, size, seed=7)):
        Image.fromarray((face * 255).round().astype(np.uint8)).save(folder / f"face{i:02d}.png")


def _card_rows(card: str, section: str) -> dict[str, list[str]]:
    """The cells of each table row of a card section whose second cell names a method in backticks."""
    text = card.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and cells[1].startswith("`") and cells[1].endswith("`"):
            rows.setdefault(cells[1].strip("`"), cells)
    return rows


def _check_card_against_parquet(pack: Path, section: str = "Evaluation (test split)") -> None:
    """Every mean and interval of the card's table is the parquet's, and the parquet's means are the
    means over faces of `per_face.parquet`'s test rows."""
    import pandas as pd

    card = (pack / "MODEL_CARD.md").read_text()
    ablation = pd.read_parquet(pack / "ablation.parquet")
    per_face = pd.read_parquet(pack / "per_face.parquet")
    rows = _card_rows(card, section)
    assert set(rows) == set(ablation["method"]), (sorted(rows), list(ablation["method"]))
    for _, r in ablation.iterrows():
        cells = rows[r["method"]]
        for cell, metric, digits in ((2, "psnr", 2), (3, "ssim", 3)):
            lo, hi = r[f"{metric}_ci_low"], r[f"{metric}_ci_high"]
            assert cells[cell] == f"{r[metric]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]", (
                r["method"],
                cells,
            )
        test_rows = per_face[(per_face["split"] == "test") & (per_face["method"] == r["method"])]
        assert r["psnr"] == pytest.approx(test_rows.groupby("face")["psnr"].mean().mean(), abs=1e-9)
        assert r["n_seeds"] == test_rows["seed"].nunique() >= 3
    full = ablation.set_index("method").loc["full"]
    assert f"full − LQ = {full['psnr_vs_lq']:+.2f} dB [{full['psnr_vs_lq_ci_low']:+.2f}," in card


def test_plan_loop_and_step_helpers() -> None:
    from dynface.train.plan import parse_stage_values, starter_plan, with_loop, with_stage, with_steps_scale

    plan = starter_plan(64)
    moved = with_loop(plan, device="cuda", seed=7)
    stages = (moved.prior, moved.rm, moved.sde, moved.se, moved.dgsa)
    assert all(s.loop.device == "cuda" and s.loop.seed == 7 for s in stages)
    assert plan.rm.loop.device == "cpu"  # the original plan is untouched
    longer = with_steps_scale(plan, 10)
    assert (longer.prior.steps, longer.rm.steps, longer.dgsa.steps) == (
        10 * plan.prior.steps, 10 * plan.rm.steps, 10 * plan.dgsa.steps,
    )  # fmt: skip
    with pytest.raises(ValueError):
        with_steps_scale(plan, 0)
    continued = with_stage(plan, "prior", steps=6000, budget_minutes=130)
    assert continued.prior.steps == 6000 and continued.prior.loop.budget_s == 130 * 60
    assert continued.rm == plan.rm and continued.prior.unet == plan.prior.unet
    assert with_stage(plan, "rm", budget_minutes=5).rm.steps == plan.rm.steps
    with pytest.raises(ValueError):
        with_stage(plan, "vae", steps=10)
    assert parse_stage_values(["prior=6000", "rm=9000"], int) == {"prior": 6000, "rm": 9000}
    for bad in (["prior"], ["vae=3"]):
        with pytest.raises(ValueError):
            parse_stage_values(bad, int)


def test_split_rule_uses_sha256_prefixes(tmp_path: Path) -> None:
    _write_faces(tmp_path / "src", 16, 16)
    faces = list_faces(tmp_path)
    train, held = split_faces(faces)
    for f in faces:
        digest = hashlib.sha256((tmp_path / f.file).read_bytes()).hexdigest()
        assert f.sha256 == digest
        assert (f in held) == digest.startswith(("0", "1"))
    assert len(train) + len(held) == 16
    with pytest.raises(ValueError):
        list_faces(tmp_path / "nothing_here")


def test_quick_starter_writes_a_loadable_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dynface.train.data as train_data
    import dynface.train.starter as starter_module
    from dynface.metrics.perceptual import default_head_path

    data = tmp_path / "data"
    _write_faces(data / "src", 24, 32)  # 22 train, 1 validation, 1 test face (sha256 prefixes)
    _write_faces(data / UTKFACE_SOURCE, 6, 24)  # kept out of the prior, joins the RM/SE pool
    extra = extra_pool_faces(list_faces(data, exclude=()), (UTKFACE_SOURCE,), list_faces(data))
    assert extra and all(f.source == UTKFACE_SOURCE and not is_held_out(f) for f in extra)
    out = tmp_path / "pack"
    hashed: list[str] = []  # a folder without MANIFEST.csv is hashed while listed: once per run, not per use
    real_sha256 = train_data._sha256_file
    monkeypatch.setattr(train_data, "_sha256_file", lambda p: hashed.append(str(p)) or real_sha256(p))
    tuned_on: list[tuple[str, str]] = []  # (face, split) of every face a tuning decision looked at
    real_tune = starter_module.tune_on_validation

    def spy_tune(restorer, sets, candidates, **kwargs):
        tuned_on.extend((n, s) for ev in sets for n, s in zip(ev.names, ev.splits, strict=True))
        return real_tune(restorer, sets, candidates, **kwargs)

    monkeypatch.setattr(starter_module, "tune_on_validation", spy_tune)
    report = train_starter(
        out,
        StarterOptions(
            resolution=32,
            quick=True,
            data_dir=str(data),
            work_dir=str(tmp_path / "work"),
            progress=False,
            tune_faces=2,
            eval_faces=2,
            scales=(0.5, 1.0),
        ),
    )
    assert sorted(hashed) == sorted(str(p) for p in data.rglob("*.png"))
    loaded = load_pack(str(out))  # verifies every sha256
    assert loaded.se is not None and loaded.dgsa is not None and loaded.dsst is not None
    assert loaded.manifest.resolution == 32 and loaded.manifest.sampler["guidance_scale"] in (0.5, 1.0)
    held = [f.file for f in split_faces(list_faces(data))[1]]
    assert (out / "holdout.txt").read_text().split() == sorted(held)
    validation = {f.file for f in list_faces(data) if split_of(f) == "validation"}
    test = {f.file for f in list_faces(data) if split_of(f) == "test"}
    assert validation and test and not validation & test
    assert tuned_on and {n for n, _ in tuned_on} == validation and {s for _, s in tuned_on} == {"validation"}
    _check_card_against_parquet(out)
    assert "## Ablation" in (out / "MODEL_CARD.md").read_text()
    assert "trained from scratch on a CPU" in (out / "MODEL_CARD.md").read_text()
    assert (
        f"| `{UTKFACE_SOURCE}` | {len(extra)} | RM and SE pairs only |" in (out / "MODEL_CARD.md").read_text()
    )
    assert f"{len(extra)} pairs (1 per face" in (out / "MODEL_CARD.md").read_text()
    face = (_faces(1, 32, seed=9)[0] * 255).astype(np.uint8)
    result = Restorer.from_pack(str(out), device="cpu").restore([face])[0]
    assert result.image.shape == (32, 32, 3) and result.image.dtype == np.uint8
    assert set(report.stages) == {"prior", "rm", "sde", "se", "dgsa"}
    recorded = json.loads((out / "training.json").read_text())
    assert recorded["prior"]["steps"] == report.stages["prior"]["steps"]

    # A second run can take the first pack's prior (weights and recorded summary) instead of training one.
    again = train_starter(tmp_path / "pack2", StarterOptions(
        resolution=32, quick=True, data_dir=str(data), work_dir=str(tmp_path / "work2"),
        progress=False, tune_faces=1, eval_faces=2, scales=(1.0,), reuse_prior=str(out), steps_scale=2.0,
        stage_steps={"dgsa": 5}, rm_pairs="fresh",
        vgg16=str(_random_vgg16_file(tmp_path / "vgg16.pth")) if default_head_path("dists") else None,
    ))  # fmt: skip
    assert again.stages["prior"]["reused_from"] == "pack"
    assert again.stages["rm"]["steps"] == 2 * report.stages["rm"]["steps"]
    assert again.stages["dgsa"]["steps"] == 5  # one stage's steps replaced after the scale
    assert again.stages["prior"]["steps"] == report.stages["prior"]["steps"]
    second = load_pack(str(tmp_path / "pack2"))
    card = (tmp_path / "pack2" / "MODEL_CARD.md").read_text()
    if default_head_path("dists"):
        assert "+ 1·DISTS" in card and "SWT only" not in card
    assert "SWT only" in (out / "MODEL_CARD.md").read_text()
    assert "RM's steps in this run drew a fresh degradation per sample (the same faces" in card
    assert "fresh degradation" not in (out / "MODEL_CARD.md").read_text()
    for name, tensor in loaded.prior.state_dict().items():
        torch.testing.assert_close(second.prior.state_dict()[name], tensor)


@pytest.mark.slow
@pytest.mark.data
def test_starter_pack_restores_every_real_lq_face(data_dir: Path) -> None:
    pack = Path(__file__).resolve().parent.parent / "weights" / "starter"
    if not (pack / "manifest.json").is_file():
        pytest.skip("weights/starter not built yet")
    files = sorted(
        p for p in (data_dir / "lq_real_aligned").rglob("*") if p.suffix.lower() in (".png", ".jpg")
    )
    assert len(files) > 0
    # Every face goes through DBLM (resize, RM, SE) via rm_only; the sampler path is the same for any face,
    # so only a few faces (the odd-sized one included) run the full method, on a coarse grid to keep the
    # suite fast. `scripts/train_starter.py weights/starter --check` runs all faces with the pack defaults.
    restorer = Restorer.from_pack(
        str(pack), device="cpu", overrides={"respacing": "ddim5", "mode": "closed_form", "batch_size": 40}
    )
    faces = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    results = restorer.with_config(method="rm_only").restore(faces)
    assert len(results) == len(faces)
    for face, res in zip(faces, results):
        assert res.image.shape == face.shape and np.isfinite(res.std_hat)
    odd = [i for i, f in enumerate(faces) if f.shape[0] != f.shape[1]][:1]
    few = sorted(set(odd + [0, len(faces) // 2, len(faces) - 1]))
    full = restorer.restore([faces[i] for i in few])
    for i, res in zip(few, full):
        assert res.image.shape == faces[i].shape and res.n_steps > 0 and res.t_start >= 690


def test_list_faces_excludes_sources(tmp_path: Path) -> None:
    _write_faces(tmp_path / "keep", 2, 16)
    _write_faces(tmp_path / "drop", 2, 16)
    names = {f.source for f in list_faces(tmp_path, exclude=("drop",))}
    assert names == {"keep"}
    assert {f.source for f in list_faces(tmp_path, exclude=())} == {"keep", "drop"}


def test_pair_pool_degrades_at_source_size_and_flips_pairs_together() -> None:
    hq = _faces(2, 64, seed=4)
    pool = build_pair_pool(hq, 16, per_image=3, seed=0, cache=False)
    assert pool.lq.shape == pool.gt.shape == (6, 16, 16, 3)
    # GT is the HQ face shrunk with PIL bicubic, three times per face.
    ref = np.asarray(
        Image.fromarray((hq[1] * 255).round().astype(np.uint8)).resize((16, 16), Image.Resampling.BICUBIC),
        dtype=np.float32,
    )
    np.testing.assert_allclose(pool.gt[3:6], np.broadcast_to(ref / 255, (3, 16, 16, 3)), atol=1e-6)
    assert not np.allclose(pool.lq, pool.gt, atol=1e-3)  # the LQ side is degraded
    lq, gt = pool.sample(32, np.random.default_rng(1))
    for a, b in zip(lq, gt):
        i = next(
            i for i in range(6) if np.array_equal(b, pool.gt[i]) or np.array_equal(b, pool.gt[i][:, ::-1])
        )
        flipped = not np.array_equal(b, pool.gt[i])
        matches = [j for j in range(6) if np.array_equal(a, pool.lq[j][:, ::-1] if flipped else pool.lq[j])]
        assert matches and all(j // 3 == i // 3 for j in matches)


def test_file_pair_pool_matches_the_array_pool_and_pools_merge(tmp_path: Path) -> None:
    _write_faces(tmp_path / "a", 3, 40)
    faces = list_faces(tmp_path)
    from_files = build_file_pair_pool(
        tmp_path, faces, 16, per_image=2, seed=3, degrade_resolution=32, cache=False
    )
    from_array = build_pair_pool(
        load_faces(tmp_path, faces, 32, cache=False), 16, per_image=2, seed=3, cache=False
    )
    np.testing.assert_array_equal(from_files.lq, from_array.lq)
    np.testing.assert_array_equal(from_files.gt, from_array.gt)
    other = build_pair_pool(_faces(1, 32, seed=8), 16, per_image=1, seed=0, cache=False)
    merged = merge_pools(from_files, other)
    assert merged.lq.shape == (7, 16, 16, 3)
    np.testing.assert_array_equal(merged.gt[6], other.gt[0])
    np.testing.assert_array_equal(merged.lq[:6], from_files.lq)


def test_extra_pool_faces_are_training_split_files_not_yet_used(tmp_path: Path) -> None:
    _write_faces(tmp_path / "main", 4, 16)
    _write_faces(tmp_path / "extra", 40, 16)
    everything = list_faces(tmp_path, exclude=())
    train = split_faces(list_faces(tmp_path, exclude=("extra",)))[0]
    extra = extra_pool_faces(everything, ("extra",), train)
    expected = [f for f in everything if f.source == "extra" and not is_held_out(f)]
    assert extra == expected and 0 < len(extra) < 40  # some of 40 random files are held out
    # A source already trained on everywhere adds nothing twice.
    assert extra_pool_faces(everything, ("main",), split_faces(everything)[0]) == []


@pytest.mark.data
def test_utkface_crops_realign_but_fill_little_of_the_ffhq_frame(data_dir: Path) -> None:
    """The documented reason for excluding UTKFace: realigned, a crop shows ~40 % original pixels."""
    from dynface.train.data import HQ_FOLDER, UTKFACE_SOURCE, realign_tight_crop

    files = sorted((data_dir / HQ_FOLDER / UTKFACE_SOURCE).glob("*.jpg"))[::500][:4]
    assert files
    for path in files:
        out = realign_tight_crop(np.asarray(Image.open(path).convert("RGB")), 128)
        assert out is not None and out.crop.shape == (128, 128, 3) and out.crop.dtype == np.uint8
        assert 0.25 < out.coverage < 0.6
        assert out.mask.shape == (128, 128) and out.mask.dtype == bool
        assert out.coverage == pytest.approx(out.mask.mean())
        assert out.mask[64, 64] and not out.mask[0, 0]  # the face centre is original, the corner padding
    # An FFHQ-framed face is already on the template: nearly the whole crop shows the image.
    ffhq = sorted((data_dir / HQ_FOLDER / "yangxy__GPEN").glob("*.png"))[0]
    small = np.asarray(Image.open(ffhq).convert("RGB").resize((256, 256)))
    framed = realign_tight_crop(small, 128)
    assert framed is not None and framed.coverage > 0.95
    from dynface.train.data import FaceFile, load_realigned_faces

    files = [FaceFile(p.relative_to(data_dir).as_posix(), p.name, UTKFACE_SOURCE) for p in files]
    masked = load_realigned_faces(data_dir, files, 32, cache=False)
    assert (
        masked is not None
        and masked.images.shape == (len(files), 32, 32, 3)
        and masked.masks.shape == (len(files), 32, 32)
    )
    assert masked.images.dtype == masked.masks.dtype == np.float32 and 0.25 < masked.masks.mean() < 0.6


def test_se_backward_through_channels_last_tm_output() -> None:
    """Regression: the quick 64-px SE crashed the process (double free) in backward, because TM's
    channels-last output reached the width-8 SDE stem; the SDE now makes its input contiguous."""
    from dynface.models.se import build_sde
    from dynface.train.se import se_loss

    torch.manual_seed(0)
    tm = build_swinir(swinir_config(64, embed_dim=16, depths=(1,), image_residual=True))
    sde = build_sde(sde_config(64, (0.125, 1.875), width=8))
    lq, gt = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert tm(lq).is_contiguous(memory_format=torch.channels_last)  # what triggered the crash
    losses = se_loss(StdEstimator(sde, tm), lq, gt, torch.tensor([0.5, 1.2]), 0.01)
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sde.parameters())


@pytest.mark.data
def test_quick_starter_with_masked_prior_crops_at_64_px(data_dir: Path, tmp_path: Path) -> None:
    """`prior_masked_share`: re-aligned UTKFace crops join the prior's batches and the card says so
    (64 px: also the size at which the quick SE once crashed, see the channels-last test)."""
    import shutil

    from dynface.train.data import HQ_FOLDER, UTKFACE_SOURCE

    data = tmp_path / "data"
    for source, n in (("yangxy__GPEN", 8), (UTKFACE_SOURCE, 6)):
        (data / source).mkdir(parents=True)
        for path in sorted((data_dir / HQ_FOLDER / source).iterdir())[:n]:
            shutil.copyfile(path, data / source / path.name)
    out = tmp_path / "pack"
    options = StarterOptions(
        resolution=64, quick=True, data_dir=str(data), work_dir=str(tmp_path / "work"), progress=False,
        tune_faces=1, eval_faces=1, prior_masked_share=0.5,
    )  # fmt: skip
    train_starter(out, options)
    card = (out / "MODEL_CARD.md").read_text()
    assert "50% re-aligned tight crops" in card and "prior (re-aligned, masked loss)" in card
    load_pack(str(out))


def test_train_starter_refuses_an_existing_pack_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dynface train starter weights/starter` would replace the shipped pack with another run's."""
    from app.cli import main

    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "manifest.json").write_text("{}")
    assert main(["train", "starter", str(pack), "--quick", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err
    assert (pack / "manifest.json").read_text() == "{}"
    with pytest.raises(Exception):  # noqa: B017 - with --force it goes on, and fails on the empty data dir
        main(["train", "starter", str(pack), "--quick", "--force", "--data-dir", str(tmp_path / "none")])


def test_shipped_starter_card_agrees_with_its_parquet() -> None:
    """weights/starter: every number of the card's Ablation table is a cell of ablation.parquet, whose
    means are recomputed from per_face.parquet; the reported faces are test-split faces of holdout.txt."""
    import pandas as pd

    pack = Path(__file__).resolve().parent.parent / "weights" / "starter"
    _check_card_against_parquet(pack, section="Ablation")
    per_face = pd.read_parquet(pack / "per_face.parquet")
    held = set((pack / "holdout.txt").read_text().split())
    assert {f"hq_aligned/{name}" for name in per_face["face"]} <= held
    assert not set(per_face.loc[per_face["split"] == "test", "face"]) & set(
        per_face.loc[per_face["split"] == "validation", "face"]
    )
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["splits"]["test"] == ["1"] and manifest["splits"]["validation"] == ["0"]
