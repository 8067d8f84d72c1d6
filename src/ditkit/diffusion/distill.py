"""Trajectory distillation: a one-step (average-velocity) model regresses a frozen flow teacher's ODE.

The teacher's guided ODE (`AverageVelocity.guided_velocity`: CFG scale w on the times of cfg_interval) is
solved once, before training, with Heun steps from a fixed set of noises, and every state is kept: states
z_{t_0}, ..., z_{t_S} along each trajectory, t_0 = 1 (the noise) > ... > t_S = 0 (the sample). For any two
states i < j on one trajectory, (z_{t_i} - z_{t_j}) / (t_i - t_j) is the average velocity over [t_j, t_i]
itself, so the model u(z_{t_i}, t_j, t_i) regresses it directly: no JVP and no bootstrapping from the model's
own shorter jumps. Half of the pairs are the whole jump (0, S), the one one-step sampling makes; the rest are
uniform over i < j. The loss is MeanFlow's adaptively weighted squared error.

The model and its samplers are `AverageVelocity`'s (a two-time DiT, sampled with "meanflow" jumps), so a
distilled run samples exactly as a MeanFlow run does. Each trajectory costs 2 teacher calls a Heun step, once.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ditkit.diffusion.flow import FLOW_TIME_SCALE
from ditkit.diffusion.meanflow import AverageVelocity, Model, adaptive_loss, check_interval

TRAJECTORY_SHIFT = 1.5  # the teacher's ODE grid: the demo's sampling shift
WHOLE_JUMP_SHARE = 0.5  # of each batch: the pair (0, S), the jump that one-step sampling makes


@dataclass
class Trajectories:
    """The teacher's guided ODE solved from fixed noises: states (K, S + 1, C, H, W) at `times` (S + 1,),
    which run from 1 (the noise) to 0 (the sample), for class `labels` (K,)."""
    states: Tensor
    times: Tensor
    labels: Tensor


@dataclass
class TrajectoryPairs:
    """The rows of a distillation batch: trajectory `k` and two of its states `i` < `j` (integer tensors,
    (N,) each). Sliced and moved like a tensor, so the trainer takes a process's rows as it does times."""
    k: Tensor
    i: Tensor
    j: Tensor

    def __len__(self) -> int:
        return len(self.k)

    def __getitem__(self, rows: Any) -> TrajectoryPairs:
        return TrajectoryPairs(self.k[rows], self.i[rows], self.j[rows])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrajectoryPairs:
        return TrajectoryPairs(*(a.to(device, non_blocking=non_blocking) for a in (self.k, self.i, self.j)))


