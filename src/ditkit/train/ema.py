"""Exponential moving average of model weights (the weights DiT samples from)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy of a model, updated as ema <- decay * ema + (1 - decay) * weights.

    With `warmup`, the decay is min(decay, (1 + step) / (10 + step)), so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                value = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 shards
                ema_params[name].lerp_(value.detach().to(ema_params[name].dtype), 1 - decay)
