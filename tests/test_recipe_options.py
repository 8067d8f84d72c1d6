"""The modern-recipe options: each one's maths, and that the defaults change nothing."""
from __future__ import annotations

import math

import pytest
import torch

from ditkit.diffusion import create_diffusion
from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.gaussian import space_timesteps
from ditkit.models import DiT
from ditkit.models.layers import Attention, Mlp, RMSNorm, SwiGLU, apply_rope_2d, rope_2d_tables
from ditkit.sampling import APG, CFG, Autoguidance, guidance_from_settings, sample, shifted_gaussian_steps
from ditkit.sampling.guidance import apg_update
from ditkit.config import build_config
from ditkit.train.ema import EMA, power_ema_gamma

TINY_ARGS = ["data=patterns", "image_size=8", "channels=2", "hidden_size=32", "depth=1", "num_heads=2",
             "patch_size=2", "batch_size=8", "save_every=4", "warmup_steps=1", "samples_per_class=1", "sample.steps=2",
             "precision=fp32"]
SMALL = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn (zero-initialised layers would make guidance variants trivially equal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


# ---- model options ---------------------------------------------------------------------------

def test_rope_depends_only_on_relative_position():
    head_dim, grid = 16, (6, 5)
    cos, sin = rope_2d_tables(head_dim, grid)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=gen, dtype=torch.float64), torch.randn(head_dim, generator=gen,
                                                                                   dtype=torch.float64)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> float:
        x = torch.zeros(grid[0] * grid[1], head_dim, dtype=torch.float64)
        y = torch.zeros_like(x)
        iq, ik = pq[0] * grid[1] + pq[1], pk[0] * grid[1] + pk[1]
        x[iq], y[ik] = q, k
        rq, rk = apply_rope_2d(x, cos.double(), sin.double()), apply_rope_2d(y, cos.double(), sin.double())
        return float(rq[iq] @ rk[ik])

    base = score((1, 1), (3, 0))
    assert score((2, 3), (4, 2)) == pytest.approx(base, abs=1e-5)  # both moved by (1, 2); float32 tables
    assert score((1, 1), (3, 1)) != pytest.approx(base, abs=1e-3)   # a different offset
    # the origin is not rotated, and rotations keep norms
    x = torch.randn(30, head_dim, generator=gen)
    out = apply_rope_2d(x, cos, sin)
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    # leading extra tokens (in-context conditioning) are left as they are
    extra = apply_rope_2d(torch.cat([x[:2], x]), cos, sin)
    assert torch.equal(extra[:2], x[:2]) and torch.equal(extra[2:], out)


