"""One sampling entry point for both objectives: `sample(model, objective, shape, y, guidance, ...)`.

Guidance is one argument, a small object from `ditkit.sampling.guidance`: `CFG` (classifier-free guidance,
optionally inside an interval of the trajectory), `APG` (adaptive projected guidance) or `Autoguidance`
(against a weaker model, alone or added to a CFG). Editing (`ditkit.sampling.editing`) is sampling started
part-way and steered after each step, described by an `Editing`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.flow import SAMPLERS as FLOW_SAMPLERS
from ditkit.diffusion.flow import shift_time
from ditkit.diffusion.gaussian import GaussianDiffusion, StepHook, sampling_levels, space_timesteps
from ditkit.diffusion.meanflow import SAMPLERS as MEANFLOW_SAMPLERS
from ditkit.diffusion.meanflow import AverageVelocity
from ditkit.sampling.fast import prepare_model, warn_few_steps
from ditkit.sampling.guidance import (APG, CFG, GUIDANCE_SETTINGS, Autoguidance, Guidance, as_guidance,
                                      guidance_from_settings)

__all__ = ["APG", "CFG", "GUIDANCE_SETTINGS", "Autoguidance", "Callback", "Editing", "Guidance", "ddim_respacing",
           "guidance_from_settings", "sample", "samplers_for", "sampling_schedule", "scale_as_input",
           "shifted_gaussian_steps", "x0_prediction"]

GAUSSIAN_SAMPLERS = ("ddpm", "ddim")  # the first of each objective's samplers is its default
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 50, "sde": 100, "meanflow": 1}
Callback = Callable[[int, int, Tensor], None]  # (steps done, steps in all, x0 prediction) after each step


@dataclass(frozen=True)
class Editing:
    """Sampling started part-way and steered (`ditkit.sampling.editing`): skip the `start_step` noisiest
    steps (sample's `noise` is then the state there), re-impose something after each step
    (`step_hook(x, level) -> x`), and RePaint's resampling jumps (`jump_length`, `jump_n_sample`). The
    levels are those of `sampling_schedule`'s loop (see `sampling_levels`)."""

    start_step: int = 0
    step_hook: StepHook | None = None
    jump_length: int = 1
    jump_n_sample: int = 1

    def levels(self, steps: int) -> list[int]:
        return sampling_levels(steps, self.start_step, self.jump_length, self.jump_n_sample)


def ddim_respacing(steps: int, num_timesteps: int) -> str:
    """"ddimN" (the original's fixed stride) when N steps fit a stride of the schedule, else "N" (even spacing)."""
    try:
        space_timesteps(num_timesteps, f"ddim{steps}")
    except ValueError:
        return str(steps)
    return f"ddim{steps}"


def _model_device(model: Callable[..., Tensor]) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _labels(model: Callable[..., Tensor], y: Tensor | None, null_label: int | None, n: int, device: torch.device,
            guidance: Guidance) -> tuple[Tensor | None, Tensor | None]:
    """(labels, null labels) for n samples: y None samples unconditionally (the null label if there is one,
    else no label at all); guidance against the null label needs both."""
    null_value = getattr(model, "num_classes", null_label)
    null = None if null_value is None else torch.full((n,), null_value, dtype=torch.long, device=device)
    if y is None:
        if guidance.uses_null_label:
            raise ValueError("guidance against the null label (CFG, APG, an unconditional guide) needs class "
                             "labels y; Autoguidance with a conditional guide does not")
        return null, null
    if y.shape != (n,):
        raise ValueError(f"y must hold one label per sample, shape ({n},), got {tuple(y.shape)}")
    if guidance.uses_null_label and null is None:
        raise ValueError("classifier-free guidance needs a null label: the model has no num_classes, "
                         "so pass null_label=")
    return y, null


def scale_as_input(model: Callable[..., Tensor], guidance: Guidance,
                   cache: float | None = None) -> tuple[Callable[..., Tensor], Guidance]:
    """For a model told its guidance scale (a DiT built with `guidance_range`, iMF): the model fed CFG's
    scale w as `guidance=w` in one conditional call per step, and no guidance on top; other models as given.
    Only plain CFG at every time can be an input, with w inside the trained range (one clear error else)."""
    lo_hi = getattr(model, "guidance_range", None)
    if lo_hi is None:
        return model, guidance
    if not isinstance(guidance, CFG) or guidance.interval is not None:
        raise ValueError(f"this model takes the CFG scale as an input (trained on [{lo_hi[0]:g}, {lo_hi[1]:g}]): "
                         f"use a plain CFG scale with no interval, got {guidance!r}")
    if not lo_hi[0] - 1e-6 <= guidance.scale <= lo_hi[1] + 1e-6:
        raise ValueError(f"cfg {guidance.scale:g} is outside the guidance scales this model was trained on "
                         f"[{lo_hi[0]:g}, {lo_hi[1]:g}]: choose a scale in that range")
    if cache is not None:
        raise ValueError("block caching does not pass a guidance-scale input to the model: sample without cache")
    scale = guidance.scale

    def told(x: Tensor, t: Tensor, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return model(x, t, *args, guidance=torch.full((x.shape[0],), scale, device=x.device), **kwargs)

    return told, CFG(1.0)


def x0_prediction(objective: GaussianDiffusion | FlowMatching, x: Tensor, model_t: Tensor, out: Tensor) -> Tensor:
    """The clean sample the (guided) prediction `out` at state x and model timestep `model_t` points to:
    flow x0 = x_t - t v; Gaussian x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) at the base schedule's step."""
    pred = out[:, : x.shape[1]].to(x.dtype)
    shape = (-1, *([1] * (x.ndim - 1)))
    if isinstance(objective, FlowMatching):
        return x - objective.time_fraction(model_t).to(x.dtype).reshape(shape) * pred
    if objective.model_mean_type == "x0":
        return pred
    abar = torch.cumprod(1.0 - objective.base_betas, dim=0).to(x.device)[model_t.long()].to(x.dtype).reshape(shape)
    return (x - (1 - abar).sqrt() * pred) / abar.sqrt()


def _with_previews(model_fn: Callable[[Tensor, Tensor], Tensor], objective: GaussianDiffusion | FlowMatching,
                   step_hook: StepHook | None, callback: Callback,
                   total: int) -> tuple[Callable[[Tensor, Tensor], Tensor], StepHook]:
    """`model_fn` that remembers its last call, and a step hook that reports that call's x0 prediction."""
    last: dict[str, Tensor] = {}
    done = [0]

    def recording_fn(x: Tensor, t: Tensor, **kwargs: Tensor) -> Tensor:
        out = model_fn(x, t, **kwargs)
        last.update(x=x, t=t, out=out)
        return out

    def hook(x: Tensor, level: int) -> Tensor:
        if step_hook is not None:
            x = step_hook(x, level)
        done[0] += 1
        callback(done[0], total, x0_prediction(objective, last["x"], last["t"], last["out"]))
        return x

    return recording_fn, hook


def samplers_for(objective: GaussianDiffusion | FlowMatching) -> tuple[str, ...]:
    """The sampler names an objective allows; the first is its default."""
    if isinstance(objective, GaussianDiffusion):
        return GAUSSIAN_SAMPLERS
    if isinstance(objective, AverageVelocity):
        return MEANFLOW_SAMPLERS
    if isinstance(objective, FlowMatching):
        return FLOW_SAMPLERS
    raise ValueError(f"objective must be a GaussianDiffusion or FlowMatching, got {type(objective).__name__}")


def shifted_gaussian_steps(num_timesteps: int, steps: int, shift: float) -> list[int]:
    """`steps` base timesteps spread by the flow resolution shift: fractions u evenly spaced in [0, 1],
    mapped to shift_time(u) * (T - 1) and rounded (duplicates merged, so a strong shift can keep fewer)."""
    u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    return sorted({int(round(float(v))) for v in shift_time(u, shift) * (num_timesteps - 1)})


def sampling_schedule(objective: GaussianDiffusion | FlowMatching, sampler: str | None,
                      steps: int | None,
                      shift: float | None = None) -> tuple[str, GaussianDiffusion | FlowMatching, int]:
    """What `sample` runs for `sampler` and `steps` (arguments as there): the sampler's name, the objective
    (a Gaussian one respaced) and the number of steps, so that callers can address the loop's levels
    (see `sampling_levels`)."""
    allowed = samplers_for(objective)
    sampler = sampler or allowed[0]
    if sampler not in allowed:
        raise ValueError(f"unknown sampler {sampler!r} for {type(objective).__name__}: "
                         f"expected one of {', '.join(allowed)}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift is not None and shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if isinstance(objective, FlowMatching):
        return sampler, objective, steps or DEFAULT_STEPS[sampler]
    diffusion = objective
    if shift is not None and shift != 1.0:
        T = objective.original_num_steps
        keep = shifted_gaussian_steps(T, steps or DEFAULT_STEPS[sampler], shift)
        diffusion = GaussianDiffusion(objective.base_betas, objective.model_mean_type, objective.model_var_type,
                                      objective.loss_type, keep)
    elif steps is not None or objective.num_timesteps == objective.original_num_steps:
        n = steps or DEFAULT_STEPS[sampler]
        diffusion = objective.respace(ddim_respacing(n, objective.original_num_steps) if sampler == "ddim" else str(n))
    return sampler, diffusion, diffusion.num_timesteps


def sample(model: Callable[..., Tensor], objective: GaussianDiffusion | FlowMatching, shape: Sequence[int],
           y: Tensor | None = None, guidance: Guidance | float | None = None, steps: int | None = None,
           sampler: str | None = None, generator: torch.Generator | None = None, progress: bool = True, *,
           guided_channels: int | None = None, null_label: int | None = None, noise: Tensor | None = None,
           step_noises: Sequence[Tensor] | None = None, editing: Editing | None = None,
           callback: Callback | None = None, cache: float | None = None, precision: str | None = None,
           compile: bool = False, shift: float | None = None) -> Tensor:
    """Draw samples of `shape` (N, C, ...) from `model(x, t, y)` under either objective.

    y: (N,) labels; None samples unconditionally (the null label if there is one, else model(x, t)).
    guidance: CFG(scale, interval), APG(...) or Autoguidance(...) (`ditkit.sampling.guidance`); a number s
    is CFG(s); None: no guidance, one conditional call per step. A model with a `guidance_range` (told its
    CFG scale, iMF) is instead fed the CFG scale as `guidance=` in one call a step (`scale_as_input`).
    guided_channels: how many prediction channels to guide (default all C; learned-variance channels never
    are). null_label: the unconditional
    label when the model has no `num_classes` attribute.
    sampler: Gaussian "ddpm" (default, 250 steps) or "ddim" (50, eta 0); flow "heun" (default, 50), "euler"
    (50) or "sde" (100); MeanFlow "meanflow" (default, 1 step) or euler/heun at r = t. steps: a Gaussian
    objective is respaced from its base schedule ("N" for ddpm, "ddimN" for ddim, as the original); an
    already respaced one is used as it is when steps is None. Gaussian sampling does not clip x_0.
    shift: the step grid's time shift t' = s t / (1 + (s - 1) t) (s > 1: more steps near noise); None: the
    objective's own (flow) or an even grid (Gaussian).
    noise, step_noises: the start and per-step noises (stochastic samplers), to replay a run; otherwise all
    is drawn from `generator`. editing: start part-way and steer each step (see `Editing`).
    callback(step, total, x0): after each step, with the current prediction of the clean sample; an
    exception it raises stops sampling.
    cache: reuse the DiT blocks' residual while their modulated input changes by less than this (in [0, 1];
    `ditkit.sampling.cache`). precision: "bf16" (or "fp16" on CUDA) autocast of the model, guidance and
    sampler maths staying float32. compile: run a `torch.compile`d model (needs a C++ compiler on the CPU).
    """
    shape, guidance, editing = tuple(shape), as_guidance(guidance), editing or Editing()
    sampler, schedule, n = sampling_schedule(objective, sampler, steps, shift)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, ...) with positive sizes, got {shape}")
    g = shape[1] if guided_channels is None else guided_channels
    if not 1 <= g <= shape[1]:
        raise ValueError(f"guided_channels must be in 1..{shape[1]} (the prediction channels), got {guided_channels}")
    device = y.device if y is not None else noise.device if noise is not None else _model_device(model)
    y, null = _labels(model, y, null_label, shape[0], torch.device(device), guidance)
    warn_few_steps(objective, sampler, n)
    model, guidance = scale_as_input(model, guidance, cache)
    model = prepare_model(model, torch.device(device), precision=precision, compile=compile, cache=cache)
    guidance = guidance.prepared(lambda m: prepare_model(m, torch.device(device), precision=precision))
    model_fn, step_hook = guidance.model_fn(model, objective, y, null, g), editing.step_hook
    if callback is not None:
        levels = editing.levels(n)
        total = sum(b > a for a, b in zip(levels, levels[1:]))
        model_fn, step_hook = _with_previews(model_fn, objective, step_hook, callback, total)
    common = dict(device=device, progress=progress, step_noises=step_noises, generator=generator,
                  start_step=editing.start_step, step_hook=step_hook, jump_length=editing.jump_length,
                  jump_n_sample=editing.jump_n_sample)
    if isinstance(schedule, FlowMatching):
        return schedule.sample_loop(model_fn, shape, noise, sampler=sampler, steps=n, shift=shift, **common)
    loop = schedule.p_sample_loop if sampler == "ddpm" else schedule.ddim_sample_loop
    return loop(model_fn, shape, noise, clip_denoised=False, **common)
