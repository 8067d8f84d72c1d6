"""`ditkit.sample`: both objectives, every sampler, classifier-free guidance and its interval, replay,
parity with the original's CFG loop, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import reference_path
from ditkit.diffusion import FlowMatching, create_diffusion
from ditkit.models import DiT
from ditkit.sampling import CFG, ddim_respacing, sample
from test_gaussian_diffusion import one_thread  # noqa: F401  (the fixture, used through pytestmark)
from test_gaussian_diffusion import MIXTURE, exact_eps_model, exact_velocity_model, flat

pytestmark = pytest.mark.usefixtures("one_thread")


class LabelModel:
    """A toy class-conditional model that records its calls: prediction = 0.1 x + (y + 1) in every channel,
    followed by C "variance" channels equal to y (when learn_sigma)."""

    def __init__(self, num_classes: int = 3, learn_sigma: bool = False):
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.calls: list[tuple[int, list[int]]] = []  # (batch size, labels)

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        label = y.to(x.dtype).reshape(-1, 1, 1, 1)
        out = 0.1 * x + (label + 1)
        return torch.cat([out, label.expand_as(x)], dim=1) if self.learn_sigma else out


def gaussian(learn_sigma: bool = False, respacing: str = ""):
    return create_diffusion(respacing, learn_sigma=learn_sigma)


SHAPE = (2, 3, 2, 2)
Y = torch.tensor([0, 2])


# ------------------------------------------------------------------------------------------------
# Parity with the original sample.py (10-step CFG loop, guided_channels=3), 2e-6 of its scale
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small"])
def test_matches_the_original_cfg_loop(name):
    spec = json.loads(reference_path("dit_official", f"{name}.json").read_text())["constructor"]
    ref = load_file(str(reference_path("dit_official", f"{name}.diffusion.safetensors")))
    model = DiT(**spec).eval()
    model.load_state_dict(load_file(str(reference_path("dit_official", f"{name}.weights.safetensors"))))
    n = len(ref["loop.y"]) // 2  # the original's batch is [conditional; unconditional]; ours is the first half
    out = sample(model, create_diffusion("", learn_sigma=spec["learn_sigma"]), (n, *ref["loop.z"].shape[1:]),
                 y=ref["loop.y"][:n], guidance=CFG(4.0), steps=10, sampler="ddpm", guided_channels=3,
                 noise=ref["loop.z"][:n], step_noises=[z[:n] for z in ref["loop.noises"]], progress=False)
    # float32 rounding: through 10 steps of a random-weights model the values reach ~700, so the bound is
    # 2e-6 of the sample's scale (errors measured 3.5e-7 of it; a wrong step is off by orders of magnitude)
    expected = ref["loop.sample"][:n]
    assert (out - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "sde"])
def test_cfg_scale_1_is_the_conditional_model_with_one_call_per_step(sampler):
    gaussian_sampler = sampler in ("ddpm", "ddim")
    objective = gaussian(True) if gaussian_sampler else FlowMatching()
    model = LabelModel(learn_sigma=gaussian_sampler)
    out = sample(model, objective, SHAPE, y=Y, guidance=CFG(1.0), steps=4, sampler=sampler,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert model.calls == [(2, [0, 2])] * (8 if sampler == "heun" else 4)
    conditional = lambda x, t: model(x, t, Y)  # noqa: E731
    kwargs = dict(generator=torch.Generator().manual_seed(0))
    if sampler == "ddpm":
        direct = objective.respace("4").p_sample_loop(conditional, SHAPE, clip_denoised=False, **kwargs)
    elif sampler == "ddim":
        direct = objective.respace("ddim4").ddim_sample_loop(conditional, SHAPE, clip_denoised=False, **kwargs)
    else:
        direct = objective.sample_loop(conditional, SHAPE, sampler=sampler, steps=4, **kwargs)
    assert torch.equal(out, direct)
    assert torch.equal(sample(model, objective, SHAPE, y=Y, steps=4, sampler=sampler,
                              generator=torch.Generator().manual_seed(0), progress=False), direct)


def test_guidance_formula():
    """One Euler step from z at t = 1 gives z - v, so the guided velocity is read off the sample:
    v = v(null) + s (v(y) - v(null)), with v(y) = 0.1 z + y + 1 and the null label 3."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 4.0):
        out = sample(LabelModel(), FlowMatching(), SHAPE, y=Y, guidance=CFG(scale), steps=1, sampler="euler",
                     noise=z, progress=False)
        uncond = 0.1 * z + 4
        cond = 0.1 * z + (Y + 1).reshape(-1, 1, 1, 1)
        assert torch.allclose(z - out, uncond + scale * (cond - uncond), atol=1e-6)
        as_number = sample(LabelModel(), FlowMatching(), SHAPE, y=Y, guidance=scale, steps=1, sampler="euler",
                           noise=z, progress=False)
        assert torch.equal(as_number, out)  # a number is CFG with that scale


