"""MeanFlow: the maths on closed-form Gaussian data, the two-time DiT, the samplers, training.

Data x0 ~ N(mu, sigma^2 I), noise ~ N(0, I), z_t = (1 - t) x0 + t noise. The probability-flow map keeps
the standardised coordinate xi = (z_t - (1 - t) mu) / s_t, s_t = sqrt((1 - t)^2 sigma^2 + t^2), so the
exact average velocity is u(z, r, t) = (z_t - z_r) / (t - r) = -mu + (s_t - s_r) / (t - r) xi, and the
exact (marginal) velocity v(z, t) = -mu + s_t' xi with s_t' = (t - (1 - t) sigma^2) / s_t.
"""
import math

import pytest
import torch

import ditkit
from ditkit.diffusion import FLOW_TIME_SCALE, FlowMatching
from ditkit.diffusion.meanflow import MeanFlow
from ditkit.models import DiT

MU, SIGMA = 0.7, 0.3


def s_of(t):
    return torch.sqrt((1 - t) ** 2 * SIGMA**2 + t**2)


def bc(a, like):
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def exact_u(z, t, r):
    xi = (z - bc(1 - t, z) * MU) / bc(s_of(t), z)
    h = t - r
    safe = torch.where(h > 0, h, torch.ones_like(h))
    slope = torch.where(h > 0, (s_of(t) - s_of(r)) / safe, (t - (1 - t) * SIGMA**2) / s_of(t))
    return -MU + bc(slope, z) * xi


def exact_v(z, t):
    return exact_u(z, t, t)


class ExactAverageVelocity(torch.nn.Module):
    """The closed-form u as a model with DiT's call signature (times x FLOW_TIME_SCALE)."""

    def forward(self, z, t, y=None, force_drop_ids=None, interval=None):
        t = t / FLOW_TIME_SCALE
        r = t - (interval / FLOW_TIME_SCALE if interval is not None else 0)
        return exact_u(z, t, r)


def tiny_dit(interval_embed=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=3,
                learn_sigma=False, interval_embed=interval_embed, **kw)
    with torch.no_grad():  # zero-initialised layers would hide the dependence on t, r and z
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def times(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return t, r


def test_exact_u_satisfies_the_meanflow_identity():
    # with the exact u and the marginal v, the JVP target v - (t - r) du/dt is u itself
    t, r = times(6)
    z = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, u_tgt = MeanFlow().jvp_target(ExactAverageVelocity(), z, t, r, exact_v(z, t))
    assert torch.allclose(u, exact_u(z, t, r), atol=1e-12)
    assert torch.allclose(u_tgt, u, atol=1e-10)


def float64_timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None].double() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("model", ["exact", "dit"])
def test_jvp_target_equals_the_finite_difference_derivative(model, monkeypatch):
    # DiT embeds t in float32 (as the original) with frequencies up to 1 per 1/1000 of flow time: a difference
    # quotient needs a step far below float32's resolution, so this test embeds in float64
    from ditkit.models.layers import TimestepEmbedder

    monkeypatch.setattr(TimestepEmbedder, "timestep_embedding", staticmethod(float64_timestep_embedding))
    fn = ExactAverageVelocity() if model == "exact" else tiny_dit().double()
    C = 1 if model == "exact" else 2
    size = 4 if model == "exact" else 8
    t, r = times(5, seed=2)
    r[0] = t[0]  # an r = t pair: its target is v itself
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, C, size, size, generator=g, dtype=torch.float64)
    v = torch.randn(5, C, size, size, generator=g, dtype=torch.float64)
    kwargs = {} if model == "exact" else {"y": torch.tensor([0, 1, 2, 0, 3])}
    mf = MeanFlow()
    _, u_tgt = mf.jvp_target(fn, z, t, r, v, kwargs)

    def u(z_, t_):  # r held fixed
        return mf.average_velocity(fn, z_, t_, r, kwargs)

    eps, tol = (1e-5, 1e-9) if model == "exact" else (1e-7, 1e-6)
    with torch.no_grad():
        dudt = (u(z + eps * v, t + eps) - u(z - eps * v, t - eps)) / (2 * eps)
    expected = v - bc(t - r, v) * dudt
    assert (u_tgt - expected).abs().max().item() < tol * expected.abs().max().item()
    assert torch.equal(u_tgt[0], v[0])


