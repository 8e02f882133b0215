"""The guided sampler on a tiny random pack: guidance lowers the data residual, seeds are per sample."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dynface.core.blur import gaussian_blur
from dynface.core.dblm import run_dblm
from dynface.core.diffusion import Diffusion, linear_betas
from dynface.core.guidance import GuidanceTargets
from dynface.core.sampler import FaceNoise, SampleBatch, SamplerConfig, StepInfo, sample, start_indices
from dynface.packs.loading import LoadedPack, load_pack
from dynface.packs.writer import write_random_pack
from dynface.restorer import Restorer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from sampler_before import sample_before  # noqa: E402 - the plain loop, bit-for-bit baseline
from step_counters import HostReadCounter  # noqa: E402 - the project's count of waits on the device

RES = 32


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> LoadedPack:
    return load_pack(write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=RES, seed=1))


def _batch(pack: LoadedPack, n: int = 3, seed: int = 0) -> SampleBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, 3, RES, RES, generator=g)
    dblm = run_dblm(y, pack.rm, pack.se, pack.dsst, resolution=RES, std_range=pack.manifest.std_range)
    t_start = dblm.targets.t_starts.max(dim=1).values
    init = dblm.targets.targets[:, 0]
    eta = torch.full((n,), 0.5)
    return SampleBatch(
        init=init, t_start=t_start, eta=eta, seeds=list(range(10, 10 + n)), targets=dblm.targets
    )


@pytest.mark.parametrize("mode", ["dps", "closed_form"])
def test_guidance_lowers_residual_over_the_steps(pack: LoadedPack, mode: str) -> None:
    diffusion = Diffusion.create("ddim25")
    batch = _batch(pack)
    cfg = SamplerConfig(mode=mode, respacing="ddim25", guidance_scale=5.0, kernel_update=False)
    guided = sample(pack.prior, diffusion, batch, cfg, dgsa=pack.dgsa, std_range=pack.manifest.std_range)
    free = sample(
        pack.prior, diffusion, batch, cfg.with_(guidance_scale=0.0), std_range=pack.manifest.std_range
    )
    assert torch.all(guided.final_residual < 0.5 * free.final_residual)
    # Over the trajectory: the guided residual ends well below where it started.
    hist = guided.residual_history
    first = hist[np.argmax(~np.isnan(hist), axis=0), np.arange(hist.shape[1])]
    assert np.all(hist[-1] < first)


def test_per_sample_start_steps_and_progress(pack: LoadedPack) -> None:
    diffusion = Diffusion.create("ddim25")
    batch = _batch(pack, n=2)
    batch = replace(batch, t_start=torch.tensor([400, 920]))
    steps: list[StepInfo] = []
    out = sample(
        pack.prior, diffusion, batch, SamplerConfig(mode="none", respacing="ddim25"), progress=steps.append
    )
    idx = [diffusion.index_for_timestep(400), diffusion.index_for_timestep(920)]
    assert out.n_steps.tolist() == [idx[0] + 1, idx[1] + 1]
    assert len(steps) == idx[1] + 1 and steps[0].n_active == 1 and steps[-1].n_active == 2
    assert steps[0].timestep == int(diffusion.timestep_map[idx[1]])


def test_difface_start_quirk_denoises_from_the_previous_index() -> None:
    diffusion = Diffusion.create("ddim250")
    noise_idx, first = start_indices(diffusion, torch.tensor([400, 0]), quirk=True)
    assert noise_idx.tolist() == [100, 0] and first.tolist() == [99, 0]
    noise_idx, first = start_indices(diffusion, torch.tensor([400]), quirk=False)
    assert noise_idx.tolist() == [100] and first.tolist() == [100]


def test_kernel_update_changes_stds_within_range(pack: LoadedPack) -> None:
    diffusion = Diffusion.create("ddim25")
    batch = _batch(pack, n=2)
    lo, hi = pack.manifest.std_range
    cfg = SamplerConfig(mode="closed_form", respacing="ddim25", kernel_update=True, kernel_step=0.5)
    out = sample(pack.prior, diffusion, batch, cfg, dgsa=pack.dgsa, std_range=(lo, hi))
    assert not torch.allclose(out.stds_final, batch.targets.stds)
    assert torch.all(out.stds_final >= lo - 1e-6) and torch.all(out.stds_final <= hi + 1e-6)


class _OraclePrior(torch.nn.Module):
    """Predicts exactly the noise that turns x_t back into `clean`: x̂0 = clean at every step, so the
    kernel-std update sees the true x0 and its direction can be asserted."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean = clean
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - linear_betas()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.clean[: len(x)]) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def test_kernel_update_moves_each_std_towards_the_true_blur() -> None:
    """Targets are the clean faces blurred by 1.0 px; kernel stds starting above (1.6) and below (0.5)
    must both end closer to 1.0, the one above lower and the one below higher."""
    g = torch.Generator().manual_seed(7)
    clean = gaussian_blur(torch.rand(2, 3, RES, RES, generator=g), 0.8) * 2 - 1  # smooth, like a face
    true_std, starts = 1.0, torch.tensor([[1.6], [0.5]])
    blurred = gaussian_blur(clean, true_std)
    targets = GuidanceTargets(
        blurred.unsqueeze(1), starts.clone(), torch.full((2, 1), 950), torch.ones(2, 1, dtype=torch.bool),
        torch.ones(2, 1),
    )  # fmt: skip
    batch = SampleBatch(
        init=blurred, t_start=torch.tensor([900, 900]), eta=torch.zeros(2), seeds=[1, 2], targets=targets
    )
    cfg = SamplerConfig(
        mode="closed_form", respacing="ddim25", guidance_scale=0.1, kernel_update=True, kernel_step=0.5
    )
    out = sample(_OraclePrior(clean), Diffusion.create("ddim25"), batch, cfg, std_range=(0.125, 3.0))
    final = out.stds_final[:, 0]
    assert float(final[0]) < 1.6 and float(final[1]) > 0.5, final
    assert torch.all((final - true_std).abs() < (starts[:, 0] - true_std).abs() * 0.7), final