def test_rmsnorm_matches_its_formula():
    x = torch.randn(4, 7, 12, generator=torch.Generator().manual_seed(1))
    norm = RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 12))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    bare = RMSNorm(12, affine=False)
    assert bare.weight is None and not list(bare.parameters())
    torch.testing.assert_close(bare(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_swiglu_matches_its_formula():
    mlp = SwiGLU(16, 64)
    hidden = mlp.w3.in_features
    assert hidden == 48 and hidden % 8 == 0  # 2/3 of 64 rounded up to a multiple of 8
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    a = x @ mlp.w12.weight[:hidden].T + mlp.w12.bias[:hidden]
    b = x @ mlp.w12.weight[hidden:].T + mlp.w12.bias[hidden:]
    expected = (a * torch.sigmoid(a) * b) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_gelu_erf_is_the_exact_gelu_and_keeps_the_paper_keys():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # Hendrycks & Gimpel's GELU
    torch.testing.assert_close(Mlp(1, 1, approximate="none").act(x), exact, rtol=0, atol=1e-12)
    assert (Mlp(1, 1).act(x) - exact).abs().max() < 1e-3  # the paper's tanh form is within 1e-3 of it
    torch.manual_seed(0)
    erf = DiT(**SMALL, mlp="gelu_erf")
    assert list(erf.state_dict()) == list(DiT(**SMALL).state_dict())  # paper checkpoints load into it


def test_qk_norm_makes_attention_invariant_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    attn = Attention(16, 2, qk_norm=True).eval()
    x = torch.randn(2, 9, 16)
    before = attn(x)
    with torch.no_grad():  # scale the q and k projections (weights and biases) by 7
        attn.qkv.weight[:32] *= 7
        attn.qkv.bias[:32] *= 7
    torch.testing.assert_close(attn(x), before, rtol=1e-4, atol=1e-5)


def test_default_options_leave_keys_config_and_outputs_unchanged():
    torch.manual_seed(0)
    plain = DiT(**SMALL)
    torch.manual_seed(0)
    explicit = DiT(**SMALL, mlp="gelu", norm="layernorm", qk_norm=False, pos_embed="sincos")
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert plain.config == explicit.config and "mlp" not in plain.config and "pos_embed" not in plain.config
    randomised(plain), randomised(explicit)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([0, 2])
    assert torch.equal(plain(x, t, y), explicit(x, t, y))


@pytest.mark.parametrize("options", [{"mlp": "swiglu"}, {"mlp": "gelu_erf"}, {"norm": "rmsnorm"}, {"qk_norm": True},
                                     {"pos_embed": "rope"}, {"pos_embed": "sincos+rope"},
                                     {"mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True, "pos_embed": "rope",
                                          "block": "in_context"}])
def test_options_are_saved_and_load_back(tmp_path, options):
    model = randomised(DiT(**SMALL, **options))
    for key, value in options.items():
        assert model.config[key] == value
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([0, 3])
    assert torch.equal(model(x, t, y), loaded(x, t, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision runs too
        assert model(x, t, y).shape == (2, 2, 16, 16)


def test_rope_alone_drops_the_sincos_table_and_positions_still_matter():
    model = randomised(DiT(**SMALL, pos_embed="rope"))
    assert not model.add_pos_embed and model.blocks[0].attn.rope
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([300.0]), torch.tensor([1])
    shifted = torch.roll(x, shifts=4, dims=-1)  # move the content by one patch
    assert not torch.allclose(torch.roll(model(x, t, y), 4, -1), model(shifted, t, y), atol=1e-4)
    with pytest.raises(ValueError, match="pos_embed"):
        DiT(**SMALL, pos_embed="learned")


# ---- training options ------------------------------------------------------------------------

def test_velocity_cosine_term_matches_its_formula():
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    pred = torch.randn(4, 1, 8, 8, generator=gen)
    model = lambda x, t_, **kw: pred  # noqa: E731
    plain = FlowMatching().training_losses(model, x0, t, noise=noise)
    mixed = FlowMatching(cosine_weight=0.5).training_losses(model, x0, t, noise=noise)
    target = noise - x0
    cos = (pred * target).flatten(1).sum(1) / (pred.flatten(1).norm(dim=1) * target.flatten(1).norm(dim=1))
    torch.testing.assert_close(mixed["cosine"], 1 - cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed["loss"], plain["loss"] + 0.5 * (1 - cos), rtol=1e-5, atol=1e-6)
    assert "cosine" not in plain
    aligned = FlowMatching(cosine_weight=1.0).training_losses(lambda x, t_, **kw: 3 * target, x0, t, noise=noise)
    torch.testing.assert_close(aligned["cosine"], torch.zeros(4), atol=1e-6, rtol=0)


def test_power_ema_gamma_and_closed_form_average():
    # EDM2 (Karras et al. 2024): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match="ema_std"):
        power_ema_gamma(0.5)
    layer = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(layer, power_std=0.1)
    g, values = ema.gamma, [float(v) for v in torch.randn(40, generator=torch.Generator().manual_seed(4))]
    for step, v in enumerate(values):
        with torch.no_grad():
            layer.weight.fill_(v)
        ema.update(layer, step)
    # the recursion with decay (1 - 1/t)^(g + 1) weighs step tau (1-based) by (1 - beta_tau) (tau / t)^(g + 1)
    t = len(values)
    weights = [(1 - (1 - 1 / tau) ** (g + 1)) * (tau / t) ** (g + 1) for tau in range(1, t + 1)]
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    expected = sum(w * v for w, v in zip(weights, values))
    assert float(ema.model.weight) == pytest.approx(expected, abs=1e-5)


def test_new_config_fields_round_trip_and_validate():
    c = build_config(None, {}, ["sample.cfg_interval=[0.1, 0.8]", "sample.apg_eta=0", "ema_std=0.1",
                                "velocity_cosine_weight=0.5", "sample.guide_scale=2.0"])
    assert (c.sample.cfg_interval, c.sample.apg_eta, c.ema_std, c.velocity_cosine_weight) == ((0.1, 0.8), 0.0, 0.1, 0.5)
    from ditkit.pipeline import Pipeline

    pipe = Pipeline(model=_flow_model(), objective=FlowMatching(), info={"objective": "flow",
                                                                        "train_config": c.to_dict()})
    apg = APG(c.sample.cfg_scale, eta=0.0, interval=(0.1, 0.8))
    assert pipe.sample_kwargs(pipe.settings())["guidance"] == apg  # no guide model: no autoguidance
    pipe.guide = _flow_model()
    assert pipe.sample_kwargs(pipe.settings())["guidance"] == Autoguidance(pipe.guide, 2.0, cfg=apg)
    with pytest.raises(ValueError, match="sample.cfg_interval"):
        build_config(None, {}, ["sample.cfg_interval=[0.8, 0.1]"])
    with pytest.raises(ValueError, match="sample.shift"):
        build_config(None, {}, ["sample.shift=0"])


# ---- sampling options ------------------------------------------------------------------------

def _flow_model() -> DiT:
    torch.manual_seed(0)
    return randomised(DiT(**SMALL, learn_sigma=False))


def _model_and_sampler(objective: str) -> tuple[DiT, object, dict]:
    """A random DiT, its objective and a short sampler, for a flow or a Gaussian (learned-sigma) model."""
    if objective == "flow":
        return _flow_model(), FlowMatching(), {"sampler": "heun", "steps": 4}
    torch.manual_seed(0)
    return randomised(DiT(**SMALL)), create_diffusion("", learn_sigma=True), {"sampler": "ddim", "steps": 5}


@pytest.mark.parametrize("objective", ["flow", "gaussian"])
def test_autoguidance_with_the_model_itself_is_plain_conditional_sampling(objective):
    model, obj, kw = _model_and_sampler(objective)
    y, noise = torch.tensor([0, 1, 2, 1]), torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    plain = sample(model, obj, noise.shape, y=y, noise=noise, progress=False, **kw)
    auto = sample(model, obj, noise.shape, y=y, guidance=Autoguidance(model, 3.0), noise=noise, progress=False, **kw)
    cfg = sample(model, obj, noise.shape, y=y, guidance=CFG(3.0), noise=noise, progress=False, **kw)
    assert torch.equal(auto, plain)
    assert not torch.allclose(cfg, plain, atol=1e-3)  # guidance does something with this model


def test_autoguidance_follows_its_formula_and_needs_no_null_label():
    calls = []

    def strong(x, t, y=None):
        calls.append("strong")
        return 2 * x + 1

    def weak(x, t, y=None):
        calls.append("weak")
        return x
    obj = FlowMatching()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    # one Euler step from t = 1 to 0: x0 = x - v, v = weak + 2.5 (strong - weak) = x + 2.5 (x + 1)
    out = sample(strong, obj, noise.shape, guidance=Autoguidance(weak, 2.5), noise=noise, steps=1, sampler="euler",
                 progress=False)
    torch.testing.assert_close(out, noise - (noise + 2.5 * (noise + 1)))
    assert calls == ["strong", "weak"]


def test_cfg_plus_autoguidance_follows_its_formula():
    def strong(x, t, y):
        return 2 * x + 1 + y.view(-1, 1, 1, 1).float()

    def weak(x, t, y):
        return x + 0.5 * y.view(-1, 1, 1, 1).float()
    noise, y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(11)), torch.tensor([0, 3])
    out = sample(strong, FlowMatching(), noise.shape, y=y, guidance=Autoguidance(weak, 3.0, cfg=CFG(2.0)),
                 noise=noise, steps=1, sampler="euler", progress=False, null_label=5)
    cond, uncond, bad = strong(noise, None, y), strong(noise, None, torch.full_like(y, 5)), weak(noise, None, y)
    v = uncond + 2.0 * (cond - uncond) + (3.0 - 1) * (cond - bad)
    torch.testing.assert_close(out, noise - v)
    with pytest.raises(ValueError, match="guide_scale"):
        guidance_from_settings(cfg_scale=2.0, guide_scale=3.0)


def test_cfg_plus_autoguidance_inside_an_interval_calls_the_guide_at_every_step():
    """Flow, Euler, 4 steps (t = 1, 0.75, 0.5, 0.25): CFG's batched call only for t <= 0.5, the guide always."""
    calls = []

    def strong(x, t, y):
        calls.append(("strong", len(x)))
        return x + y.view(-1, 1, 1, 1).float()

    def weak(x, t, y):
        calls.append(("weak", len(x)))
        return 0.5 * x
    noise, y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(12)), torch.tensor([0, 3])
    guidance = Autoguidance(weak, 3.0, cfg=CFG(2.0, (0.0, 0.5)))
    sample(strong, FlowMatching(), noise.shape, y=y, guidance=guidance, noise=noise, steps=4, sampler="euler",
           progress=False, null_label=5)
    assert calls == [("strong", 2), ("weak", 2)] * 2 + [("strong", 4), ("weak", 2)] * 2
    # outside CFG's interval the prediction is cond + (w - 1) (cond - guide); inside it CFG's plus that term
    x, t = noise, torch.full((2,), 1000.0)
    out = guidance.model_fn(strong, FlowMatching(), y, torch.full_like(y, 5), 1)(x, t)
    torch.testing.assert_close(out, strong(x, t, y) + 2.0 * (strong(x, t, y) - weak(x, t, y)))
    x, t = noise, torch.full((2,), 250.0)
    out = guidance.model_fn(strong, FlowMatching(), y, torch.full_like(y, 5), 1)(x, t)
    cond, uncond = strong(x, t, y), strong(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond) + 2.0 * (cond - weak(x, t, y)))


def test_guidance_from_settings_gives_each_mode():
    def guide(x, t, y):
        return x
    assert guidance_from_settings() is None and guidance_from_settings(cfg_scale=1.0, cfg_interval=(0, 0.5)) is None
    assert guidance_from_settings(cfg_scale=2.0, cfg_interval=(0.0, 0.5)) == CFG(2.0, (0.0, 0.5))
    assert guidance_from_settings(cfg_scale=3.0, apg_eta=0.0, apg_norm=2.0, apg_momentum=-0.5) == APG(
        3.0, 0.0, 2.0, -0.5)
    assert guidance_from_settings(cfg_scale=2.0, cfg_interval=(0.1, 0.9), guide_model=guide,
                                  guide_unconditional=True) == Autoguidance(guide, 2.0, True, (0.1, 0.9))
    assert guidance_from_settings(cfg_scale=4.0, cfg_interval=(0.2, 0.8), guide_model=guide, guide_scale=2.0,
                                  apg_eta=0.0) == Autoguidance(guide, 2.0, cfg=APG(4.0, 0.0, interval=(0.2, 0.8)))
    with pytest.raises(ValueError, match="apg_eta projects guidance"):
        guidance_from_settings(cfg_scale=2.0, guide_model=guide, apg_eta=0.0)
    with pytest.raises(ValueError, match="APG needs numbers eta and momentum and a norm cap > 0"):
        guidance_from_settings(cfg_scale=2.0, apg_eta=0.0, apg_norm=0.0)
    with pytest.raises(ValueError, match="Autoguidance needs a guide_model"):
        Autoguidance(None, 2.0)
    with pytest.raises(ValueError, match="Autoguidance's cfg must be a CFG or APG"):
        Autoguidance(guide, 2.0, cfg=2.0)
    with pytest.raises(ValueError, match="Autoguidance interval"):
        Autoguidance(guide, 2.0, interval=(1.0, 0.0))


def test_apg_object_follows_apg_update_with_its_momentum():
    """Two calls of one APG model_fn: each is cond + (s - 1) update / b, update from apg_update on the denoised
    images with b (cond - uncond), the second call's running average carrying the first's."""
    flow, g = FlowMatching(), torch.Generator().manual_seed(13)
    x, y, null = torch.randn(2, 2, 4, 4, generator=g), torch.tensor([0, 2]), torch.full((2,), 3)

    def model(x, t, y):
        return torch.sin(x * (y.view(-1, 1, 1, 1).float() + 1))
    fn = APG(3.0, eta=0.3, norm=2.0, momentum=-0.5).model_fn(model, flow, y, null, 2)
    running = None
    for step in (900.0, 600.0):
        t = torch.full((2,), step)
        cond, uncond = model(x, t, y), model(x, t, null)
        a, b = (c.view(-1, 1, 1, 1) for c in flow.x0_coefficients(t))
        update, running = apg_update(b * (cond - uncond), a * x + b * cond, 0.3, 2.0, running, -0.5)
        torch.testing.assert_close(fn(x, t), cond + 2.0 * update / b)


def test_apg_update_formula_on_a_constructed_case():
    d_c = torch.tensor([[3.0, 0.0, 0.0, 4.0]])                 # |D_c| = 5
    par, orth = 0.4 * d_c, torch.tensor([[0.0, 2.0, -1.0, 0.0]])
    delta = par + orth
    for eta in (0.0, 0.3, 1.0):
        update, running = apg_update(delta, d_c, eta)
        torch.testing.assert_close(update, orth + eta * par)
        assert torch.equal(running, delta)
    # a norm cap rescales delta before the split; momentum adds beta * the previous running delta
    capped, _ = apg_update(delta, d_c, eta=1.0, norm_threshold=1.0)
    torch.testing.assert_close(capped, delta / delta.norm())
    prev = torch.ones_like(delta)
    moved, running = apg_update(delta, d_c, eta=1.0, running=prev, momentum=-0.5)
    torch.testing.assert_close(moved, delta - 0.5 * prev)
    torch.testing.assert_close(running, delta - 0.5 * prev)
    # no parallel component: APG is CFG's update whatever eta
    update, _ = apg_update(orth, d_c, eta=0.0)
    torch.testing.assert_close(update, orth)


@pytest.mark.parametrize("objective", ["flow", "gaussian"])
def test_apg_with_the_whole_parallel_component_is_cfg(objective):
    model, obj, kw = _model_and_sampler(objective)
    y, noise = torch.tensor([0, 1, 2, 1]), torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    cfg = sample(model, obj, noise.shape, y=y, guidance=CFG(3.0), noise=noise, progress=False, **kw)
    apg1 = sample(model, obj, noise.shape, y=y, guidance=APG(3.0, eta=1.0), noise=noise, progress=False, **kw)
    apg0 = sample(model, obj, noise.shape, y=y, guidance=APG(3.0, eta=0.0), noise=noise, progress=False, **kw)
    torch.testing.assert_close(apg1, cfg, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(apg0, cfg, atol=1e-3)


def test_x0_coefficients_recover_the_denoised_image():
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    flow, t = FlowMatching(), torch.tensor([0.2, 0.5, 0.9])
    a, b = flow.x0_coefficients(t * 1000)
    x_t = flow.q_sample(x0, t, noise)
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * x_t + b.view(-1, 1, 1, 1) * (noise - x0), x0)
    diffusion, steps = create_diffusion("", learn_sigma=False), torch.tensor([10, 400, 990])
    a, b = diffusion.x0_coefficients(steps)
    x_t = diffusion.q_sample(x0, steps, noise)
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * x_t + b.view(-1, 1, 1, 1) * noise, x0, rtol=1e-4, atol=1e-4)