def test_jvp_runs_on_the_bf16_cpu_attention_path_and_with_gradient_checkpointing():
    model = tiny_dit().train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 8, 8, generator=g)
    noise = torch.randn(6, 2, 8, 8, generator=g)
    pairs = MeanFlow(unequal_fraction=1.0).sample_t(6, g)
    kwargs = {"y": torch.tensor([0, 1, 2, 0, 1, 2]), "force_drop_ids": torch.tensor([0, 0, 1, 0, 0, 0])}
    mf = MeanFlow()
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mf.training_losses(model, x0, pairs, kwargs, noise)["loss"].mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert torch.isfinite(loss)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    # and the bf16 JVP agrees with the fp64 one to bf16 accuracy
    t, r = pairs[:, 0], pairs[:, 1]
    z = mf.q_sample(x0, t, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = mf.jvp_target(model, z, t, r, noise - x0, kwargs)
    model.grad_checkpointing = False
    _, high = mf.jvp_target(model.double(), z.double(), t.double(), r.double(), (noise - x0).double(), kwargs)
    assert (low.double() - high).abs().max() < 0.05 * high.abs().max()


def test_exact_u_gives_exact_one_step_and_few_step_samples():
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 2, 5):
        x = ditkit.sample(ExactAverageVelocity(), MeanFlow(), noise.shape, noise=noise, steps=steps, progress=False)
        # z_1 = noise = xi, so the exact jump lands on mu + sigma xi for every sample (the sampler's times are
        # float32, hence the tolerance)
        assert torch.allclose(x, MU + SIGMA * noise, atol=1e-6), steps
    assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - SIGMA) < 0.01


def test_one_euler_step_of_the_instantaneous_velocity_is_not_exact_and_warns():
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(UserWarning, match="1 euler step on a flow-matching"):
        x = ditkit.sample(ExactAverageVelocity(), FlowMatching(), noise.shape, noise=noise, steps=1,
                          sampler="euler", progress=False)
    # Euler from t = 1 with v(z, 1) = -mu + z: x = mu, every sample collapses to the mean
    assert torch.allclose(x, torch.full_like(x, MU), atol=1e-12)


class LabelField(torch.nn.Module):
    """u(z, t, t | y) = z * (y + 1) (null label 3 -> 4 z), so every term of the guided field is visible."""

    num_classes = 3

    def forward(self, z, t, y, force_drop_ids=None, interval=None):
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids == 1, torch.full_like(y, self.num_classes), y)
        return z * bc((y + 1).to(z.dtype), z)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_cfg_folded_target_equals_the_formula(w):
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    drop = torch.tensor([0, 0, 1, 0, 1, 0])
    t = torch.rand(6, generator=g)
    field = MeanFlow(cfg_scale=w).guided_field(LabelField(), z, t, v, {"y": y, "force_drop_ids": drop})
    expected = w * v + (1 - w) * 4 * z  # the null label's u is 4 z
    expected[drop == 1] = v[drop == 1]  # dropped labels learn the unguided field
    assert torch.allclose(field, expected, atol=1e-6)


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_a_teacher_field_is_the_teachers_guided_velocity(w):
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    drop = torch.tensor([0, 0, 1, 0, 1, 0])
    t = torch.rand(6, generator=g)
    field = MeanFlow(cfg_scale=w, teacher=LabelField()).guided_field(torch.nn.Identity(), z, t, v,
                                                                     {"y": y, "force_drop_ids": drop})
    v_cond, v_null = z * bc(y + 1.0, z), 4 * z
    expected = v_null + w * (v_cond - v_null)
    expected[drop == 1] = v_null[drop == 1]  # the noise - x0 estimate v plays no part
    assert torch.allclose(field, expected, atol=1e-6)


def test_with_the_exact_teacher_the_exact_u_has_zero_loss_where_noise_minus_x0_does_not():
    # the teacher's velocity is the marginal v that noise - x0 estimates: same target mean, no variance
    g = torch.Generator().manual_seed(3)
    x0 = MU + SIGMA * torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.stack(times(64, seed=4), dim=1)
    t[::4, 1] = t[::4, 0]  # some r = t pairs too
    plain = MeanFlow(adaptive_p=0.0).training_losses(ExactAverageVelocity(), x0, t)["mse"]
    taught = MeanFlow(adaptive_p=0.0, teacher=ExactAverageVelocity()).training_losses(ExactAverageVelocity(), x0, t)
    assert plain.mean() > 0.1
    assert taught["mse"].max() < 1e-18