def test_zero_dgsa_map_switches_guidance_off(pack: LoadedPack) -> None:
    diffusion = Diffusion.create("ddim25")
    batch = _batch(pack, n=2)

    class ZeroMap(torch.nn.Module):
        def forward(self, target: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x0[:, :1])

    cfg = SamplerConfig(mode="closed_form", respacing="ddim25", kernel_update=False)
    zero = sample(pack.prior, diffusion, batch, cfg, dgsa=ZeroMap())
    off = sample(pack.prior, diffusion, batch, cfg.with_(mode="none"))
    assert torch.allclose(zero.images, off.images, atol=1e-6)


def test_bad_batch_raises(pack: LoadedPack) -> None:
    batch = _batch(pack, n=2)
    with pytest.raises(ValueError):
        sample(pack.prior, Diffusion.create("ddim25"), replace(batch, seeds=[1]), SamplerConfig())
    with pytest.raises(ValueError):
        SamplerConfig(mode="bogus")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- built for the GPU


def _one(batch: SampleBatch, i: int) -> SampleBatch:
    """Face i of the batch alone."""
    return SampleBatch(
        init=batch.init[i : i + 1],
        t_start=batch.t_start[i : i + 1],
        eta=batch.eta[i : i + 1],
        seeds=[batch.seeds[i]],
        targets=batch.targets.select(torch.tensor([i])),
    )


def _mixed_batch(pack: LoadedPack, n: int = 5) -> SampleBatch:
    """Unsorted per-face starts and etas, levels starting at different steps: every path of the loop."""
    batch = _batch(pack, n=n, seed=4)
    t_start = torch.tensor([200, 900, 520, 700, 300][:n])
    t_starts = torch.stack([t_start, t_start - 60, t_start - 120], dim=1)
    return replace(
        batch,
        t_start=t_start,
        eta=torch.linspace(0.0, 1.0, n),
        targets=replace(batch.targets, t_starts=t_starts),
    )


@pytest.mark.parametrize("mode", ["dps", "closed_form", "none"])
def test_bit_for_bit_the_plain_loop(pack: LoadedPack, mode: str) -> None:
    """The GPU-ready loop computes exactly what the plain one (benchmarks/sampler_before.py) does."""
    diffusion = Diffusion.create("ddim10")
    batch = _mixed_batch(pack)
    cfg = SamplerConfig(mode=mode, respacing="ddim10", guidance_scale=5.0, kernel_step=0.5)
    kwargs = {"dgsa": pack.dgsa, "std_range": pack.manifest.std_range}
    new, old = (
        sample(pack.prior, diffusion, batch, cfg, **kwargs),
        sample_before(pack.prior, diffusion, batch, cfg, **kwargs),
    )
    assert torch.equal(new.images, old.images)
    assert torch.equal(new.stds_final, old.stds_final) and torch.equal(new.final_residual, old.final_residual)
    assert torch.equal(new.n_steps, old.n_steps)
    np.testing.assert_array_equal(new.residual_history, old.residual_history)


