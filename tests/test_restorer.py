"""Restorer end to end on a tiny random pack: every method, ordering, seeds, diagnostics."""

from __future__ import annotations

import numpy as np
import pytest

from dynface.core.dblm import guidance_stds
from dynface.packs.writer import write_random_pack
from dynface.restorer import METHODS, RestoreConfig, Restorer, face_seed

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


def test_known_std_from_estimate_gives_the_same_restoration(
    restorer: Restorer, faces: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = restorer.with_config(mode="closed_form")
    calls = {"rm": 0, "se": 0}
    for name in calls:
        net = getattr(r.pack, name)
        monkeypatch.setattr(net, "forward", _counting(net.forward, calls, name))
    estimates = r.estimate(faces)
    assert calls == {"rm": 0, "se": 2}  # two batches (batch_size 2); std* only: RM is not run
    known = r.restore(faces, std_hats=[e.std_hat for e in estimates])
    assert calls == {"rm": 2, "se": 2}  # restore with known std* skips SE
    fresh = r.restore(faces)
    for k, f, e in zip(known, fresh, estimates):
        assert k.std_hat == f.std_hat == e.std_hat and k.t_start == f.t_start == e.t_start
        np.testing.assert_array_equal(k.image, f.image)
    with pytest.raises(ValueError, match="one std_hat per face"):
        r.restore(faces, std_hats=[1.0])


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
    y = restorer._input_batch(crops)
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
