"""Exponential moving average of model weights (the weights DiT samples from)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def power_ema_gamma(std: float) -> float:
    """The exponent gamma of EDM2's power-function EMA whose relative standard deviation is `std`
    (Karras et al. 2024, eq. 3: std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))), by bisection."""
    if not 0 < std < 12 ** -0.5:  # gamma >= 0 (EDM2's range) gives std in (0, 12^-0.5]
        raise ValueError(f"ema_std must be in (0, {12 ** -0.5:.3f}), got {std}")

    def rel_std(g: float) -> float:
        return ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5

    lo, hi = 0.0, 1e6  # rel_std falls from 12^-0.5 (gamma = 0) towards 0 as gamma grows
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rel_std(mid) > std else (lo, mid)
    return (lo + hi) / 2


class EMA:
    """Shadow copy of a model, updated as ema <- decay * ema + (1 - decay) * weights.

    With `warmup`, the decay is min(decay, (1 + step) / (10 + step)), so early averages are not
    dominated by the random initialisation. With `power_std` (EDM2's power-function EMA, Karras et al.
    2024), the decay at step t (counted from 1) is (1 - 1/t)^(gamma + 1): an average over a fixed
    *fraction* of training (relative std `power_std`, e.g. 0.05-0.10) whatever its length.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, power_std: float | None = None):
        self.decay, self.warmup, self.power_std = decay, warmup, power_std
        self.gamma = None if power_std is None else power_ema_gamma(power_std)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        if self.gamma is not None:
            return (1 - 1 / (step + 1)) ** (self.gamma + 1)
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema <- ema + (1 - decay) * (weights - ema) for every trained parameter, as one `torch._foreach_lerp_`
        (the same per-element arithmetic as a lerp_ per tensor, one call)."""
        decay = self.decay_at(step)
        ema_params = dict(self.model.named_parameters())
        targets, values = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                value = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 shards
                targets.append(ema_params[name])
                values.append(value.detach().to(ema_params[name].dtype))
        if targets:
            torch._foreach_lerp_(targets, values, 1 - decay)
