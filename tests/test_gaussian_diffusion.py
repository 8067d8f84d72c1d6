"""Gaussian diffusion: parity with the original DiT diffusion on its fixtures, schedules and respacing,
the hybrid loss, and DDPM/DDIM against closed-form optimal predictors for Gaussian data.

The closed-form helpers here (GaussianMixture, exact_eps_model, exact_velocity_model, exact_moments) and the
`one_thread` fixture are also used by test_flow_matching.py and test_sampling.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import reference_path
from ditkit.diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps
from ditkit.models import DiT

CASES = ("tiny", "small")


@pytest.fixture
def one_thread():
    """These tests run many small ops: on 2 busy cores OpenMP hand-offs made them 10-20x slower than 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("one_thread")
RESPACINGS = {"1000": "", "250": "250", "ddim25": "ddim25"}  # fixture key prefix -> timestep_respacing


# ------------------------------------------------------------------------------------------------
# Closed-form data: for x_t = a x0 + b noise and x0 from a Gaussian mixture, E[x0 | x_t] and
# E[noise | x_t] are exact, so the optimal epsilon / velocity predictor is known.
# ------------------------------------------------------------------------------------------------

class GaussianMixture:
    def __init__(self, weights, means, covs):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.cov = torch.as_tensor(covs, dtype=torch.float64)  # (K, D, D)
        self.dim = self.mu.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return (self.w[:, None] * self.mu).sum(0)

    @property
    def covariance(self) -> torch.Tensor:
        d = self.mu - self.mean
        return (self.w[:, None, None] * (self.cov + d[:, :, None] * d[:, None, :])).sum(0)

    def posterior(self, x: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        """E[x0 | x_t = x] and E[noise | x_t = x], x (N, D)."""
        S = a * a * self.cov + b * b * torch.eye(self.dim, dtype=torch.float64)  # (K, D, D)
        r = x[:, None, :] - a * self.mu  # (N, K, D)
        S_inv_r = torch.einsum("kij,nkj->nki", torch.linalg.inv(S), r)
        log_p = -0.5 * (r * S_inv_r).sum(-1) - 0.5 * torch.logdet(S) + torch.log(self.w)
        # clamped: far-off components would give denormal weights, which are very slow on CPUs
        resp = (log_p - log_p.logsumexp(1, keepdim=True)).clamp(min=-600).exp()[..., None]
        x0 = (resp * (self.mu + a * torch.einsum("kij,nkj->nki", self.cov, S_inv_r))).sum(1)
        return x0, (resp * b * S_inv_r).sum(1)


def as_images(v: torch.Tensor) -> torch.Tensor:
    return v[:, :, None, None]  # (N, D) -> (N, D, 1, 1)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, 0, 0].double()


def exact_eps_model(data: GaussianMixture, diffusion: GaussianDiffusion):
    """The optimal epsilon predictor; called with the base schedule's steps (all equal within a batch)."""
    abar = torch.cumprod(1 - diffusion.base_betas, 0)

    def model(x, t, *args):
        ab = float(abar[int(t[0])])
        return as_images(data.posterior(flat(x), math.sqrt(ab), math.sqrt(1 - ab))[1]).to(x.dtype)

    return model


def exact_velocity_model(data: GaussianMixture):
    """The optimal velocity (noise - x0) predictor; called with t * 1000."""
    def model(x, t, *args):
        tt = float(t[0]) / 1000.0
        x0, eps = data.posterior(flat(x), 1 - tt, tt)
        return as_images(eps - x0).to(x.dtype)

    return model


def exact_moments(run, dim: int, noisy_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of an affine sampler's output (Gaussian data make every sampler here
    affine in its start noise and step noises): run it on the zero vector and on each unit vector of
    (start noise, step noises) and read off out = b + sum_j A_j z_j, so mean = b, cov = sum A_j A_j^T."""
    n = dim * (1 + noisy_steps)
    E = torch.cat([torch.zeros(1, n), torch.eye(n)]).double().reshape(n + 1, 1 + noisy_steps, dim)
    out = flat(run(as_images(E[:, 0]), [as_images(E[:, 1 + i]) for i in range(noisy_steps)] or None))
    A = out[1:] - out[0]
    return out[0], A.T @ A


def moment_errors(data: GaussianMixture, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    return (mean - data.mean).abs().max().item(), (cov - data.covariance).abs().max().item()


_L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.7, 0.0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
GAUSSIAN = GaussianMixture([1.0], [[0.5, -1.0, 0.25]], (_L @ _L.T)[None])
MIXTURE = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]],
                          [[[0.2, 0.05], [0.05, 0.1]], [[0.3, -0.1], [-0.1, 0.2]]])


# ------------------------------------------------------------------------------------------------
# Parity with the original (fixtures: float32, 1e-5; the 10-step CFG loop 2e-6 of its scale)
# ------------------------------------------------------------------------------------------------

def load_diffusion_case(name: str) -> tuple[dict, dict]:
    spec = json.loads(reference_path("dit_official", f"{name}.json").read_text())
    return spec, load_file(str(reference_path("dit_official", f"{name}.diffusion.safetensors")))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("key", list(RESPACINGS))
def test_matches_original_diffusion(name, key):
    spec, ref = load_diffusion_case(name)
    learn_sigma = spec["constructor"]["learn_sigma"]
    diffusion = create_diffusion(RESPACINGS[key], learn_sigma=learn_sigma)
    r = {k[len(key) + 1:]: v for k, v in ref.items() if k.startswith(key + ".")}
    mo = r["mo"]

    def model(x, t, **kwargs):
        return mo

    assert torch.equal(diffusion.timestep_map, r["timestep_map"])
    assert torch.allclose(diffusion.betas, r["betas"], rtol=1e-6, atol=0)
    assert max_err(diffusion.q_sample(r["x0"], r["t"], r["noise"]), r["xt"]) <= 1e-5
    out = diffusion.p_mean_variance(model, r["xt"], r["t"], clip_denoised=False)
    for k in ("mean", "variance", "log_variance", "pred_xstart"):
        assert max_err(out[k], r[f"pmv.{k}"]) <= 1e-5, k
    losses = diffusion.training_losses(model, r["x0"], r["t"], noise=r["noise"])
    assert set(losses) == ({"loss", "mse", "vb"} if learn_sigma else {"loss", "mse"})
    for k in losses:
        assert max_err(losses[k], r[f"losses.{k}"]) <= 1e-5, k
    step = diffusion.ddim_sample(model, r["xt"], r["t"], clip_denoised=False, eta=0.0)
    assert max_err(step["sample"], r["ddim_eta0.sample"]) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_cfg_sampling_loop_matches_original(name):
    """The original's sample.py: p_sample_loop over "10" steps with model.forward_with_cfg, no clipping."""
    spec, ref = load_diffusion_case(name)
    model = DiT(**spec["constructor"]).eval()
    model.load_state_dict(load_file(str(reference_path("dit_official", f"{name}.weights.safetensors"))))
    diffusion = create_diffusion("10", learn_sigma=spec["constructor"]["learn_sigma"])
    out = diffusion.p_sample_loop(model.forward_with_cfg, ref["loop.z"].shape, ref["loop.z"], clip_denoised=False,
                                  model_kwargs=dict(y=ref["loop.y"], cfg_scale=4.0, guided_channels=3),
                                  step_noises=list(ref["loop.noises"]))
    # float32 rounding: the values reach ~700 through 10 steps of a random-weights model, so the bound is
    # 2e-6 of the sample's scale (errors measured 3.5e-7 of it; a wrong step is off by orders of magnitude)
    assert max_err(out, ref["loop.sample"]) <= 2e-6 * ref["loop.sample"].abs().max().item()


@pytest.mark.parametrize("key", ["250", "ddim25"])
def test_respacing_picks_the_originals_timesteps(key):
    _, ref = load_diffusion_case("tiny")
    assert space_timesteps(1000, RESPACINGS[key]) == ref[f"{key}.timestep_map"].tolist()


# ------------------------------------------------------------------------------------------------
# Schedules and respacing
# ------------------------------------------------------------------------------------------------

def test_linear_schedule_is_ho_et_al():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12) and betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # other step counts are scaled so that the schedule covers the same noise levels
    assert get_named_beta_schedule("linear", 100)[-1].item() == pytest.approx(0.2, rel=1e-12)


