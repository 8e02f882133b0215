"""The Restorer's batch sizing: the memory probe runs the configured method, running out of device memory
halves the batch, and the speed options leave the faces as they are (tiny random pack, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynface.restorer as restorer_module
from dynface.packs.writer import write_random_pack
from dynface.restorer import RestoreConfig, Restorer

FAST = {"respacing": "ddim10", "mode": "closed_form"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_random_pack(str(tmp_path_factory.mktemp("pack")), resolution=32, seed=3)


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]


def _record_sample(monkeypatch: pytest.MonkeyPatch, fail_above: int | None = None) -> list:
    """Calls of the sampler as (batch, config); batches larger than `fail_above` run out of memory."""
    calls = []
    real = restorer_module.sample

    def spy(prior, diffusion, batch, config, **kwargs):
        calls.append((batch, config))
        if fail_above is not None and batch.init.shape[0] > fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(prior, diffusion, batch, config, **kwargs)

    monkeypatch.setattr(restorer_module, "sample", spy)
    return calls


@pytest.mark.parametrize(
    ("method", "levels", "dgsa", "kernel_update"), [("full", 3, True, True), ("dblm", 1, False, False)]
)
def test_memory_probe_is_one_step_of_the_configured_method(
    pack: str, monkeypatch: pytest.MonkeyPatch, method: str, levels: int, dgsa: bool, kernel_update: bool
) -> None:
    restorer = Restorer.from_pack(pack, overrides={**FAST, "method": method}, device="cpu")
    calls = _record_sample(monkeypatch)
    out = restorer.memory_probe(2)
    ((batch, config),) = calls
    assert config == restorer._sampler_config() and config.mode == "closed_form"
    assert (config.use_dgsa, config.kernel_update) == (dgsa, kernel_update)
    assert batch.targets.stds.shape == (2, levels)
    assert torch.all(batch.targets.t_starts == 0)  # every level active: the step that holds the most
    assert out.n_steps.tolist() == [1, 1]


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size(
    pack: str, faces: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    restorer = Restorer.from_pack(pack, overrides={**FAST, "batch_size": 4}, device="cpu")
    expected = Restorer.from_pack(pack, overrides={**FAST, "batch_size": 2}, device="cpu").restore(faces)
    calls = _record_sample(monkeypatch, fail_above=2)
    results = restorer.restore(faces)
    assert [b.init.shape[0] for b, _ in calls] == [4, 2, 2, 1]  # 4 ran out; the rest at 2
    assert restorer.batch_size() == 2
    for got, want in zip(results, expected, strict=True):
        assert np.array_equal(got.image, want.image) and got.seed == want.seed
    calls.clear()
    restorer.restore(faces[:3])
    assert [b.init.shape[0] for b, _ in calls] == [2, 1]  # a later call starts at the smaller size


def test_out_of_memory_at_one_face_is_raised(pack: str, faces: list[np.ndarray], monkeypatch) -> None:
    restorer = Restorer.from_pack(pack, overrides={**FAST, "batch_size": 2}, device="cpu")
    _record_sample(monkeypatch, fail_above=0)
    with pytest.raises(torch.OutOfMemoryError):
        restorer.restore(faces[:2])


def test_speed_options_leave_the_faces_unchanged(pack: str, faces: list[np.ndarray]) -> None:
    base = Restorer.from_pack(pack, overrides=FAST, device="cpu").restore(faces[:2])
    fast = Restorer.from_pack(pack, overrides={**FAST, "channels_last": True}, device="cpu")
    assert fast.prior is not fast.pack.prior  # the prior runs through the channels-last wrapper
    for got, want in zip(fast.restore(faces[:2]), base, strict=True):
        assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 1


def test_bad_speed_options_and_fp16_dps_are_refused(pack: str) -> None:
    with pytest.raises(ValueError, match="compile_mode"):
        RestoreConfig(compile_mode="fastest")
    with pytest.raises(ValueError, match="fp16"):
        Restorer.from_pack(pack, overrides={"precision": "fp16", "mode": "dps"}, device="cpu")
    Restorer.from_pack(pack, overrides={"precision": "fp16", "mode": "closed_form"}, device="cpu")
