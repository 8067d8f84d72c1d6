"""Shared by the benchmarks: train-or-reuse a run, draw class-conditional digits from it with counted
function evaluations, and print a results table as text or as Markdown (`--markdown`, the form the docs
embed). (Scripts in benchmarks/ import it as `common`.)"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

from ditkit.pipeline import Pipeline
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
    return Pipeline.load(path), seconds


class CountingModel(torch.nn.Module):
    """The model, counting its forward calls (the sampler's function evaluations) in itself or in `counter`
    (another CountingModel, so that a guide model's calls add to the main model's)."""

    def __init__(self, model: torch.nn.Module, counter: CountingModel | None = None):
        super().__init__()
        self.model, self.calls, self.counter = model, 0, counter
        self.guidance_range = getattr(model, "guidance_range", None)  # a model told its CFG scale stays one

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
    to the pipeline's; `options` (sample() keywords, guidance as its flat settings) override the recorded ones.
    Returns the images in [-1, 1], the NFE of one trajectory (a guide model's calls included) and the seconds."""
    cfg = pipe.info["train_config"]
    # the run's recorded options, then the explicit ones (None included: it switches an option off)
    settings = {**pipe.settings(sampler=sampler, steps=steps, cfg=cfg_scale), **options}
    counted = CountingModel(model or pipe.model)
    guide = settings.get("guide_model") or (pipe.guide if settings.get("guide_scale") is not None else None)
    if guide is not None:  # the guide's calls count too
        settings["guide_model"] = CountingModel(guide, counter=counted)
    options = {k: v for k, v in pipe.sample_kwargs(settings).items() if k not in ("precision", "compile")}
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


def add_markdown_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true",
                        help="print the results as a Markdown table (as the docs show it) instead of text columns")


class Table:
    """A results table: printed row by row as aligned text (progress on long runs), or with `markdown` once,
    at `finish()`, as a Markdown table."""

    def __init__(self, header: Sequence[str], markdown: bool = False):
        self.header, self.markdown, self.rows = [str(h) for h in header], markdown, []
        self.widths = [max(len(h), 6) for h in self.header]
        if not markdown:
            print(self._text(self.header), flush=True)

    def _text(self, cells: Sequence[str]) -> str:
        return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, self.widths)))

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.header)} columns")
        row = [str(c) for c in cells]
        self.rows.append(row)
        if not self.markdown:
            print(self._text(row), flush=True)

    def finish(self) -> None:
        if self.markdown:
            print("\n".join(markdown_table(self.header, self.rows)), flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table (GitHub and MkDocs form)."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]
