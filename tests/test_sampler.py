"""The guided sampler on a tiny random pack: guidance lowers the data residual, seeds are per sample."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynface.core.dblm import run_dblm
from dynface.core.diffusion import Diffusion
from dynface.core.sampler import SampleBatch, SamplerConfig, StepInfo, sample, start_indices
from dynface.packs.loading import LoadedPack, load_pack
from dynface.packs.writer import write_random_pack

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


def test_sample_is_identical_alone_or_in_a_batch(pack: LoadedPack) -> None:
    diffusion = Diffusion.create("ddim25")
    batch = _batch(pack, n=3)
    cfg = SamplerConfig(respacing="ddim25", guidance_scale=1.0)
    together = sample(pack.prior, diffusion, batch, cfg, dgsa=pack.dgsa, std_range=pack.manifest.std_range)
    for i in range(3):
        one = SampleBatch(
            init=batch.init[i : i + 1],
            t_start=batch.t_start[i : i + 1],
            eta=batch.eta[i : i + 1],
            seeds=[batch.seeds[i]],
            targets=batch.targets.select(torch.tensor([i])),
        )
        alone = sample(pack.prior, diffusion, one, cfg, dgsa=pack.dgsa, std_range=pack.manifest.std_range)
        assert torch.allclose(alone.images[0], together.images[i], atol=1e-4)
    # A different seed changes the result.
    other = replace(batch, seeds=[99, 98, 97])
    moved = sample(pack.prior, diffusion, other, cfg, dgsa=pack.dgsa, std_range=pack.manifest.std_range)
    assert not torch.allclose(moved.images, together.images, atol=1e-3)


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
