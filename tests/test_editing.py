"""Editing: SDEdit's strength ends (0 = the image, 1 = plain sampling), SDEdit and RePaint inpainting
against the closed-form Gaussian data of the objectives tests, the resampling-jump schedule, files and
bad input."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from ditkit.diffusion import FlowMatching, create_diffusion
from ditkit.diffusion.gaussian import sampling_levels
from ditkit.sampling.editing import edit, noised_to_level, read_image, read_mask
from ditkit.models import DiT
from ditkit.sampling import CFG, Editing, sample, sampling_schedule
from test_gaussian_diffusion import one_thread  # noqa: F401  (the fixture, used through pytestmark)
from test_gaussian_diffusion import GAUSSIAN, as_images, exact_eps_model, exact_moments, exact_velocity_model, flat

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLERS = [("ddpm", "ddpm"), ("ddpm", "ddim"), ("flow", "euler"), ("flow", "heun"), ("flow", "sde")]


def tiny_dit(objective: str) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                learn_sigma=objective == "ddpm").eval()
    for p in model.parameters():  # zero-initialised layers would make every prediction 0
        p.data.normal_(0, 0.05)
    return model


def objective_for(name: str):
    return create_diffusion("", learn_sigma=True) if name == "ddpm" else FlowMatching(shift=2.0)


def image_batch() -> torch.Tensor:
    return torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# SDEdit
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective,sampler", SAMPLERS)
def test_strength_0_is_the_image_and_strength_1_is_plain_sampling(objective, sampler):
    model, obj, image, y = tiny_dit(objective), objective_for(objective), image_batch(), torch.tensor([0, 1, 2])
    kw = dict(y=y, guidance=CFG(2.0), steps=6, sampler=sampler)
    assert torch.equal(edit(model, obj, image, strength=0.0, generator=torch.Generator().manual_seed(1), **kw), image)
    plain = sample(model, obj, image.shape, generator=torch.Generator().manual_seed(1), progress=False, **kw)
    edited = edit(model, obj, image, strength=1.0, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(edited, plain)  # bit for bit
    half = edit(model, obj, image, strength=0.5, generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.equal(half, plain) and not torch.equal(half, image)


def _sdedit_truth(a: float, b: float, image: torch.Tensor, ode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of SDEdit's output for Gaussian data N(mu, Sigma), from x_t ~ N(a image, b^2 I).

    A stochastic sampler draws x0 ~ p(x0 | x_t) = N(mu + G (x_t - a mu), Sigma - a G Sigma), G = a Sigma S^-1,
    S = a^2 Sigma + b^2 I. An ODE sampler maps x_t by the flow map x0 = mu + A (x_t - a mu),
    A = Sigma^1/2 S^-1/2 (Sigma and S commute)."""
    mu, sigma = GAUSSIAN.mean, GAUSSIAN.covariance
    lam, V = torch.linalg.eigh(sigma)
    s = a * a * lam + b * b
    gain = V @ torch.diag((lam / s).sqrt() if ode else a * lam / s) @ V.T
    cov = b * b * gain @ gain.T + (0 if ode else sigma - a * gain @ sigma)
    return mu + a * gain @ (image - mu), cov


