"""Improved MeanFlow (iMF): the v-loss and the guidance scale as an input, on closed-form Gaussian data.

The unguided toy is test_meanflow's: x0 ~ N(mu, sigma^2 I). The guided toy gives every class c its own spread,
x0 | c ~ N(mu, sigma_c^2 I), and the null label N(mu, sigma_0^2 I). Each velocity is then -mu + a(t) y with
y = z - (1 - t) mu and a = s'/s (s_t = sqrt((1 - t)^2 sigma^2 + t^2)), so CFG at scale w has
a_w = w a_c + (1 - w) a_0, and its flow map keeps the form: y_r = A(r, t) y_t with
A = (s_c(r) / s_c(t))^w (s_0(r) / s_0(t))^(1 - w). The exact guided one-step map from noise n is therefore
x = mu + sigma_c^w sigma_0^(1 - w) n, and the exact guided average velocity u_w = -mu + (1 - A) / (t - r) y.
"""
import math

import pytest
import torch

import ditkit
from ditkit.diffusion import FLOW_TIME_SCALE, FlowMatching
from ditkit.diffusion.meanflow import MeanFlow
from ditkit.models import DiT
from test_meanflow import MU, TINY, ExactAverageVelocity, bc, exact_v, float64_timestep_embedding, times, tiny_dit

SIGMAS, SIGMA_NULL = (0.3, 0.5), 0.8  # class 0, class 1; the null label is 2


def s_and_slope(t, sigma):
    """s_t and a_t = s_t' / s_t for spread sigma (a tensor like t)."""
    s = torch.sqrt((1 - t) ** 2 * sigma**2 + t**2)
    return s, (t - (1 - t) * sigma**2) / s**2


class ExactGuided(torch.nn.Module):
    """The exact CFG-guided average velocity of the guided toy as a model with DiT's call signature, told the
    scale by `guidance=` (the null label and dropped labels are unguided at every scale)."""

    num_classes = 2
    guidance_range = (1.0, 4.0)

    def forward(self, z, t, y, force_drop_ids=None, interval=None, guidance=None):
        t = t.double() / FLOW_TIME_SCALE
        h = torch.zeros_like(t) if interval is None else interval.double() / FLOW_TIME_SCALE
        r = t - h
        null = y == self.num_classes
        if force_drop_ids is not None:
            null = null | (force_drop_ids == 1)
        w = torch.ones_like(t) if guidance is None else guidance.double()
        w = torch.where(null, torch.ones_like(w), w)
        sigma_c = torch.where(null | (y == 1), SIGMAS[1], SIGMAS[0]).double()
        sigma_c = torch.where(null, SIGMA_NULL, sigma_c)
        sc_t, a_c = s_and_slope(t, sigma_c)
        s0_t, a_0 = s_and_slope(t, torch.full_like(t, SIGMA_NULL))
        sc_r, _ = s_and_slope(r, sigma_c)
        s0_r, _ = s_and_slope(r, torch.full_like(t, SIGMA_NULL))
        A = (sc_r / sc_t) ** w * (s0_r / s0_t) ** (1 - w)
        safe = torch.where(h > 0, h, torch.ones_like(h))
        slope = torch.where(h > 0, (1 - A) / safe, w * a_c + (1 - w) * a_0)
        return -MU + bc(slope, z).to(z.dtype) * (z - bc(1 - t, z).to(z.dtype) * MU)


class TwoCallGuided(ExactGuided):
    """The same fields without a guidance input: sampled with ordinary CFG (two calls a step)."""

    guidance_range = None

    def forward(self, z, t, y, force_drop_ids=None, interval=None):
        return super().forward(z, t, y, force_drop_ids, interval)


class Perturbed(torch.nn.Module):
    """`inner` + a * (b z + 1 - b): a family of models through the exact one at a = 0."""

    def __init__(self, inner, a, b):
        super().__init__()
        self.inner, self.a, self.b = inner, a, b
        self.guidance_range = getattr(inner, "guidance_range", None)

    def forward(self, z, t, *args, **kwargs):
        return self.inner(z, t, *args, **kwargs) + self.a * (self.b * z + 1 - self.b)


