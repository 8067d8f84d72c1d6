"""Objectives: Gaussian diffusion (the original DiT recipe) and flow matching, with their samplers."""
from ditkit.diffusion.flow import FLOW_TIME_SCALE, FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps

__all__ = ["FLOW_TIME_SCALE", "FlowMatching", "GaussianDiffusion", "create_diffusion", "get_named_beta_schedule",
           "space_timesteps"]
