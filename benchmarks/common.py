"""Shared by the quality benchmarks: train-or-reuse a run, and draw class-conditional digits from it
with counted function evaluations. (Scripts in benchmarks/ import it as `common`.)"""
from __future__ import annotations

import time
from typing import Any

import torch

from ditkit.pipeline import Pipeline, load_pipeline
from ditkit.sampling import sample
from ditkit.train import build_config, train
from ditkit.checkpoint import latest_checkpoint


def trained_run(path: str, overrides: dict[str, Any]) -> tuple[Pipeline, float | None]:
    """The run in `path` and its training seconds (None if reused): trained first with the demo config plus
    `overrides` when `path` holds no checkpoint yet."""
    seconds = None
    if latest_checkpoint(path) is None:
        print(f"training {path} ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'demo config'}) ...",
              flush=True)
        seconds = train(build_config(None, {"out": path, **overrides}, []), progress=False).seconds
    return load_pipeline(path), seconds


class CountingModel(torch.nn.Module):
    """The model, counting its forward calls (the sampler's function evaluations) in itself or in `counter`
    (another CountingModel, so that a guide model's calls add to the main model's)."""

    def __init__(self, model: torch.nn.Module, counter: CountingModel | None = None):
        super().__init__()
        self.model, self.calls, self.counter = model, 0, counter

    def forward(self, *args, **kwargs):
        if self.counter is not None:
            self.counter.calls += 1
        else:
            self.calls += 1
        return self.model(*args, **kwargs)


@torch.no_grad()
def draw(pipe: Pipeline, y: torch.Tensor, noise: torch.Tensor, sampler: str | None = None,
         steps: int | None = None, cfg_scale: float | None = None, chunk: int = 250,
         model: torch.nn.Module | None = None, objective: Any = None,
         **options: Any) -> tuple[torch.Tensor, int, float]:
    """Samples for labels y from fixed noise (N, C, H, W), in the run's precision; sampler, steps, CFG and the
    other recorded sampling options (cfg_interval, shift, APG, ...) default to the run's, model and objective
    to the pipeline's; `options` (sample() keywords) override the recorded ones. Returns the images in
    [-1, 1], the NFE of one trajectory (a guide model's calls included) and the seconds taken."""
    cfg = pipe.info["train_config"]
    settings = pipe.settings(sampler=sampler, steps=steps, cfg=cfg_scale)
    # the run's recorded options, then the explicit ones (None included: it switches an option off)
    options = {**{k: v for k, v in pipe.sample_kwargs(settings).items() if k not in ("precision", "compile")},
               **options}
    counted = CountingModel(model or pipe.model)
    if options.get("guide_model") is not None:  # the guide's calls count too
        options["guide_model"] = CountingModel(options["guide_model"], counter=counted)
    start, images, nfe = time.perf_counter(), [], 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16"):
        for i in range(0, len(y), chunk):
            counted.calls = 0
            out = sample(counted, objective or pipe.objective, noise[i:i + chunk].shape, y=y[i:i + chunk],
                         noise=noise[i:i + chunk], generator=torch.Generator().manual_seed(i), progress=False,
                         guided_channels=pipe.model.in_channels, null_label=pipe.model.num_classes, **options)
            images.append(out.float().clamp(-1, 1))
            nfe = counted.calls
    return torch.cat(images), nfe, time.perf_counter() - start


def digits(n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (0..9 repeated) and fixed starting noise for 32x32 single-channel digits."""
    y = torch.arange(10).repeat(n_per_class)
    return y, torch.randn(len(y), 1, 32, 32, generator=torch.Generator().manual_seed(seed))