def test_shift_one_is_the_plain_grid():
    flow = FlowMatching()
    torch.testing.assert_close(flow.timesteps(10, 1.0), torch.linspace(1.0, 0.0, 11, dtype=torch.float64))
    shifted = flow.timesteps(10, 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (shifted[1:-1] > flow.timesteps(10, 1.0)[1:-1]).all()
    model = _flow_model()
    y, noise = torch.tensor([0, 2]), torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    plain = sample(model, flow, noise.shape, y=y, guidance=CFG(2.0), steps=3, noise=noise, progress=False)
    one = sample(model, flow, noise.shape, y=y, guidance=CFG(2.0), steps=3, noise=noise, progress=False, shift=1.0)
    assert torch.equal(plain, one)
    # Gaussian: shift 1 keeps the even spacing of "N"; a shift > 1 moves the kept steps towards noise
    assert shifted_gaussian_steps(1000, 50, 1.0) == space_timesteps(1000, "50")
    strong = shifted_gaussian_steps(1000, 50, 3.0)
    assert strong[-1] == 999 and strong[0] == 0 and sum(strong) > sum(space_timesteps(1000, "50"))
    with pytest.raises(ValueError, match="shift"):
        sample(model, flow, noise.shape, y=y, steps=3, noise=noise, progress=False, shift=0.0)


def test_gaussian_sampling_honours_shift():
    torch.manual_seed(0)
    model, obj = randomised(DiT(**SMALL)), create_diffusion("", learn_sigma=True)
    y, noise = torch.tensor([0, 1]), torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(10))
    plain = sample(model, obj, noise.shape, y=y, steps=6, sampler="ddim", noise=noise, progress=False)
    one = sample(model, obj, noise.shape, y=y, steps=6, sampler="ddim", noise=noise, progress=False, shift=1.0)
    three = sample(model, obj, noise.shape, y=y, steps=6, sampler="ddim", noise=noise, progress=False, shift=3.0)
    assert torch.equal(plain.float(), one.float()) or math.isclose(float((plain - one).abs().max()), 0.0, abs_tol=1e-6)
    assert not torch.allclose(plain, three, atol=1e-4)