class TrajectoryDistillation(AverageVelocity):
    """Distil a frozen flow-matching `teacher` into a one-step average-velocity model.

    trajectories: how many ODE solutions (noises) are made, classes in turn; heun_steps: the Heun steps of
    each, on the grid shifted by TRAJECTORY_SHIFT. cfg_scale, cfg_interval: the teacher's guidance
    (w on the times (lo, hi); w = 1 outside, None: every time). time_scale: both times are fed x this.
    adaptive_p, adaptive_c: MeanFlow's loss weight 1 / (|delta|^2 + c)^p. The teacher may be None for
    sampling only; `make_trajectories` then refuses.
    """

    def __init__(self, teacher: Model | None = None, trajectories: int = 2048, heun_steps: int = 8,
                 cfg_scale: float = 1.0, cfg_interval: tuple[float, float] | None = None,
                 time_scale: float = FLOW_TIME_SCALE, adaptive_p: float = 1.0, adaptive_c: float = 1e-3):
        super().__init__(time_scale=time_scale)
        if trajectories < 1 or heun_steps < 1:
            raise ValueError(f"trajectories and heun_steps must be >= 1, got {trajectories}, {heun_steps}")
        if cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"adaptive_p must be >= 0 and adaptive_c > 0, got {adaptive_p}, {adaptive_c}")
        check_interval(cfg_interval)
        self.teacher, self.num_trajectories, self.heun_steps = teacher, trajectories, heun_steps
        self.cfg_scale, self.cfg_interval = cfg_scale, cfg_interval
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c
        self.trajectories: Trajectories | None = None

    def __repr__(self) -> str:
        return (f"TrajectoryDistillation(trajectories={self.num_trajectories}, heun_steps={self.heun_steps}, "
                f"cfg_scale={self.cfg_scale}, cfg_interval={self.cfg_interval}, time_scale={self.time_scale:g})")

    def make_trajectories(self, shape: Sequence[int], num_classes: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None, batch: int = 256,
                          progress: bool = False) -> Trajectories:
        """Solve the teacher's guided ODE from `trajectories` noises of `shape` (C, H, W), classes in turn,
        with FlowMatching's Heun sampler, keep every state, and set them as this objective's `trajectories`.
        Noise comes from `generator` (CPU), so a resumed run makes the same ones again."""
        if self.teacher is None:
            raise ValueError("trajectories are the teacher's: build TrajectoryDistillation with teacher= first")

        def guided_teacher(z: Tensor, t: Tensor, interval: Tensor | None = None, **kwargs: Any) -> Tensor:
            t = t / self.time_scale  # the sampler feeds t x time_scale
            return self.guided_velocity(self.teacher, z, t, kwargs, self.cfg_scale, self.cfg_interval).float()

        start, chunks = time.perf_counter(), []
        labels = torch.arange(self.num_trajectories) % num_classes
        for lo in range(0, self.num_trajectories, batch):
            y = labels[lo:lo + batch].to(device)
            states = [torch.randn(len(y), *shape, generator=generator).to(device)]
            self.sample_loop(guided_teacher, states[0].shape, states[0], sampler="heun", steps=self.heun_steps,
                             shift=TRAJECTORY_SHIFT, model_kwargs={"y": y},
                             step_hook=lambda x, level, kept=states: kept.append(x) or x)
            chunks.append(torch.stack(states, dim=1))
        grid = self.timesteps(self.heun_steps, TRAJECTORY_SHIFT).float()
        self.trajectories = Trajectories(torch.cat(chunks), grid.to(device), labels.to(device))
        if progress:
            print(f"teacher trajectories: {self.num_trajectories} x {self.heun_steps} Heun steps in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        return self.trajectories

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> TrajectoryPairs:
        """n training rows: trajectory k uniform, states i < j uniform over the pairs, and for a
        WHOLE_JUMP_SHARE of rows (0, S). All draws come from `generator`, so a seeded trainer replays them on
        resume."""
        S = self.heun_steps
        k = torch.randint(0, self.num_trajectories, (n,), generator=generator)
        i = torch.randint(0, S + 1, (n,), generator=generator)
        j = torch.randint(0, S, (n,), generator=generator)
        j = j + (j >= i).long()  # a distinct second state
        i, j = torch.minimum(i, j), torch.maximum(i, j)
        whole = torch.rand(n, generator=generator) < WHOLE_JUMP_SHARE
        return TrajectoryPairs(k, torch.where(whole, 0, i), torch.where(whole, S, j))

    def pair_targets(self, pairs: TrajectoryPairs, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(z, t, r, labels, v) of trajectory rows: z = z_{t_i}, t = t_i > r = t_j, their trajectory's label,
        v = (z_{t_i} - z_{t_j}) / (t_i - t_j) the exact average velocity over [r, t]; z and v as `like`."""
        if self.trajectories is None:
            raise ValueError("trajectory distillation trains on the teacher's trajectories: make_trajectories() "
                             "first")
        tr = self.trajectories
        k, i, j = (a.to(tr.states.device) for a in (pairs.k, pairs.i, pairs.j))
        times = tr.times.cpu()
        t = times[i.cpu()].to(like.device)
        r = times[j.cpu()].to(like.device)
        z_i, z_j = tr.states[k, i].to(like), tr.states[k, j].to(like)
        v = (z_i - z_j) / self._bcast(t - r, z_i)
        return z_i, t, r, tr.labels[k].to(like.device), v

    def training_losses(self, model: Model, x_start: Tensor, t: TrajectoryPairs,
                        model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses for the rows `t` (from `sample_t`): {"loss": sg(w) * mse, "mse": |u - v|^2
        averaged per sample}, u the model at (z_{t_i}, t_j, t_i) with the trajectory's label (never dropped),
        v the exact average velocity between the two states. The batch's images and noise are not used."""
        z, tt, r, labels, v = self.pair_targets(t, x_start)
        kwargs = dict(model_kwargs or {})
        kwargs["y"] = labels.to(kwargs["y"]) if "y" in kwargs else labels
        if "force_drop_ids" in kwargs:
            kwargs["force_drop_ids"] = torch.zeros_like(kwargs["force_drop_ids"])
        u = self.average_velocity(model, z, tt, r, kwargs)
        return adaptive_loss(u, v, self.adaptive_p, self.adaptive_c)
