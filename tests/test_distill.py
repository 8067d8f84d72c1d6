"""Trajectory distillation: the teacher's ODE on closed-form Gaussian data, the rows drawn from the generator,
the loss, the config's options, and one-step runs saved in the meanflow_* keys (tests/data/old_onestep_run:
written by ditkit with trajectory distillation inside MeanFlow, with what its `ditkit sample --steps 1` wrote).

Data x0 ~ N(mu, sigma^2 I) as in test_meanflow.py, where the exact average velocity u is known in closed form.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_meanflow import FLOW, TINY, ExactAverageVelocity, MU, SIGMA, exact_u

from ditkit.diffusion import AverageVelocity, TrajectoryDistillation
from ditkit.diffusion.distill import TrajectoryPairs

OLD_RUN = Path(__file__).parent / "data" / "old_onestep_run"


def exact_teacher_trajectories(count=64, steps=8):
    tr = TrajectoryDistillation(ExactAverageVelocity(), trajectories=count, heun_steps=steps, adaptive_p=0.0)
    tr.make_trajectories((1, 2, 2), num_classes=3, generator=torch.Generator().manual_seed(0))
    return tr


def flow_map_error(tr):
    """The largest distance of the trajectories' states from the exact flow map of their noise z_1:
    z_r = z_1 - (1 - r) u(z_1, r, 1)."""
    z1, n = tr.states[:, 0], len(tr.states)
    return max((tr.states[:, i] - (z1 - (1 - r) * exact_u(z1, torch.ones(n), torch.full((n,), r)))).abs().max().item()
               for i, r in enumerate(tr.times.tolist()))


def test_teacher_trajectories_solve_the_teachers_ode_and_give_exact_average_velocities():
    coarse, fine = exact_teacher_trajectories(steps=8), exact_teacher_trajectories(steps=32)
    tr = fine.trajectories
    assert tr.states.shape == (64, 33, 1, 2, 2) and torch.equal(tr.labels, torch.arange(64) % 3)
    assert tr.times[0] == 1 and tr.times[-1] == 0 and (tr.times.diff() < 0).all()
    assert torch.equal(tr.states[:, 0], coarse.trajectories.states[:, 0])  # the same noises from the generator
    # Heun's second order: 4x the steps, about 16x closer to the exact map (first order would give 4x)
    assert flow_map_error(tr) < 3e-3 and flow_map_error(coarse.trajectories) > 8 * flow_map_error(tr)
    assert (tr.states[:, -1] - (MU + SIGMA * tr.states[:, 0])).abs().max() < 3e-3
    # so the exact u has almost zero loss on every row (what is left is the 32-step solve's error), and the
    # instantaneous velocity does not
    rows = fine.sample_t(64, torch.Generator().manual_seed(1))
    x0, y = torch.zeros(64, 1, 2, 2), torch.zeros(64, dtype=torch.long)  # the batch's images are not used
    assert fine.training_losses(ExactAverageVelocity(), x0, rows, {"y": y})["mse"].max() < 1e-4

    class InstantaneousOnly(ExactAverageVelocity):
        def forward(self, z, t, y=None, force_drop_ids=None, interval=None):
            return super().forward(z, t, y, force_drop_ids, None if interval is None else 0 * interval)

    whole = (rows.i == 0) & (rows.j == 32)
    mse = fine.training_losses(InstantaneousOnly(), x0, rows, {"y": y})["mse"]
    assert mse[whole].mean() > 0.05  # 0.09 E xi^2


def test_trajectory_rows_are_integers_drawn_from_the_generator():
    tr = exact_teacher_trajectories(count=10, steps=4)
    a, b = (tr.sample_t(4000, torch.Generator().manual_seed(5)) for _ in range(2))
    assert isinstance(a, TrajectoryPairs) and len(a) == 4000
    assert all(torch.equal(x, y) and x.dtype == torch.long for x, y in zip((a.k, a.i, a.j), (b.k, b.i, b.j)))
    assert (a.k >= 0).all() and (a.k < 10).all() and (a.i >= 0).all() and (a.i < a.j).all() and (a.j <= 4).all()
    whole = ((a.i == 0) & (a.j == 4)).float().mean().item()  # half by choice, plus 1 in 10 of the uniform pairs
    assert abs(whole - (0.5 + 0.5 / 10)) < 0.04
    # a process's rows are a slice of the global batch's, moved like a tensor
    part = a[1000:2000].to("cpu")
    assert torch.equal(part.i, a.i[1000:2000]) and len(part) == 1000
    # the trajectories are the generator's first draws
    assert torch.equal(torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(5)), a.k)


def test_the_loss_regresses_the_pair_velocity_with_the_trajectorys_label_never_dropped():
    tr = exact_teacher_trajectories(count=6, steps=4)
    rows = TrajectoryPairs(torch.tensor([0, 4, 5]), torch.tensor([0, 1, 2]), torch.tensor([4, 3, 4]))
    seen = {}

    def model(z, t, interval=None, y=None, force_drop_ids=None):
        seen.update(z=z, t=t, interval=interval, y=y, drop=force_drop_ids)
        return torch.zeros_like(z)

    kwargs = {"y": torch.tensor([2, 2, 2]), "force_drop_ids": torch.tensor([1, 1, 0])}
    out = tr.training_losses(model, torch.zeros(3, 1, 2, 2), rows, kwargs)
    states, times = tr.trajectories.states, tr.trajectories.times
    t, r = times[rows.i], times[rows.j]
    v = (states[rows.k, rows.i] - states[rows.k, rows.j]) / (t - r).reshape(-1, 1, 1, 1)
    assert torch.equal(seen["z"], states[rows.k, rows.i]) and torch.equal(seen["y"], torch.tensor([0, 1, 2]))
    assert torch.equal(seen["drop"], torch.zeros(3, dtype=torch.long))
    assert torch.allclose(seen["t"], t * tr.time_scale) and torch.allclose(seen["interval"], (t - r) * tr.time_scale)
    assert torch.allclose(out["mse"], (v ** 2).mean(dim=(1, 2, 3)))
    assert torch.allclose(out["loss"], out["mse"])  # adaptive_p = 0: the plain squared error
    with pytest.raises(ValueError, match="make_trajectories"):
        TrajectoryDistillation(ExactAverageVelocity(), trajectories=2).training_losses(model, torch.zeros(3, 1, 2, 2),
                                                                                      rows, kwargs)


def test_the_teachers_guidance_is_its_cfg_on_its_interval():
    from test_meanflow import LabelField, bc

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 1, 2, 2, generator=g)
    y, t = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0.1, 0.5, 0.75, 0.76, 0.9, 1.0])
    tr = TrajectoryDistillation(LabelField(), cfg_scale=2.5, cfg_interval=(0.0, 0.75))
    field = tr.guided_velocity(tr.teacher, z, t, {"y": y}, tr.cfg_scale, tr.cfg_interval)
    v_cond, v_null = z * bc(y + 1.0, z), 4 * z
    assert torch.allclose(field, torch.where(bc(t <= 0.75, z), v_null + 2.5 * (v_cond - v_null), v_cond))
    for bad, match in [({"cfg_interval": (0.8, 0.2)}, "cfg_interval must be"), ({"cfg_scale": 0.5}, "cfg_scale"),
                       ({"trajectories": 0}, "trajectories and heun_steps must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            TrajectoryDistillation(LabelField(), **bad)
    with pytest.raises(ValueError, match="teacher="):
        TrajectoryDistillation().make_trajectories((1, 2, 2), 3)


def test_distill_config_errors_name_the_option(tmp_path):
    from ditkit.train import TrainConfig, build_config

    flow_file = tmp_path / "flow.yaml"
    flow_file.write_text("objective: flow\n")
    distill = dict(TINY, objective="distill", base=str(flow_file))
    assert TrainConfig.from_dict(distill).distill_trajectories == 2048
    for bad, match in [({"base": None}, "objective=distill distils a flow run's trajectories: set base="),
                       ({"distill_trajectories": 0}, "distill_trajectories and distill_heun_steps must be >= 1"),
                       ({"distill_heun_steps": 0}, "distill_trajectories and distill_heun_steps must be >= 1"),
                       ({"distill_cfg": 0.5}, "meanflow_cfg and distill_cfg must be >= 1"),
                       ({"distill_cfg_interval": [0.9, 0.1]}, "distill_cfg_interval must be"),
                       ({"distill_cfg": 2.0, "class_dropout_prob": 0.0}, "lacks: set distill_cfg=1"),
                       ({"meanflow_teacher": True}, "meanflow_teacher=true .* needs objective=meanflow")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict({**distill, **bad})
    with pytest.raises(ValueError, match="unknown config key 'meanflow_trajectories'"):  # in a config, not saved
        build_config(values=distill, assignments=["meanflow_trajectories=8"])


def test_saved_meanflow_keys_map_to_the_distill_objective_or_are_refused():
    from ditkit.config import saved_one_step_keys
    from ditkit.train import TrainConfig

    saved = json.loads((OLD_RUN / "config.json").read_text())
    assert saved["objective"] == "meanflow" and saved["meanflow_trajectory_share"] == 1.0
    c = TrainConfig.from_dict(saved)
    assert (c.objective, c.distill_trajectories, c.distill_heun_steps, c.distill_cfg, c.distill_cfg_interval,
            c.meanflow_teacher) == ("distill", 8, 2, 2.5, (0.0, 0.75), False)
    base = json.loads((OLD_RUN / "base" / "config.json").read_text())  # a flow run: the keys are dropped
    assert TrainConfig.from_dict(base).objective == "flow"
    with pytest.raises(ValueError, match=r"mixed MeanFlow's identity with trajectory distillation \("
                                         r"meanflow_trajectory_share=0.5"):
        saved_one_step_keys({**saved, "meanflow_trajectory_share": 0.5})
    with pytest.raises(ValueError, match="meanflow_cfg_mix=0.4"):
        saved_one_step_keys({**saved, "meanflow_cfg_mix": 0.4})


def test_an_old_one_step_run_loads_and_samples_exactly_as_before():
    """old_onestep_samples.npz is what the old `ditkit sample --ckpt old_onestep_run --steps 1` wrote."""
    from ditkit.pipeline import Pipeline

    pipe = Pipeline.load(OLD_RUN, device="cpu")
    assert isinstance(pipe.objective, AverageVelocity)
    samples = pipe.generate(steps=1, n_per_class=8, progress=False)  # the old command's defaults
    expected = np.load(OLD_RUN.parent / "old_onestep_samples.npz")
    assert samples.labels.tolist() == expected["labels"].tolist()
    assert torch.allclose(samples.images, torch.from_numpy(expected["images"]), rtol=0, atol=1e-6)


def test_an_old_one_step_run_trains_and_resumes_as_a_distillation_run(tmp_path, monkeypatch):
    """The old run's saved config (objective=meanflow and the trajectory keys) trains again from its own flow
    base, and the old run itself resumes as a distillation run."""
    from ditkit.train import TrainConfig, resume_config, train

    shutil.copytree(OLD_RUN, tmp_path / OLD_RUN.name)
    monkeypatch.chdir(tmp_path)  # the run records its base as a path from where it was trained
    saved = json.loads((OLD_RUN / "config.json").read_text())
    again = train(TrainConfig.from_dict({**saved, "out": "again"}), progress=False)
    losses = [float(line.split(",")[1]) for line in (tmp_path / "again" / "metrics.csv").read_text().splitlines()[1:]]
    assert again.steps == 2 and len(losses) == 2 and np.isfinite(losses).all()
    assert json.loads((again.checkpoint / "run.json").read_text())["objective"] == "distill"
    resumed = train(resume_config(overrides={"out": OLD_RUN.name, "steps": 3}), resume=True, progress=False)
    assert resumed.start_step == 2 and resumed.steps == 3
    info = json.loads((resumed.checkpoint / "run.json").read_text())
    assert info["objective"] == "distill" and info["train_config"]["distill_trajectories"] == 8


def test_distillation_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    from ditkit.train import TrainConfig, train

    train(TrainConfig.from_dict(dict(**FLOW, steps=2, out=str(tmp_path / "flow"))), progress=False)
    settings = dict(TINY, objective="distill", base=str(tmp_path / "flow"), distill_trajectories=6,
                    distill_heun_steps=2, distill_cfg=2.0, warmup_steps=1, lr=1e-3)
    whole = train(TrainConfig.from_dict({**settings, "steps": 3, "out": str(tmp_path / "whole")}), progress=False)
    train(TrainConfig.from_dict({**settings, "steps": 1, "out": str(tmp_path / "parts")}), progress=False)
    parts = train(TrainConfig.from_dict({**settings, "steps": 3, "out": str(tmp_path / "parts")}), resume=True,
                  progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(r.checkpoint / name)) for r in (whole, parts))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a distilled run samples as any one-step run: one model call
    from ditkit.pipeline import Pipeline

    pipe = Pipeline.load(tmp_path / "whole", device="cpu")
    assert isinstance(pipe.objective, TrajectoryDistillation) and pipe.objective.teacher is None
    calls = []
    pipe.model.register_forward_hook(lambda *a: calls.append(1))
    samples = pipe.generate(n_per_class=1, progress=False)
    assert len(calls) == 1 and torch.isfinite(samples.images).all()