def test_a_run_keeps_its_autoguidance_model_and_samples_with_it(tmp_path):
    from ditkit.pipeline import Pipeline
    from ditkit import checkpoint as ckpt
    from ditkit.train import train

    run = tmp_path / "run"
    c = build_config(None, {"out": str(run)}, [
        *TINY_ARGS, "steps=4", "sample_guide_step=2", "sample.guide_scale=2.0", "sample.guide_unconditional=true",
        "sample.cfg_interval=[0.1, 0.9]", 'model_args={"mlp": "swiglu", "pos_embed": "rope"}',
        "velocity_cosine_weight=0.5", "ema_std=0.1"])
    train(c, progress=False)
    pipe = Pipeline.load(run)
    assert pipe.guide is not None and pipe.model.config["mlp"] == "swiglu"
    # the guide is the EMA at step 2, not the final one
    final = ckpt.load_weights(ckpt.latest_checkpoint(run), "ema.safetensors")
    assert not all(torch.equal(v, final[k]) for k, v in pipe.guide.state_dict().items())
    guidance = pipe.sample_kwargs(pipe.settings())["guidance"]
    assert guidance.guide_model is pipe.guide and guidance.unconditional and guidance.scale == 2.0
    assert guidance.cfg == CFG(pipe.settings()["cfg"], (0.1, 0.9)) and guidance.interval is None
    with pytest.raises(ValueError, match="sample_guide_step"):
        build_config(None, {}, ["sample_guide_step=0"])
    short = tmp_path / "short"  # a run shorter than the guide step samples without a guide, silently
    train(build_config(None, {"out": str(short)}, [*TINY_ARGS, "steps=2", "sample_guide_step=400"]), progress=False)
    assert Pipeline.load(short).guide is None and not (short / "guide").exists()


def test_a_saved_config_round_trips_with_every_field():
    """A run saves every field, so loading its config gives back what it trained and sampled with."""
    from ditkit.config import TrainConfig

    chosen = build_config(None, {}, ["mlp=gelu", "sample.cfg_interval=none", "sample.shift=none"])
    assert TrainConfig.from_dict(chosen.to_dict()) == chosen
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