def test_guided_channels_and_learned_variance():
    """Only the first guided_channels are guided; the rest, and the learned-variance channels, are the
    conditional pass's."""
    model = LabelModel(learn_sigma=True)
    x, t = torch.randn(SHAPE), torch.full((2,), 500.0)
    null = torch.full((2,), 3)
    cond, uncond = model(x, t, Y), model(x, t, null)
    guided = uncond + 4.0 * (cond - uncond)
    for g in (3, 1):
        out = CFG(4.0).model_fn(model, FlowMatching(), Y, null, g)(x, t)
        assert torch.allclose(out[:, :g], guided[:, :g]) and torch.equal(out[:, g:], cond[:, g:])
    assert model.calls[-1] == (4, [0, 2, 3, 3])  # one batched call on [x; x] with [y; null]


def test_cfg_interval_skips_the_unconditional_pass_outside_it():
    # flow, Euler, 10 steps: t = 1.0, 0.9, ..., 0.1; guidance only for t in [0, 0.5]
    model = LabelModel()
    sample(model, FlowMatching(), SHAPE, y=Y, guidance=CFG(3.0, interval=(0.0, 0.5)), steps=10, sampler="euler",
           progress=False)
    assert [n for n, _ in model.calls] == [2] * 5 + [4] * 5
    # Gaussian, ddpm "10": steps 999, 888, ..., 0 of 1000; guidance only for step/1000 in [0.5, 1]
    model = LabelModel(learn_sigma=True)
    sample(model, gaussian(True), SHAPE, y=Y, guidance=CFG(3.0, (0.5, 1.0)), steps=10, progress=False)
    assert [n for n, _ in model.calls] == [4] * 5 + [2] * 5
    # an interval covering everything is plain CFG
    runs = [sample(LabelModel(), FlowMatching(), SHAPE, y=Y, guidance=CFG(3.0, interval), steps=3,
                   generator=torch.Generator().manual_seed(0), progress=False) for interval in ((0.0, 1.0), None)]
    assert torch.equal(*runs)


# ------------------------------------------------------------------------------------------------
# Every sampler reproduces a Gaussian mixture with the exact predictor (Monte Carlo, 20k samples)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 100), ("euler", 100), ("heun", 20), ("sde", 100)])
def test_samplers_reproduce_a_gaussian_mixture(sampler, steps):
    """Tolerances are ~4 standard errors at n = 20000 (mean 0.04, covariance 0.1, weight 0.02) plus the
    sampler's own bias (DDIM's start at abar_999 > 0 and first-order steps: ~0.04 in covariance)."""
    n = 20000
    if sampler in ("ddpm", "ddim"):
        objective = create_diffusion("", learn_sigma=False)
        model = exact_eps_model(MIXTURE, objective)
    else:
        objective, model = FlowMatching(), exact_velocity_model(MIXTURE)
    x = flat(sample(model, objective, (n, MIXTURE.dim, 1, 1), steps=steps, sampler=sampler,
                    generator=torch.Generator().manual_seed(0), progress=False))
    assert (x.mean(0) - MIXTURE.mean).abs().max() < 0.04
    assert (torch.cov(x.T) - MIXTURE.covariance).abs().max() < 0.1
    assert abs((x[:, 0] < -0.25).double().mean().item() - 0.3) < 0.02  # the components' weights


# ------------------------------------------------------------------------------------------------
# Defaults, respacing, replay, a real model
# ------------------------------------------------------------------------------------------------

