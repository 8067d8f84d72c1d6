"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): one- and few-step generation
trained from scratch, with no teacher (or, as an option, with a frozen flow model as one).

The path is flow matching's, stated once in `ditkit.diffusion.flow`: z_t = (1 - t) x0 + t noise, with the
instantaneous velocity v = noise - x0. The model learns the *average* velocity over an interval [r, t],

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,

so that one jump z_r = z_t - (t - r) u(z_t, r, t) follows the whole trajectory. Differentiating
(t - r) u = integral_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt, with the total derivative
du/dt = v . d_z u + d_t u along the path (r fixed): one Jacobian-vector product of the network with the
tangent (v, 0, 1) in (z, r, t). The regression target u_tgt = v - (t - r) du/dt is held fixed
(stop-gradient). The model is fed t and the interval t - r (both x time_scale); at r = t it is a
plain velocity model, so FlowMatching's Euler and Heun samplers also run it.

Guidance is folded into the target (the paper's sec. 4.2): for a labelled sample the field regressed is
v_cfg = w v + k u(z_t, t, t | c) + (1 - w - k) u(z_t, t, t | null), the network's own (stop-gradient)
instantaneous predictions standing in for the unknown conditional and unconditional fields; samples whose
label was dropped to the null label keep v. One step then draws guided samples with a single model call.

With a `teacher` (a frozen flow-matching model, e.g. the run a MeanFlow run fine-tunes from), the field
regressed is the teacher's guided velocity v(null) + w (v(c) - v(null)) instead: the marginal velocity that the
one-sample noise - x0 only estimates, so the target keeps its mean and loses that estimate's variance. This
is not the paper's method (which needs no second model); it costs one teacher call on a doubled batch a step.

The teacher can also supervise whole jumps directly (`make_trajectories`, `trajectory_share`): its guided
ODE, solved once with Heun steps from a fixed set of noises, gives states z_{t_i} along each trajectory, and
(z_{t_i} - z_{t_j}) / (t_i - t_j) is the average velocity over [t_j, t_i] itself, with no JVP and no
bootstrapping from the model's own shorter jumps. A share of each batch is drawn from these pairs (half of
them the whole jump 1 -> 0 that one-step sampling makes); the rest is MeanFlow's identity as above. This is
trajectory distillation, not the paper's method; each trajectory costs 2 teacher calls a Heun step, once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditkit.diffusion.flow import FLOW_TIME_SCALE, SAMPLERS as FLOW_SAMPLERS, FlowMatching
from ditkit.diffusion.gaussian import StepHook, mean_flat

Model = Callable[..., Tensor]

SAMPLERS = ("meanflow", *FLOW_SAMPLERS)  # the first is the default; the flow samplers use r = t
TRAJECTORY_SHIFT = 1.5  # the teacher's ODE grid: the demo's sampling shift (at 8 Heun steps shift 3 was far worse)
WHOLE_JUMP_SHARE = 0.5  # of the trajectory rows: the pair (1, 0), the jump that one-step sampling makes


@dataclass
class Trajectories:
    """The teacher's guided ODE solved from fixed noises: states (K, S + 1, C, H, W) at `times` (S + 1,),
    which run from 1 (the noise) to 0 (the sample), for class `labels` (K,)."""
    states: Tensor
    times: Tensor
    labels: Tensor


