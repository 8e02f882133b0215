"""Golden tests of the DifFace UNet against tests/golden (shared golden README sections 2, 3, 5, 7 and 8)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _golden import (
    TIER_A,
    TIER_B,
    assert_close_tier,
    fill_by_rule,
    load_expected,
    load_manifest,
    rule_weight,
)

from dynface.checkpoints import load_state_dict
from dynface.models.unet import DifFaceUNet, build_unet, timestep_sinusoid

FULL_PARAMS = 159_788_454  # spec §4.4 [measured]


def _config(golden_dir: Path, case: str) -> dict:
    return json.loads((golden_dir / f"{case}_keys.json").read_text())["config"]


def _case(golden_dir: Path, case: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    x = torch.from_numpy(np.load(golden_dir / f"{case}_x.npy"))
    t = torch.from_numpy(np.load(golden_dir / f"{case}_t.npy"))
    return x, t, load_expected(golden_dir, case)


def _unet_input(shape: tuple[int, ...]) -> np.ndarray:
    """Input rule of README §4 (UNet range [-1, 1))."""
    k = np.arange(int(np.prod(shape)), dtype=np.float64)
    z = np.sin((k + 1.0) * 3.1416 + 0.5) * 12345.678
    return ((z - np.floor(z) - 0.5) * 2.0).reshape(shape).astype(np.float32)


def _run(model: DifFaceUNet, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x, t).double().numpy()


@pytest.mark.parametrize(("case", "n_params"), [("unet_ffhq512", FULL_PARAMS), ("unet_small", 1_193_254)])
def test_keys_match_manifest(golden_dir: Path, case: str, n_params: int) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = build_unet(_config(golden_dir, case))
    entries = load_manifest(golden_dir, case)
    state = model.state_dict()
    assert all(e["kind"] == "parameter" for e in entries)
    assert list(state) == [e["name"] for e in entries]
    assert [tuple(v.shape) for v in state.values()] == [tuple(e["shape"]) for e in entries]
    assert [name for name, _ in model.named_parameters()] == [e["name"] for e in entries]
    assert [e["param_index"] for e in entries] == list(range(len(entries)))
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert "freqs" not in state  # non-persistent: the checkpoint has no buffers


def test_rule_matches_manifest_fingerprints(golden_dir: Path) -> None:
    for e in load_manifest(golden_dir, "unet_small"):
        w = rule_weight(e["param_index"], e["name"], tuple(e["shape"]))
        fp = e["fingerprint"]
        np.testing.assert_array_equal(w.reshape(-1)[:4], np.asarray(fp["first"], dtype=np.float32))
        assert abs(w.astype(np.float64).sum() - fp["sum"]) <= 1e-6 * fp["abs_sum"], e["name"]


@pytest.fixture(scope="module")
def small_loaded(golden_dir: Path) -> tuple[DifFaceUNet, dict[str, torch.Tensor]]:
    state = load_state_dict(str(golden_dir / "unet_small_ckpt.pth"))
    model = build_unet(_config(golden_dir, "unet_small"))
    model.load_state_dict(state, strict=True)
    return model.eval(), state


def test_small_ckpt_is_rule_weights(golden_dir: Path, small_loaded) -> None:
    raw = torch.load(golden_dir / "unet_small_ckpt.pth", weights_only=True)
    assert all(k.startswith("module.") for k in raw)  # the released file's prefix, stripped by the loader
    _, state = small_loaded
    entries = load_manifest(golden_dir, "unet_small")
    assert list(state) == [e["name"] for e in entries]
    for e in entries:
        expected = rule_weight(e["param_index"], e["name"], tuple(e["shape"]))
        np.testing.assert_array_equal(state[e["name"]].numpy(), expected, err_msg=e["name"])


def test_small_inputs_follow_input_rule(golden_dir: Path) -> None:
    x, t, _ = _case(golden_dir, "unet_small")
    np.testing.assert_array_equal(x.numpy(), _unet_input((3, 3, 64, 64)))
    assert t.dtype == torch.int64 and t.tolist() == [0, 400, 999]


def test_small_float32_tier_b(golden_dir: Path, small_loaded) -> None:
    model, _ = small_loaded
    x, t, expected = _case(golden_dir, "unet_small")
    assert_close_tier(_run(model, x, t), expected, TIER_B)
    # Pairing a sample with the wrong timestep must be caught (README §4).
    wrong = np.abs(_run(model, x, t.flip(0)) - expected).max() / np.abs(expected).max()
    assert wrong > 0.1


def test_small_float64_tier_a_and_intermediates(golden_dir: Path) -> None:
    model = build_unet(_config(golden_dir, "unet_small"))
    model.load_state_dict(load_state_dict(str(golden_dir / "unet_small_ckpt.pth")), strict=True)
    model = model.double().eval()
    assert model.freqs.dtype == torch.float64  # float32 values held in float64 (README §5)
    seen: dict[str, torch.Tensor] = {}
    model.time_embed.register_forward_hook(
        lambda _m, inp, out: seen.update(sinusoid=inp[0].detach(), embed=out.detach())
    )
    x, t, expected = _case(golden_dir, "unet_small")
    assert_close_tier(_run(model, x.double(), t), expected, TIER_A)
    inter = np.load(golden_dir / "unet_small_intermediates_f64.npz")
    np.testing.assert_allclose(seen["sinusoid"].numpy(), inter["timestep_sinusoid"], rtol=0, atol=1e-14)
    np.testing.assert_allclose(seen["embed"].numpy(), inter["time_embed_out"], rtol=0, atol=1e-12)


@pytest.fixture(scope="class")
def full_model(golden_dir: Path):
    """The released config filled by the weight rule: one float32 model (~640 MB), freed after the class."""
    with torch.device("meta"):
        model = build_unet(_config(golden_dir, "unet_ffhq512"))
    model.to_empty(device="cpu")  # skips the default init of 160M parameters
    model.reset_frequencies()
    fill_by_rule(model, load_manifest(golden_dir, "unet_ffhq512"))
    yield model.eval()
    del model
    gc.collect()


class TestFullFFHQ512:
    """Full-size cases (README §2.1): 64×64 with t = 0, 400, 999 and 128×128 with t = 250."""

    @pytest.mark.slow
    @pytest.mark.parametrize("case", ["unet_ffhq512", "unet_ffhq512_128"])
    def test_float32_tier_b(self, golden_dir: Path, full_model: DifFaceUNet, case: str) -> None:
        x, t, expected = _case(golden_dir, case)
        assert_close_tier(_run(full_model, x, t), expected, TIER_B)

    @pytest.mark.slow
    @pytest.mark.parametrize("case", ["unet_ffhq512", "unet_ffhq512_128"])
    def test_time_embedding_float64(self, golden_dir: Path, full_model: DifFaceUNet, case: str) -> None:
        _, t, _ = _case(golden_dir, case)
        inter = np.load(golden_dir / f"{case}_intermediates_f64.npz")
        # Only the time embedding runs in float64: functional_call leaves the float32 model untouched.
        sinusoid = timestep_sinusoid(t, full_model.freqs.double(), full_model.config.model_channels)
        np.testing.assert_allclose(sinusoid.numpy(), inter["timestep_sinusoid"], rtol=0, atol=1e-14)
        params = {k: v.double() for k, v in full_model.time_embed.state_dict().items()}
        with torch.no_grad():
            emb = torch.func.functional_call(full_model.time_embed, params, (sinusoid,))
        np.testing.assert_allclose(emb.numpy(), inter["time_embed_out"], rtol=0, atol=1e-12)
