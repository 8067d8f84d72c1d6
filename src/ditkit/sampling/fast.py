"""Options of `ditkit.sample` that change how the model is run, not what is sampled: reduced-precision
autocast, `torch.compile`, block caching (`ditkit.sampling.cache`), and the warning for step counts a model
cannot honour. Guidance and sampler maths stay in float32: the model's output is cast back to the state's
dtype before guidance (`ditkit.sampling.guidance`)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ditkit.sampling.cache import BlockCache

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fewer steps than this on an instantaneous-velocity / noise model earn a warning: one step lands on the
# posterior mean E[x0 | noise] (a blurred class average); benchmarks/few_step.py measures what 2+ steps give
FEW_STEPS = 2


class Autocast(nn.Module):
    """The model run under `torch.autocast(device_type, dtype)`."""

    def __init__(self, model: Callable[..., Tensor], device_type: str, dtype: torch.dtype):
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, *args, **kwargs) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs)


class Compiled(nn.Module):
    """`torch.compile(model)`, turning a compiler failure at the first call into one ValueError."""

    def __init__(self, model: Callable[..., Tensor]):
        super().__init__()
        self.model, self.compiled, self.ok = model, torch.compile(model), False

    def forward(self, *args, **kwargs) -> Tensor:
        if self.ok:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except ValueError:
            raise
        except Exception as err:  # inductor raises many types for a missing or broken toolchain
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"compile=True: torch.compile failed on this machine ({first[:200]}); "
                             f"sample without compile") from None
        self.ok = True
        return out


def check_compiler(device_type: str) -> None:
    """ValueError unless torch.compile has a backend toolchain here: a C++ compiler on the CPU, Triton on CUDA."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("compile=True on a CUDA GPU needs Triton (pip install triton); sample without compile")
        return
    cxx = os.environ.get("CXX")
    found = shutil.which(cxx) if cxx else (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"))
    if not found:
        raise ValueError(f"compile=True needs a C++ compiler for torch.compile on the CPU "
                         f"({'CXX=' + cxx + ' was not found' if cxx else 'no c++, g++ or clang++ on PATH'}); "
                         f"install one (e.g. apt install g++) or sample without compile")


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (or None: as called), got {precision!r}")


def prepare_model(model: Callable[..., Tensor], device: torch.device, precision: str | None = None,
                  compile: bool = False, cache: float | None = None) -> Callable[..., Tensor]:
    """`model` wrapped for sampling: block cache (innermost), then torch.compile, then autocast."""
    check_precision(precision)
    if compile and cache is not None:
        raise ValueError("compile=True and cache= cannot be combined (the cache decides per call which blocks "
                         "run, which a compiled graph cannot); choose one")
    if isinstance(model, BlockCache):  # a cache the caller holds (to read its counters): a new trajectory
        model.reset()
    if cache is not None:
        model = BlockCache(model, cache)
    if compile:
        check_compiler(device.type)
        model = Compiled(model)
    dtype = PRECISIONS.get(precision) if precision else None
    if dtype is not None:
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("precision='fp16' needs a CUDA GPU; on the CPU use 'bf16'")
        model = Autocast(model, device.type, dtype)
    return model


def warn_few_steps(objective: object, sampler: str, steps: int) -> None:
    """Warn when a model that learned an instantaneous velocity (or noise) is asked for a single step: the
    result is the posterior mean (a blurred average), not samples. One-step models (MeanFlow) are exempt."""
    from ditkit.diffusion.meanflow import AverageVelocity

    if steps >= FEW_STEPS or (isinstance(objective, AverageVelocity) and sampler == "meanflow"):
        return
    kind = "flow-matching (velocity)" if hasattr(objective, "velocity") else "Gaussian diffusion (noise)"
    warnings.warn(f"{steps} {sampler} step on a {kind} model: it was trained for many small steps, so one step "
                  f"gives the blurred average image, not samples; use >= 2 steps (10+ for full quality), or a "
                  f"one-step model (objective: meanflow)", UserWarning, stacklevel=3)
