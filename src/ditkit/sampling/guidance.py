"""Guidance settings for `ditkit.sample`: small objects that turn a model into the function a sampler calls.

- `CFG(scale, interval)`: classifier-free guidance (Ho & Salimans 2022), pred = uncond + s (cond - uncond),
  from one batched model call on [x; x] with labels [y; null]. `interval` (Kynkaanniemi et al. 2024) limits
  it to part of the trajectory; outside it the model is called once, on x only.
- `APG(scale, eta, norm, momentum, interval)`: adaptive projected guidance (Sadat et al. 2024): the update on
  the denoised image, D_c - D_u, split into its part parallel to D_c (which over-saturates) and the
  orthogonal rest; the parallel part is weighted by `eta`, after an optional norm cap and reverse momentum.
- `Autoguidance(guide_model, scale, unconditional, interval, cfg)` (Karras et al. 2024, "Guiding a diffusion
  model with a bad version of itself"): guide against a weaker model's conditional prediction (or, with
  `unconditional`, its null-label one) instead of the unconditional one. With `cfg` the two combine: the
  CFG (or APG) prediction plus (scale - 1) (cond - guide).

Only the first `guided_channels` prediction channels are guided; the rest (a learned variance) are the
conditional pass's. Model outputs are cast to the state's dtype, so guidance maths stay in full precision
under autocast.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Model = Callable[..., Tensor]
ModelFn = Callable[..., Tensor]  # model_fn(x, t, **kwargs) -> prediction, as a sampler calls it
Predictor = Callable[..., tuple[Tensor, Tensor]]  # (x, t, **kwargs) -> (guided, conditional) predictions
Combine = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x, t, cond, other) -> guided prediction
# the flat sampling settings a run records (its config's `sample` section), read by `guidance_from_settings`
GUIDANCE_SETTINGS = frozenset({"cfg_scale", "cfg_interval", "guide_model", "guide_scale", "guide_unconditional",
                               "apg_eta", "apg_norm", "apg_momentum"})


def _call(net: Model, x: Tensor, t: Tensor, labels: Tensor | None, **kwargs: Tensor) -> Tensor:
    return (net(x, t, **kwargs) if labels is None else net(x, t, labels, **kwargs)).to(x.dtype)


def _call_both(model: Model, x: Tensor, t: Tensor, y: Tensor, null: Tensor, **kwargs: Tensor) -> tuple[Tensor, ...]:
    """Conditional and unconditional predictions from one batched call on [x; x] (kwargs: per-sample tensors)."""
    doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
    return model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **doubled).to(x.dtype).chunk(2)


def _join(guided: Tensor, rest: Tensor, g: int) -> Tensor:
    """The guided channels followed by the unguided ones of `rest`."""
    return torch.cat([guided, rest[:, g:]], dim=1)


def _inside(interval: tuple[float, float] | None, t: Tensor, time_fraction: Callable[[Tensor], Tensor]) -> bool:
    """Whether model timestep t lies in `interval` of the trajectory (None: everywhere)."""
    return interval is None or interval[0] <= float(time_fraction(t[0])) <= interval[1]


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products of (N, ...) tensors, shaped (N, 1, ..., 1) to broadcast back."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def apg_update(delta: Tensor, denoised_cond: Tensor, eta: float = 0.0, norm_threshold: float | None = None,
               running: Tensor | None = None, momentum: float = 0.0) -> tuple[Tensor, Tensor]:
    """APG's guidance update on denoised images (Sadat et al. 2024, Alg. 1): returns (update, new running).

    delta = D_c - D_u (N, ...); with momentum beta (the paper uses negative values) delta is first replaced by
    the running average delta + beta * running; its norm is capped at norm_threshold (per sample); then it is
    split into the part parallel to D_c and the orthogonal rest: update = orthogonal + eta * parallel.
    eta = 1 with no cap and no momentum gives back delta, i.e. plain CFG.
    """
    if momentum != 0.0 and running is not None:
        delta = delta + momentum * running
    running = delta
    if norm_threshold is not None:
        norm = _flat_dot(delta, delta).sqrt()
        delta = delta * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    d = denoised_cond.double()
    parallel = (_flat_dot(delta.double(), d) / _flat_dot(d, d).clamp_min(1e-24) * d).to(delta.dtype)
    return delta - parallel + eta * parallel, running


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, scale: Any, interval: Any) -> None:
    """ValueError unless scale is a number >= 0 and interval None or (lo, hi) with 0 <= lo <= hi <= 1."""
    if not _number(scale) or scale < 0:
        raise ValueError(f"{name} scale must be a number >= 0 (1 = no guidance), got {scale!r}")
    try:
        lo, hi = (None, None) if interval is None else interval
        ok = interval is None or 0.0 <= lo <= hi <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} interval must be (lo, hi) with 0 <= lo <= hi <= 1 (1 = noise), got {interval!r}")


class Guidance:
    """What `sample` asks of a guidance setting; by default it guides against the unconditional prediction."""

    scale: float
    interval: tuple[float, float] | None

    @property
    def uses_null_label(self) -> bool:
        """Whether it contrasts the labels y with the null label (so it needs both)."""
        return self.scale != 1.0

    def applies(self, t: Tensor, time_fraction: Callable[[Tensor], Tensor]) -> bool:
        """Whether it guides at model timestep t (scale 1 never does)."""
        return self.scale != 1.0 and _inside(self.interval, t, time_fraction)

    def prepared(self, prepare: Callable[[Model], Model]) -> Guidance:
        """The setting with any model of its own passed through `prepare` (device, precision)."""
        return self

    def model_fn(self, model: Model, objective: Any, y: Tensor | None, null: Tensor | None,
                 guided_channels: int) -> ModelFn:
        """`model_fn(x, t, **kwargs)` for a sampler: `model`'s prediction for labels y, guided where this
        applies. `objective` gives the time fraction and the denoised-image coefficients of a timestep."""
        predict = self.predictor(model, objective, y, null, guided_channels)
        return lambda x, t, **kwargs: predict(x, t, **kwargs)[0]

    def predictor(self, model: Model, objective: Any, y: Tensor | None, null: Tensor | None, g: int) -> Predictor:
        """(guided, conditional) predictions at (x, t): one batched call where guidance applies, else one call."""
        combine = self.combine_fn(objective, g)

        def predict(x: Tensor, t: Tensor, **kwargs: Tensor) -> tuple[Tensor, Tensor]:
            if not self.applies(t, objective.time_fraction):
                cond = _call(model, x, t, y, **kwargs)
                return cond, cond
            cond, uncond = _call_both(model, x, t, y, null, **kwargs)
            return combine(x, t, cond, uncond), cond

        return predict

    def combine_fn(self, objective: Any, g: int) -> Combine:
        """other + scale (cond - other) on the first g channels."""
        def combine(x: Tensor, t: Tensor, cond: Tensor, other: Tensor) -> Tensor:
            return _join(other[:, :g] + self.scale * (cond[:, :g] - other[:, :g]), cond, g)

        return combine


@dataclass(frozen=True)
class CFG(Guidance):
    """Classifier-free guidance with `scale` (1 = the conditional model), inside `interval` (lo, hi) of the
    trajectory, 1 = pure noise, 0 = data (Gaussian: step / T; flow: t); None: at every step."""

    scale: float
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check("CFG", self.scale, self.interval)


@dataclass(frozen=True)
class APG(Guidance):
    """Adaptive projected guidance with `scale`: `eta` weighs the update's part parallel to the denoised image
    (0, the paper's choice, drops it; 1 is CFG), `norm` caps the update's norm per sample, `momentum` (e.g.
    -0.5) is the paper's reverse momentum; `interval` as for CFG."""

    scale: float
    eta: float = 0.0
    norm: float | None = None
    momentum: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check("APG", self.scale, self.interval)
        if not (_number(self.eta) and _number(self.momentum)) or (self.norm is not None and not (
                _number(self.norm) and self.norm > 0)):
            raise ValueError(f"APG needs numbers eta and momentum and a norm cap > 0 (or None), got eta={self.eta!r}, "
                             f"norm={self.norm!r}, momentum={self.momentum!r}")

    def combine_fn(self, objective: Any, g: int) -> Combine:
        """APG on the denoised images x0 = a x + b pred, (a, b) = objective.x0_coefficients(t), back in the
        model's units; the momentum state lives for one trajectory (one `model_fn`)."""
        running: list[Tensor | None] = [None]

        def combine(x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
            a, b = (c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) for c in objective.x0_coefficients(t))
            denoised_cond = a * x[:, :g] + b * cond[:, :g]
            update, running[0] = apg_update(b * (cond[:, :g] - uncond[:, :g]), denoised_cond, self.eta, self.norm,
                                            running[0], self.momentum)
            # where b = 0 (flow at t = 0) the prediction does not move the denoised image: plain CFG there
            safe = b.abs() > 1e-12
            from_apg = update / torch.where(safe, b, torch.ones_like(b))
            out = cond[:, :g] + (self.scale - 1) * torch.where(safe, from_apg, cond[:, :g] - uncond[:, :g])
            return _join(out, cond, g)

        return combine


@dataclass(frozen=True)
class Autoguidance(Guidance):
    """Guide against `guide_model` (a weaker model with the same call signature, e.g. an early EMA checkpoint
    of the same run) with `scale`: its conditional prediction, or with `unconditional` its null-label one
    (a weak CFG that also pushes away from the weak model's errors). The guide model being the model gives
    plain conditional sampling. `cfg`: a CFG or APG to combine with: its prediction plus the autoguidance
    term (scale - 1) (cond - guide), one more model call per step inside `interval` (None: every step)."""

    guide_model: Model
    scale: float
    unconditional: bool = False
    interval: tuple[float, float] | None = None
    cfg: CFG | APG | None = None

    def __post_init__(self) -> None:
        if not callable(self.guide_model):
            raise ValueError(f"Autoguidance needs a guide_model (a weaker model, called as the model is), "
                             f"got {type(self.guide_model).__name__}")
        _check("Autoguidance", self.scale, self.interval)
        if self.cfg is not None and not isinstance(self.cfg, (CFG, APG)):
            raise ValueError(f"Autoguidance's cfg must be a CFG or APG, got {type(self.cfg).__name__}")

    @property
    def uses_null_label(self) -> bool:
        return (self.cfg is not None and self.cfg.uses_null_label) or (self.unconditional and self.scale != 1.0)

    def prepared(self, prepare: Callable[[Model], Model]) -> Autoguidance:
        return dataclasses.replace(self, guide_model=prepare(self.guide_model))

    def predictor(self, model: Model, objective: Any, y: Tensor | None, null: Tensor | None, g: int) -> Predictor:
        guide_labels = null if self.unconditional else y
        if self.cfg is not None:
            return self._added_to(self.cfg.predictor(model, objective, y, null, g), objective, guide_labels, g)
        combine = self.combine_fn(objective, g)

        def predict(x: Tensor, t: Tensor, **kwargs: Tensor) -> tuple[Tensor, Tensor]:
            cond = _call(model, x, t, y, **kwargs)
            if not self.applies(t, objective.time_fraction):
                return cond, cond
            return combine(x, t, cond, _call(self.guide_model, x, t, guide_labels, **kwargs)), cond

        return predict

    def _added_to(self, base: Predictor, objective: Any, guide_labels: Tensor | None, g: int) -> Predictor:
        """`base`'s prediction plus the autoguidance term (scale - 1) (cond - guide) inside the interval."""
        def predict(x: Tensor, t: Tensor, **kwargs: Tensor) -> tuple[Tensor, Tensor]:
            out, cond = base(x, t, **kwargs)
            if not _inside(self.interval, t, objective.time_fraction):
                return out, cond
            guide = _call(self.guide_model, x, t, guide_labels, **kwargs)
            return _join(out[:, :g] + (self.scale - 1) * (cond[:, :g] - guide[:, :g]), out, g), cond

        return predict


def as_guidance(guidance: Guidance | float | None) -> Guidance:
    """`sample`'s guidance argument as a Guidance: None is CFG(1) (no guidance), a number is CFG(number)."""
    if guidance is None:
        return CFG(1.0)
    if isinstance(guidance, Guidance):
        return guidance
    if _number(guidance):
        return CFG(float(guidance))
    raise ValueError(f"guidance must be CFG(...), APG(...), Autoguidance(...) (ditkit.sampling), a number (the "
                     f"CFG scale) or None, got {guidance!r}")


def guidance_from_settings(cfg_scale: float = 1.0, cfg_interval: tuple[float, float] | None = None,
                           guide_model: Model | None = None, guide_scale: float | None = None,
                           guide_unconditional: bool = False, apg_eta: float | None = None,
                           apg_norm: float | None = None, apg_momentum: float = 0.0) -> Guidance | None:
    """The guidance a run's flat sampling settings (its config's `sample` section) describe, None for none:
    APG where apg_eta is set, else CFG; with a guide_model, autoguidance instead of the unconditional
    prediction, or with guide_scale CFG (or APG) plus autoguidance with weight guide_scale at every step."""
    if guide_scale is not None and guide_model is None:
        raise ValueError("guide_scale is the weight of autoguidance: it needs a guide_model")
    cfg = (CFG(cfg_scale, cfg_interval) if apg_eta is None
           else APG(cfg_scale, apg_eta, apg_norm, apg_momentum, cfg_interval))
    if guide_scale is not None:
        return Autoguidance(guide_model, guide_scale, guide_unconditional, cfg=cfg)
    if guide_model is not None:
        if apg_eta is not None and cfg_scale != 1.0:
            raise ValueError("apg_eta projects guidance against the unconditional prediction: with a guide_model "
                             "set guide_scale (CFG or APG plus autoguidance), or drop apg_eta")
        return Autoguidance(guide_model, cfg_scale, guide_unconditional, cfg_interval)
    return cfg if cfg_scale != 1.0 else None
