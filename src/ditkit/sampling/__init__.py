"""One sampling entry point for both objectives, and the one place classifier-free guidance lives.

CFG (Ho & Salimans 2022): pred = pred_uncond + s (pred_cond - pred_uncond), from one batched model call on
[x; x] with labels [y; null]. `cfg_interval` applies it only inside part of the trajectory (Kynkaanniemi
et al. 2024), where the unconditional half is not computed at all.

Two variants change what guidance pushes against or how:
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the
  unconditional prediction is replaced by a weaker model's *conditional* one (`guide_model`: a smaller or
  less trained network), so guidance sharpens what the weak model gets wrong without narrowing the classes.
- adaptive projected guidance (APG; Sadat et al. 2024): the guidance update on the denoised image,
  D_c - D_u, is split into its part parallel to D_c (which over-saturates) and the orthogonal rest; the
  parallel part is weighted by `apg_eta` (0 drops it), after an optional norm cap and reverse momentum.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.flow import SAMPLERS as FLOW_SAMPLERS
from ditkit.diffusion.flow import shift_time
from ditkit.diffusion.gaussian import GaussianDiffusion, StepHook, sampling_levels, space_timesteps
from ditkit.diffusion.meanflow import SAMPLERS as MEANFLOW_SAMPLERS
from ditkit.diffusion.meanflow import MeanFlow
from ditkit.sampling.fast import prepare_model, warn_few_steps

GAUSSIAN_SAMPLERS = ("ddpm", "ddim")  # the first of each objective's samplers is its default
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 50, "sde": 100, "meanflow": 1}
Callback = Callable[[int, int, Tensor], None]  # (steps done, steps in all, x0 prediction) after each step


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


def guided_model(model: Callable[..., Tensor], y: Tensor | None, null: Tensor | None, cfg_scale: float,
                 cfg_interval: tuple[float, float] | None, guided_channels: int,
                 time_fraction: Callable[[Tensor], Tensor], *, guide_model: Callable[..., Tensor] | None = None,
                 apg_eta: float | None = None, apg_norm: float | None = None, apg_momentum: float = 0.0,
                 guide_unconditional: bool = False, guide_scale: float | None = None,
                 x0_coefficients: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                 ) -> Callable[[Tensor, Tensor], Tensor]:
    """`model_fn(x, t)` for a sampler: the conditional prediction, guided where guidance applies.

    The first `guided_channels` output channels are guided; the rest (a learned variance) are the
    conditional pass's. Outside `cfg_interval` (or when cfg_scale == 1) the model is called once, on x only.
    guide_model: the prediction guided against is guide_model(x, t, y) (autoguidance) instead of the
    model's unconditional one. apg_eta (not None): APG instead of CFG, computed on the denoised images
    x0 = a x + b pred given by `x0_coefficients(t) -> (a, b)` (each (N,)).
    """
    g = guided_channels
    state: dict[str, Tensor | None] = {"running": None}
    if guide_scale is not None and guide_model is None:
        raise ValueError("guide_scale is the weight of autoguidance: it needs a guide_model")

    def call(net: Callable[..., Tensor], x: Tensor, t: Tensor, labels: Tensor | None,
             **kwargs: Tensor) -> Tensor:
        return (net(x, t, **kwargs) if labels is None else net(x, t, labels, **kwargs)).to(x.dtype)

    def call_both(x: Tensor, t: Tensor, **kwargs: Tensor) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional predictions from one batched call on [x; x]."""
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **doubled).to(x.dtype)
        return out.chunk(2)

    def guided(x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        """CFG (or APG) from the two predictions; unguided channels are the conditional ones."""
        if apg_eta is None:
            out = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
            return torch.cat([out, cond[:, g:]], dim=1)
        a, b = (c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) for c in x0_coefficients(t))
        denoised_cond = a * x[:, :g] + b * cond[:, :g]
        update, state["running"] = apg_update(b * (cond[:, :g] - uncond[:, :g]), denoised_cond, apg_eta, apg_norm,
                                              state["running"], apg_momentum)
        # back from denoised-image units to the model's (where b = 0, flow at t = 0, the prediction does not
        # move the denoised image and plain CFG is used)
        safe = b.abs() > 1e-12
        from_apg = update / torch.where(safe, b, torch.ones_like(b))
        out = cond[:, :g] + (cfg_scale - 1) * torch.where(safe, from_apg, cond[:, :g] - uncond[:, :g])
        return torch.cat([out, cond[:, g:]], dim=1)

    def model_fn(x: Tensor, t: Tensor, **kwargs: Tensor) -> Tensor:  # kwargs: per-sample tensors (interval=)
        guide = cfg_scale != 1.0
        if guide and cfg_interval is not None:
            frac = float(time_fraction(t[0]))
            guide = cfg_interval[0] <= frac <= cfg_interval[1]
        # outputs are cast to x's dtype so that guidance and sampler maths stay in full precision under autocast
        if guide_scale is not None:  # both: CFG (where it applies) plus autoguidance at every step
            if guide:
                cond, uncond = call_both(x, t, **kwargs)
                out = guided(x, t, cond, uncond)
            else:
                cond = out = call(model, x, t, y, **kwargs)
            weak = call(guide_model, x, t, null if guide_unconditional else y, **kwargs)
            return torch.cat([out[:, :g] + (guide_scale - 1) * (cond[:, :g] - weak[:, :g]), out[:, g:]], dim=1)
        if not guide:
            return call(model, x, t, y, **kwargs)
        if guide_model is not None:
            weak_labels = null if guide_unconditional else y
            cond, uncond = call(model, x, t, y, **kwargs), call(guide_model, x, t, weak_labels, **kwargs)
        else:
            cond, uncond = call_both(x, t, **kwargs)
        return guided(x, t, cond, uncond)

    return model_fn


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
    if isinstance(objective, MeanFlow):
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
           y: Tensor | None = None, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] | None = None,
           steps: int | None = None, sampler: str | None = None, generator: torch.Generator | None = None,
           progress: bool = True, *, guided_channels: int | None = None, null_label: int | None = None,
           noise: Tensor | None = None, step_noises: Sequence[Tensor] | None = None, start_step: int = 0,
           step_hook: StepHook | None = None, jump_length: int = 1, jump_n_sample: int = 1,
           callback: Callback | None = None, cache: float | None = None, precision: str | None = None,
           compile: bool = False, guide_model: Callable[..., Tensor] | None = None,
           apg_eta: float | None = None, apg_norm: float | None = None, apg_momentum: float = 0.0,
           shift: float | None = None, guide_unconditional: bool = False,
           guide_scale: float | None = None) -> Tensor:
    """Draw samples of `shape` (N, C, H, W) from `model(x, t, y)` under either objective.

    sampler: Gaussian "ddpm" (default, 250 steps) or "ddim" (50, eta 0); flow "heun" (default, 50),
    "euler" (50) or "sde" (100). steps: number of sampling steps; a Gaussian objective is respaced from its
    base schedule ("N" for ddpm, "ddimN" for ddim, as the original), and an already respaced one is used
    as it is when steps is None. Gaussian sampling does not clip x_0 (latents are not in [-1, 1]).
    y: (N,) labels; None samples unconditionally (the null label if there is one, else model(x, t)).
    cfg_scale: classifier-free guidance scale (1 = the conditional model, one call per step).
    cfg_interval: (lo, hi) fraction of the trajectory, 1 = pure noise, 0 = data (Gaussian: step / T;
    flow: t), where guidance applies; outside it one conditional call per step. guided_channels: how
    many prediction channels to guide (default all C; learned-variance channels are never guided).
    null_label: the unconditional label when the model has no `num_classes` attribute.
    guide_model: autoguidance: guide against this weaker model's conditional prediction (same call
    signature; e.g. an early EMA checkpoint of the same run) instead of the unconditional one; cfg_scale
    is then the autoguidance weight. guide_model is model gives plain conditional sampling.
    guide_unconditional: call the guide with the null label: CFG against a weaker unconditional model,
    which pushes away from both the other classes and the weak model's errors.
    guide_scale: use both: pred = CFG(cfg_scale, cfg_interval) + (guide_scale - 1) (cond - guide), the
    autoguidance term at every step (one more model call per step).
    apg_eta: adaptive projected guidance with this weight on the parallel component (None: plain CFG; 0 is
    the paper's choice); apg_norm caps the update's norm per sample, apg_momentum (e.g. -0.5) adds
    the paper's reverse momentum. Both apply to the denoised image.
    shift: the time shift of the step grid, t' = s t / (1 + (s - 1) t) (flow: the grid's times; Gaussian:
    the kept steps' fractions of T); s > 1 spends more steps near noise, s < 1 near the data; None: the
    objective's own (flow) or an even grid (Gaussian).
    noise, step_noises: the start and the per-step noises (one per step, stochastic samplers), to replay
    a run; otherwise everything is drawn from `generator`.
    start_step, step_hook, jump_length, jump_n_sample: for editing (`ditkit.sampling.editing`): skip the noisiest
    steps (`noise` is then the state there), re-impose something after each step, RePaint's resampling
    jumps; the loop's levels are those of `sampling_schedule` (see `sampling_levels`).
    callback(step, total, x0): called after each of the `total` steps with the current prediction of the
    clean sample (model space); an exception it raises stops sampling.
    MeanFlow (one-step) models: sampler "meanflow" (default, 1 step: one model call), or euler/heun at r = t.
    cache: reuse the DiT blocks' residual while the timestep-modulated input has changed by less than this
    (summed relative L1, in [0, 1]; 0 = never; `ditkit.sampling.cache`). precision: "bf16" (or "fp16" on CUDA)
    runs the model under autocast, guidance and sampler maths staying float32; None leaves it as called.
    compile: run a `torch.compile`d model (needs a C++ compiler on the CPU).
    """
    shape = tuple(shape)
    C = shape[1] if len(shape) > 1 else 0
    sampler, schedule, n = sampling_schedule(objective, sampler, steps, shift)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, ...) with positive sizes, got {shape}")
    if cfg_interval is not None and not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0:
        raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {cfg_interval}")
    g = C if guided_channels is None else guided_channels
    if not 1 <= g <= C:
        raise ValueError(f"guided_channels must be in 1..{C} (the prediction channels), got {guided_channels}")

    device = y.device if y is not None else noise.device if noise is not None else _model_device(model)
    null_value = getattr(model, "num_classes", null_label)
    null = None if null_value is None else torch.full((shape[0],), null_value, dtype=torch.long, device=device)
    autoguided = guide_model is not None and not guide_unconditional and guide_scale is None  # no null label needed
    if y is None:
        y = null  # unconditional: the null label, or no label at all
        if cfg_scale != 1.0 and not autoguided:
            raise ValueError("cfg_scale != 1 needs class labels y (or a guide_model)")
    else:
        if y.shape != (shape[0],):
            raise ValueError(f"y must hold one label per sample, shape ({shape[0]},), got {tuple(y.shape)}")
        if cfg_scale != 1.0 and null is None and not autoguided:
            raise ValueError("classifier-free guidance needs a null label: the model has no num_classes, "
                             "so pass null_label=")
    if apg_norm is not None and apg_norm <= 0:
        raise ValueError(f"apg_norm must be > 0, got {apg_norm}")
    warn_few_steps(objective, sampler, n)
    model = prepare_model(model, torch.device(device), precision=precision, compile=compile, cache=cache)
    if guide_model is not None:
        guide_model = prepare_model(guide_model, torch.device(device), precision=precision)
    model_fn = guided_model(model, y, null, cfg_scale, cfg_interval, g, objective.time_fraction,
                            guide_model=guide_model, apg_eta=apg_eta, apg_norm=apg_norm,
                            apg_momentum=apg_momentum,
                            guide_unconditional=guide_unconditional, guide_scale=guide_scale,
                            x0_coefficients=objective.x0_coefficients)
    if callback is not None:
        levels = sampling_levels(n, start_step, jump_length, jump_n_sample)
        total = sum(b > a for a, b in zip(levels, levels[1:]))
        model_fn, step_hook = _with_previews(model_fn, objective, step_hook, callback, total)

    common = dict(device=device, progress=progress, step_noises=step_noises, generator=generator,
                  start_step=start_step, step_hook=step_hook, jump_length=jump_length, jump_n_sample=jump_n_sample)
    if isinstance(schedule, FlowMatching):
        return schedule.sample_loop(model_fn, shape, noise, sampler=sampler, steps=n, shift=shift, **common)
    loop = schedule.p_sample_loop if sampler == "ddpm" else schedule.ddim_sample_loop
    return loop(model_fn, shape, noise, clip_denoised=False, **common)
