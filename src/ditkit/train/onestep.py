"""One-step training from a TrainConfig: the two average-velocity objectives (MeanFlow, trajectory
distillation), the start from a flow-matching run (`base=RUN`), whose velocity model is the two-time model at
r = t, and the two-phase run (`base=CONFIG_FILE`) that trains that flow run first."""
from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditkit import checkpoint as ckpt
from ditkit.config import BASE_DIR, ONE_STEP, is_config_file
from ditkit.diffusion.distill import TrajectoryDistillation
from ditkit.diffusion.flow import FLOW_TIME_SCALE
from ditkit.diffusion.meanflow import MeanFlow
from ditkit.models.dit import RECIPE_DEFAULTS
from ditkit.train.phases import train_first_phase


def one_step_objective(c: Any, model: nn.Module) -> MeanFlow | TrajectoryDistillation:
    """The objective a one-step TrainConfig `c` asks for (its meanflow_* or distill_* fields). `model` is the
    two-time model before any update: started from the base run, so a frozen copy of it is that run's
    velocity model, the teacher (`meanflow_teacher`, and always for distillation)."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if c.objective == "distill" or c.meanflow_teacher \
        else None
    if c.objective == "distill":
        return TrajectoryDistillation(teacher, trajectories=c.distill_trajectories, heun_steps=c.distill_heun_steps,
                                      cfg_scale=c.distill_cfg, cfg_interval=c.distill_cfg_interval,
                                      time_scale=c.flow_time_scale)
    return MeanFlow(timestep_sampling=c.timestep_sampling, unequal_fraction=c.meanflow_unequal,
                    adaptive_p=c.meanflow_adaptive_p, cfg_scale=c.meanflow_cfg, teacher=teacher,
                    time_scale=c.flow_time_scale, cfg_interval=c.meanflow_cfg_interval, loss=c.meanflow_loss,
                    cfg_range=c.meanflow_cfg_range)


def make_trajectories(run: Any, progress: bool) -> None:
    """The teacher's trajectories a distillation run trains on, from its own seed: made again, identically,
    when the run resumes. Call it under the run's autocast, inside `minutes` (it is part of this phase's
    cost)."""
    if not isinstance(run.objective, TrajectoryDistillation):
        return
    data = run.kind.data
    with torch.no_grad():
        run.objective.make_trajectories(data.images.shape[1:], data.num_classes,
                                        torch.Generator().manual_seed(run.c.seed), run.dist.device,
                                        progress=progress and run.dist.is_main)


def load_base_weights(model: nn.Module, base: Path, time_scale: float = FLOW_TIME_SCALE) -> None:
    """Start `model` (a DiT with an interval embedder, fed times x `time_scale`) from a flow-matching
    checkpoint's EMA weights.

    Every key but the interval (and guidance) embedder's must be there with the same shape; those keep their
    zero-initialised output, so the start is exactly the base velocity model at r = t."""
    info_file = base / "run.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("objective") != "flow":
        raise ValueError(f"base={base} must be a flow-matching run to start a one-step model from, "
                         f"got objective={info.get('objective')}")
    base_scale = info.get("train_config", {}).get("flow_time_scale", FLOW_TIME_SCALE)
    if base_scale != time_scale:
        raise ValueError(f"base={base} was trained with flow_time_scale={base_scale:g} but this run has "
                         f"{time_scale:g}: set flow_time_scale={base_scale:g} (and meanflow_interval_scale="
                         f"{10 / base_scale:g}, which keeps the interval's t - r x 10)")
    config_file = base / "config.json"  # the MLP's activation is not in the keys: compare it by name
    paper = RECIPE_DEFAULTS["mlp"]
    base_mlp = json.loads(config_file.read_text()).get("mlp", paper) if config_file.is_file() else paper
    own_mlp = getattr(model, "config", {}).get("mlp", paper)
    if base_mlp != own_mlp:
        raise ValueError(f"base={base} has mlp {base_mlp} but this config builds mlp {own_mlp}: "
                         f"add mlp={base_mlp}")
    weights = "ema.safetensors" if (base / "ema.safetensors").is_file() else "model.safetensors"
    state = ckpt.load_weights(base, weights)
    own = model.state_dict()
    wrong = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    fresh = ("interval_embedder.", "guidance_embedder.")  # the two-time model's own, zero-initialised inputs
    missing = sorted(k for k in own if k not in state and not k.startswith(fresh))
    if wrong or missing:
        raise ValueError(f"base={base} does not fit this model (set the same model fields as the base run): "
                         f"unexpected or differently shaped {wrong[:4]}, missing {missing[:4]}")
    model.load_state_dict(state, strict=False)


def _check_flow(c: Any) -> Callable[[Any], None]:
    def check(base: Any) -> None:
        if base.objective != "flow":
            raise ValueError(f"base={c.base} must describe a flow-matching run (objective: flow) to start "
                             f"{c.objective} from, got objective={base.objective}")
    return check


def train_flow_base(c: Any, resume: bool, progress: bool, train: Callable[..., Any]) -> tuple[Any, bool]:
    """The first phase of a two-phase one-step run: with objective=meanflow or distill and base= a flow config
    file, train that flow run into OUT/base (for base_minutes if set, with this run's seed), then return the
    config with base= that run, and whether the one-step phase resumes (it has checkpoints). A run stopped in
    the first phase resumes there; one already past it skips it."""
    if c.objective not in ONE_STEP or not is_config_file(c.base):
        return c, resume
    # the flow run is fed time as this run is: the one-step model starts from its weights
    overrides = {"seed": c.seed, "minutes": c.base_minutes, "flow_time_scale": c.flow_time_scale}
    out = train_first_phase("base", c.base, Path(c.out) / BASE_DIR, overrides, f"the flow run {c.base}",
                            f"{c.objective} from its newest checkpoint", progress, train, _check_flow(c))
    return dataclasses.replace(c, base=str(out)), resume and bool(ckpt.list_checkpoints(c.out))
