"""`train complete` on a random-weight base pack of the DifFace architecture at 64 px (the released
file formats, few channels): the completed pack verifies and runs the full method, the base's files are
untouched, a restart from a mid-stage checkpoint reaches the weights of an uninterrupted run, and the same
global batch gives the same weights on one or two Ray Train workers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixture local_ray
from s3_server import s3_environment
from safetensors.torch import load_file
from test_train import _write_faces

import dynface.core.memory as memory_module
import dynface.models.unet as unet_module
import dynface.train.fresh_stages as stages
from app.cli import main
from app.train_parallel import ray_data_parallel
from dynface.checkpoints import ChecksumError
from dynface.core.config import RestoreConfig
from dynface.core.diffusion import Diffusion
from dynface.core.dsst import build_dsst_table
from dynface.models.dgsa import build_dgsa
from dynface.models.se import StdEstimator, build_sde
from dynface.models.swinir import build_swinir, small_params
from dynface.models.unet import build_unet
from dynface.packs.loading import load_pack
from dynface.packs.manifest import read_manifest, verify_pack
from dynface.packs.writer import power_law_psd
from dynface.restorer import Restorer
from dynface.train.complete import complete
from dynface.train.complete_plan import CompleteOptions
from dynface.train.dgsa import DGSATrainConfig, FrozenNets
from dynface.train.fresh_stages import DGSAMemory, dgsa_step_loss, freeze

RES = 64
DEGRADE = 128  # degradations made at 128 px instead of 512 keep the CPU test short
DIFFACE_LIKE_UNET = {  # the DifFace prior's block structure (multi-depth res blocks, attention) in small
    "image_size": RES,
    "in_channels": 3,
    "model_channels": 32,
    "out_channels": 6,
    "attention_resolutions": [16],
    "dropout": 0,
    "channel_mult": [1, 1, 2],
    "num_res_blocks": [1, 1, 2],
    "num_head_channels": 32,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
}
QUICK = CompleteOptions(quick=True, degrade_resolution=DEGRADE, progress=False)


def write_base_pack(folder: Path) -> Path:
    """A DifFace-style base pack: prior and RM as torch pickles in the released formats (`module.`
    keys on the prior), no sha256 pinned, no SE, no DGSA, no DSST; a manifest.yaml beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = build_unet(DIFFACE_LIKE_UNET)
    torch.save({f"module.{k}": v for k, v in unet.state_dict().items()}, folder / "prior.pth")
    rm_cfg = small_params(RES, embed_dim=16, depths=(1,), num_heads=2, image_residual=True)
    torch.save(build_swinir(rm_cfg).state_dict(), folder / "rm.pth")
    manifest = {
        "name": "base64",
        "resolution": RES,
        "std_range": [1.0 * RES / 512, 15.0 * RES / 512],
        "components": {
            "prior": {"file": "prior.pth", "sha256": None, "config": DIFFACE_LIKE_UNET},
            "rm": {"file": "rm.pth", "sha256": None, "config": rm_cfg},
        },
        "sampler": {"respacing": "ddim10", "guidance_scale": 2.0, "fixed_std": 6.0, "batch_size": 4},
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base_pack(tmp_path_factory.mktemp("base") / "base64")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    _write_faces(folder / "generated", 6, DEGRADE)
    return folder


def _stage_weights(pack: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_file(str(pack / f"{c}.safetensors")) for c in ("tm", "sde", "dgsa")}


def _check_full_method(pack: Path) -> None:
    restorer = Restorer.from_pack(str(pack), overrides={"respacing": "ddim10"})
    assert restorer.pack.se is not None and restorer.pack.dgsa is not None
    rng = np.random.default_rng(3)
    smooth = np.full((RES, RES, 3), 120, np.uint8)
    noisy = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    results = restorer.restore([smooth, noisy])
    assert [r.plan.std_source for r in results] == ["se", "se"]
    stds = [r.std_hat for r in results]
    fixed = RestoreConfig().merged({}).fixed_std * RES / 512
    assert stds[0] != pytest.approx(stds[1]) and all(s != pytest.approx(fixed) for s in stds)


def test_complete_on_generated_faces(base: Path, faces: Path, tmp_path: Path) -> None:
    before = _hashes(base)
    out = tmp_path / "out"
    report = complete(str(base), str(out), str(faces), replace(QUICK, checkpoint_uri=str(tmp_path / "ckpt")))
    assert report.finished and report.manifest_uri == f"{out}/manifest.json"
    assert _hashes(base) == before  # the base pack is never modified
    manifest = verify_pack(str(out))
    data = json.loads((out / "manifest.json").read_text())
    for name, file in (("prior", "prior.pth"), ("rm", "rm.pth")):  # referenced, not copied
        assert data["components"][name]["file"] == f"file://{base / file}"
        assert data["components"][name]["sha256"] == before[file]
        assert not (out / file).exists()
    assert set(manifest.components) == {"prior", "rm", "tm", "sde", "dgsa", "dsst"}
    assert set(data["documents"]) == {"MODEL_CARD.md", "training.json"}
    training = json.loads((out / "training.json").read_text())
    assert {k: v["steps"] for k, v in training["stages"].items()} == {"sde": 3, "se": 3, "dgsa": 3}
    assert training["data"]["faces"] == 6 and "fixed_std" not in data["sampler"]
    assert "Not measured" in (out / "MODEL_CARD.md").read_text()
    _check_full_method(out)
    # A changed document fails verification.
    (out / "training.json").write_text("{}")
    with pytest.raises(ChecksumError, match="training.json"):
        verify_pack(str(out))


def test_complete_on_the_shared_hq_faces_from_the_command_line(
    base: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dynface train complete` on the shared data folder (MANIFEST.csv): the first 8 faces of its
    training split, 2 steps per stage."""
    out = tmp_path / "out"
    argv = ["train", "complete", str(base), str(out), "--data", str(data_dir), "--limit", "8", "--quick"]
    argv += ["--steps", "2", "--degrade-resolution", str(DEGRADE), "--checkpoint-uri", str(tmp_path / "c")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["finished"] and printed["manifest_uri"] == f"{out}/manifest.json"
    verify_pack(str(out))
    training = json.loads((out / "training.json").read_text())
    assert training["data"]["faces"] == 8 and training["data"]["chosen"].startswith("training split")
    assert {k: v["steps"] for k, v in training["stages"].items()} == {"sde": 2, "se": 2, "dgsa": 2}
    _check_full_method(out)


def test_restart_from_a_mid_stage_checkpoint_gives_the_same_weights(
    base: Path, faces: Path, tmp_path: Path
) -> None:
    data = str(faces)
    first = replace(QUICK, checkpoint_uri=str(tmp_path / "c1"))
    whole = complete(str(base), str(tmp_path / "whole"), data, first)
    again = replace(QUICK, checkpoint_uri=str(tmp_path / "c2"))
    stopped = complete(str(base), str(tmp_path / "split"), data, again, stop=("se", 1))
    assert not stopped.finished and stopped.stopped == "se at step 1"
    assert not (tmp_path / "split").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        complete(str(base), str(tmp_path / "split"), data, again)
    resumed = complete(str(base), str(tmp_path / "split"), data, replace(again, resume=True))
    assert resumed.finished and whole.finished
    a, b = _stage_weights(tmp_path / "whole"), _stage_weights(tmp_path / "split")
    for comp in a:
        for key in a[comp]:
            torch.testing.assert_close(a[comp][key], b[comp][key], rtol=0, atol=0, msg=f"{comp}.{key}")


def test_data_and_checkpoints_on_s3_give_the_weights_of_a_local_run(
    base: Path, faces: Path, tmp_path: Path
) -> None:
    """`--data s3://...` and `--checkpoint-uri s3://...` (moto on loopback): a run stopped mid-stage and
    resumed from its S3 checkpoints ends with the weights of an uninterrupted run on the same faces in a
    local folder with local checkpoints."""
    import s3fs

    local = complete(
        str(base), str(tmp_path / "local"), str(faces), replace(QUICK, checkpoint_uri=str(tmp_path / "c"))
    )
    with s3_environment("ckpt"):
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.put(str(faces) + "/", "ckpt/faces/", recursive=True)
        data = "s3://ckpt/faces"
        on_s3 = replace(QUICK, checkpoint_uri="s3://ckpt/run1", checkpoint_every=1)
        stopped = complete(str(base), str(tmp_path / "split"), data, on_s3, stop=("dgsa", 1))
        assert not stopped.finished and stopped.stopped == "dgsa at step 1"
        stored = fs.find("ckpt/run1")
        assert {"ckpt/run1/run.json", "ckpt/run1/sde/last.pt", "ckpt/run1/dgsa/last.pt"} <= set(stored)
        with pytest.raises(FileExistsError, match="--resume"):  # the S3 checkpoints are found
            complete(str(base), str(tmp_path / "split"), data, on_s3)
        resumed = complete(str(base), str(tmp_path / "split"), data, replace(on_s3, resume=True))
    training = json.loads((tmp_path / "split" / "training.json").read_text())
    assert training["data"]["faces"] == 6 and training["data"]["uri"] == data
    assert local.finished and resumed.finished and resumed.checkpoints == "s3://ckpt/run1"
    a, b = _stage_weights(tmp_path / "local"), _stage_weights(tmp_path / "split")
    for comp in a:
        for key in a[comp]:
            torch.testing.assert_close(a[comp][key], b[comp][key], rtol=0, atol=0, msg=f"{comp}.{key}")


@pytest.mark.slow
def test_one_and_two_ray_train_workers_give_the_same_weights(
    base: Path, faces: Path, tmp_path: Path, local_ray
) -> None:
    """Data-parallel: two CPU workers, each on half of every global batch, gradients averaged, reach the
    weights of one worker on the whole batch (to float tolerance: the sum runs in another order)."""

    def trained_on(workers: int) -> Path:
        pack = tmp_path / f"workers{workers}"
        checkpoints = str(tmp_path / f"c{workers}")
        options = replace(QUICK, checkpoint_every=2, checkpoint_uri=checkpoints, workers=workers)
        runner = ray_data_parallel(workers, None)
        assert complete(str(base), str(pack), str(faces), options, data_parallel=runner).finished
        return pack

    one, two = trained_on(1), trained_on(2)
    assert json.loads((two / "training.json").read_text())["workers"] == 2
    a, b = _stage_weights(one), _stage_weights(two)
    # Gradients agree to rounding (the workers' means are averaged in another order); Adam's first steps
    # move a weight by ~lr·sign(gradient), so the rare weights whose gradient is at rounding level may
    # step differently. Nearly every weight must agree, and the components on the whole.
    for comp in a:
        wa, wb = (torch.cat([w[k].flatten() for k in sorted(w)]) for w in (a[comp], b[comp]))
        close = torch.isclose(wa, wb, rtol=1e-3, atol=1e-5).float().mean()
        print(f"{comp}: {float(close):.5f} of the weights agree, max diff {float((wa - wb).abs().max()):.3g}")
        assert close >= 0.995, comp
        assert float((wa - wb).abs().mean()) < 1e-6, comp
    _check_full_method(two)


@pytest.mark.slow
def test_one_dgsa_step_through_the_full_size_difface_unet_with_checkpointing(monkeypatch) -> None:
    """The memory path at 512 px: one DGSA training step (forward and backward) through the 160 M-parameter
    DifFace UNet with random weights, its blocks checkpointed; DGSA gets a finite gradient and the frozen
    networks none. Closed-form guidance and an SE without TM keep it to two UNet passes on a CPU."""

    configs = {name: spec.config for name, spec in read_manifest("difface").components.items()}
    torch.manual_seed(0)
    prior = build_unet(configs["prior"]).eval().requires_grad_(False)
    dsst = build_dsst_table(
        power_law_psd(512),
        np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)),
        resolution=512,
        std_min=1.0,
        std_max=15.0,
        std_step=0.5,
    )
    se = StdEstimator(build_sde({"width": 8, "num_stages": 2, "input_size": 64}), None)
    nets = FrozenNets(
        prior=prior, rm=torch.nn.Identity(), se=se, dsst=dsst, std_range=(1.0, 15.0), resolution=512
    )
    config = DGSATrainConfig(dgsa={"hidden": 8}, respacing="ddim250", mode="closed_form", guidance_scale=10.0)
    model = build_dgsa(config.dgsa)
    freeze(nets, "cpu")
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    gt = torch.rand(1, 3, 512, 512)
    rngs = [np.random.default_rng(0)]
    loss = dgsa_step_loss(
        model, nets, Diffusion.create("ddim250"), config, gt, gt, rngs, memory=DGSAMemory(checkpointing=True)
    )["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(
        g.abs().sum() > 0 for g in grads
    )
    assert all(p.grad is None for p in prior.parameters())
    blocks = sum(isinstance(m, (unet_module.ResBlock, unet_module.AttentionBlock)) for m in prior.modules())
    assert len(calls) == blocks  # DGSA's pass through the UNet kept only the blocks' inputs
    assert not any(m.training for m in prior.modules())  # checkpointing left the prior as it was


def _small_nets(base: Path) -> FrozenNets:

    pack = load_pack(str(base))
    lo, hi = pack.manifest.std_range
    dsst = build_dsst_table(
        power_law_psd(RES),
        np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)),
        resolution=RES,
        std_min=lo,
        std_max=hi,
        std_step=0.125,
    )
    torch.manual_seed(0)
    se = StdEstimator(
        build_sde({"width": 8, "num_stages": 2, "input_size": RES, "std_min": lo, "std_max": hi})
    )
    return FrozenNets(prior=pack.prior, rm=pack.rm, se=se, dsst=dsst, std_range=(lo, hi), resolution=RES)


def test_dgsa_step_checkpoints_the_frozen_unet_and_runs_in_bf16(base: Path, monkeypatch) -> None:
    """Checkpointing recomputes every UNet block in the backward and changes no gradient; bf16 autocast
    gives a finite loss near fp32's; the prior is left in eval mode."""

    nets = _small_nets(base)
    freeze(nets, "cpu")
    config = DGSATrainConfig(dgsa={"hidden": 8}, respacing="ddim10", mode="dps", guidance_scale=2.0)
    gt = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def step(memory: DGSAMemory) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_dgsa(config.dgsa)
        rngs = [np.random.default_rng([0, r]) for r in range(2)]
        loss = dgsa_step_loss(model, nets, Diffusion.create("ddim10"), config, gt, gt, rngs, memory=memory)
        loss["loss"].backward()
        return float(loss["loss"].detach()), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain = step(DGSAMemory())
    assert not calls
    ckpt_loss, ckpt = step(DGSAMemory(checkpointing=True))
    blocks = sum(
        isinstance(m, (unet_module.ResBlock, unet_module.AttentionBlock)) for m in nets.prior.modules()
    )
    assert len(calls) == 2 * blocks  # both UNet passes with a gradient (DPS guidance, DGSA's step)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not any(m.training for m in nets.prior.modules())
    bf16_loss, bf16 = step(DGSAMemory(precision="bf16", checkpointing=True))
    assert np.isfinite(bf16_loss) and bf16_loss == pytest.approx(plain_loss, rel=0.1)
    assert all(torch.isfinite(g).all() for g in bf16)


def test_dgsa_batch_from_free_memory(base: Path, monkeypatch) -> None:
    """The memory model: peaks at batch 1 and 2 give the per-sample cost; the batch fills the budget."""

    peaks = {1: 3e9, 2: 4e9}  # 2 GB fixed + 1 GB per face
    monkeypatch.setattr(stages, "dgsa_step_peak", lambda nets, config, batch, **kw: (peaks[batch], 1.0))
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: int(25e9))
    size = stages.dgsa_batch_size(_small_nets(base), DGSATrainConfig(dgsa={"hidden": 8}), budget_fraction=0.8)
    assert size == 18  # (0.8 · 25 GB − 2 GB) / 1 GB


def test_the_train_complete_flow(base: Path, faces: Path, tmp_path: Path, prefect_api) -> None:
    from flows.train import train_complete_flow

    out = tmp_path / "out"
    result = train_complete_flow(
        base=str(base),
        out=str(out),
        data=str(faces),
        options={  # as a deployment's JSON parameters give it
            "steps": {"sde": 1, "se": 1, "dgsa": 1},
            "quick": True,
            "degrade_resolution": DEGRADE,
            "checkpoint_uri": str(tmp_path / "c"),
        },
    )
    assert result["finished"] and result["manifest_uri"] == f"{out}/manifest.json"
    assert {k: v["steps"] for k, v in result["stages"].items()} == {"sde": 1, "se": 1, "dgsa": 1}
    verify_pack(str(out))


@pytest.mark.slow
def test_restore_with_the_completed_pack_records_se_estimates(
    base: Path, faces: Path, tmp_path: Path, prefect_api, local_ray, capsys
) -> None:
    """`dynface restore --pack OUT`: the catalog's std* comes from SE for every face and varies with the
    input (never the fixed_std fallback of the base pack)."""
    from catalogs import Catalog

    out = tmp_path / "pack"
    options = replace(QUICK, checkpoint_uri=str(tmp_path / "c"))
    assert complete(str(base), str(out), str(faces), options).finished
    src = tmp_path / "crops"
    src.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(synthetic_face(128)).save(src / "face.png")
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(src / "noise.png")
    dest = tmp_path / "restored"
    run = ["--option", "respacing=ddim10", "--shard-size", "1"]
    assert main(["restore", str(src), str(dest), "--pack", str(out), "--aligned", *run]) == 0, (
        capsys.readouterr()
    )
    rows = Catalog(str(dest / "catalog")).read("faces")
    assert len(rows) == 2 and set(rows["status"]) == {"ok"}
    assert set(rows["std_source"]) == {"se"}
    assert rows["std_hat"].nunique() == 2
