"""Objectives: Gaussian diffusion (the original DiT recipe), flow matching and MeanFlow, with their samplers."""
from ditkit.diffusion.flow import FLOW_TIME_SCALE, FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps
from ditkit.diffusion.meanflow import MeanFlow

__all__ = ["FLOW_TIME_SCALE", "FlowMatching", "GaussianDiffusion", "MeanFlow", "create_diffusion",
           "get_named_beta_schedule", "space_timesteps"]
