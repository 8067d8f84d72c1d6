"""Flow matching: the path, training-time t sampling and shift, the loss, and the Euler/Heun/SDE samplers
against the closed-form optimal velocity (exact moments for Gaussian data, pathwise order for a mixture)."""
from __future__ import annotations

import pytest
import torch

from ditkit.diffusion import FLOW_TIME_SCALE, FlowMatching
from ditkit.diffusion.flow import shift_time
from test_gaussian_diffusion import one_thread  # noqa: F401  (the fixture, used through pytestmark)
from test_gaussian_diffusion import GAUSSIAN, MIXTURE, exact_moments, exact_velocity_model, moment_errors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_path_direction_and_velocity_target():
    fm = FlowMatching()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 3, 3, generator=g, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.equal(fm.q_sample(x0, 0 * ones, noise), x0)
    assert torch.equal(fm.q_sample(x0, ones, noise), noise)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-6
    velocity = (fm.q_sample(x0, t + h, noise) - fm.q_sample(x0, t - h, noise)) / (2 * h)
    assert torch.allclose(velocity, noise - x0, atol=1e-8)


def test_the_model_sees_t_scaled_to_the_gaussian_range():
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.clone())
        return torch.zeros_like(x)

    fm = FlowMatching()
    fm.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([0.0, 1.0]))
    fm.sample_loop(model, (1, 1, 2, 2), sampler="euler", steps=2)
    assert FLOW_TIME_SCALE == 1000.0
    assert seen[0].tolist() == [0.0, 1000.0] and [s.item() for s in seen[1:]] == [1000.0, 500.0]
    # a time_scale of its own: the model sees t x 10, and the sampler's previews map it back
    from ditkit.sampling import x0_prediction

    seen.clear()
    ten = FlowMatching(time_scale=10)
    ten.sample_loop(model, (1, 1, 2, 2), sampler="euler", steps=2)
    assert [s.item() for s in seen] == [10.0, 5.0] and ten.time_fraction(torch.tensor([5.0])).item() == 0.5
    x, v = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    assert torch.equal(x0_prediction(ten, x, torch.tensor([5.0]), v), x - 0.5 * v)
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        FlowMatching(time_scale=0)


def test_training_time_sampling():
    n, g = 20000, torch.Generator().manual_seed(0)
    t = FlowMatching("uniform").sample_t(n, generator=g)
    assert 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.std().item() - 12 ** -0.5) < 0.01
    t = FlowMatching("logit_normal", logit_mean=0.5, logit_std=0.8).sample_t(n, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.8) < 0.03
    # the shift is applied to the same draws
    plain = FlowMatching("logit_normal").sample_t(100, generator=torch.Generator().manual_seed(1))
    shifted = FlowMatching("logit_normal", shift=3.0).sample_t(100, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))


