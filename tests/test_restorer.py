"""Restorer end to end on a tiny random pack: every method, ordering, seeds, diagnostics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dynface.core.calls import LEDGER_ENV, read_ledger
from dynface.core.dblm import guidance_stds
from dynface.packs.writer import write_random_pack
from dynface.restorer import METHODS, RestoreConfig, Restorer, face_seed, input_batch

FAST = {"respacing": "ddim10", "batch_size": 2}


@pytest.fixture(scope="module")
def restorer(tmp_path_factory: pytest.TempPathFactory) -> Restorer:
    uri = write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=32, seed=2)
    return Restorer.from_pack(uri, overrides=FAST, device="cpu")


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 8 * i, 40 + 8 * i, 3), dtype=np.uint8) for i in range(3)]


# Guidance mode matters only for the guided methods.
CASES = [(m, "closed_form") for m in METHODS] + [(m, "dps") for m in ("full", "dblm")]


@pytest.mark.parametrize(("method", "mode"), CASES)
def test_every_method_runs_end_to_end(
    restorer: Restorer, faces: list[np.ndarray], method: str, mode: str
) -> None:
    results = restorer.with_config(method=method, mode=mode).restore(faces)
    assert [r.image.shape for r in results] == [f.shape for f in faces]
    for r in results:
        assert r.image.dtype == np.uint8 and r.method == method
        lo, hi = restorer.std_range
        assert lo <= r.std_hat <= hi
        assert r.std_hat_512 == pytest.approx(r.std_hat * 512 / 32)
        if method == "rm_only":
            assert r.n_steps == 0 and r.guidance_residual is None
            continue
        assert r.n_steps > 0 and r.guidance_residual is not None and np.isfinite(r.guidance_residual)
        if method == "difface":
            assert r.t_start == 400 and r.eta == 0.5
        elif method == "dblm":
            assert r.t_start == 999
        else:
            assert 690 <= r.t_start <= 925
            assert r.eta == pytest.approx(min(1.0, r.std_hat_512 / 10), rel=1e-5)
        if method == "full":
            assert len(r.levels) >= 1 and r.levels[0] == pytest.approx(r.std_hat, rel=1e-5)
        elif method != "difface":
            assert len(r.levels) == 1


def test_results_keep_input_order_and_seeds_follow_content(
    restorer: Restorer, faces: list[np.ndarray]
) -> None:
    r = restorer.with_config(mode="closed_form")
    forward = r.restore(faces)
    backward = r.restore(faces[::-1])[::-1]
    for a, b in zip(forward, backward):
        assert a.seed == b.seed
        np.testing.assert_allclose(a.image.astype(int), b.image.astype(int), atol=1)
    assert forward[0].seed == face_seed(faces[0], r.config.seed)
    assert len({x.seed for x in forward}) == 3


def test_full_method_lowers_residual_against_unguided(restorer: Restorer, faces: list[np.ndarray]) -> None:
    guided = restorer.with_config(mode="closed_form", guidance_scale=5.0).restore(faces)
    free = restorer.with_config(mode="closed_form", guidance_scale=0.0).restore(faces)
    for g, f in zip(guided, free):
        assert g.guidance_residual < f.guidance_residual


def test_config_round_trip_and_validation() -> None:
    cfg = RestoreConfig().merged({"method": "dblm_dsst", "mode": "closed_form", "offsets": [0, 2]})
    assert cfg.method == "dblm_dsst" and cfg.sampler.mode == "closed_form" and cfg.offsets == (0, 2)
    assert RestoreConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        RestoreConfig.from_dict({"nonsense": 1})
    with pytest.raises(ValueError):
        RestoreConfig(method="magic")  # type: ignore[arg-type]


def test_guidance_levels_drop_below_minimum() -> None:
    import torch

    stds, valid = guidance_stds(
        torch.tensor([8.0, 2.5, 0.5]), offsets=(0, 1, 2), resolution=512, std_range=(1, 15)
    )
    assert stds[0].tolist() == [8.0, 7.0, 6.0] and valid[0].tolist() == [True, True, True]
    assert stds[1].tolist() == [2.5, 1.5, 1.0] and valid[1].tolist() == [True, True, False]
    assert stds[2].tolist() == [1.0, 1.0, 1.0] and valid[2].tolist() == [True, False, False]
    # Offsets are in 512-px units: at 64 px one unit is 1/8 px.
    stds, _ = guidance_stds(torch.tensor([1.0]), offsets=(0, 1), resolution=64, std_range=(0.125, 1.875))
    assert stds[0].tolist() == [1.0, 0.875]


def test_automatic_batch_size_on_cpu_is_fixed(restorer: Restorer, faces: list[np.ndarray]) -> None:
    auto = restorer.with_config(batch_size=0, method="rm_only")
    assert auto.auto_batch_size() == 8
    assert len(auto.restore(faces)) == 3
    with pytest.raises(ValueError):
        RestoreConfig(batch_size=-1)


def test_plans_from_plan_give_the_same_restoration_without_se_or_dsst(
    restorer: Restorer, faces: list[np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    r = restorer.with_config(mode="closed_form")
    calls = {"rm": 0}
    monkeypatch.setattr(r.pack.rm, "forward", _counting(r.pack.rm.forward, calls, "rm"))
    ledger = tmp_path / "calls.txt"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    plans = r.plan(faces)
    assert calls == {"rm": 0} and read_ledger(str(ledger)) == {"se": 3, "dsst": 3}  # one each per face
    known = r.restore(faces, plans=plans)
    assert calls == {"rm": 2}  # two batches (batch_size 2)
    assert read_ledger(str(ledger)) == {"se": 3, "dsst": 3}  # restore from plans runs neither SE nor DSST
    monkeypatch.delenv(LEDGER_ENV)
    fresh = r.restore(faces)
    for k, f, p in zip(known, fresh, plans, strict=True):
        assert k.plan == f.plan == p
        assert k.std_hat == p.std_hat_px and k.t_start == p.t_start and k.levels == p.levels_px
        np.testing.assert_array_equal(k.image, f.image)
    with pytest.raises(ValueError, match="one plan per face"):
        r.restore(faces, plans=plans[:1])
    with pytest.raises(ValueError, match="not both"):
        r.restore(faces, plans=plans, seeds=[1, 2, 3])


def test_restore_samples_from_the_plan_it_is_given(restorer: Restorer, faces: list[np.ndarray]) -> None:
    """A plan is used as it is: another start step, seed or level std changes the result accordingly."""
    r = restorer.with_config(mode="closed_form", batch_size=4)
    plan = r.plan(faces[:1])[0]
    starts = tuple(t - 300 for t in plan.level_t_starts)  # ddim10: 3 grid points earlier
    earlier = replace(plan, t_start=plan.t_start - 300, level_t_starts=starts)
    base, moved = r.restore(faces[:1] * 2, plans=[plan, earlier])
    assert moved.t_start == plan.t_start - 300 and moved.n_steps == base.n_steps - 3
    reseeded = r.restore(faces[:1], plans=[replace(plan, seed=plan.seed + 1)])[0]
    assert reseeded.seed == plan.seed + 1 and not np.array_equal(reseeded.image, base.image)
    fixed = r.restore(faces[:1], plans=[plan])[0]
    np.testing.assert_array_equal(fixed.image, base.image)


def _counting(fn, calls: dict[str, int], name: str):
    def wrapped(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def test_rm_flip_ensemble_averages_rm_and_its_mirror(restorer: Restorer, faces: list[np.ndarray]) -> None:
    import torch

    from dynface.core.dblm import restore_rm

    rm = restorer.pack.rm
    crops = [f[:32, :32] for f in faces]  # at the pack's resolution: no resizing around RM
    y = input_batch(crops, restorer.resolution, restorer.device)
    with torch.no_grad():
        plain, mirrored = rm(y), rm(y.flip(-1)).flip(-1)
        ensemble = restore_rm(y, rm, flip_ensemble=True)
    assert not torch.allclose(plain, mirrored, atol=1e-4)  # a random RM is not mirror-symmetric
    torch.testing.assert_close(ensemble, ((plain + mirrored) / 2).clamp(0, 1))
    torch.testing.assert_close(restore_rm(y, rm), plain.clamp(0, 1))
    # The option reaches RM through the restorer (and a pack's sampler section, as a flat option).
    on = restorer.with_config(method="rm_only", rm_flip_ensemble=True).restore(crops)
    off = restorer.with_config(method="rm_only").restore(crops)
    expected = (ensemble.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for got, want, other in zip(on, expected, off):
        assert np.abs(got.image.astype(int) - want).max() <= 1
        assert not np.array_equal(got.image, other.image)
    assert RestoreConfig().merged({"rm_flip_ensemble": True}).rm_flip_ensemble


def test_given_rm_output_replaces_rm(
    restorer: Restorer, faces: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`restored=` (another restorer's output, or the ground truth for the oracle bound) is used as
    RM(y): RM is not run, the targets are blurred from it, and everything else is unchanged."""
    r = restorer.with_config(mode="closed_form")
    calls = {"rm": 0}
    monkeypatch.setattr(r.pack.rm, "forward", _counting(r.pack.rm.forward, calls, "rm"))
    crops = [f[:32, :32] for f in faces]  # at the pack's resolution: no resizing around RM
    rng = np.random.default_rng(5)
    given = [rng.integers(0, 256, c.shape, dtype=np.uint8) for c in crops]
    as_rm = r.with_config(method="rm_only").restore(crops, restored=given)
    for got, want in zip(as_rm, given):
        np.testing.assert_array_equal(got.image, want)
    full_given = r.restore(crops, restored=given)
    assert calls == {"rm": 0}
    full_own = r.restore(crops)
    assert calls == {"rm": 2}
    for a, b in zip(full_given, full_own):
        assert a.std_hat == b.std_hat and a.t_start == b.t_start and a.seed == b.seed
        assert not np.array_equal(a.image, b.image)
    # Given RM's own output, the result is the same as running RM.
    own_rm = [x.image for x in r.with_config(method="rm_only").restore(crops)]
    for a, b in zip(r.restore(crops, restored=own_rm), full_own):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2
    with pytest.raises(ValueError, match="one restored image per face"):
        r.restore(crops, restored=given[:1])


