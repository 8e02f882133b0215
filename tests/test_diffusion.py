"""Diffusion process: golden tables and steps (tests/golden, shared golden README §11), respacing, losses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dynface.core.diffusion import Diffusion, StepOutput, linear_betas, space_timesteps

RESPACINGS = ("ddim250", "1000")
TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
OUTPUTS = (
    "pred_xstart",
    "p_mean",
    "p_log_variance",
    "ddpm_sample",
    "ddim_sample_eta0.0",
    "ddim_sample_eta0.5",
    "ddim_sample_eta1.0",
    "q_sample",
)
# The golden outputs were made with coefficients cast to float32 (improved-diffusion's
# `_extract_into_tensor(...).float()`), so exact float64 coefficients differ from them by the float32
# rounding of the tables: measured <= 2.1e-6 of max|e| (DDIM at index 1, where 1 - ᾱ/ᾱ_prev cancels).
REFERENCE_ROUNDING = 5e-6


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "diffusion_schedule.npz") as data:
        return {k: data[k] for k in data.files}


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-12, atol: float = 0.0
) -> None:
    # numpy rather than torch.testing: its first call spends seconds on lazy imports.
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), rtol=rtol, atol=atol)


def _max_ratio(y: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(y.detach().double().numpy() - expected).max() / np.abs(expected).max())


def _outputs(diff: Diffusion, g: dict[str, np.ndarray], prefix: str, dtype: torch.dtype) -> dict:
    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(g[f"{prefix}/{key}"]).to(dtype)

    x_t, out, noise, index = t("x_t"), t("model_output"), t("noise"), torch.from_numpy(g[f"{prefix}/index"])
    mean, log_var, pred_xstart = diff.p_mean_variance(x_t, index, out)
    res = {
        "pred_xstart": pred_xstart,
        "p_mean": mean,
        "p_log_variance": log_var,
        "ddpm_sample": diff.ddpm_step(x_t, index, out, noise).prev_sample,
        # x_start is the clean image that q_sample diffuses to `index` with the same noise z.
        "q_sample": diff.q_sample(t("x_start"), index, noise),
    }
    for eta in (0.0, 0.5, 1.0):
        res[f"ddim_sample_eta{eta}"] = diff.ddim_step(x_t, index, out, noise, eta=eta).prev_sample
    return res


# ------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("respacing", RESPACINGS)
def test_tables_match_golden(golden: dict, respacing: str) -> None:
    diff = Diffusion.create(respacing)
    np.testing.assert_array_equal(diff.timestep_map, golden[f"{respacing}/timestep_map"])
    assert diff.timestep_map.dtype == np.int64 and diff.num_steps == len(diff.timestep_map)
    for name in TABLES:
        np.testing.assert_allclose(
            getattr(diff, name), golden[f"{respacing}/{name}"], rtol=1e-12, atol=0, err_msg=name
        )
    ac = golden[f"{respacing}/alphas_cumprod"]
    np.testing.assert_allclose(diff.sqrt_alphas_cumprod, np.sqrt(ac), rtol=1e-12)
    np.testing.assert_allclose(diff.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ac), rtol=1e-12)
    np.testing.assert_allclose(diff.sqrt_recip_alphas_cumprod, 1 / np.sqrt(ac), rtol=1e-12)
    np.testing.assert_allclose(diff.sqrt_recipm1_alphas_cumprod, np.sqrt((1 - ac) / ac), rtol=1e-12)
    # The respaced ᾱ must be the unspaced ᾱ read at the kept timesteps (composition of the process).
    base = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(diff.base_alphas_cumprod, base, rtol=1e-14)
    np.testing.assert_allclose(ac, base[diff.timestep_map], rtol=1e-12)


def test_linear_betas() -> None:
    b = linear_betas()
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and b[-1] == 0.02 and b[1] == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-14)
    with pytest.raises(ValueError):
        linear_betas(0)


# ------------------------------------------------------------------------------------------- golden steps


@pytest.mark.parametrize("respacing", RESPACINGS)
def test_steps_match_golden_float64_reference_rounding(golden: dict, respacing: str) -> None:
    """float32 coefficients + float64 state reproduces the reference computation to 1e-12; the DDIM
    steps to 2 float32 ulps: their coefficients go through torch's float32 sqrt, whose last bit
    depends on the CPU (exact on the machines that made and first checked the golden files; 5e-8 on an
    AVX-512-FP16 Xeon, where torch.sqrt differs from the correctly rounded numpy.sqrt on 9 of 1000 ᾱ)."""
    diff = Diffusion.create(respacing, coefficient_dtype="float32")
    res = _outputs(diff, golden, respacing, torch.float64)
    assert sorted(res) == sorted(OUTPUTS)
    for key, y in res.items():
        assert y.dtype == torch.float64
        tolerance = 2.4e-7 if key.startswith("ddim_sample") else 1e-12
        assert _max_ratio(y, golden[f"{respacing}/{key}"]) <= tolerance, key


@pytest.mark.parametrize("respacing", RESPACINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_match_golden_exact_coefficients(golden: dict, respacing: str, dtype: torch.dtype) -> None:
    diff = Diffusion.create(respacing)
    for key, y in _outputs(diff, golden, respacing, dtype).items():
        assert y.dtype == dtype
        expected = golden[f"{respacing}/{key}"]
        ratio = _max_ratio(y, expected)
        assert ratio <= REFERENCE_ROUNDING, f"{key}: {ratio:.2e}"
        rel_l2 = np.linalg.norm(y.double().numpy() - expected) / np.linalg.norm(expected)
        assert rel_l2 <= 2e-6, f"{key}: rel-L2 {rel_l2:.2e}"


def test_ddpm_and_ddim_add_no_noise_at_index_zero(golden: dict) -> None:
    diff = Diffusion.create("ddim250")
    x_t = torch.from_numpy(golden["ddim250/x_t"])
    out = torch.from_numpy(golden["ddim250/model_output"])
    z = torch.from_numpy(golden["ddim250/noise"])
    index = torch.tensor([0, 0, 125, 249])
    for step in (
        lambda n: diff.ddpm_step(x_t, index, out, n),
        lambda n: diff.ddim_step(x_t, index, out, n, eta=1.0),
    ):
        a, b = step(z).prev_sample, step(torch.zeros_like(z)).prev_sample
        assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2:], b[2:])
    # At index 0 DDIM returns the clipped x̂0 (ᾱ_prev = 1).
    res = diff.ddim_step(x_t, index, out, z, eta=0.5)
    _assert_close(res.prev_sample[:2], res.pred_xstart[:2], rtol=0, atol=1e-15)


def test_ddim_uses_raw_eps_and_per_sample_eta(golden: dict) -> None:
    diff = Diffusion.create("ddim250")
    x_t = torch.from_numpy(golden["ddim250/x_t"])
    out = torch.from_numpy(golden["ddim250/model_output"])
    z = torch.from_numpy(golden["ddim250/noise"])
    index = torch.from_numpy(golden["ddim250/index"])
    etas = [0.0, 0.3, 0.7, 1.0]
    joint = diff.ddim_step(x_t, index, out, z, eta=torch.tensor(etas, dtype=torch.float64))
    assert isinstance(joint, StepOutput)
    assert torch.equal(joint.eps, out[:, :3])
    for b, eta in enumerate(etas):
        one = diff.ddim_step(x_t[b : b + 1], index[b : b + 1], out[b : b + 1], z[b : b + 1], eta=eta)
        _assert_close(joint.prev_sample[b : b + 1], one.prev_sample, rtol=0, atol=1e-15)
    # Hand formula at sample 2 (index 125, η = 0.7).
    ab, abp = diff.alphas_cumprod[125], diff.alphas_cumprod_prev[125]
    sigma = etas[2] * math.sqrt((1 - abp) / (1 - ab)) * math.sqrt(1 - ab / abp)
    x0 = ((x_t[2] - math.sqrt(1 - ab) * out[2, :3]) / math.sqrt(ab)).clamp(-1, 1)
    hand = math.sqrt(abp) * x0 + math.sqrt(1 - abp - sigma**2) * out[2, :3] + sigma * z[2]
    _assert_close(joint.prev_sample[2], hand, rtol=1e-12, atol=1e-12)


def test_steps_are_differentiable() -> None:
    """Autograd directional derivatives w.r.t. (x_t, model_output) equal central finite differences."""
    diff = Diffusion.create("ddim250")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x_t, out, z = 0.3 * rand(2, 3, 4, 4), 0.3 * rand(2, 6, 4, 4), rand(2, 3, 4, 4)
    dx, dout, w = rand(2, 3, 4, 4), rand(2, 6, 4, 4), rand(2, 3, 4, 4)
    index = torch.tensor([3, 200])
    steps = (
        lambda a, b: diff.ddim_step(a, index, b, z, eta=0.5, clip=False).prev_sample,
        lambda a, b: diff.ddpm_step(a, index, b, z, clip=False).prev_sample,
    )
    for step in steps:
        a, b = x_t.clone().requires_grad_(), out.clone().requires_grad_()
        ga, gb = torch.autograd.grad((step(a, b) * w).sum(), (a, b))
        analytic = float((ga * dx).sum() + (gb * dout).sum())
        h = 1e-6
        numeric = float(
            ((step(x_t + h * dx, out + h * dout) - step(x_t - h * dx, out - h * dout)) * w).sum()
        ) / (2 * h)
        assert analytic == pytest.approx(numeric, rel=1e-6)
        assert gb[:, 3:].abs().sum() > 0 if step is steps[1] else torch.all(gb[:, 3:] == 0)


# ------------------------------------------------------------------------------------------- respacing


def test_space_timesteps() -> None:
    ddim = space_timesteps(1000, "ddim250")
    assert ddim.dtype == np.int64
    np.testing.assert_array_equal(ddim, np.arange(0, 1000, 4))
    sec = space_timesteps(1000, "250")
    assert len(sec) == 250 and sec[0] == 0 and sec[-1] == 999 and np.all(np.diff(sec) >= 4)
    np.testing.assert_array_equal(sec, np.round(np.arange(250) * 999 / 249).astype(np.int64))
    np.testing.assert_array_equal(space_timesteps(1000, 250), sec)
    two = space_timesteps(1000, "10,20")
    assert len(two) == 30
    np.testing.assert_array_equal(two[:10], [0, 55, 111, 166, 222, 277, 333, 388, 444, 499])
    np.testing.assert_array_equal(two[10:], 500 + np.round(np.arange(20) * 499 / 19).astype(np.int64))
    np.testing.assert_array_equal(space_timesteps(1000, ""), np.arange(1000))
    np.testing.assert_array_equal(space_timesteps(1000, "1000"), np.arange(1000))
    np.testing.assert_array_equal(space_timesteps(100, "ddim10"), np.arange(0, 100, 10))
    # Non-divisors: the smallest stride giving exactly N steps (improved-diffusion's search), 1000/7 -> 143.
    np.testing.assert_array_equal(space_timesteps(1000, "ddim7"), np.arange(0, 1000, 143))
    for bad in ("ddim300", "ddimx", "abc", "2000", "0", "10,", -5, 2.5):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)  # type: ignore[arg-type]


def test_index_for_timestep_and_model_timesteps() -> None:
    diff = Diffusion.create("ddim250")
    assert diff.index_for_timestep(690) == 172
    assert diff.index_for_timestep(688) == 172 and diff.index_for_timestep(687) == 171
    assert diff.index_for_timestep(0) == 0 and diff.index_for_timestep(999) == 249
    np.testing.assert_array_equal(diff.index_for_timestep(np.array([3, 4, 925])), [0, 1, 231])
    for bad in (-1, 1000):
        with pytest.raises(ValueError):
            diff.index_for_timestep(bad)
    t = diff.model_timesteps(torch.tensor([0, 1, 172, 249]))
    assert t.dtype == torch.int64 and t.tolist() == [0, 4, 688, 996]
    assert Diffusion.create("1000").index_for_timestep(690) == 690


# ------------------------------------------------------------------------------------------- small pieces


def test_split_predict_roundtrip() -> None:
    diff = Diffusion.create("ddim250")
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 3, 4, 4, generator=gen, dtype=torch.float64)
    out = torch.randn(3, 6, 4, 4, generator=gen, dtype=torch.float64)
    eps, v = diff.split_output(out)
    assert torch.equal(eps, out[:, :3]) and torch.equal(v, out[:, 3:])
    eps3, none = diff.split_output(out[:, :3])
    assert none is None and torch.equal(eps3, out[:, :3])
    index = torch.tensor([0, 100, 249])
    x0 = diff.predict_xstart(x_t, index, eps, clip=False)
    _assert_close(diff.predict_eps(x_t, index, x0), eps, rtol=1e-9, atol=1e-9)
    assert diff.predict_xstart(x_t, index, eps).abs().max() <= 1.0
    # eps-only output: fixed-large variance log β (index > 0).
    _, log_var, _ = diff.p_mean_variance(x_t, index, out[:, :3])
    _assert_close(log_var[2], torch.full((3, 4, 4), math.log(diff.betas[249]), dtype=torch.float64))


def test_argument_validation() -> None:
    diff = Diffusion.create("ddim250")
    x = torch.zeros(2, 3, 4, 4)
    out = torch.zeros(2, 6, 4, 4)
    good = torch.tensor([0, 1])
    cases = [
        lambda: diff.q_sample(x, torch.tensor([0, 250]), x),
        lambda: diff.q_sample(x, torch.tensor([-1, 0]), x),
        lambda: diff.q_sample(x, torch.tensor([0.0, 1.0]), x),
        lambda: diff.q_sample(x, torch.tensor([0, 1, 2]), x),
        lambda: diff.q_sample(x, good, torch.zeros(2, 3, 4, 5)),
        lambda: diff.ddim_step(x, good, torch.zeros(2, 5, 4, 4), x),
        lambda: diff.ddim_step(x, good, torch.zeros(2, 6, 4, 2), x),
        lambda: diff.ddim_step(x, good, out, x, eta=torch.zeros(3)),
        lambda: diff.ddim_step(x, good, out, x, eta=-0.1),
        lambda: Diffusion.create("ddim250", coefficient_dtype="float16"),  # type: ignore[arg-type]
        lambda: Diffusion.create("ddim300"),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()


# ------------------------------------------------------------------------------------------- training loss


def _fixed_model(output: torch.Tensor, seen: list | None = None):
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append(t.clone())
        return output

    return model


def test_training_losses_values() -> None:
    diff = Diffusion.create("1000")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 4, 4, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    noise = torch.randn(3, 3, 4, 4, generator=gen, dtype=torch.float64)
    out = torch.randn(3, 6, 4, 4, generator=gen, dtype=torch.float64) * 0.5
    index = torch.tensor([0, 10, 700])
    seen: list = []
    losses = diff.training_losses(_fixed_model(out, seen), x0, index, noise)
    assert seen[0].tolist() == [0, 10, 700] and seen[0].dtype == torch.int64
    for key in ("mse", "vb", "loss"):
        assert losses[key].shape == (3,) and torch.isfinite(losses[key]).all()
    # mse by hand.
    mse = [float(((noise[b] - out[b, :3]) ** 2).mean()) for b in range(3)]
    np.testing.assert_allclose(losses["mse"].numpy(), mse, rtol=1e-12)
    _assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # vb at index > 0: Gaussian KL from the closed forms, in bits per dimension (numpy, own derivation).
    x0n, zn, on = x0.numpy(), noise.numpy(), out.numpy()
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    for b, k in ((1, 10), (2, 700)):
        a, ap = ac[k], ac[k - 1]
        xt = math.sqrt(a) * x0n[b] + math.sqrt(1 - a) * zn[b]
        var_q = betas[k] * (1 - ap) / (1 - a)
        mu_q = (math.sqrt(ap) * betas[k] * x0n[b] + math.sqrt(1 - betas[k]) * (1 - ap) * xt) / (1 - a)
        x0_hat = (xt - math.sqrt(1 - a) * on[b, :3]) / math.sqrt(a)
        mu_p = (math.sqrt(ap) * betas[k] * x0_hat + math.sqrt(1 - betas[k]) * (1 - ap) * xt) / (1 - a)
        frac = (on[b, 3:] + 1) / 2
        log_var_p = frac * math.log(betas[k]) + (1 - frac) * math.log(var_q)
        var_p = np.exp(log_var_p)
        kl = 0.5 * (np.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)
        assert float(losses["vb"][b]) == pytest.approx(kl.mean() / math.log(2), rel=1e-9)
    # vb at index 0: decoder NLL with the exact normal CDF (the loss uses a tanh approximation of Φ).
    a = ac[0]
    xt = math.sqrt(a) * x0n[0] + math.sqrt(1 - a) * zn[0]
    mu = (xt - math.sqrt(1 - a) * on[0, :3]) / math.sqrt(a)  # posterior mean at k = 0 is x̂0
    frac = (on[0, 3:] + 1) / 2
    # log β̃ at k = 0 is clipped to β̃ at k = 1.
    sd = np.exp(
        0.5 * (frac * math.log(betas[0]) + (1 - frac) * math.log(betas[1] * (1 - ac[0]) / (1 - ac[1])))
    )
    phi = np.vectorize(lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2))))
    p = phi((x0n[0] - mu + 1 / 255) / sd) - phi((x0n[0] - mu - 1 / 255) / sd)
    nll = -np.log(np.maximum(p, 1e-12)).mean() / math.log(2)
    assert float(losses["vb"][0]) == pytest.approx(nll, rel=2e-2)


def test_training_losses_oracle_and_frozen_mean() -> None:
    diff = Diffusion.create("ddim250")
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    index = torch.tensor([0, 5, 120, 249])
    v = torch.zeros(4, 3, 8, 8)
    oracle = diff.training_losses(_fixed_model(torch.cat([noise, v], 1)), x0, index, noise)
    zero = diff.training_losses(_fixed_model(torch.zeros(4, 6, 8, 8)), x0, index, noise)
    assert torch.all(oracle["mse"] == 0)
    assert torch.all(oracle["loss"] < zero["loss"])
    assert torch.all(oracle["vb"][1:] < zero["vb"][1:])
    # The vb term trains v only: no gradient reaches ε̂ through it (frozen-mean trick).
    out = (torch.randn(4, 6, 8, 8, generator=gen) * 0.5).requires_grad_()
    losses = diff.training_losses(_fixed_model(out), x0, index, noise)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.all(grad[:, :3] == 0) and grad[:, 3:].abs().sum() > 0
    (grad,) = torch.autograd.grad(losses["loss"].sum(), out)
    assert grad[:, :3].abs().sum() > 0
    # An ε-only model has no vb term.
    eps_only = diff.training_losses(_fixed_model(noise), x0, index, noise)
    assert torch.all(eps_only["vb"] == 0) and torch.all(eps_only["loss"] == 0)


def test_training_losses_pixel_weight_counts_only_weighted_pixels() -> None:
    """A 0/1 mask makes mse and vb the means over the masked pixels; all-ones equals no weight."""
    diff = Diffusion.create("1000")
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    out = (torch.randn(2, 6, 6, 6, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    index = torch.tensor([0, 300])
    plain = diff.training_losses(_fixed_model(out), x0, index, noise)
    ones = diff.training_losses(_fixed_model(out), x0, index, noise, pixel_weight=torch.ones(2, 1, 6, 6))
    for key in ("mse", "vb", "loss"):
        _assert_close(ones[key], plain[key])
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    mask[:, :, 1:4, 2:5] = 1
    masked = diff.training_losses(_fixed_model(out), x0, index, noise, pixel_weight=mask)
    inside = (slice(None), slice(None), slice(1, 4), slice(2, 5))
    mse = ((noise - out[:, :3].detach()) ** 2)[inside].flatten(1).mean(1)
    _assert_close(masked["mse"], mse)
    # The masked loss equals the plain loss of the same data cropped to the mask: both terms are
    # per-pixel, so nothing outside the mask can reach it.
    cropped = diff.training_losses(_fixed_model(out[inside]), x0[inside], index, noise[inside])
    for key in ("mse", "vb", "loss"):
        _assert_close(masked[key], cropped[key])
    (grad,) = torch.autograd.grad(masked["loss"].sum(), out)
    assert torch.all(grad * (1 - mask) == 0) and grad[inside].abs().sum() > 0


@pytest.mark.parametrize("coefficient_dtype", ["float64", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_schedule_is_bit_for_bit_the_gathered_step(golden: dict, coefficient_dtype: str, dtype) -> None:
    """The sampler's tabled coefficients (built once per run) give exactly predict_xstart and ddim_step."""
    diff = Diffusion.create("ddim250", coefficient_dtype=coefficient_dtype)
    x_t, out, z = (
        torch.from_numpy(golden[f"ddim250/{key}"]).to(dtype) for key in ("x_t", "model_output", "noise")
    )
    etas = np.array([0.0, 0.25, 0.6, 1.0])
    schedule = diff.ddim_schedule(etas, device=torch.device("cpu"), dtype=dtype)
    for k in (0, 1, 125, 249):  # every sample at the same step, as in the sampler
        index = torch.full((4,), k)
        eps = out[:, :3]
        x0 = schedule.predict_xstart(x_t, k, eps)
        assert torch.equal(x0, diff.predict_xstart(x_t, index, eps))
        step = diff.ddim_step(x_t, index, out, z, eta=torch.from_numpy(etas))
        assert torch.equal(schedule.step(x0, eps, z, k), step.prev_sample)
        # the first rows alone (the running faces of a step) take the first rows' coefficients
        assert torch.equal(schedule.step(x0[:2], eps[:2], z[:2], k), step.prev_sample[:2])
        assert schedule.timesteps[k] == diff.timestep_map[k]
    with pytest.raises(ValueError):
        diff.ddim_schedule(np.array([-0.1]), device=torch.device("cpu"), dtype=dtype)