def test_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert shift_time(t, 3.0).tolist() == [0.0, 0.5, 0.75, 1.0]
    assert torch.equal(shift_time(t, 1.0), t)
    grid = FlowMatching(shift=3.0).timesteps(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(FlowMatching(shift=3.0).timesteps(4, shift=1.0), torch.linspace(1, 0, 5, dtype=torch.float64))


def test_loss_is_the_velocity_error_with_optional_weighting():
    """Data = a point mass mu: the exact velocity is (x - mu) / t, so its loss is 0; a model off by c
    everywhere has mse c^2; loss_weight multiplies each sample's loss."""
    mu = torch.tensor([0.5, -1.0]).reshape(1, 2, 1, 1)
    x0 = mu.expand(4, 2, 1, 1)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    exact = lambda x, t_: (x - mu) / (t_ / FLOW_TIME_SCALE).reshape(-1, 1, 1, 1)  # noqa: E731
    losses = FlowMatching().training_losses(exact, x0, t, noise=torch.randn(4, 2, 1, 1))
    assert set(losses) == {"loss", "mse"} and losses["loss"].abs().max() < 1e-10
    off = lambda x, t_: exact(x, t_) + 0.3  # noqa: E731
    weighted = FlowMatching(loss_weight=lambda t_: 1 + t_)
    losses = weighted.training_losses(off, x0, t, noise=torch.randn(4, 2, 1, 1))
    assert torch.allclose(losses["mse"], torch.full((4,), 0.09), atol=1e-6)
    assert torch.allclose(losses["loss"], (1 + t) * 0.09, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Samplers with the exact velocity
# ------------------------------------------------------------------------------------------------

def _moment_errors(sampler: str, steps: int) -> tuple[float, float]:
    fm, model = FlowMatching(), exact_velocity_model(GAUSSIAN)
    noisy = steps if sampler == "sde" else 0
    return moment_errors(GAUSSIAN, *exact_moments(
        lambda z, zs: fm.sample_loop(model, z.shape, z, sampler=sampler, steps=steps, step_noises=zs),
        GAUSSIAN.dim, noisy))


def test_samplers_reproduce_the_gaussian_at_their_order():
    """Exact output moments (no Monte Carlo). Measured cov errors, N = 10, 20, 40, 80:
    euler 0.232, 0.123, 0.064, 0.032; heun 0.0028, 0.00062, 0.00015, 0.00004; sde (N = 50, 100, 200)
    0.026, 0.013, 0.0066. The mean is exact for all (< 1e-12)."""
    euler = [_moment_errors("euler", n) for n in (10, 20, 40, 80)]
    heun = [_moment_errors("heun", n) for n in (10, 20, 40, 80)]
    sde = [_moment_errors("sde", n) for n in (50, 100, 200)]
    assert all(mean_err < 1e-9 for mean_err, _ in euler + heun + sde)
    assert euler[-1][1] < 0.05 and heun[2][1] < 1e-3 and sde[-1][1] < 0.01
    for errors, lo, hi in ((euler, 1.6, 2.6), (heun, 3.0, 5.0), (sde, 1.6, 2.6)):
        for (_, coarse), (_, fine) in zip(errors, errors[1:]):
            assert lo <= coarse / fine <= hi
    for (_, e), (_, h) in zip(euler, heun):
        assert h < e / 20  # "far below": 80x at 10 steps, 800x at 80


def test_ode_order_on_a_gaussian_mixture():
    """Pathwise: a fixed start noise, endpoints against Heun with 1024 steps (nonlinear velocity, float64).
    RMS errors measured, N = 16, 32, 64, 128: euler 9.1e-2, 4.0e-2, 1.9e-2, 9.3e-3 (ratios 2.3, 2.1, 2.0);
    N = 8, 16, 32, 64: heun 1.2e-2, 2.9e-3, 7.5e-4, 1.9e-4 (ratios 4.1, 3.9, 4.0)."""
    fm, model = FlowMatching(), exact_velocity_model(MIXTURE)
    z = torch.randn(64, MIXTURE.dim, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = fm.sample_loop(model, z.shape, z, sampler="heun", steps=1024)

    def rms_errors(sampler, counts):
        return [(fm.sample_loop(model, z.shape, z, sampler=sampler, steps=n) - ref).pow(2).mean().sqrt().item()
                for n in counts]

    euler, heun = rms_errors("euler", (16, 32, 64, 128)), rms_errors("heun", (8, 16, 32, 64))
    assert all(1.6 <= a / b <= 2.6 for a, b in zip(euler, euler[1:])), euler
    assert all(3.0 <= a / b <= 5.0 for a, b in zip(heun, heun[1:])), heun
    assert heun[1] < euler[0] / 20  # 16 steps each


def test_sampling_grid_shift_is_used():
    seen = []

    def model(x, t):
        seen.append(round(t[0].item() / FLOW_TIME_SCALE, 6))
        return torch.zeros_like(x)

    FlowMatching(shift=3.0).sample_loop(model, (1, 1, 1, 1), sampler="euler", steps=4)
    FlowMatching(shift=3.0).sample_loop(model, (1, 1, 1, 1), sampler="euler", steps=4, shift=1.0)
    assert seen == [1.0, 0.9, 0.75, 0.5, 1.0, 0.75, 0.5, 0.25]


def test_sde_replays_from_a_generator_or_recorded_noise():
    fm, model = FlowMatching(), exact_velocity_model(GAUSSIAN)
    shape = (3, GAUSSIAN.dim, 1, 1)
    run = lambda seed: fm.sample_loop(model, shape, sampler="sde", steps=5,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(4)
    z = torch.randn(shape, generator=g)
    zs = [torch.randn(shape, generator=g) for _ in range(5)]
    replay = fm.sample_loop(model, shape, z, sampler="sde", steps=5, step_noises=zs)
    assert torch.equal(run(4), run(4)) and not torch.equal(run(4), run(5)) and torch.equal(run(4), replay)


def test_bad_arguments():
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        FlowMatching("beta")
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(shift=0.0)
    fm = FlowMatching()
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="heun, euler, sde"):
        fm.sample_loop(model, (1, 1, 1, 1), sampler="rk4")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fm.sample_loop(model, (1, 1, 1, 1), steps=0)
    with pytest.raises(ValueError, match="one tensor per sampling step \\(3\\), got 2"):
        fm.sample_loop(model, (1, 1, 1, 1), sampler="sde", steps=3, step_noises=[torch.zeros(1, 1, 1, 1)] * 2)
    with pytest.raises(ValueError, match="deterministic"):
        fm.sample_loop(model, (1, 1, 1, 1), sampler="euler", steps=2, step_noises=[torch.zeros(1, 1, 1, 1)] * 2)


@pytest.mark.parametrize("time_scale", [FLOW_TIME_SCALE, 10.0])
def test_velocity_model_as_epsilon_model_is_exact(time_scale):
    """EpsilonFromVelocity of the exact velocity predictor is the exact epsilon predictor at every
    Gaussian step (1e-6: the flow time reaches the model in float32, as in flow sampling), so DDPM/DDIM
    sample a flow model correctly, whatever time scale it was trained with."""
    from test_gaussian_diffusion import exact_eps_model

    from ditkit.diffusion import create_diffusion
    from ditkit.diffusion.flow import EpsilonFromVelocity

    diffusion = create_diffusion("", learn_sigma=False)
    exact_v = exact_velocity_model(MIXTURE)  # called with t x 1000
    converted = EpsilonFromVelocity(lambda x, t: exact_v(x, t * (FLOW_TIME_SCALE / time_scale)),
                                    diffusion.alphas_cumprod, FlowMatching(time_scale=time_scale))
    exact = exact_eps_model(MIXTURE, diffusion)
    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    for step in (0, 1, 100, 500, 900, 999):
        t = torch.full((16,), step)
        assert (converted(x, t) - exact(x, t)).abs().max() < 1e-6, step