class MeanFlow(FlowMatching):
    """The MeanFlow objective: average-velocity regression with a JVP target, and its samplers.

    timestep_sampling / logit_mean / logit_std: how the two times are drawn (each pair is two draws,
    t the larger, r the smaller; the paper's logit-normal(-0.4, 1)). unequal_fraction: the fraction of
    pairs with r != t (the rest have r = t, plain flow matching; the paper's best is 0.25).
    adaptive_p, adaptive_c: adaptive loss weighting w = 1 / (|delta|^2 + c)^p, held fixed (the paper's
    p = 1, c = 1e-3; p = 0 is the plain squared error). cfg_scale (w) and cfg_mix (k): guidance folded
    into the target (w = 1, k = 0: none); a model trained with w > 1 is sampled with cfg_scale 1.
    cfg_interval: (lo, hi) the times where the folded guidance applies (None: all; outside it w = 1).
    teacher: a frozen velocity model whose guided velocity (cfg_scale w; cfg_mix unused) replaces noise - x0.
    trajectory_share: the share of each batch drawn from the teacher's trajectories (`make_trajectories`).
    time_scale: both times are fed x this (FlowMatching's; the JVP differentiates the model in t, so a small
    one, e.g. 10, keeps du/dt the trajectory's and not the time embedding's wiggles).
    """

    def __init__(self, timestep_sampling: str = "logit_normal", logit_mean: float = -0.4, logit_std: float = 1.0,
                 unequal_fraction: float = 0.25, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                 cfg_scale: float = 1.0, cfg_mix: float = 0.0, teacher: Model | None = None,
                 time_scale: float = FLOW_TIME_SCALE, cfg_interval: tuple[float, float] | None = None,
                 trajectory_share: float = 0.0):
        super().__init__(timestep_sampling=timestep_sampling, logit_mean=logit_mean, logit_std=logit_std,
                         time_scale=time_scale)
        if cfg_interval is not None and not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0:
            raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {cfg_interval}")
        if not 0.0 <= trajectory_share <= 1.0:
            raise ValueError(f"trajectory_share must be in [0, 1], got {trajectory_share}")
        if not 0.0 <= unequal_fraction <= 1.0:
            raise ValueError(f"unequal_fraction must be in [0, 1], got {unequal_fraction}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"adaptive_p must be >= 0 and adaptive_c > 0, got {adaptive_p}, {adaptive_c}")
        if cfg_scale < 1.0 or not 0.0 <= cfg_mix < 1.0:
            raise ValueError(f"cfg_scale must be >= 1 and cfg_mix in [0, 1), got {cfg_scale}, {cfg_mix}")
        self.unequal_fraction, self.adaptive_p, self.adaptive_c = unequal_fraction, adaptive_p, adaptive_c
        self.cfg_scale, self.cfg_mix = cfg_scale, cfg_mix
        self.teacher, self.cfg_interval, self.trajectory_share = teacher, cfg_interval, trajectory_share
        self.trajectories: Trajectories | None = None

    def __repr__(self) -> str:
        return (f"MeanFlow(unequal_fraction={self.unequal_fraction}, adaptive_p={self.adaptive_p}, "
                f"cfg_scale={self.cfg_scale}, cfg_mix={self.cfg_mix}, teacher={self.teacher is not None}, "
                f"time_scale={self.time_scale:g}, cfg_interval={self.cfg_interval}, "
                f"trajectory_share={self.trajectory_share})")

    # ---- the two times -------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """n training pairs (n, 2): column 0 is t, column 1 is r <= t; r = t for a (1 - unequal_fraction)
        share. With a trajectory_share, the last round(share x n) rows are pairs of the teacher's trajectories
        and the rows grow to (n, 5): [t, r, trajectory, i, j], t and r being its times i < j (-1 in the last
        three columns for the other rows). All draws come from `generator`, so a seeded trainer replays them
        on resume."""
        a = super().sample_t(n, generator, device)
        b = super().sample_t(n, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        equal = torch.rand(n, generator=generator, device=device) >= self.unequal_fraction
        pairs = torch.stack([t, torch.where(equal, t, r)], dim=1)
        m = round(self.trajectory_share * n)
        if m == 0:
            return pairs
        if self.trajectories is None:
            raise ValueError("trajectory_share > 0 draws from the teacher's trajectories: make_trajectories() first")
        S = len(self.trajectories.times) - 1
        k = torch.randint(0, len(self.trajectories.labels), (m,), generator=generator)
        i = torch.randint(0, S + 1, (m,), generator=generator)
        j = torch.randint(0, S, (m,), generator=generator)
        j = j + (j >= i).long()  # a distinct second time
        i, j = torch.minimum(i, j), torch.maximum(i, j)
        whole = torch.rand(m, generator=generator) < WHOLE_JUMP_SHARE
        i, j = torch.where(whole, 0, i), torch.where(whole, S, j)
        times = self.trajectories.times.cpu()
        pairs[n - m:] = torch.stack([times[i], times[j]], dim=1).to(pairs)
        picks = torch.full((n, 3), -1.0, device=pairs.device)
        picks[n - m:] = torch.stack([k, i, j], dim=1).to(picks)
        return torch.cat([pairs, picks], dim=1)

    @staticmethod
    def split_times(times: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 2) pairs (or (n, 5) rows with trajectory picks) -> t (n,), r (n,); (n,) times are r = t pairs."""
        if times.ndim == 1:
            return times, times
        if times.ndim != 2 or times.shape[1] not in (2, 5):
            raise ValueError(f"MeanFlow times must be (N,), (N, 2) [t, r] pairs or (N, 5) [t, r, trajectory, i, j], "
                             f"got shape {tuple(times.shape)}")
        return times[:, 0], times[:, 1]

    # ---- the model as a function of (z, t, r) ----------------------------------------------------
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

    def jvp_target(self, model: Model, z: Tensor, t: Tensor, r: Tensor, v: Tensor,
                   model_kwargs: dict[str, Any] | None = None, exact: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(u, u_tgt): the prediction u(z, r, t) (differentiable) and the target v - (t - r) du/dt
        (detached), du/dt being the JVP of u along the tangent (v, 0, 1) in (z, r, t).

        The model is fed the interval h = t - r, so the tangent in (z, t, h) is (v, 1, 1). Because the target
        is detached, the forward-mode pass (`torch.func.jvp`) runs without autograd and only on the pairs
        with r < t (at r = t the target is v itself); the prediction is an ordinary forward, so gradient
        checkpointing and every attention path apply to it unchanged. Rows marked `exact` keep v as their target
        (it is already the average velocity over [r, t]: the teacher's trajectories)."""
        kwargs = model_kwargs or {}
        h = t - r
        u = self.average_velocity(model, z, t, r, kwargs)
        u_tgt = v.clone()
        pick = ((h > 0) if exact is None else (h > 0) & ~exact).nonzero().flatten()
        if len(pick):
            sub = _rows(kwargs, pick, z.shape[0])

            def u_of(z_: Tensor, t_: Tensor, h_: Tensor) -> Tensor:
                return self._u_of_interval(model, z_, t_, h_, sub)

            ones = torch.ones_like(t[pick])
            # PyTorch's fused attention kernels (CPU flash, CUDA flash / memory-efficient) have no forward-mode
            # derivative; the math backend is made of ops that do
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                _, dudt = torch.func.jvp(u_of, (z[pick], t[pick], h[pick]), (v[pick], ones, ones))
            u_tgt[pick] = v[pick] - self._bcast(h[pick], v) * dudt.to(v.dtype)
        return u, u_tgt.detach()

    @staticmethod
    def _pop_kept(t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """Which rows keep their label: `force_drop_ids` != 1 (all rows without it). Pops it from kwargs, so
        the calls that follow set their own."""
        drop = kwargs.pop("force_drop_ids", None)
        return torch.ones_like(t, dtype=torch.bool) if drop is None else drop.to(t.device) != 1

    def _cond_and_null(self, model: Model, z: Tensor, t: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(u(z, t, t | c), u(z, t, t | null)) without gradients, in one doubled batch: the null half is forced
        by force_drop_ids, so kwargs must not carry its own (`_pop_kept` first)."""
        y = kwargs["y"]
        ids = torch.cat([torch.zeros_like(y), torch.ones_like(y)])
        with torch.no_grad():
            both = self.velocity(model, torch.cat([z, z]), torch.cat([t, t]),
                                 {**kwargs, "y": torch.cat([y, y]), "force_drop_ids": ids})
        return both.to(z.dtype).chunk(2)

    def guided_field(self, model: Model, z: Tensor, t: Tensor, v: Tensor,
                     model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The field regressed with guidance folded in: w v + k u(z, t, t | c) + (1 - w - k) u(z, t, t | null)
        for labelled samples at times in cfg_interval, v where the label was dropped (`force_drop_ids` == 1),
        outside the interval or with no labels; with a teacher, `teacher_field` instead."""
        if self.teacher is not None:
            return self.teacher_field(z, t, model_kwargs)
        kwargs = dict(model_kwargs or {})
        y = kwargs.get("y")
        if self.cfg_scale == 1.0 or y is None:
            return v
        kept = self._pop_kept(t, kwargs)
        w, k = self.cfg_scale, self.cfg_mix
        if k > 0:
            u_cond, u_null = self._cond_and_null(model, z, t, kwargs)
        else:  # the conditional part has no weight: only the null half runs
            u_cond = 0.0
            with torch.no_grad():
                u_null = self.velocity(model, z, t, {**kwargs, "force_drop_ids": torch.ones_like(y)}).to(z.dtype)
        guided = w * v + k * u_cond + (1 - w - k) * u_null
        return torch.where(self._bcast(kept & self._guided_at(t), z).bool(), guided, v)

    def teacher_field(self, z: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The teacher's velocity at (z, t), guided with cfg_scale: v(null) + w (v(c) - v(null)) for labelled
        samples (w = 1 outside cfg_interval), v(null) where the label was dropped. It is the marginal velocity
        the noise - x0 of one sample estimates, so the MeanFlow target keeps its mean and loses that estimate's
        variance."""
        kwargs = dict(model_kwargs or {})
        if kwargs.get("y") is None:
            with torch.no_grad():
                return self.velocity(self.teacher, z, t, kwargs).to(z.dtype)
        kept = self._pop_kept(t, kwargs)
        v_cond, v_null = self._cond_and_null(self.teacher, z, t, kwargs)
        w = torch.where(self._guided_at(t), self.cfg_scale, 1.0)
        guided = v_null + self._bcast(w, z) * (v_cond - v_null)
        return torch.where(kept.reshape(-1, *([1] * (z.ndim - 1))), guided, v_null)

    def _guided_at(self, t: Tensor) -> Tensor:
        """Which times the folded guidance applies at (cfg_interval; all without one)."""
        if self.cfg_interval is None:
            return torch.ones_like(t, dtype=torch.bool)
        return (t >= self.cfg_interval[0]) & (t <= self.cfg_interval[1])

    def make_trajectories(self, count: int, shape: Sequence[int], num_classes: int, steps: int = 8,
                          generator: torch.Generator | None = None, device: torch.device | str | None = None,
                          batch: int = 256, progress: bool = False) -> Trajectories:
        """Solve the teacher's guided ODE (`teacher_field`) from `count` noises of `shape`, classes in turn,
        with `steps` steps of FlowMatching's Heun sampler on the grid shifted by TRAJECTORY_SHIFT, keep every
        state, and set them as this objective's `trajectories`. Noise comes from `generator` (CPU)."""
        if self.teacher is None:
            raise ValueError("trajectories are the teacher's: build MeanFlow with teacher= first")
        if count < 1 or steps < 1:
            raise ValueError(f"count and steps must be >= 1, got {count}, {steps}")

        def guided_teacher(z: Tensor, t: Tensor, interval: Tensor | None = None, **kwargs: Any) -> Tensor:
            return self.teacher_field(z, t / self.time_scale, kwargs).float()  # the sampler feeds t x time_scale

        start, labels, chunks = time.perf_counter(), torch.arange(count) % num_classes, []
        for lo in range(0, count, batch):
            y = labels[lo:lo + batch].to(device)
            states = [torch.randn(len(y), *shape, generator=generator).to(device)]
            self.sample_loop(guided_teacher, states[0].shape, states[0], sampler="heun", steps=steps,
                             shift=TRAJECTORY_SHIFT, model_kwargs={"y": y},
                             step_hook=lambda x, level, kept=states: kept.append(x) or x)
            chunks.append(torch.stack(states, dim=1))
        grid = self.timesteps(steps, TRAJECTORY_SHIFT).float()
        self.trajectories = Trajectories(torch.cat(chunks), grid.to(device), labels.to(device))
        if progress:
            print(f"teacher trajectories: {count} x {steps} Heun steps in {time.perf_counter() - start:.0f} s",
                  flush=True)
        return self.trajectories

    # ---- training --------------------------------------------------------------------------------
    def training_losses(self, model: Model, x_start: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses for times `t`, (N, 2) [t, r] pairs from `sample_t` ((N,) means r = t; (N, 5) rows
        also pick trajectory rows, whose z, label and target replace the batch's): {"loss": sg(w) * mse,
        "mse": |u - sg(u_tgt)|^2 averaged per sample}, w the adaptive weight."""
        times, (t, r) = t, self.split_times(t)
        if noise is None:
            noise = torch.randn_like(x_start)
        z = self.q_sample(x_start, t, noise)
        if times.ndim == 2 and times.shape[1] == 5:
            z, v, model_kwargs, exact = self._with_trajectory_rows(model, z, t, r, times[:, 2:].long(),
                                                                   noise - x_start, dict(model_kwargs or {}))
        else:
            v, exact = self.guided_field(model, z, t, noise - x_start, model_kwargs), None
        u, u_tgt = self.jvp_target(model, z, t, r, v, model_kwargs, exact)
        mse = mean_flat((u.float() - u_tgt.float()) ** 2)
        weight = 1.0 / (mse.detach() + self.adaptive_c) ** self.adaptive_p
        return {"loss": weight * mse, "mse": mse}

    def _with_trajectory_rows(self, model: Model, z: Tensor, t: Tensor, r: Tensor, picks: Tensor, v_data: Tensor,
                              kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any], Tensor]:
        """(z, v, kwargs, exact) with the rows whose `picks` [trajectory, i, j] are set taken from the teacher's
        trajectories: z = z_{t_i}, label theirs (never dropped), v = (z_{t_i} - z_{t_j}) / (t_i - t_j); the
        other rows keep the guided field."""
        if self.trajectories is None:
            raise ValueError("times with trajectory picks need the teacher's trajectories: make_trajectories() first")
        traj = picks[:, 0] >= 0
        k, i, j = picks[traj].T
        states = self.trajectories.states
        z_i, z_j = states[k, i].to(z), states[k, j].to(z)
        z = z.clone()
        z[traj] = z_i
        kwargs["y"] = kwargs["y"].clone()
        kwargs["y"][traj] = self.trajectories.labels[k].to(kwargs["y"])
        if "force_drop_ids" in kwargs:
            kwargs["force_drop_ids"] = torch.where(traj.to(kwargs["force_drop_ids"].device), 0,
                                                   kwargs["force_drop_ids"])
        data = (~traj).nonzero().flatten()
        v = torch.empty_like(z)
        v[traj] = (z_i - z_j) / self._bcast(t[traj] - r[traj], z_i)
        if len(data):
            v[data] = self.guided_field(model, z[data], t[data], v_data[data], _rows(kwargs, data, len(z))).to(v)
        return z, v, kwargs, traj

    # ---- sampling --------------------------------------------------------------------------------
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


def _rows(kwargs: dict[str, Any], idx: Tensor, n: int) -> dict[str, Any]:
    """The model's keyword arguments for rows `idx` of a batch of n (per-row tensors indexed, the rest as is)."""
    return {k: a[idx] if isinstance(a, Tensor) and a.ndim and a.shape[0] == n else a for k, a in kwargs.items()}