def guided_toy(n, seed):
    """n class-conditional samples (labels alternate 0, 1), float64, shape (n, 1, 2, 2)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)[y]
    return MU + bc(sigma, torch.zeros(n, 1, 2, 2)) * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64), y


# ---------------------------------------------------------------------------------------------------------
# the v-loss
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guided", [False, True])
def test_the_v_loss_gradient_is_its_formula(guided, monkeypatch):
    # grad = (1 / N) sum_i sg(w_i) (2 / D) (V_i - v_i) . du_i/dtheta, V = u + (t - r) du/dt with du/dt taken
    # here as a central difference along the network's own velocity u(z, t, t): the JVP and the tangent are
    # held fixed, the gradient flows through u alone
    from ditkit.models.layers import TimestepEmbedder

    monkeypatch.setattr(TimestepEmbedder, "timestep_embedding", staticmethod(float64_timestep_embedding))
    model = tiny_dit(guidance_range=(1.0, 4.0) if guided else None).double()
    n = 6
    t, r = times(n, seed=5)
    r[0] = t[0]  # an r = t row: V is u itself
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    kwargs = {"y": torch.tensor([0, 1, 2, 0, 1, 3])}
    mf = MeanFlow(loss="v", cfg_range=(1.0, 4.0) if guided else None)
    rows = torch.stack([t, r], dim=1)
    if guided:
        w = torch.tensor([1.0, 2.5, 4.0, 1.5, 3.0, 2.0], dtype=torch.float64)
        rows = torch.cat([rows, w[:, None]], dim=1)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = mf.training_losses(model, x0, rows, kwargs, noise)["loss"].mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    own = {**kwargs, **({"guidance": w} if guided else {})}
    z = mf.q_sample(x0, t, noise)
    v = mf.guided_field(model, z, t, noise - x0, own)  # noise - x0, or its guided form at each row's w

    def u_at(z_, t_):  # r held fixed
        return mf.average_velocity(model, z_, t_, r, own)

    eps = 1e-6
    with torch.no_grad():
        v_own = mf.velocity(model, z, t, own)
        dudt = (u_at(z + eps * v_own, t + eps) - u_at(z - eps * v_own, t - eps)) / (2 * eps)
    u = u_at(z, t)
    V = u.detach() + bc(t - r, u) * dudt
    D = V[0].numel()
    mse = ((V - v) ** 2).flatten(1).mean(1)
    weight = 1 / (mse + mf.adaptive_c) ** mf.adaptive_p
    cotangent = bc(weight, V) * 2 * (V - v) / (D * n)
    expected = torch.autograd.grad(u, params, cotangent, allow_unused=True)
    for got, want in zip(grads, expected):
        if want is None:
            assert got is None or got.abs().max() == 0
            continue
        assert (got - want).abs().max() <= 1e-6 * want.abs().max() + 1e-12
    flat = torch.cat([x.flatten() for x in expected if x is not None])
    assert flat.abs().max() > 1e-3  # the check is not vacuous


def test_with_the_exact_u_the_v_prediction_is_the_marginal_velocity_and_minimises_the_v_loss():
    g = torch.Generator().manual_seed(7)
    n = 20000
    x0 = MU + 0.3 * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    rows = MeanFlow(unequal_fraction=0.75).sample_t(n, g).double()
    t, r = rows[:, 0], rows[:, 1]
    mf = MeanFlow(loss="v", adaptive_p=0.0)
    z = mf.q_sample(x0, t, noise)
    # V = u + (t - r) du/dt along the exact u's own velocity: the MeanFlow identity makes it v(z_t, t) exactly
    u, V = mf.v_prediction(ExactAverageVelocity(), z, t, r)
    assert (r < t).float().mean() > 0.7
    assert torch.allclose(V, exact_v(z, t), atol=1e-10)
    # v(z_t, t) = E[noise - x0 | z_t], so the exact u minimises the expected loss: any model of a family through
    # it (a shift, or a rescaling of z) does worse, on the same draws
    exact = mf.training_losses(ExactAverageVelocity(), x0, rows, None, noise)["mse"].mean()
    for b in (0.0, 1.0):
        for a in (-0.05, 0.05):
            worse = mf.training_losses(Perturbed(ExactAverageVelocity(), a, b), x0, rows, None, noise)["mse"]
            assert worse.mean() > exact, (a, b)


# ---------------------------------------------------------------------------------------------------------
# the guidance scale as an input
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [1.0, 2.5, 4.0])
def test_guidance_conditioned_exact_u_gives_the_exact_guided_one_step_map(w):
    n = 4000
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(n) % 2
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)[y]
    expected = MU + bc(sigma**w * SIGMA_NULL ** (1 - w), noise) * noise
    model = ExactGuided()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True)
    for steps in (1, 2):
        seen.clear()
        x = ditkit.sample(model, MeanFlow(), noise.shape, y=y, noise=noise, guidance=w, steps=steps, progress=False)
        # one conditional call a step, told w (sampler times are float32, hence the tolerance)
        assert len(seen) == steps and torch.equal(seen[0], torch.full((n,), w, dtype=seen[0].dtype))
        assert torch.allclose(x, expected, atol=1e-6), steps
    # an independent check of the closed form: ordinary CFG (two calls a step) on the instantaneous velocities,
    # solved with 200 Heun steps, reaches the same samples
    heun = ditkit.sample(TwoCallGuided(), FlowMatching(), noise.shape, y=y, noise=noise, guidance=w, steps=200,
                         sampler="heun", shift=1.0, progress=False)
    assert (heun - expected).abs().max() < 1e-4
    # and the spread of each class is the guided one: sigma_c (sigma_c / sigma_0)^(w - 1)
    for c in (0, 1):
        assert abs(x[y == c].std().item() / (SIGMAS[c] ** w * SIGMA_NULL ** (1 - w)) - 1) < 0.05


def test_the_guided_v_loss_target_is_the_cfg_field_and_the_exact_guided_u_minimises_it():
    n = 20000
    x0, y = guided_toy(n, seed=8)
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    mf = MeanFlow(loss="v", adaptive_p=0.0, unequal_fraction=0.75, cfg_range=(1.0, 4.0))
    rows = mf.sample_t(n, g).double()
    t, r, w = rows[:, 0], rows[:, 1], rows[:, 2]
    assert w.min() >= 1.0 and w.max() <= 4.0 and abs(w.mean().item() - 2.5) < 0.03
    model = ExactGuided()
    kwargs = {"y": y, "guidance": w}
    z = mf.q_sample(x0, t, noise)
    # the field regressed: w (noise - x0) + (1 - w) u(z, t, t | null), the null call told the same w
    field = mf.guided_field(model, z, t, noise - x0, kwargs)
    v_null = model(z, t * FLOW_TIME_SCALE, torch.full_like(y, 2))
    assert torch.allclose(field, bc(w, z) * (noise - x0) + bc(1 - w, z) * v_null, atol=1e-12)
    # V of the exact guided u is the CFG velocity at the row's own w (the identity on the guided ODE)
    _, V = mf.v_prediction(model, z, t, r, kwargs)
    v_guided = model(z, t * FLOW_TIME_SCALE, y, guidance=w)
    assert torch.allclose(V, v_guided, atol=1e-9)
    # whose conditional mean the field is: the exact guided u minimises the guided loss in its family
    exact = mf.training_losses(model, x0, rows, {"y": y}, noise)["mse"].mean()
    for b in (0.0, 1.0):
        for a in (-0.05, 0.05):
            worse = mf.training_losses(Perturbed(model, a, b), x0, rows, {"y": y}, noise)["mse"].mean()
            assert worse > exact, (a, b)
    with pytest.raises(ValueError, match="trains on \\(N, 3\\)"):
        mf.training_losses(model, x0, rows[:, :2], {"y": y}, noise)


def test_sampling_a_guidance_conditioned_model_checks_the_scale():
    noise = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"cfg 5 is outside the guidance scales this model was trained on \[1, 4\]"):
        ditkit.sample(ExactGuided(), MeanFlow(), noise.shape, y=y, noise=noise, guidance=5.0, progress=False)
    with pytest.raises(ValueError, match="use a plain CFG scale with no interval"):
        ditkit.sample(ExactGuided(), MeanFlow(), noise.shape, y=y, noise=noise,
                      guidance=ditkit.sampling.CFG(2.0, (0.0, 0.7)), progress=False)
    # no guidance asked is w = 1: the conditional model
    plain = ditkit.sample(ExactGuided(), MeanFlow(), noise.shape, y=y, noise=noise, progress=False)
    told = ditkit.sample(ExactGuided(), MeanFlow(), noise.shape, y=y, noise=noise, guidance=1.0, progress=False)
    assert torch.equal(plain, told)


def test_the_guidance_embedder_is_zero_initialised_and_absent_unless_asked():
    kw = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=3,
              interval_embed=True)
    torch.manual_seed(0)
    plain = DiT(**kw)
    torch.manual_seed(0)
    steered = DiT(**kw, guidance_range=(1, 4))
    assert not any(k.startswith("guidance_embedder") for k in plain.state_dict())
    assert "guidance_range" not in plain.config and steered.config["guidance_range"] == [1.0, 4.0]
    # built last: every other weight is the plain model's, and a fresh embedder adds nothing at any scale
    shared = {k: v for k, v in steered.state_dict().items() if not k.startswith("guidance_embedder")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    for p in steered.final_layer.parameters():
        torch.nn.init.normal_(p)
    plain.final_layer.load_state_dict(steered.final_layer.state_dict())
    x, t, y, h = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 9.0]), torch.tensor([0, 3]), torch.tensor([1.0, 5.0])
    with torch.no_grad():
        for w in (1.0, 2.5, 4.0):
            assert torch.equal(steered(x, t, y, interval=h, guidance=torch.full((2,), w)), plain(x, t, y, interval=h))
        torch.nn.init.normal_(steered.guidance_embedder.mlp[2].weight, std=0.5)
        one, four = (steered(x, t, y, interval=h, guidance=torch.full((2,), w)) for w in (1.0, 4.0))
        assert (one - four).abs().max() > 1e-3
        assert torch.equal(steered(x, t, y, interval=h), one)  # no guidance given: w = 1
    # the saved config rebuilds it
    again = DiT(**steered.config)
    again.load_state_dict(steered.state_dict())
    assert again.guidance_range == (1.0, 4.0)
    with pytest.raises(ValueError, match="no guidance-scale input: build it with guidance_range"):
        plain(x, t, y, guidance=torch.ones(2))
    with pytest.raises(ValueError, match="guidance_range must be \\(lo, hi\\) with 1 <= lo <= hi"):
        DiT(**kw, guidance_range=(0.5, 4))


IMF = dict(TINY, meanflow_cfg=1.0, meanflow_loss="v", meanflow_cfg_range=[1.0, 4.0], meanflow_unequal=0.5,
           flow_time_scale=10.0, meanflow_interval_scale=1.0,
           sample={**TINY["sample"], "cfg_scale": 2.0, "cfg_interval": None})


def test_a_guidance_conditioned_v_loss_run_resumes_bit_identically_and_samples_at_any_scale(tmp_path):
    from safetensors.torch import load_file

    from ditkit import checkpoint as ckpt
    from ditkit.pipeline import Pipeline
    from ditkit.train import TrainConfig, train

    straight = train(TrainConfig.from_dict(dict(IMF, steps=3, out=str(tmp_path / "a"))), progress=False)
    assert math.isfinite(straight.final_loss)
    train(TrainConfig.from_dict(dict(IMF, steps=2, out=str(tmp_path / "b"))), progress=False)
    again = train(TrainConfig.from_dict(dict(IMF, steps=3, out=str(tmp_path / "b"))), resume=True, progress=False)
    assert again.start_step == 2
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(ckpt.latest_checkpoint(tmp_path / "a") / name))
        b = load_file(str(ckpt.latest_checkpoint(tmp_path / "b") / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("guidance_embedder") for k in a)
    assert not torch.equal(a["guidance_embedder.mlp.2.weight"], torch.zeros_like(a["guidance_embedder.mlp.2.weight"]))

    pipe = Pipeline.load(tmp_path / "a")
    assert pipe.model.guidance_range == (1.0, 4.0)
    seen = []
    pipe.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True)
    images = {w: pipe.generate(n_per_class=1, cfg=w, seed=0, progress=False) for w in (1.0, 3.0)}
    assert [s.tolist() for s in seen] == [[1.0] * 4, [3.0] * 4]  # one call each, told its scale
    assert images[3.0].settings["cfg"] == 3.0
    assert (images[1.0].images - images[3.0].images).abs().max() > 0  # the scale reached the trained embedder
    with pytest.raises(ValueError, match="outside the guidance scales"):
        pipe.generate(n_per_class=1, cfg=6.0, progress=False)


def test_guidance_range_settings_are_checked():
    from ditkit.train import TrainConfig

    with pytest.raises(ValueError, match="meanflow_loss must be u .* or v"):
        TrainConfig.from_dict(dict(TINY, meanflow_loss="w"))
    with pytest.raises(ValueError, match="leave meanflow_cfg at 1"):
        TrainConfig.from_dict(dict(IMF, meanflow_cfg=2.0))
    with pytest.raises(ValueError, match="meanflow_cfg_range must be \\[lo, hi\\] with 1 <= lo <= hi"):
        TrainConfig.from_dict(dict(IMF, meanflow_cfg_range=[0.5, 4.0]))
    with pytest.raises(ValueError, match="lacks"):
        TrainConfig.from_dict(dict(IMF, class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="set sample.cfg_interval: null"):
        TrainConfig.from_dict(dict(IMF, sample={**IMF["sample"], "cfg_interval": [0.0, 0.75]}))
    with pytest.raises(ValueError, match="cfg_range draws the guidance scale per row"):
        MeanFlow(cfg_range=(1.0, 4.0), cfg_scale=2.0)
    with pytest.raises(ValueError, match="unknown MeanFlow loss"):
        MeanFlow(loss="x")


def test_a_guidance_conditioned_run_starts_from_a_flow_run_with_its_embedder_at_zero(tmp_path):
    from safetensors.torch import load_file

    from test_meanflow import FLOW

    from ditkit.train import TrainConfig, train

    train(TrainConfig.from_dict(dict(FLOW, flow_time_scale=10.0, steps=1, out=str(tmp_path / "flow"))),
          progress=False)
    run = train(TrainConfig.from_dict(dict(IMF, steps=1, lr=1e-12, warmup_steps=1, base=str(tmp_path / "flow"),
                                           out=str(tmp_path / "imf"))), progress=False)
    tuned = load_file(str(run.checkpoint / "model.safetensors"))
    assert tuned["guidance_embedder.mlp.2.weight"].abs().max() < 1e-6  # lr 1e-12: still the zero start
    assert any(k.startswith("interval_embedder") for k in tuned)