def test_cosine_schedule_follows_alpha_bar():
    T, s = 1000, 0.008
    betas = get_named_beta_schedule("cosine", T)
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    abar = torch.cumprod(1 - betas, 0)
    uncapped = [i for i in range(T) if betas[i] < 0.999]
    assert len(uncapped) >= T - 2 and betas.max().item() <= 0.999
    for i in uncapped[:-1]:
        assert abar[i].item() == pytest.approx(f[i + 1] / f[0], rel=1e-9, abs=1e-12)


def test_space_timesteps_examples():
    assert space_timesteps(1000, "10") == list(range(0, 1000, 111))  # both ends included
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]  # two sections of 5 steps
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert len(create_diffusion("").timestep_map) == 1000


def test_respaced_diffusion_keeps_alpha_bar_and_calls_the_model_with_original_steps():
    full, spaced = create_diffusion(""), create_diffusion("ddim25")
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_mean_variance(model, torch.zeros(2, 1, 1, 1), torch.tensor([24, 3]))
    assert seen == [[960, 120]]


# ------------------------------------------------------------------------------------------------
# The training loss
# ------------------------------------------------------------------------------------------------

def _learned_sigma_output(x0: torch.Tensor) -> torch.Tensor:
    return torch.randn(x0.shape[0], 2 * x0.shape[1], *x0.shape[2:], generator=torch.Generator().manual_seed(3))


