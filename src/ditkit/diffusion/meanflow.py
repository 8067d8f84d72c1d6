"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): one- and few-step generation
trained from scratch, with no teacher.

The path is flow matching's, stated once in `ditkit.diffusion.flow`: z_t = (1 - t) x0 + t noise, with the
instantaneous velocity v = noise - x0. The model learns the *average* velocity over an interval [r, t],

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,

so that one jump z_r = z_t - (t - r) u(z_t, r, t) follows the whole trajectory. Differentiating
(t - r) u = integral_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt, with the total derivative
du/dt = v . d_z u + d_t u along the path (r fixed): one Jacobian-vector product of the network with the
tangent (v, 0, 1) in (z, r, t). The regression target u_tgt = v - (t - r) du/dt is held fixed
(stop-gradient), and each sample's loss is weighted by 1 / (|u - u_tgt|^2 + c)^p (the paper's adaptive
weight, also held fixed). The model is fed t and the interval t - r (both x time_scale); at r = t it is a
plain velocity model, so FlowMatching's Euler and Heun samplers also run it.

Guidance is folded into the target (the paper's sec. 4.2, with kappa = 0): for a labelled sample the field
regressed is v_cfg = w v + (1 - w) u(z_t, t, t | null), the network's own (stop-gradient) unconditional
prediction standing in for the unknown unconditional field; samples whose label was dropped to the null label
keep v. One step then draws guided samples with a single model call.

Two refinements from improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter, He, CVPR 2026):

- The v-loss (`loss="v"`). The identity read the other way, v = u + (t - r) du/dt, makes the network a model
  of the instantaneous velocity, V = u + (t - r) sg(du/dt), regressed on the field v itself (noise - x0, or
  its guided form). The JVP's tangent is the network's own instantaneous velocity sg(u(z_t, t, t)) instead
  of the one-sample noise - x0, so the regression target no longer contains the network; the gradient
  flows through u alone (the JVP term and the tangent are held fixed). With the exact u, V is the marginal
  velocity, the conditional mean of noise - x0, so the exact u minimises the expected loss.
- Guidance as an input (`cfg_range=(lo, hi)`). Each training row draws its own scale w uniformly from
  [lo, hi] and the network is told it (`guidance=w`, a DiT built with `guidance_range`); the field
  regressed is the one folded above at that row's w. Sampling feeds the asked CFG scale to the network,
  so one model draws at any scale in the range in one call (`ditkit.sampling.sample`).

`AverageVelocity` is the part every average-velocity objective shares: the two-time model, its samplers and
the teacher's guided velocity. `ditkit.diffusion.distill.TrajectoryDistillation` trains the same model by
regressing a teacher's ODE trajectories instead.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditkit.diffusion.flow import FLOW_TIME_SCALE, SAMPLERS as FLOW_SAMPLERS, FlowMatching
from ditkit.diffusion.gaussian import StepHook, mean_flat

Model = Callable[..., Tensor]

SAMPLERS = ("meanflow", *FLOW_SAMPLERS)  # the first is the default; the flow samplers use r = t
LOSSES = ("u", "v")  # MeanFlow's loss on the average velocity u; iMF's on the instantaneous velocity v


def check_cfg_range(cfg_range: tuple[float, float] | None, name: str = "cfg_range") -> None:
    """A range (lo, hi) of guidance scales, 1 <= lo <= hi (None: one fixed scale)."""
    if cfg_range is not None and not (len(cfg_range) == 2 and 1.0 <= cfg_range[0] <= cfg_range[1]):
        raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {cfg_range}")


def check_interval(lo_hi: tuple[float, float] | None, name: str = "cfg_interval") -> None:
    """A guidance interval (lo, hi) of times in [0, 1] (None: every time)."""
    if lo_hi is not None and not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
        raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi <= 1, got {lo_hi}")


def adaptive_loss(u: Tensor, u_tgt: Tensor, p: float, c: float) -> dict[str, Tensor]:
    """{"loss": sg(w) * mse, "mse": |u - u_tgt|^2 averaged per sample}, w = 1 / (mse + c)^p the paper's
    adaptive weight (p = 0: the plain squared error)."""
    mse = mean_flat((u.float() - u_tgt.float()) ** 2)
    weight = 1.0 / (mse.detach() + c) ** p
    return {"loss": weight * mse, "mse": mse}