@pytest.mark.parametrize("teacher", [False, True])
def test_folded_guidance_applies_only_inside_its_interval(teacher):
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    y, t = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0.1, 0.5, 0.75, 0.76, 0.9, 1.0])
    mf = MeanFlow(cfg_scale=2.5, cfg_interval=(0.0, 0.75), teacher=LabelField() if teacher else None)
    field = mf.guided_field(LabelField(), z, t, v, {"y": y})
    u_cond, u_null = z * bc(y + 1.0, z), 4 * z
    if teacher:  # w = 1 outside the interval: the teacher's conditional velocity
        expected = torch.where(bc(t <= 0.75, z), u_null + 2.5 * (u_cond - u_null), u_cond)
    else:  # outside it, the unguided field v
        expected = torch.where(bc(t <= 0.75, z), 2.5 * v - 1.5 * u_null, v)
    assert torch.allclose(field, expected, atol=1e-6)
    with pytest.raises(ValueError, match="cfg_interval must be"):
        MeanFlow(cfg_interval=(0.8, 0.2))


def test_time_pairs_come_from_the_generator_with_the_asked_share_of_r_equal_t():
    mf = MeanFlow(unequal_fraction=0.25)
    a = mf.sample_t(20000, torch.Generator().manual_seed(5))
    b = mf.sample_t(20000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (20000, 2)
    t, r = a[:, 0], a[:, 1]
    assert ((r <= t) & (r > 0) & (t < 1)).all()
    assert abs((r < t).float().mean().item() - 0.25) < 0.01
    # logit-normal(-0.4, 1): the median of one draw is sigmoid(-0.4); t is the larger of two
    assert abs(torch.logit(t).median().item() - (-0.4 + 0.545)) < 0.03  # median of the max of two normals
    with pytest.raises(ValueError, match="unequal_fraction"):
        MeanFlow(unequal_fraction=1.5)


def test_interval_embedder_is_zero_initialised_and_absent_unless_asked():
    plain = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=3)
    assert not any(k.startswith("interval_embedder") for k in plain.state_dict())
    assert "interval_embed" not in plain.config
    torch.manual_seed(0)
    two = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=3,
              interval_embed=True)
    state = {k: v for k, v in two.state_dict().items() if not k.startswith("interval_embedder")}
    plain.load_state_dict(state)  # a flow checkpoint fits every other key
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 900.0]), torch.tensor([0, 3])
    for p in two.final_layer.parameters():
        torch.nn.init.normal_(p)
    plain.final_layer.load_state_dict(two.final_layer.state_dict())
    assert torch.equal(two(x, t, y, interval=torch.tensor([100.0, 500.0])), plain(x, t, y))
    with pytest.raises(ValueError, match="interval_embed=True"):
        plain(x, t, y, interval=torch.tensor([1.0, 2.0]))


def test_interval_scale_is_how_the_embedder_reads_t_minus_r_and_is_saved():
    torch.manual_seed(0)
    one = tiny_dit()
    scaled = DiT(**{**{k: v for k, v in one.config.items()}, "interval_scale": 0.01})
    scaled.load_state_dict(one.state_dict())
    assert scaled.config["interval_scale"] == 0.01 and "interval_scale" not in one.config
    x, t, y, h = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 900.0]), torch.tensor([0, 2]), torch.tensor([100., 500.])
    with torch.no_grad():
        assert torch.equal(scaled(x, t, y, interval=h), one(x, t, y, interval=h * 0.01))
    # MeanFlow runs embed t - r x 1000 x 0.01 unless meanflow_interval_scale says otherwise
    from ditkit.train import build_config
    from ditkit.train.kinds import make_kind

    assert make_kind(build_config(values=TINY)).build().interval_scale == 0.01
    assert make_kind(build_config(values={**TINY, "meanflow_interval_scale": 1.0})).build().interval_scale == 1.0


TINY = dict(data="patterns", image_size=8, channels=2, hidden_size=32, depth=2, num_heads=4, patch_size=2,
            batch_size=8, warmup_steps=2, log_every=1, samples_per_class=1, objective="meanflow", meanflow_cfg=2.0,
            sample={"sampler": "meanflow", "steps": 1, "cfg_scale": 1.0}, precision="bf16")