@pytest.mark.parametrize("sampler,steps,start,tol", [("ddpm", 100, 40, 0.02), ("heun", 20, 8, 0.005)])
def test_sdedit_samples_the_posterior_of_the_noised_image(sampler, steps, start, tol):
    """Exact output moments (no Monte Carlo) of sampling from level `start` with the optimal model, against
    the closed form (a posterior draw for DDPM, the flow map for the Heun ODE). Measured errors (mean, cov):
    ddpm 1e-14, 0.008 (its first-order discretisation); heun 0.0016, 0.0012."""
    obj = create_diffusion("", learn_sigma=False) if sampler == "ddpm" else FlowMatching()
    model = exact_eps_model(GAUSSIAN, obj) if sampler == "ddpm" else exact_velocity_model(GAUSSIAN)
    _, schedule, n = sampling_schedule(obj, sampler, steps)
    x = torch.tensor([1.5, 0.5, -2.0], dtype=torch.float64)
    noisy = n - start if sampler == "ddpm" else 0

    def run(z, zs):
        image = as_images(x.expand(len(z), -1))
        return sample(model, obj, z.shape, steps=steps, sampler=sampler,
                      noise=noised_to_level(schedule, n, image, start, z),
                      editing=Editing(start_step=start), step_noises=zs, progress=False)

    mean, cov = exact_moments(run, GAUSSIAN.dim, noisy)
    if sampler == "ddpm":
        abar = float(schedule.alphas_cumprod[n - 1 - start])
        a, b = abar ** 0.5, (1 - abar) ** 0.5
    else:
        t = float(obj.timesteps(n)[start])
        a, b = 1 - t, t
    true_mean, true_cov = _sdedit_truth(a, b, x, ode=sampler != "ddpm")
    assert (mean - true_mean).abs().max() < tol and (cov - true_cov).abs().max() < tol
    # and edit() is exactly this construction, its noise drawn from the generator (start first)
    image, g = as_images(x[None]), torch.Generator().manual_seed(3)
    z = torch.randn(image.shape, generator=g, dtype=torch.float64)
    direct = sample(model, obj, image.shape, steps=steps, sampler=sampler, generator=g, progress=False,
                    noise=noised_to_level(schedule, n, image, start, z), editing=Editing(start_step=start))
    edited = edit(model, obj, image, strength=(n - start) / n, steps=steps, sampler=sampler,
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(edited, direct)


# ------------------------------------------------------------------------------------------------
# Inpainting
# ------------------------------------------------------------------------------------------------

def _conditional(known: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of coordinates 1, 2 of GAUSSIAN given coordinate 0 = known."""
    mu, S = GAUSSIAN.mean, GAUSSIAN.covariance
    gain = S[1:, :1] / S[0, 0]
    return mu[1:] + gain[:, 0] * (known - mu[0]), S[1:, 1:] - gain @ S[:1, 1:]


@pytest.mark.parametrize("objective,sampler", SAMPLERS)
def test_inpainting_keeps_the_known_pixels_exactly(objective, sampler):
    model, obj, image = tiny_dit(objective), objective_for(objective), image_batch()
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1
    out = edit(model, obj, image, mask, y=torch.tensor([0, 1, 2]), guidance=CFG(2.0), steps=6, sampler=sampler,
               jump_length=2, jump_n_sample=2, generator=torch.Generator().manual_seed(0))
    keep = (mask == 0).expand_as(image)
    assert torch.equal(out[keep], image[keep])
    assert (out[~keep] - image[~keep]).abs().min() > 0  # the masked pixels were generated


@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddpm", 50), ("flow", "sde", 50)])
def test_inpainting_fills_in_the_conditional_distribution(objective, sampler, steps):
    """Monte Carlo, 10,000 draws, seed 0: coordinate 0 of GAUSSIAN is known (1.5), coordinates 1, 2 are
    generated. Measured errors (mean, cov) with 10 resamplings per step: ddpm 0.020, 0.010; sde 0.022, 0.029
    (Monte Carlo standard error about 0.007 each). Replacement alone is biased (RePaint's motivation):
    mean errors 0.18 (ddpm) and 0.19 (sde)."""
    obj = create_diffusion("", learn_sigma=False) if objective == "ddpm" else FlowMatching()
    model = exact_eps_model(GAUSSIAN, obj) if objective == "ddpm" else exact_velocity_model(GAUSSIAN)
    n = 10_000
    image = torch.zeros(n, 3, 1, 1, dtype=torch.float64)
    image[:, 0] = 1.5
    mask = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    true_mean, true_cov = _conditional(1.5)

    def errors(resamplings: int) -> tuple[float, float]:
        out = edit(model, obj, image, mask, steps=steps, sampler=sampler, jump_n_sample=resamplings,
                   generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[:, 0], image[:, 0])
        x = flat(out)[:, 1:]
        return (x.mean(0) - true_mean).abs().max().item(), (x.T.cov() - true_cov).abs().max().item()

    mean_err, cov_err = errors(10)
    assert mean_err < 0.05 and cov_err < 0.06
    assert errors(1)[0] > 0.1


def test_resampling_jump_schedule():
    assert sampling_levels(4) == [0, 1, 2, 3, 4]
    assert sampling_levels(4, start_step=2) == [2, 3, 4]
    # jump_length 1, 3 samples per step: every step but the last is sampled 3 times
    assert sampling_levels(3, jump_length=1, jump_n_sample=3) == [0, 1, 0, 1, 0, 1, 2, 1, 2, 1, 2, 3]
    # jumps of 2 from level 2, never above the start, never from the end
    assert sampling_levels(5, start_step=1, jump_length=2, jump_n_sample=2) == [1, 2, 3, 1, 2, 3, 4, 5]
    levels = sampling_levels(20, jump_length=4, jump_n_sample=3)
    down = sum(b == a + 1 for a, b in zip(levels, levels[1:]))
    assert down == 4 * 3 * 4 + 4 and all(b == a + 1 or b == a - 4 for a, b in zip(levels, levels[1:]))


def test_renoise_keeps_the_forward_marginals():
    """Noising a state back (RePaint's jump) gives x_t | x0 of the forward process: checked on the exact
    coefficients with 200,000 draws (mean to 0.01, std to 0.01)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    fm = FlowMatching()
    x_t = fm.renoise(fm.q_sample(x0, torch.tensor([0.3]), torch.randn(x0.shape, generator=g)), 0.3, 0.8, generator=g)
    assert abs(x_t.mean() - 0.2 * 0.7) < 0.01 and abs(x_t.std() - 0.8) < 0.01
    d = create_diffusion("50", learn_sigma=False)
    x_s = d.q_sample(x0, torch.full((len(x0),), 10), torch.randn(x0.shape, generator=g))
    x_t = d.renoise(x_s, 10, 30, generator=g)
    abar = float(d.alphas_cumprod[30])
    assert abs(x_t.mean() - abar ** 0.5 * 0.7) < 0.01 and abs(x_t.std() - (1 - abar) ** 0.5) < 0.01


# ------------------------------------------------------------------------------------------------
# Files and bad input
# ------------------------------------------------------------------------------------------------

def test_read_image_and_mask(tmp_path):
    grey = torch.arange(64, dtype=torch.uint8).reshape(8, 8) * 4
    Image.fromarray(grey.numpy()).save(tmp_path / "g.png")
    Image.fromarray(torch.stack([grey] * 3, -1).numpy()).save(tmp_path / "rgb.png")
    g = read_image(tmp_path / "g.png")
    assert g.shape == (1, 1, 8, 8) and torch.allclose(g[0, 0], grey.float() / 127.5 - 1)
    assert read_image(tmp_path / "rgb.png").shape == (1, 3, 8, 8)
    m = read_mask(tmp_path / "g.png")
    assert m.shape == (1, 1, 8, 8) and torch.equal(m[0, 0], (grey >= 128).float())
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=torch.zeros(1, 3, 8, 8)), "3 channel.*takes 2"),
    (dict(image=torch.zeros(1, 2, 16, 16)), "16x16.*built for 8x8"),
    (dict(mask=torch.zeros(4, 4)), "mask must be"),
    (dict(mask=torch.full((8, 8), 0.5)), "only 0 .keep. and 1"),
    (dict(mask=torch.zeros(1, 3, 8, 8)), "does not fit"),
    (dict(strength=1.5), r"strength must be in \[0, 1\]"),
    (dict(strength=-0.1), r"strength must be in \[0, 1\]"),
    (dict(jump_n_sample=3), "give a mask"),
    (dict(sampler="heun"), "unknown sampler"),
])
def test_bad_input_is_one_clear_error(kwargs, match):
    model, obj = tiny_dit("ddpm"), objective_for("ddpm")
    args = {"image": torch.zeros(1, 2, 8, 8), "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        edit(model, obj, **args)
