"""Objectives: Gaussian diffusion (the original DiT recipe), flow matching, and the one-step (average-velocity)
objectives MeanFlow and trajectory distillation, with their samplers."""
from __future__ import annotations

from ditkit.diffusion.distill import TrajectoryDistillation
from ditkit.diffusion.flow import FLOW_TIME_SCALE, FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps
from ditkit.diffusion.meanflow import AverageVelocity, MeanFlow

__all__ = ["FLOW_TIME_SCALE", "AverageVelocity", "FlowMatching", "GaussianDiffusion", "MeanFlow",
           "TrajectoryDistillation", "build_objective", "create_diffusion", "get_named_beta_schedule",
           "space_timesteps"]


def build_objective(objective: str, timestep_sampling: str = "logit_normal", cosine_weight: float = 0.0,
                    time_scale: float = FLOW_TIME_SCALE) -> GaussianDiffusion | FlowMatching:
    """The objective a run names, as sampling needs it: "flow": rectified flow (velocity prediction); "ddpm":
    the original DiT recipe (1000 linear-beta steps, epsilon prediction, learned sigma, hybrid loss);
    "meanflow" and "distill": a two-time average-velocity model for one-step generation (training builds
    them from the config's meanflow_* / distill_* settings and a teacher: `ditkit.train.onestep`).
    cosine_weight: flow's velocity-direction loss term. time_scale: the flow models see t x this."""
    if objective == "flow":
        return FlowMatching(timestep_sampling=timestep_sampling, cosine_weight=cosine_weight, time_scale=time_scale)
    if objective == "ddpm":
        return create_diffusion("", learn_sigma=True)
    if objective == "meanflow":
        return MeanFlow(timestep_sampling=timestep_sampling, time_scale=time_scale)
    if objective == "distill":
        return TrajectoryDistillation(time_scale=time_scale)
    raise ValueError(f"unknown objective {objective!r}: expected flow, ddpm, meanflow or distill")