@pytest.mark.parametrize(
    ("mode", "kernel_update", "most"), [("dps", True, 1), ("dps", False, 0), ("closed_form", False, 0)]
)
def test_a_step_reads_the_device_at_most_once(
    pack: LoadedPack, mode: str, kernel_update: bool, most: int
) -> None:
    """Once per step to refresh the host copy of the kernel stds after their update; never without it."""
    batch = _mixed_batch(pack)
    cfg = SamplerConfig(mode=mode, respacing="ddim10", kernel_update=kernel_update)
    per_step: list[int] = []
    with HostReadCounter() as reads:

        def step_done(_info: StepInfo) -> None:
            per_step.append(reads.count - sum(per_step))

        out = sample(pack.prior, Diffusion.create("ddim10"), batch, cfg, dgsa=pack.dgsa, progress=step_done)
    # per_step[0] also counts the run's setup (start steps, etas, the stds' first host copy).
    assert len(per_step) == int(out.n_steps.max()) and max(per_step[1:]) == most


def test_face_noise_is_each_faces_own_stream() -> None:
    together = FaceNoise([7, 8, 9], (3, 4, 4), torch.device("cpu"))
    alone = FaceNoise([8], (3, 4, 4), torch.device("cpu"))
    first, second = together.draw(3).clone(), together.draw(2).clone()
    g = torch.Generator().manual_seed(8)
    assert torch.equal(first[1], torch.randn((3, 4, 4), generator=g))
    assert torch.equal(second[1], torch.randn((3, 4, 4), generator=g))
    assert torch.equal(alone.draw(1)[0], first[1]) and torch.equal(alone.draw(1)[0], second[1])


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().astype(int)


def test_same_seeds_give_the_same_faces_alone_and_batched(pack: LoadedPack) -> None:
    """Faces with their own start steps, stds and etas, sampled together and one by one: the same faces
    (the blur's kernel size follows the batch's largest std, which may move a pixel by one level)."""
    diffusion = Diffusion.create("ddim10")
    batch = _mixed_batch(pack)
    cfg = SamplerConfig(respacing="ddim10", guidance_scale=5.0, kernel_step=0.5)
    kw = {"dgsa": pack.dgsa, "std_range": pack.manifest.std_range}
    together = sample(pack.prior, diffusion, batch, cfg, **kw)
    for i in range(len(batch.seeds)):
        one = sample(pack.prior, diffusion, _one(batch, i), cfg, **kw)
        diff = np.abs(_uint8(one.images[0]) - _uint8(together.images[i]))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        torch.testing.assert_close(one.stds_final[0], together.stds_final[i], rtol=1e-3, atol=1e-5)
    moved = sample(pack.prior, diffusion, replace(batch, seeds=[s + 1 for s in batch.seeds]), cfg, **kw)
    assert all(np.abs(_uint8(a) - _uint8(b)).max() > 1 for a, b in zip(moved.images, together.images))


def test_a_face_restores_the_same_alone_and_in_a_batch(tmp_path) -> None:
    """Through the Restorer: each face's seed comes from its pixels, so batching does not move it."""
    uri = write_random_pack(str(tmp_path / "pack"), resolution=RES, seed=5)
    restorer = Restorer.from_pack(uri, overrides={"respacing": "ddim10", "batch_size": 3}, device="cpu")
    rng = np.random.default_rng(2)
    faces = [rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for _ in range(3)]
    together = restorer.restore(faces)
    for face, res in zip(faces, together, strict=True):
        alone = restorer.restore([face])[0]
        assert alone.seed == res.seed
        assert np.abs(alone.image.astype(int) - res.image.astype(int)).max() <= 1
    other = restorer.restore(faces, seeds=[1, 2, 3])
    assert all(np.abs(a.image.astype(int) - b.image.astype(int)).max() > 1 for a, b in zip(other, together))


def test_fp16_with_dps_is_refused(pack: LoadedPack) -> None:
    batch = replace(_batch(pack, n=1), t_start=torch.tensor([80]))
    with pytest.raises(ValueError, match="fp16"):
        sample(pack.prior, Diffusion.create("ddim25"), batch, SamplerConfig(precision="fp16"))
    sample(pack.prior, Diffusion.create("ddim25"), batch, SamplerConfig(mode="closed_form", precision="fp16"))


def test_invalid_kernel_stds_are_refused(pack: LoadedPack) -> None:
    """The host decides the blur's kernel size, so it also checks the stds the blur would have checked."""
    batch = _batch(pack, n=2)
    bad = replace(
        batch, targets=replace(batch.targets, stds=batch.targets.stds * torch.tensor([[1.0], [0.0]]))
    )
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        sample(pack.prior, Diffusion.create("ddim10"), bad, SamplerConfig(respacing="ddim10"))