FLOW = {**TINY, "objective": "flow", "sample": {**TINY["sample"], "sampler": "heun", "steps": 2}}


def test_meanflow_training_resumes_bit_identically_and_samples_in_one_call(tmp_path):
    from safetensors.torch import load_file

    from ditkit.pipeline import Pipeline
    from ditkit.train import TrainConfig, train
    from ditkit import checkpoint as ckpt

    straight = train(TrainConfig.from_dict(dict(**TINY, steps=4, save_every=2, out=str(tmp_path / "a"))),
                     progress=False)
    assert math.isfinite(straight.final_loss)
    train(TrainConfig.from_dict(dict(**TINY, steps=4, save_every=2, out=str(tmp_path / "b"))), progress=False)
    # resume from step 2 of b: remove its step-4 checkpoint and continue
    import shutil

    shutil.rmtree(ckpt.step_dir(tmp_path / "b", 4))
    train(TrainConfig.from_dict(dict(**TINY, steps=4, save_every=2, out=str(tmp_path / "b"))), resume=True,
          progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(ckpt.latest_checkpoint(tmp_path / "a") / name))
        b = load_file(str(ckpt.latest_checkpoint(tmp_path / "b") / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    pipe = Pipeline.load(tmp_path / "a")
    assert isinstance(pipe.objective, MeanFlow) and pipe.model.interval_embedder is not None

    calls = []
    pipe.model.register_forward_hook(lambda *a: calls.append(1))
    x = ditkit.sample(pipe.model, pipe.objective, (4, 2, 8, 8), y=torch.tensor([0, 1, 2, 3]), progress=False)
    assert len(calls) == 1 and x.shape == (4, 2, 8, 8) and torch.isfinite(x).all()


def test_meanflow_fine_tunes_from_a_flow_run(tmp_path):
    from ditkit.train import TrainConfig, train
    from ditkit import checkpoint as ckpt

    train(TrainConfig.from_dict(dict(**FLOW, steps=2, out=str(tmp_path / "flow"))), progress=False)
    tune = dict(**{**TINY, "warmup_steps": 1}, steps=1, lr=1e-12, base=str(tmp_path / "flow"), out=str(tmp_path / "mf"))
    run = train(TrainConfig.from_dict(tune), progress=False)
    from safetensors.torch import load_file

    base = load_file(str(ckpt.latest_checkpoint(tmp_path / "flow") / "ema.safetensors"))
    tuned = load_file(str(run.checkpoint / "model.safetensors"))
    assert all(torch.allclose(base[k].float(), tuned[k].float(), atol=1e-6) for k in base)
    assert any(k.startswith("interval_embedder") for k in tuned)
    def whole_and_resumed(settings, name):
        """Weights after 2 steps in one run and after 1 + a resumed 1."""
        whole = train(TrainConfig.from_dict({**settings, "steps": 2, "out": str(tmp_path / f"{name}2")}),
                      progress=False)
        train(TrainConfig.from_dict({**settings, "steps": 1, "out": str(tmp_path / f"{name}11")}), progress=False)
        again = train(TrainConfig.from_dict({**settings, "steps": 2, "out": str(tmp_path / f"{name}11")}),
                      resume=True, progress=False)
        return [load_file(str(r.checkpoint / "model.safetensors")) for r in (whole, again)]

    # with the base as teacher: a resumed run rebuilds the teacher from the base, not from its own checkpoint
    taught = {**tune, "lr": 1e-3, "meanflow_teacher": True}
    a, b = whole_and_resumed(taught, "t")
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["final_layer.linear.weight"],
                                                                       tuned["final_layer.linear.weight"])
    # trajectory distillation from the same base: a resumed run makes the same trajectories again from its seed
    c, d = whole_and_resumed({**tune, "lr": 1e-3, "objective": "distill", "distill_trajectories": 6,
                              "distill_heun_steps": 2, "distill_cfg": 2.0, "distill_cfg_interval": [0, 0.75]}, "j")
    assert all(torch.equal(c[k], d[k]) for k in c) and not torch.equal(c["final_layer.linear.weight"],
                                                                       a["final_layer.linear.weight"])
    with pytest.raises(ValueError, match="must be a flow-matching run"):
        train(TrainConfig.from_dict(dict(**TINY, steps=1, base=str(tmp_path / "mf"), out=str(tmp_path / "mf2"))),
              progress=False)
    # the GELU form is not in the keys, so a base with another MLP activation is refused by name
    with pytest.raises(ValueError, match="has mlp gelu_erf but this config builds mlp gelu: add mlp=gelu_erf"):
        train(TrainConfig.from_dict({**tune, "mlp": "gelu", "out": str(tmp_path / "mf3")}), progress=False)
    assert not (tmp_path / "mf3" / "checkpoints").exists()


def test_a_two_phase_config_trains_its_flow_base_first_and_resumes_in_either_phase(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from ditkit.train import build_config, resume_config, train
    from ditkit import checkpoint as ckpt

    flow_file = tmp_path / "flow.json"
    flow = {**FLOW, "out": "ignored"}
    flow_file.write_text(json.dumps({**flow, "steps": 1}))
    out = tmp_path / "onestep"
    mf = dict(**{**TINY, "warmup_steps": 1}, steps=1, lr=1e-12, base=str(flow_file), out=str(out))
    # a run stopped in its flow phase (here: that phase's config asked for 1 step, now 3) resumes there
    train(build_config(str(flow_file), {"out": str(out / "base")}), progress=False)
    flow_file.write_text(json.dumps({**flow, "steps": 3}))
    config_file = tmp_path / "mf.json"
    config_file.write_text(json.dumps(mf))
    resumed = resume_config(str(config_file))  # no MeanFlow checkpoint yet: the config as given
    assert resumed.base == str(flow_file)
    run = train(resumed, resume=True)
    assert "resuming from step 1" in capsys.readouterr().out
    base_ckpt = ckpt.latest_checkpoint(out / "base")
    assert base_ckpt.name == ckpt.step_dir(out, 3).name
    assert json.loads((out / "base" / "finished.json").read_text())["steps"] == 3
    # phase 2 started from the flow run's EMA weights (lr 1e-12 keeps them), its base now that run
    base = load_file(str(base_ckpt / "ema.safetensors"))
    tuned = load_file(str(run.checkpoint / "model.safetensors"))
    assert all(torch.allclose(base[k].float(), tuned[k].float(), atol=1e-6) for k in base)
    assert json.loads((out / "config.json").read_text())["base"] == str(out / "base")
    # resuming the MeanFlow phase leaves the finished flow run alone
    before = (base_ckpt / "model.safetensors").stat().st_mtime_ns
    config_file.write_text(json.dumps({**mf, "steps": 2}))
    again = train(resume_config(str(config_file)), resume=True, progress=False)
    assert again.start_step == 1 and again.steps == 2
    assert (base_ckpt / "model.safetensors").stat().st_mtime_ns == before
    assert len(ckpt.list_checkpoints(out / "base")) == 2  # steps 1 and 3, nothing new


def test_a_base_config_file_is_checked_before_anything_runs(tmp_path):
    from ditkit.train import TrainConfig, build_config

    with pytest.raises(FileNotFoundError, match="base=nowhere.yaml: config file not found"):
        TrainConfig.from_dict(dict(TINY, base="nowhere.yaml"))
    flow_file = tmp_path / "flow.yaml"
    flow_file.write_text("objective: flow\n")
    with pytest.raises(ValueError, match="only objective=meanflow or distill trains a base run first"):
        TrainConfig.from_dict(dict(TINY, objective="flow", base=str(flow_file)))
    with pytest.raises(ValueError, match="base_minutes is the time budget of a base=CONFIG_FILE run"):
        TrainConfig.from_dict(dict(TINY, base_minutes=3.0))
    with pytest.raises(ValueError, match="base_minutes must be > 0"):
        TrainConfig.from_dict(dict(TINY, base=str(flow_file), base_minutes=0))
    with pytest.raises(ValueError, match="meanflow_teacher=true takes its velocity from the base run"):
        TrainConfig.from_dict(dict(TINY, meanflow_teacher=True))
    with pytest.raises(ValueError, match="meanflow_cfg and distill_cfg must be >= 1"):
        TrainConfig.from_dict(dict(TINY, meanflow_cfg=0.5))
    with pytest.raises(ValueError, match="meanflow_cfg_interval must be"):
        TrainConfig.from_dict(dict(TINY, meanflow_cfg_interval=[0.5, 0.2]))
    # in a config file, base= is a path from that file's folder (as an include); given directly, from here
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "mf.yaml").write_text("objective: meanflow\nbase: ../flow.yaml\n")
    assert build_config(str(tmp_path / "one" / "mf.yaml")).base == str(tmp_path / "one" / ".." / "flow.yaml")


def test_a_small_time_scale_makes_du_dt_the_trajectorys_and_not_the_time_embeddings():
    """Fed t x 1000, DiT's top embedding frequency turns 1000 radians per unit of t, and the JVP's du/dt is
    that of wiggles on a 1e-3 scale: a difference quotient over 1e-3 of the time range misses it by 69%
    (|du/dt| 55,000 here). Fed t x 10, the quotient agrees to 0.08% (|du/dt| 330). Random-weight DiT, float32."""
    t, r = (a.float() for a in times(8, seed=2))
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(8, 2, 8, 8, generator=g), torch.randn(8, 2, 8, 8, generator=g)
    kwargs, eps = {"y": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}, 1e-3
    errors, sizes = {}, {}
    for scale in (FLOW_TIME_SCALE, 10.0):
        mf, model = MeanFlow(time_scale=scale), tiny_dit()
        _, u_tgt = mf.jvp_target(model, z, t, r, v, kwargs)
        dudt = (v - u_tgt) / bc(t - r, v)
        with torch.no_grad():
            quotient = (mf.average_velocity(model, z + eps * v, t + eps, r, kwargs)
                        - mf.average_velocity(model, z - eps * v, t - eps, r, kwargs)) / (2 * eps)
        errors[scale] = ((quotient - dudt).norm() / dudt.norm()).item()
        sizes[scale] = dudt.norm().item()
    assert errors[10.0] < 0.01 and errors[FLOW_TIME_SCALE] > 0.3
    assert sizes[FLOW_TIME_SCALE] > 20 * sizes[10.0]


def test_a_time_scale_trains_loads_and_is_held_by_the_base_and_its_meanflow_run(tmp_path):
    import json

    from ditkit.pipeline import Pipeline
    from ditkit.train import TrainConfig, build_config, train

    flow = {**FLOW, "flow_time_scale": 10.0}
    train(TrainConfig.from_dict(dict(**flow, steps=1, out=str(tmp_path / "flow"))), progress=False)
    assert Pipeline.load(tmp_path / "flow").objective.time_scale == 10.0
    tune = dict(**TINY, steps=1, base=str(tmp_path / "flow"), meanflow_teacher=True, flow_time_scale=10.0,
                out=str(tmp_path / "mf"))
    train(TrainConfig.from_dict(tune), progress=False)
    pipe = Pipeline.load(tmp_path / "mf")
    assert isinstance(pipe.objective, MeanFlow) and pipe.objective.time_scale == 10.0
    seen = []
    pipe.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args[1], kwargs["interval"])),
                                         with_kwargs=True)
    ditkit.sample(pipe.model, pipe.objective, (2, 2, 8, 8), y=torch.tensor([0, 1]), progress=False)
    assert seen[0][0].tolist() == [10.0, 10.0] and seen[0][1].tolist() == [10.0, 10.0]
    with pytest.raises(ValueError, match="flow_time_scale=10 but this run has 1000: set flow_time_scale=10"):
        train(TrainConfig.from_dict({**tune, "flow_time_scale": 1000.0, "out": str(tmp_path / "mf2")}),
              progress=False)
    with pytest.raises(ValueError, match="flow_time_scale is for objective=flow, meanflow or distill"):
        TrainConfig.from_dict(dict(TINY, objective="ddpm", flow_time_scale=10.0))
    with pytest.raises(ValueError, match="flow_time_scale must be > 0"):
        TrainConfig.from_dict(dict(TINY, flow_time_scale=0.0))
    # a two-phase run trains its flow base with its own time scale
    flow_file = tmp_path / "flow.json"
    flow_file.write_text(json.dumps({**flow, "flow_time_scale": 1000.0, "steps": 1, "out": "ignored"}))
    two = build_config(values=dict(**TINY, steps=1, base=str(flow_file), flow_time_scale=10.0,
                                   out=str(tmp_path / "two")))
    train(two, progress=False)
    assert json.loads((tmp_path / "two" / "base" / "config.json").read_text())["flow_time_scale"] == 10.0