def test_vlb_term_trains_only_the_variance():
    """Hybrid loss: the VLB term sees the mean through a stop-gradient (Nichol & Dhariwal sec. 3.1)."""
    diffusion = create_diffusion("")
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    out = _learned_sigma_output(x0).requires_grad_()
    t = torch.tensor([0, 10, 500, 999])
    losses = diffusion.training_losses(lambda x, t: out, x0, t)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0
    assert torch.equal(losses["loss"], losses["mse"] + losses["vb"])


def test_rescaled_and_kl_losses():
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    out = _learned_sigma_output(x0)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 100, 249])
    model = lambda x, t: out  # noqa: E731
    hybrid = create_diffusion("250").training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    kl = create_diffusion("250", use_kl=True).training_losses(model, x0, t, noise=noise)
    assert torch.allclose(rescaled["vb"], hybrid["vb"] * 250 / 1000, rtol=1e-6)
    assert torch.allclose(kl["loss"], hybrid["vb"] * 250, rtol=1e-5)
    assert set(kl) == {"loss"}


def test_fixed_variances_and_x0_prediction():
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 5, 999])
    large = create_diffusion("", learn_sigma=False)
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    x0_pred = create_diffusion("", learn_sigma=False, predict_xstart=True)
    model = lambda x_, t_: x  # noqa: E731
    v_large = large.p_mean_variance(model, x, t)["variance"][:, 0, 0, 0].double()
    v_small = small.p_mean_variance(model, x, t)["variance"][:, 0, 0, 0].double()
    assert torch.allclose(v_large[1:], large.betas[t[1:]], rtol=1e-6)
    assert torch.allclose(v_large[0], large.posterior_variance[1], rtol=1e-6)  # beta~_1 at t = 0
    assert torch.allclose(v_small[1:], small.posterior_variance[t[1:]], rtol=1e-6)
    out = x0_pred.p_mean_variance(model, x, t)
    assert torch.equal(out["pred_xstart"], x.clamp(-1, 1))
    target = x0_pred.training_losses(lambda x_, t_: torch.zeros_like(x_), x, t)["mse"]
    assert torch.allclose(target, (x ** 2).mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------------------------------------
# Samplers with the exact epsilon (Gaussian data: exact moments, no Monte Carlo)
# ------------------------------------------------------------------------------------------------

def _ddpm_moments(spacing: str, sigma_small: bool = False):
    diffusion = create_diffusion(spacing, learn_sigma=False, sigma_small=sigma_small)
    model = exact_eps_model(GAUSSIAN, diffusion)
    return exact_moments(lambda z, zs: diffusion.p_sample_loop(model, z.shape, z, clip_denoised=False, step_noises=zs),
                         GAUSSIAN.dim, diffusion.num_timesteps)


def _ddim_cov_error(spacing: str) -> tuple[float, float]:
    diffusion = create_diffusion(spacing, learn_sigma=False)
    model = exact_eps_model(GAUSSIAN, diffusion)
    return moment_errors(GAUSSIAN, *exact_moments(
        lambda z, zs: diffusion.ddim_sample_loop(model, z.shape, z, clip_denoised=False), GAUSSIAN.dim, 0))


def test_ddpm_with_exact_eps_reproduces_the_gaussian():
    # measured: mean 2e-5, cov 0.0032 (fixed large, 250 steps); cov 0.0086 (fixed small, 1000 steps)
    mean_err, cov_err = moment_errors(GAUSSIAN, *_ddpm_moments("250"))
    assert mean_err < 1e-3 and cov_err < 0.01
    small_mean_err, small_cov_err = moment_errors(GAUSSIAN, *_ddpm_moments("", sigma_small=True))
    assert small_mean_err < 1e-3 and small_cov_err < 0.02
    # first order in the step: 5x fewer steps, about 5x the error (measured 0.0163 at 50 steps)
    assert 3.5 < moment_errors(GAUSSIAN, *_ddpm_moments("50"))[1] / cov_err < 7


def test_ddim_with_exact_eps_is_first_order():
    # measured cov errors: ddim25 0.133, ddim50 0.069, ddim100 0.035 (ratios 1.93, 1.96);
    # the mean error (0.004) is the schedule's: abar at step 999 is not 0, so the start is not pure noise
    errors = [_ddim_cov_error(f"ddim{n}") for n in (25, 50, 100)]
    assert all(mean_err < 0.01 for mean_err, _ in errors)
    assert errors[-1][1] < 0.05
    for (_, coarse), (_, fine) in zip(errors, errors[1:]):
        assert 1.6 <= coarse / fine <= 2.6


# ------------------------------------------------------------------------------------------------
# Replay and bad input
# ------------------------------------------------------------------------------------------------

def test_loops_replay_from_a_generator_or_recorded_noise():
    """All noise comes from `generator`: the start, then one draw per step from the noisiest; passing
    the same tensors as noise/step_noises reproduces the run exactly."""
    diffusion = create_diffusion("5")
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)  # noqa: E731
    shape = (2, 1, 2, 2)
    a = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(7))
    b = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(7))
    c = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(7)
    z = torch.randn(shape, generator=g)
    zs = [torch.randn(shape, generator=g) for _ in range(5)]
    replay = diffusion.p_sample_loop(model, shape, z, step_noises=zs)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a, replay)
    ddim = diffusion.ddim_sample_loop(model, shape, z, eta=1.0, step_noises=zs)
    seeded = diffusion.ddim_sample_loop(model, shape, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ddim, seeded)


@pytest.mark.parametrize("respacing", ["abc", "ddimx", "ddim0", "0", "2000", "5,,5", "ddim999", "-3", "ddim2000"])
def test_bad_respacing_strings(respacing):
    with pytest.raises(ValueError, match="ddim|steps|expected"):
        create_diffusion(respacing)


def test_bad_arguments():
    with pytest.raises(ValueError, match="linear, cosine"):
        create_diffusion("", noise_schedule="quadratic")
    with pytest.raises(ValueError, match=">= 1"):
        create_diffusion("", diffusion_steps=0)
    with pytest.raises(ValueError, match="fixed_large, fixed_small, learned_range"):
        GaussianDiffusion(get_named_beta_schedule("linear", 10), model_var_type="learned")
    diffusion = create_diffusion("4")
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # noqa: E731
    with pytest.raises(ValueError, match="one tensor per sampling step \\(4\\), got 3"):
        diffusion.p_sample_loop(model, (1, 1, 2, 2), step_noises=[torch.zeros(1, 1, 2, 2)] * 3)
    with pytest.raises(ValueError, match="needs 2"):  # learned sigma wants 2C channels
        diffusion.p_sample_loop(lambda x, t: x, (1, 1, 2, 2))