def test_defaults_and_respacing():
    model = LabelModel(learn_sigma=True)
    sample(model, gaussian(True), SHAPE, y=Y, progress=False)  # ddpm, 250 steps
    assert len(model.calls) == 250
    model.calls.clear()
    sample(model, gaussian(True, "ddim25"), SHAPE, y=Y, sampler="ddim", progress=False)  # respaced: as it is
    assert len(model.calls) == 25
    model = LabelModel()
    sample(model, FlowMatching(), SHAPE, y=Y, progress=False)  # heun, 50 steps, 2 calls each
    assert len(model.calls) == 100
    assert ddim_respacing(25, 1000) == "ddim25" and ddim_respacing(300, 1000) == "300"


def test_ddim_uses_the_originals_spacing():
    steps = []
    sample(lambda x, t: steps.append(t[0].item()) or torch.zeros_like(x), gaussian(False), (1, 1, 1, 1),
           sampler="ddim", steps=25, progress=False)
    assert steps == list(range(960, -1, -40))


@pytest.mark.parametrize("objective,sampler", [(gaussian(False), "ddpm"), (FlowMatching(), "sde")])
def test_seeded_runs_repeat(objective, sampler):
    run = lambda seed: sample(LabelModel(), objective, SHAPE, y=Y, guidance=CFG(2.0), steps=3,  # noqa: E731
                              sampler=sampler, generator=torch.Generator().manual_seed(seed), progress=False)
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_with_a_dit_both_objectives(capsys):
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()
    y = torch.tensor([1, 7])
    for objective in (create_diffusion(""), FlowMatching()):
        x = sample(dit, objective, (2, 4, 8, 8), y=y, guidance=CFG(4.0), steps=3,
                   generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    x = sample(dit, FlowMatching(), (2, 4, 8, 8), steps=2, progress=False)  # unconditional: the null label
    assert x.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="input_size"):
        sample(dit, FlowMatching(), (2, 4, 6, 6), y=y, steps=2, progress=False)  # the model rejects the shape


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_input():
    model = LabelModel(learn_sigma=True)
    with pytest.raises(ValueError, match="expected one of ddpm, ddim"):
        sample(model, gaussian(True), SHAPE, y=Y, sampler="euler")
    with pytest.raises(ValueError, match="expected one of heun, euler, sde"):
        sample(model, FlowMatching(), SHAPE, y=Y, sampler="ddim")
    for steps in (0, -5):
        with pytest.raises(ValueError, match="steps must be >= 1"):
            sample(model, FlowMatching(), SHAPE, y=Y, steps=steps)
    with pytest.raises(ValueError, match="cannot take 2000 steps"):
        sample(model, gaussian(True), SHAPE, y=Y, steps=2000)
    with pytest.raises(ValueError, match="one tensor per sampling step \\(5\\), got 4"):
        sample(model, gaussian(True), SHAPE, y=Y, steps=5, step_noises=[torch.zeros(SHAPE)] * 4, progress=False)
    with pytest.raises(ValueError, match="guided_channels must be in 1..3"):
        sample(model, gaussian(True), SHAPE, y=Y, guidance=CFG(2.0), guided_channels=4)
    with pytest.raises(ValueError, match="needs class labels"):
        sample(model, gaussian(True), SHAPE, guidance=CFG(2.0))
    with pytest.raises(ValueError, match="null_label="):
        sample(lambda x, t, y: x, FlowMatching(), SHAPE, y=Y, guidance=CFG(2.0))
    with pytest.raises(ValueError, match="one label per sample"):
        sample(model, gaussian(True), SHAPE, y=torch.tensor([1]))
    for interval in ((0.8, 0.2), (0.0, 1.5), (0.5,), "0-1"):
        with pytest.raises(ValueError, match="CFG interval must be \\(lo, hi\\)"):
            CFG(2.0, interval)
    for scale in (-1.0, float("nan"), "4", True):
        with pytest.raises(ValueError, match="CFG scale must be a number >= 0"):
            CFG(scale)
    with pytest.raises(ValueError, match="guidance must be CFG"):
        sample(model, FlowMatching(), SHAPE, y=Y, guidance="cfg")
    with pytest.raises(ValueError, match="GaussianDiffusion or FlowMatching"):
        sample(model, "ddpm", SHAPE, y=Y)
