"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) as SD3 uses it (Esser et al. 2024).

Direction, stated once: x_t = (1 - t) x0 + t noise, t in [0, 1], noise at t = 1, data at t = 0.
The model predicts the velocity dx_t/dt = noise - x0; sampling integrates it from t = 1 down to t = 0.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ditkit.diffusion.gaussian import StepHook, check_step_noises, mean_flat, sampling_levels

Model = Callable[..., Tensor]

# The model sees t * FLOW_TIME_SCALE by default: DiT's sinusoidal timestep embedder was designed for Gaussian
# steps 0..999, so flow time [0, 1] is fed as [0, 1000] and the same embedder (and frequencies) fit both
# objectives. A `time_scale` of its own (MeanFlow: 10) makes the model smooth in t (see FlowMatching).
FLOW_TIME_SCALE = 1000.0

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("heun", "euler", "sde")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """The resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, sec. 5.3.2); s > 1 moves t
    towards noise, as larger images need."""
    return shift * t / (1 + (shift - 1) * t)


class FlowMatching:
    """The flow-matching objective and its samplers.

    timestep_sampling: how training draws t, "uniform" or "logit_normal" (t = sigmoid(m + s n), n ~ N(0, 1),
    Esser et al. 2024 eq. 19 with logit_mean m and logit_std s). shift: the resolution shift applied to the
    drawn t and, unless a sampler is given its own, to the sampling grid. loss_weight: optional function of
    t giving each sample's loss weight (None: 1). cosine_weight: weight of the velocity-direction term
    1 - cos(v_pred, v_target) per sample (LightningDiT, Yao et al. 2025; 0: plain flow matching).
    time_scale: the model is fed t * time_scale (default FLOW_TIME_SCALE, 1000). The embedder's top frequency
    is then time_scale radians per unit of t: at 1000 a trained model can wiggle in t on a scale of 1e-3, harmless
    for a sampler but not for a derivative in t (MeanFlow's JVP); 10 keeps it smooth (sCM, Lu & Song 2024,
    feed t unscaled for the same reason).
    """

    def __init__(self, timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0, loss_weight: Callable[[Tensor], Tensor] | None = None,
                 cosine_weight: float = 0.0, time_scale: float = FLOW_TIME_SCALE):
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}: "
                             f"expected one of {', '.join(TIMESTEP_SAMPLINGS)}")
        if shift <= 0 or logit_std <= 0:
            raise ValueError(f"shift and logit_std must be > 0, got shift={shift}, logit_std={logit_std}")
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        if cosine_weight < 0:
            raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}")
        self.shift, self.loss_weight, self.cosine_weight = shift, loss_weight, cosine_weight
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = float(time_scale)

    def __repr__(self) -> str:
        return (f"FlowMatching(timestep_sampling={self.timestep_sampling!r}, shift={self.shift}, "
                f"time_scale={self.time_scale:g})")

    # ---- the path ------------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """n training times in (0, 1), drawn as configured, then shifted."""
        if self.timestep_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))
        return shift_time(t, self.shift)

    @staticmethod
    def _bcast(t: Tensor, like: Tensor) -> Tensor:
        return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = (1 - t) x0 + t noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        t = self._bcast(t, x_start)
        return (1 - t) * x_start + t * noise

    def renoise(self, x: Tensor, s: float, t: float, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """A draw of x_t given x_s, s < t, on the path: x_t = (1 - t) / (1 - s) x_s + sigma z with
        sigma^2 = t^2 - ((1 - t) s / (1 - s))^2, which keeps x_t | x0 = N((1 - t) x0, t^2 I) (RePaint's jump)."""
        if not 0.0 <= s < t <= 1.0:
            raise ValueError(f"renoise needs 0 <= s < t <= 1, got s={s}, t={t}")
        a = (1 - t) / (1 - s)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return a * x + max(t * t - (a * s) ** 2, 0.0) ** 0.5 * noise

    def time_fraction(self, model_t: Tensor) -> Tensor:
        """Where a model timestep lies in the trajectory: flow time t (1 = pure noise)."""
        return model_t.float() / self.time_scale

    def x0_coefficients(self, model_t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b), each (N,), with the denoised image x0 = a x_t + b v: x0 = x_t - t v."""
        t = self.time_fraction(model_t)
        return torch.ones_like(t), -t

    def velocity(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The model's velocity at flow time t (N,): its first C output channels (a learned-sigma model's
        extra channels carry nothing here)."""
        out = model(x, t * self.time_scale, **(model_kwargs or {}))
        return out[:, : x.shape[1]]

    def training_losses(self, model: Model, x_start: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None,
                        noise: Tensor | None = None, given: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses {"loss", "mse"} (+ "cosine" with a cosine_weight): mse = |(noise - x0) - v(x_t, t)|^2
        averaged per sample, loss = loss_weight(t) * mse + cosine_weight * (1 - cos(v, noise - x0)).

        given: for clips (N, C, F, H, W), an (N, F) bool mask of frames given clean (frame conditioning): they
        enter x_t as x0, the model is called with a per-frame time (N, F) that is 0 on them, and the losses
        average over the other frames only."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        t_model, keep = t, None
        if given is not None:
            x_t, t_model, keep = self._given_frames(x_start, x_t, t, given)
        target, pred = noise - x_start, self.velocity(model, x_t, t_model, model_kwargs)
        if keep is None:
            mse = mean_flat((target - pred) ** 2)
        else:
            target, pred = target * keep, pred * keep
            mse = ((target - pred) ** 2).flatten(1).sum(1) / keep.expand_as(x_start).flatten(1).sum(1).clamp(min=1)
        loss = mse if self.loss_weight is None else self.loss_weight(t).to(mse) * mse
        out = {"loss": loss, "mse": mse}
        if self.cosine_weight:
            out["cosine"] = 1 - torch.nn.functional.cosine_similarity(pred.flatten(1).float(),
                                                                      target.flatten(1).float(), dim=1)
            out["loss"] = loss + self.cosine_weight * out["cosine"].to(loss)
        return out

    @staticmethod
    def _given_frames(x_start: Tensor, x_t: Tensor, t: Tensor, given: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t with the given frames clean, the per-frame time (N, F) that is 0 on them, the (N, 1, F, 1, 1)
        weight that is 1 on the frames the loss covers)."""
        if x_start.ndim != 5 or given.shape != (x_start.shape[0], x_start.shape[2]) or given.dtype != torch.bool:
            raise ValueError(f"given must be an (N, F) bool mask of the clips' frames (clips (N, C, F, H, W)); got "
                             f"{tuple(given.shape)} {given.dtype} for x0 of shape {tuple(x_start.shape)}")
        given = given.to(x_start.device)
        frames = given[:, None, :, None, None]
        t_frames = t.to(x_start.device)[:, None].expand(given.shape).masked_fill(given, 0)
        return torch.where(frames, x_start, x_t), t_frames, (~frames).to(x_start.dtype)

    # ---- sampling ------------------------------------------------------------------------------
    def timesteps(self, steps: int, shift: float | None = None) -> Tensor:
        """The sampling grid (steps + 1,) from 1 to 0, uniform then shifted (float64)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64),
                          self.shift if shift is None else shift)

    def sample_loop(self, model: Model, shape: Sequence[int], noise: Tensor | None = None, *,
                    sampler: str = "heun", steps: int = 50, shift: float | None = None, sde_scale: float = 1.0,
                    model_kwargs: dict[str, Any] | None = None, device: torch.device | str | None = None,
                    progress: bool = False, step_noises: Sequence[Tensor] | None = None,
                    generator: torch.Generator | None = None, start_step: int = 0,
                    step_hook: StepHook | None = None, jump_length: int = 1, jump_n_sample: int = 1) -> Tensor:
        """Integrate from `noise` (or a fresh draw) at t = 1 to t = 0.

        "euler": x <- x + h v (1 model call per step). "heun": Heun's 2nd-order method (Karras et al. 2022,
        Alg. 1 without churn; 2 calls per step). "sde": Euler-Maruyama on the reverse SDE with diffusion
        g(t)^2 = 2 sde_scale t, which keeps the path's marginals; with the score -(x + (1 - t) v) / t its
        drift is v + sde_scale * eps_hat (eps_hat = x + (1 - t) v) and fresh noise sqrt(2 sde_scale t |h|) z
        enters every step but the last. step_noises (sde only): one tensor per step replaces the draws.
        For editing (as GaussianDiffusion.p_sample_loop): start_step skips that many steps (`noise` is then
        the state at grid time timesteps(steps)[start_step]); step_hook(x, level) after every step, level
        `steps` being t = 0; jump_length and jump_n_sample add RePaint's resampling jumps.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for flow matching: expected one of {', '.join(SAMPLERS)}")
        grid = self.timesteps(steps, shift)
        if sampler != "sde" and step_noises is not None:
            raise ValueError(f"sampler {sampler!r} is deterministic and takes no step_noises (only 'sde' does)")
        levels = sampling_levels(steps, start_step, jump_length, jump_n_sample)  # level i is at time grid[i]
        check_step_noises(step_noises, sum(b > a for a, b in zip(levels, levels[1:])))
        x = noise.to(device) if noise is not None and device is not None else noise
        if x is None:
            x = torch.randn(*shape, generator=generator, device=device)
        N = x.shape[0]

        def v(x_: Tensor, t: float) -> Tensor:
            return self.velocity(model, x_, torch.full((N,), t, device=x_.device, dtype=torch.float32), model_kwargs)

        i = 0
        with torch.no_grad():
            for a, b in tqdm(list(zip(levels, levels[1:])), disable=not progress, desc=sampler, delay=1.0):
                t, s = float(grid[a]), float(grid[b])
                if b < a:
                    x = self.renoise(x, t, s, generator=generator)
                    continue
                h = s - t  # negative: time runs from noise to data
                d = v(x, t)
                if sampler == "euler":
                    x = x + h * d
                elif sampler == "heun":
                    x_euler = x + h * d
                    x = x + h * 0.5 * (d + v(x_euler, s))
                else:
                    eps_hat = x + (1 - t) * d
                    x = x + h * (d + sde_scale * eps_hat)
                    z = (step_noises[i].to(x) if step_noises is not None else
                         torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
                    if s > 0:
                        x = x + (2 * sde_scale * t * -h) ** 0.5 * z
                i += 1
                if step_hook is not None:
                    x = step_hook(x, b)
        return x


class EpsilonFromVelocity(torch.nn.Module):
    """A flow-matching (velocity) model as an epsilon model of a Gaussian diffusion, so that the DDPM and
    DDIM samplers run it unchanged (the same network under every sampler).

    The Gaussian x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, divided by a + b (a = sqrt(abar),
    b = sqrt(1 - abar)), is the flow state at s = b / (a + b); there the velocity gives
    eps = x_s + (1 - s) v. `alphas_cumprod` is the base schedule's (the steps the model is called with);
    `flow` the objective the model was trained with (its time_scale; default FlowMatching()).
    """

    def __init__(self, model: Model, alphas_cumprod: Tensor, flow: FlowMatching | None = None):
        super().__init__()
        self.model, self.flow = model, flow or FlowMatching()
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64), persistent=False)

    def forward(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        abar = self.alphas_cumprod.to(x.device)[t.long()]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        s = (b / (a + b)).to(torch.float32)
        x_s = x / FlowMatching._bcast((a + b).to(x.dtype), x)
        v = self.model(x_s, s * self.flow.time_scale, *args, **kwargs).to(x.dtype)
        return x_s + FlowMatching._bcast((1 - s).to(x.dtype), x) * v