# What each rung of the ablation ladder runs: (start, guidance map, kernel update, several levels).
COMPONENTS = {
    "difface": ("fixed400", "none", False, None),  # unguided: its planned levels are never used
    "dblm": ("fixed999", "ones", False, False),
    "dblm_dsst": ("dsst", "ones", False, False),
    "dblm_dsst_dgsa": ("dsst", "dgsa", False, False),
    "full": ("dsst", "dgsa", True, True),
}


@pytest.mark.parametrize("method", sorted(COMPONENTS))
def test_each_method_runs_exactly_its_components(
    restorer: Restorer, faces: list[np.ndarray], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DSST start vs a fixed one, A_t = 1 vs the DGSA map, one level vs several, the kernel update:
    observed on the sampler's inputs and outputs and on DGSA's calls, one method at a time."""
    import dynface.restorer as restorer_module

    start, guidance_map, kernel_update, multi_level = COMPONENTS[method]
    seen: list = []

    def spy(prior, diffusion, batch, config, **kwargs):
        out = restorer_module_sample(prior, diffusion, batch, config, **kwargs)
        seen.append((batch, config, out))
        return out

    restorer_module_sample = restorer_module.sample
    monkeypatch.setattr(restorer_module, "sample", spy)
    calls = {"dgsa": 0}
    monkeypatch.setattr(restorer.pack.dgsa, "forward", _counting(restorer.pack.dgsa.forward, calls, "dgsa"))
    r = restorer.with_config(method=method, mode="closed_form", guidance_scale=2.0)
    big = [np.ascontiguousarray(np.repeat(np.repeat(f[:32, :32], 2, 0), 2, 1)) for f in faces]
    results = r.restore(big)
    batch, config, out = seen[0]
    t_starts = [res.t_start for res in results]
    if start == "dsst":
        table = restorer.pack.dsst
        expected = [int(round(float(table.lookup(res.levels[0])))) for res in results]
        assert t_starts == expected and all(690 <= t <= 925 for t in t_starts), (t_starts, expected)
    else:
        assert t_starts == [int(start.removeprefix("fixed"))] * len(results)
    assert (config.mode == "none") == (guidance_map == "none")
    assert (calls["dgsa"] > 0) == (guidance_map == "dgsa"), calls
    moved = [res.std_final != res.levels for res in results]
    assert any(moved) if kernel_update else not any(moved)
    n_levels = [len(res.levels) for res in results]
    if multi_level is not None:
        assert (max(n_levels) > 1) == multi_level, n_levels