class AverageVelocity(FlowMatching):
    """A model of the average velocity u(z, r, t) on flow matching's path, fed t and t - r (both x
    time_scale), and its samplers: "meanflow" jumps, or FlowMatching's at r = t. The objectives that train
    it (MeanFlow, TrajectoryDistillation) add their own `training_losses`."""

    def average_velocity(self, model: Model, z: Tensor, t: Tensor, r: Tensor,
                         model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """u(z, r, t): the model fed t and the interval t - r (both x time_scale)."""
        return self._u_of_interval(model, z, t, t - r, model_kwargs or {})

    def _u_of_interval(self, model: Model, z: Tensor, t: Tensor, h: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """u as a function of (z, t, h = t - r): the form the JVP differentiates."""
        out = model(z, t * self.time_scale, interval=h * self.time_scale, **kwargs)
        return out[:, : z.shape[1]]

    def velocity(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The instantaneous velocity v(z, t) = u(z, t, t), for FlowMatching's Euler/Heun samplers."""
        return self.average_velocity(model, x, t, t, model_kwargs)

    @staticmethod
    def _pop_kept(t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """Which rows keep their label: `force_drop_ids` != 1 (all rows without it). Pops it from kwargs, so
        the calls that follow set their own."""
        drop = kwargs.pop("force_drop_ids", None)
        return torch.ones_like(t, dtype=torch.bool) if drop is None else drop.to(t.device) != 1

    @staticmethod
    def _guided_at(t: Tensor, cfg_interval: tuple[float, float] | None) -> Tensor:
        """Which times guidance applies at (all without an interval)."""
        if cfg_interval is None:
            return torch.ones_like(t, dtype=torch.bool)
        return (t >= cfg_interval[0]) & (t <= cfg_interval[1])

    def guided_velocity(self, teacher: Model, z: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None,
                        cfg_scale: float, cfg_interval: tuple[float, float] | None = None) -> Tensor:
        """A teacher's velocity at (z, t), without gradients, guided: v(null) + w (v(c) - v(null)) for
        labelled samples (w = 1 outside cfg_interval), v(null) where the label was dropped (`force_drop_ids`
        == 1); unlabelled calls are plain. The conditional and null halves run as one doubled batch."""
        kwargs = dict(model_kwargs or {})
        if kwargs.get("y") is None:
            with torch.no_grad():
                return self.velocity(teacher, z, t, kwargs).to(z.dtype)
        kept = self._pop_kept(t, kwargs)
        y = kwargs["y"]
        ids = torch.cat([torch.zeros_like(y), torch.ones_like(y)])
        with torch.no_grad():
            both = self.velocity(teacher, torch.cat([z, z]), torch.cat([t, t]),
                                 {**kwargs, "y": torch.cat([y, y]), "force_drop_ids": ids})
        v_cond, v_null = both.to(z.dtype).chunk(2)
        w = torch.where(self._guided_at(t, cfg_interval), cfg_scale, 1.0)
        guided = v_null + self._bcast(w, z) * (v_cond - v_null)
        return torch.where(kept.reshape(-1, *([1] * (z.ndim - 1))), guided, v_null)

    def sample_loop(self, model: Model, shape: Sequence[int], noise: Tensor | None = None, *,
                    sampler: str = "meanflow", steps: int = 1, shift: float | None = None, sde_scale: float = 1.0,
                    model_kwargs: dict[str, Any] | None = None, device: torch.device | str | None = None,
                    progress: bool = False, step_noises: Sequence[Tensor] | None = None,
                    generator: torch.Generator | None = None, start_step: int = 0,
                    step_hook: StepHook | None = None, jump_length: int = 1, jump_n_sample: int = 1) -> Tensor:
        """"meanflow": N jumps z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid from 1 to 0 (1 step: one model
        call, x0 = z_1 - u(z_1, 0, 1)). "euler", "heun", "sde": FlowMatching's, on the model at r = t.
        `model` is called as model(z, t, interval=h) with both times x time_scale."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for MeanFlow: expected one of {', '.join(SAMPLERS)}")
        if sampler != "meanflow":
            return super().sample_loop(model, shape, noise, sampler=sampler, steps=steps, shift=shift,
                                       sde_scale=sde_scale, model_kwargs=model_kwargs, device=device,
                                       progress=progress, step_noises=step_noises, generator=generator,
                                       start_step=start_step, step_hook=step_hook, jump_length=jump_length,
                                       jump_n_sample=jump_n_sample)
        if step_noises is not None or jump_length != 1 or jump_n_sample != 1:
            raise ValueError("the meanflow sampler is deterministic and has no resampling jumps: "
                             "no step_noises, jump_length or jump_n_sample")
        grid = self.timesteps(steps, shift)
        if not 0 <= start_step < steps:
            raise ValueError(f"start_step must be in 0..{steps - 1}, got {start_step}")
        x = noise.to(device) if noise is not None and device is not None else noise
        if x is None:
            x = torch.randn(*shape, generator=generator, device=device)
        N = x.shape[0]
        with torch.no_grad():
            for i in range(start_step, steps):
                t, r = float(grid[i]), float(grid[i + 1])
                tt = torch.full((N,), t, device=x.device, dtype=torch.float32)
                rr = torch.full((N,), r, device=x.device, dtype=torch.float32)
                x = x - (t - r) * self.average_velocity(model, x, tt, rr, model_kwargs).to(x.dtype)
                if step_hook is not None:
                    x = step_hook(x, i + 1)
        return x


class MeanFlow(AverageVelocity):
    """The MeanFlow objective: average-velocity regression with a JVP target.

    timestep_sampling / logit_mean / logit_std: how the two times are drawn (each pair is two draws,
    t the larger, r the smaller; the paper's logit-normal(-0.4, 1)). unequal_fraction: the fraction of
    pairs with r != t (the rest have r = t, plain flow matching; the paper's best is 0.25).
    adaptive_p, adaptive_c: the adaptive loss weight 1 / (|delta|^2 + c)^p (the paper's p = 1, c = 1e-3).
    cfg_scale (w): guidance folded into the target (w = 1: none); a model trained with w > 1 is sampled
    with cfg_scale 1. cfg_interval: (lo, hi) the times where it applies (None: all; outside it w = 1).
    teacher: a frozen velocity model (e.g. the flow run this one starts from) whose guided velocity replaces
    noise - x0 as the identity's v: the marginal velocity that one sample's noise - x0 only estimates, so the
    target keeps its mean and loses that estimate's variance (one teacher call on a doubled batch a step).
    time_scale: both times are fed x this (FlowMatching's; the JVP differentiates the model in t, so a small
    one, e.g. 10, keeps du/dt the trajectory's and not the time embedding's wiggles).
    loss: "u" (the paper's: u regressed on sg(v - (t - r) du/dt), the JVP along (v, 0, 1)) or "v" (iMF's:
    V = u + (t - r) sg(du/dt) regressed on v, the JVP along the network's own sg(u(z, t, t))).
    cfg_range: (lo, hi) guidance scales drawn per row (uniform) and fed to the model as `guidance=` (its
    DiT built with `guidance_range`); replaces the fixed cfg_scale, which must then be 1.
    """

    def __init__(self, timestep_sampling: str = "logit_normal", logit_mean: float = -0.4, logit_std: float = 1.0,
                 unequal_fraction: float = 0.25, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                 cfg_scale: float = 1.0, teacher: Model | None = None, time_scale: float = FLOW_TIME_SCALE,
                 cfg_interval: tuple[float, float] | None = None, loss: str = "u",
                 cfg_range: tuple[float, float] | None = None):
        super().__init__(timestep_sampling=timestep_sampling, logit_mean=logit_mean, logit_std=logit_std,
                         time_scale=time_scale)
        check_interval(cfg_interval)
        if not 0.0 <= unequal_fraction <= 1.0:
            raise ValueError(f"unequal_fraction must be in [0, 1], got {unequal_fraction}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"adaptive_p must be >= 0 and adaptive_c > 0, got {adaptive_p}, {adaptive_c}")
        if cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
        if loss not in LOSSES:
            raise ValueError(f"unknown MeanFlow loss {loss!r}: expected one of {', '.join(LOSSES)}")
        check_cfg_range(cfg_range)
        if cfg_range is not None and (cfg_scale != 1.0 or teacher is not None):
            raise ValueError("cfg_range draws the guidance scale per row: leave cfg_scale at 1 and use no teacher")
        self.unequal_fraction, self.adaptive_p, self.adaptive_c = unequal_fraction, adaptive_p, adaptive_c
        self.cfg_scale, self.teacher, self.cfg_interval = cfg_scale, teacher, cfg_interval
        self.loss = loss
        self.cfg_range = None if cfg_range is None else (float(cfg_range[0]), float(cfg_range[1]))

    def __repr__(self) -> str:
        return (f"MeanFlow(unequal_fraction={self.unequal_fraction}, adaptive_p={self.adaptive_p}, "
                f"cfg_scale={self.cfg_scale}, teacher={self.teacher is not None}, "
                f"time_scale={self.time_scale:g}, cfg_interval={self.cfg_interval}, loss={self.loss!r}, "
                f"cfg_range={self.cfg_range})")

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """n training pairs (n, 2): column 0 is t, column 1 is r <= t; r = t for a (1 - unequal_fraction)
        share; with cfg_range a third column, each row's guidance scale w (uniform on the range). All draws
        come from `generator`, so a seeded trainer replays them on resume."""
        a = super().sample_t(n, generator, device)
        b = super().sample_t(n, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        equal = torch.rand(n, generator=generator, device=device) >= self.unequal_fraction
        columns = [t, torch.where(equal, t, r)]
        if self.cfg_range is not None:
            lo, hi = self.cfg_range
            columns.append(lo + (hi - lo) * torch.rand(n, generator=generator, device=device))
        return torch.stack(columns, dim=1)

    @staticmethod
    def split_times(times: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 2) [t, r] pairs (or (n, 3) [t, r, w]) -> t (n,), r (n,); (n,) times are r = t pairs."""
        if times.ndim == 1:
            return times, times
        if times.ndim != 2 or times.shape[1] not in (2, 3):
            raise ValueError(f"MeanFlow times must be (N,) or (N, 2) [t, r] pairs (or (N, 3) [t, r, w] with a "
                             f"guidance scale), got shape {tuple(times.shape)}")
        return times[:, 0], times[:, 1]

    def guidance_scales(self, times: Tensor) -> Tensor | None:
        """Each row's guidance scale w: the third column of `sample_t`'s rows (cfg_range), else None."""
        if self.cfg_range is None:
            return None
        if times.ndim != 2 or times.shape[1] != 3:
            raise ValueError(f"a MeanFlow with cfg_range trains on (N, 3) [t, r, w] rows from sample_t, got shape "
                             f"{tuple(times.shape)}")
        return times[:, 2]

    def jvp_target(self, model: Model, z: Tensor, t: Tensor, r: Tensor, v: Tensor,
                   model_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """(u, u_tgt): the prediction u(z, r, t) (differentiable) and the target v - (t - r) du/dt
        (detached), du/dt being the JVP of u along the tangent (v, 0, 1) in (z, r, t).

        The model is fed the interval h = t - r, so the tangent in (z, t, h) is (v, 1, 1). Because the target
        is detached, the forward-mode pass (`torch.func.jvp`) runs without autograd and only on the pairs
        with r < t (at r = t the target is v itself); the prediction is an ordinary forward, so gradient
        checkpointing and every attention path apply to it unchanged."""
        kwargs = model_kwargs or {}
        h = t - r
        u = self.average_velocity(model, z, t, r, kwargs)
        u_tgt = v.clone()
        pick = (h > 0).nonzero().flatten()
        if len(pick):
            dudt = self._total_derivative(model, z, t, h, v, kwargs, pick)
            u_tgt[pick] = v[pick] - self._bcast(h[pick], v) * dudt.to(v.dtype)
        return u, u_tgt.detach()

    def _total_derivative(self, model: Model, z: Tensor, t: Tensor, h: Tensor, tangent: Tensor,
                          kwargs: dict[str, Any], pick: Tensor) -> Tensor:
        """du/dt on rows `pick`, without gradients: the JVP of u in (z, t, h) along (tangent, 1, 1)."""
        sub = _rows(kwargs, pick, z.shape[0])

        def u_of(z_: Tensor, t_: Tensor, h_: Tensor) -> Tensor:
            return self._u_of_interval(model, z_, t_, h_, sub)

        ones = torch.ones_like(t[pick])
        # PyTorch's fused attention kernels (CPU flash, CUDA flash / memory-efficient) have no forward-mode
        # derivative; the math backend is made of ops that do
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, dudt = torch.func.jvp(u_of, (z[pick], t[pick], h[pick]), (tangent[pick], ones, ones))
        return dudt

    def v_prediction(self, model: Model, z: Tensor, t: Tensor, r: Tensor,
                     model_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """(u, V): the prediction u(z, r, t) (differentiable) and iMF's instantaneous velocity
        V = u + (t - r) sg(du/dt), du/dt the JVP along the network's own velocity sg(u(z, t, t)) (one extra
        forward without gradients on the rows with r < t; V = u where r = t)."""
        kwargs = model_kwargs or {}
        h = t - r
        u = self.average_velocity(model, z, t, r, kwargs)
        pick = (h > 0).nonzero().flatten()
        if not len(pick):
            return u, u
        sub = _rows(kwargs, pick, z.shape[0])
        with torch.no_grad():
            v_own = torch.zeros_like(z)
            v_own[pick] = self.velocity(model, z[pick], t[pick], sub).to(z.dtype)
        dudt = self._total_derivative(model, z, t, h, v_own, kwargs, pick)
        correction = torch.zeros_like(u)
        correction[pick] = self._bcast(h[pick], u) * dudt.to(u.dtype)
        return u, u + correction

    def guided_field(self, model: Model, z: Tensor, t: Tensor, v: Tensor,
                     model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The field regressed with guidance folded in: w v + (1 - w) u(z, t, t | null) for labelled samples
        at times in cfg_interval, v where the label was dropped (`force_drop_ids` == 1), outside the interval
        or with no labels; with a teacher, its guided velocity (`guided_velocity`) instead. w is cfg_scale,
        or each row's own scale, the `guidance` tensor in model_kwargs (cfg_range; the null call is told it
        too)."""
        if self.teacher is not None:
            return self.guided_velocity(self.teacher, z, t, model_kwargs, self.cfg_scale, self.cfg_interval)
        kwargs = dict(model_kwargs or {})
        y = kwargs.get("y")
        w = kwargs.get("guidance") if self.cfg_range is not None else None
        if (self.cfg_scale == 1.0 and w is None) or y is None:
            return v
        kept = self._pop_kept(t, kwargs)
        with torch.no_grad():
            u_null = self.velocity(model, z, t, {**kwargs, "force_drop_ids": torch.ones_like(y)}).to(z.dtype)
        w = self.cfg_scale if w is None else self._bcast(w.to(z.dtype), z)
        guided = w * v + (1 - w) * u_null
        return torch.where(self._bcast(kept & self._guided_at(t, self.cfg_interval), z).bool(), guided, v)

    def training_losses(self, model: Model, x_start: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses for times `t`, (N, 2) [t, r] pairs from `sample_t` ((N,) means r = t; (N, 3)
        [t, r, w] with cfg_range): {"loss": sg(w) * mse, "mse": per-sample mean squared error}, w the adaptive
        weight; the error is |u - sg(u_tgt)|^2 (loss "u") or |V - v|^2 (loss "v")."""
        w = self.guidance_scales(t)
        t, r = self.split_times(t)
        kwargs = dict(model_kwargs or {})
        if w is not None:
            kwargs["guidance"] = w
        if noise is None:
            noise = torch.randn_like(x_start)
        z = self.q_sample(x_start, t, noise)
        v = self.guided_field(model, z, t, noise - x_start, kwargs)
        if self.loss == "v":
            _, v_pred = self.v_prediction(model, z, t, r, kwargs)
            return adaptive_loss(v_pred, v, self.adaptive_p, self.adaptive_c)
        u, u_tgt = self.jvp_target(model, z, t, r, v, kwargs)
        return adaptive_loss(u, u_tgt, self.adaptive_p, self.adaptive_c)


def _rows(kwargs: dict[str, Any], idx: Tensor, n: int) -> dict[str, Any]:
    """The model's keyword arguments for rows `idx` of a batch of n (per-row tensors indexed, the rest as is)."""
    return {k: a[idx] if isinstance(a, Tensor) and a.ndim and a.shape[0] == n else a for k, a in kwargs.items()}
