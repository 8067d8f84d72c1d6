"""Gaussian diffusion as the DiT paper trains and samples it: DDPM (Ho et al. 2020) with the Improved-DDPM
additions (Nichol & Dhariwal 2021: cosine schedule, learned-range variance, hybrid loss, respacing) and
DDIM sampling (Song et al. 2021).

Time: integer steps 0..T-1, 0 = the least noisy. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.
The schedule is computed in float64; each coefficient is gathered, cast to float32 (float64 for float64
inputs) and then applied, so float32 results agree with the original implementation to rounding.

A respaced diffusion (fewer steps) works on indices 0..len(timestep_map)-1 and calls the model with the
original step numbers `timestep_map[t]`, so a model trained on 1000 steps samples in 250 or 25.

The method names, argument order and results are the original DiT code's, so scripts written for it run
unchanged; its classifier guidance (`cond_fn`) is left out, so the arguments after `denoised_fn` (and after
`noise` in the loops) are keyword-only, and the loops add `step_noises=` and `generator=` for replay.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

Model = Callable[..., Tensor]
StepHook = Callable[[Tensor, int], Tensor]  # (state after a step, level reached) -> state to go on from

SCHEDULES = ("linear", "cosine")
MEAN_TYPES = ("epsilon", "x0")
VAR_TYPES = ("fixed_large", "fixed_small", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# ------------------------------------------------------------------------------------------------
# Schedules and respacing
# ------------------------------------------------------------------------------------------------

def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> Tensor:
    """betas (float64) of the "linear" (Ho et al.; scaled so any T matches T=1000) or "cosine"
    (Nichol & Dhariwal, s = 0.008, betas capped at 0.999) schedule."""
    T = num_diffusion_timesteps
    if T < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {T}")
    if name == "linear":
        scale = 1000 / T
        return torch.linspace(scale * 0.0001, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    raise ValueError(f"unknown noise_schedule {name!r}: expected one of {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The steps a respaced diffusion keeps, sorted.

    "ddimN": the stride i with len(range(0, T, i)) == N (DDIM's uniform spacing, starts at step 0).
    "N" or "N1,N2,...": T is cut into equal sections and each section's count is spread evenly over it,
    first and last step of the section included. A list of ints is read as the section counts.
    """
    allowed = ('"ddimN" (N steps at a fixed stride), "N" or "N1,N2,..." (N evenly spaced steps per '
               f'section), with 1 <= N <= {num_timesteps}')
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            if not text[4:].isdigit():
                raise ValueError(f"bad timestep_respacing {section_counts!r}: expected {allowed}")
            desired = int(text[4:])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} DDIM steps at a fixed stride from {num_timesteps}; "
                             f"use \"{desired}\" (even spacing) or another count")
        parts = text.split(",")
        if not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad timestep_respacing {section_counts!r}: expected {allowed}")
        section_counts = [int(p) for p in parts]
    if not section_counts:
        raise ValueError(f"timestep_respacing is empty: expected {allowed}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps: expected {allowed}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Python's round (half to even) is what fixes the original's choice of steps.
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


# ------------------------------------------------------------------------------------------------
# Small maths
# ------------------------------------------------------------------------------------------------

def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation, as Ho et al.'s discretized decoder uses it."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) for data in [-1, 1] quantised to 256 bins, under N(means, e^(2 log_scales)); the two
    outermost bins extend to -inf and +inf (Ho et al. 2020, eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """arr[t] (float64 schedule) as a float tensor broadcastable to `like`."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    out = arr[t.detach().cpu().long()].to(device=like.device, dtype=dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def _step_noise(step_noises: Sequence[Tensor] | None, i: int, like: Tensor,
                generator: torch.Generator | None) -> Tensor:
    if step_noises is not None:
        return step_noises[i].to(device=like.device, dtype=like.dtype)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def check_step_noises(step_noises: Sequence[Tensor] | None, steps: int) -> None:
    """ValueError unless step_noises is None or holds exactly one tensor per step."""
    if step_noises is not None and len(step_noises) != steps:
        raise ValueError(f"step_noises must hold one tensor per sampling step ({steps}), got {len(step_noises)}")


def sampling_levels(steps: int, start_step: int = 0, jump_length: int = 1, jump_n_sample: int = 1) -> list[int]:
    """The levels a sampling loop visits, in order: level i is the state before the i-th of `steps` steps
    (0 = the start noise, `steps` = data).

    Plain sampling visits start_step, start_step + 1, ..., steps. With RePaint's resampling jumps
    (Lugmayr et al. 2022, sec. 4.2) the state is noised back `jump_length` levels after every
    `jump_length` steps (never past start_step, never from the data), so each such stretch is sampled
    `jump_n_sample` times in all; jump_length 1 is the paper's Algorithm 1 with U = jump_n_sample.
    """
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in 0..{steps} (the number of steps), got {start_step}")
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}")
    levels, jumps, level = [start_step], {}, start_step
    while level < steps:
        level += 1
        levels.append(level)
        if level < steps and (level - start_step) % jump_length == 0 and jumps.get(level, 0) < jump_n_sample - 1:
            jumps[level] = jumps.get(level, 0) + 1
            level -= jump_length
            levels.append(level)
    return levels


# ------------------------------------------------------------------------------------------------
# The diffusion
# ------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """DDPM/IDDPM maths over a (possibly respaced) beta schedule.

    betas: the base schedule (float64, T steps). use_timesteps: the steps to keep (None = all); the kept
    steps get new betas so that abar at each kept step is unchanged (Nichol & Dhariwal, sec. 4).
    model_mean_type: "epsilon" or "x0" (what the model predicts). model_var_type: "fixed_large" (beta_t),
    "fixed_small" (the posterior variance) or "learned_range" (the model outputs v in [-1, 1] per channel
    and log sigma^2 = (v+1)/2 log beta_t + (1-v)/2 log beta~_t). loss_type: "mse" (+ the VLB term when the
    variance is learned), "rescaled_mse" (that VLB term times T/1000), "kl" or "rescaled_kl" (times T).
    """

    def __init__(self, betas: Tensor | Sequence[float], model_mean_type: str = "epsilon",
                 model_var_type: str = "learned_range", loss_type: str = "mse",
                 use_timesteps: Sequence[int] | None = None):
        for value, name, allowed in ((model_mean_type, "model_mean_type", MEAN_TYPES),
                                     (model_var_type, "model_var_type", VAR_TYPES),
                                     (loss_type, "loss_type", LOSS_TYPES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.base_betas = torch.as_tensor(betas, dtype=torch.float64).clone()
        if self.base_betas.ndim != 1 or not ((self.base_betas > 0) & (self.base_betas <= 1)).all():
            raise ValueError("betas must be a 1-D sequence of values in (0, 1]")
        self.original_num_steps = len(self.base_betas)

        base_abar = torch.cumprod(1.0 - self.base_betas, dim=0)
        keep = list(range(self.original_num_steps)) if use_timesteps is None else sorted(set(use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.original_num_steps:
            raise ValueError(f"use_timesteps must be steps in 0..{self.original_num_steps - 1}, got {keep[:5]}...")
        self.timestep_map = torch.tensor(keep, dtype=torch.long)
        kept_abar = base_abar[self.timestep_map]
        prev_abar = torch.cat([torch.ones(1, dtype=torch.float64), kept_abar[:-1]])
        betas = 1.0 - kept_abar / prev_abar

        self.betas = betas
        self.num_timesteps = T = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log there is taken from t = 1 (beta_0 if T = 1).
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._log_betas = torch.log(betas)
        # "fixed_large" uses beta_t, but the t = 1 posterior variance at t = 0 for a better decoder likelihood
        self._large_variance = torch.cat([first, betas[1:]])

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(steps={self.num_timesteps} of {self.original_num_steps}, "
                f"mean={self.model_mean_type}, var={self.model_var_type}, loss={self.loss_type})")

    def respace(self, timestep_respacing: str | Sequence[int]) -> GaussianDiffusion:
        """The same diffusion over fewer steps of the base schedule ("250", "ddim25", ...; see
        `space_timesteps`). "" means all steps."""
        keep = (None if timestep_respacing == "" else
                space_timesteps(self.original_num_steps, timestep_respacing))
        return GaussianDiffusion(self.base_betas, self.model_mean_type, self.model_var_type, self.loss_type, keep)

    def time_fraction(self, model_t: Tensor) -> Tensor:
        """Where a model timestep (0..T-1 of the base schedule) lies in the trajectory: t / T, 1 ~ pure noise."""
        return model_t.float() / self.original_num_steps

    def x0_coefficients(self, model_t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b), each (N,), with the denoised image x0 = a x_t + b * prediction at base timesteps `model_t`
        (epsilon: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); x0 prediction: a = 0, b = 1)."""
        abar = torch.cumprod(1.0 - self.base_betas, dim=0).to(model_t.device)[model_t.long()].float()
        if self.model_mean_type == "x0":
            return torch.zeros_like(abar), torch.ones_like(abar)
        return abar.rsqrt(), -(1.0 / abar - 1.0).sqrt()

    def _call_model(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None) -> Tensor:
        out = model(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        want = 2 * x.shape[1] if self.model_var_type == "learned_range" else x.shape[1]
        if out.shape[1] != want:
            raise ValueError(f"model returned {out.shape[1]} channels; model_var_type {self.model_var_type!r} "
                             f"with {x.shape[1]} input channels needs {want}")
        return out

    # ---- the forward process -------------------------------------------------------------------
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """A draw of x_t ~ q(x_t | x_0) (with the given noise)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def renoise(self, x: Tensor, t_from: int, t_to: int, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """A draw of x_{t_to} given x_{t_from}, t_from < t_to, under the forward process:
        N(sqrt(abar_to / abar_from) x, (1 - abar_to / abar_from) I) (RePaint's jump back to more noise)."""
        if not 0 <= t_from < t_to < self.num_timesteps:
            raise ValueError(f"renoise needs 0 <= t_from < t_to < {self.num_timesteps}, got {t_from} and {t_to}")
        ratio = float(self.alphas_cumprod[t_to] / self.alphas_cumprod[t_from])
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return ratio ** 0.5 * x + (1 - ratio) ** 0.5 * noise

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t),
                _extract(self.posterior_log_variance_clipped, t, x_t))

    # ---- the reverse process -------------------------------------------------------------------
    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def p_mean_variance(self, model: Model, x: Tensor, t: Tensor, clip_denoised: bool = True,
                        denoised_fn: Callable[[Tensor], Tensor] | None = None,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t): {"mean", "variance", "log_variance", "pred_xstart"}.

        `model(x, t, **model_kwargs)` gets the base-schedule timesteps; clip_denoised clamps the predicted
        x_0 to [-1, 1] and denoised_fn (if given) is applied to it before the mean is formed."""
        C = x.shape[1]
        model_output = self._call_model(model, x, t, model_kwargs)
        if self.model_var_type == "learned_range":
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(self._log_betas, t, x)
            frac = (var_values + 1) / 2  # v in [-1, 1] -> interpolation weight in [0, 1]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            var, log_var = ((self._large_variance, torch.log(self._large_variance))
                            if self.model_var_type == "fixed_large"
                            else (self.posterior_variance, self.posterior_log_variance_clipped))
            model_variance = _extract(var, t, x).expand_as(x)
            model_log_variance = _extract(log_var, t, x).expand_as(x)

        def process_xstart(x0: Tensor) -> Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == "x0":
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model: Model, x: Tensor, t: Tensor, clip_denoised: bool = True,
                 denoised_fn: Callable[[Tensor], Tensor] | None = None, *,
                 model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1}: {"sample", "pred_xstart"}. No noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: Model, x: Tensor, t: Tensor, clip_denoised: bool = True,
                    denoised_fn: Callable[[Tensor], Tensor] | None = None, *,
                    model_kwargs: dict[str, Any] | None = None, eta: float = 0.0,
                    noise: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = _extract(self.alphas_cumprod, t, x)
        abar_prev = _extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        mean_pred = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step: Callable[..., dict[str, Tensor]], model: Model, shape: Sequence[int],
              noise: Tensor | None, model_kwargs: dict[str, Any] | None, device: torch.device | str | None,
              progress: bool, step_noises: Sequence[Tensor] | None, generator: torch.Generator | None,
              desc: str, start_step: int, step_hook: StepHook | None, jump_length: int, jump_n_sample: int,
              **step_kwargs: Any) -> Tensor:
        # level i is the state before the i-th step, at index T - 1 - i (index -1: x_0)
        T = self.num_timesteps
        levels = sampling_levels(T, start_step, jump_length, jump_n_sample)
        check_step_noises(step_noises, sum(b > a for a, b in zip(levels, levels[1:])))
        if noise is not None:
            img = noise.to(device) if device is not None else noise
        else:
            img = torch.randn(*shape, generator=generator, device=device)
        i = 0
        for a, b in tqdm(list(zip(levels, levels[1:])), disable=not progress, desc=desc, delay=1.0):
            if b < a:
                img = self.renoise(img, T - 1 - a, T - 1 - b, generator=generator)
                continue
            t = torch.full((img.shape[0],), T - 1 - a, device=img.device, dtype=torch.long)
            with torch.no_grad():
                img = step(model, img, t, model_kwargs=model_kwargs,
                           noise=_step_noise(step_noises, i, img, generator), **step_kwargs)["sample"]
            i += 1
            if step_hook is not None:
                img = step_hook(img, b)
        return img

    def p_sample_loop(self, model: Model, shape: Sequence[int], noise: Tensor | None = None, *,
                      clip_denoised: bool = True, denoised_fn: Callable[[Tensor], Tensor] | None = None,
                      model_kwargs: dict[str, Any] | None = None, device: torch.device | str | None = None,
                      progress: bool = False, step_noises: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None, start_step: int = 0,
                      step_hook: StepHook | None = None, jump_length: int = 1, jump_n_sample: int = 1) -> Tensor:
        """Ancestral sampling over all steps of this (respaced) diffusion, from `noise` (or a fresh draw)
        at the last step to x_0. step_noises[i] replaces the noise drawn at the i-th step (from the
        noisiest); otherwise all noise comes from `generator`.

        For editing: start_step skips that many of the noisiest steps (`noise` is then the state at step
        T - 1 - start_step); step_hook(x, level) is called after every step with the level reached (see
        `sampling_levels`; level T is x_0) and returns the state to go on from; jump_length and
        jump_n_sample add RePaint's resampling jumps (their noise always comes from `generator`)."""
        return self._loop(self.p_sample, model, shape, noise, model_kwargs, device, progress, step_noises,
                          generator, "ddpm", start_step, step_hook, jump_length, jump_n_sample,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn)

    def ddim_sample_loop(self, model: Model, shape: Sequence[int], noise: Tensor | None = None, *,
                         clip_denoised: bool = True, denoised_fn: Callable[[Tensor], Tensor] | None = None,
                         model_kwargs: dict[str, Any] | None = None, device: torch.device | str | None = None,
                         progress: bool = False, eta: float = 0.0, step_noises: Sequence[Tensor] | None = None,
                         generator: torch.Generator | None = None, start_step: int = 0,
                         step_hook: StepHook | None = None, jump_length: int = 1,
                         jump_n_sample: int = 1) -> Tensor:
        """DDIM sampling over all steps of this (respaced) diffusion; arguments as `p_sample_loop`."""
        return self._loop(self.ddim_sample, model, shape, noise, model_kwargs, device, progress, step_noises,
                          generator, "ddim", start_step, step_hook, jump_length, jump_n_sample,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn, eta=eta)

    # ---- training ------------------------------------------------------------------------------
    def _vb_terms_bpd(self, model: Model, x_start: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True,
                      model_kwargs: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """The VLB term at t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretized decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: Model, x_start: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses {"loss", "mse", "vb"} ("vb" only when the variance is learned or the loss is KL).

        MSE losses: mse = |target - prediction|^2 averaged per sample; with learned variance the hybrid
        loss adds the VLB term computed with the mean's prediction detached, so the VLB trains only the
        variance (Nichol & Dhariwal, sec. 3.1)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        terms: dict[str, Tensor] = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        C = x_t.shape[1]
        model_output = self._call_model(model, x_t, t, model_kwargs)
        if self.model_var_type == "learned_range":
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == "rescaled_mse":
                # the VLB sums T terms where the MSE is one; this keeps their balance as in T = 1000
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = noise if self.model_mean_type == "epsilon" else x_start
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def create_diffusion(timestep_respacing: str | Sequence[int] | None, noise_schedule: str = "linear",
                     use_kl: bool = False, sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The original DiT's `create_diffusion`: same arguments, same meaning.

    timestep_respacing: "" or None (all steps), "250" (evenly spaced), "ddim25" (fixed stride), or
    comma-separated section counts. The defaults are DiT's training recipe: linear betas, 1000 steps,
    epsilon prediction, learned-range variance, loss = mse + vb."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    diffusion = GaussianDiffusion(betas, "x0" if predict_xstart else "epsilon", var_type, loss_type)
    return diffusion.respace(timestep_respacing or "")
