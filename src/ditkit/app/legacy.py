"""A stand-in for the Pipeline API (issue 13) until it is merged: the part of its contract the app uses
(`load`, the run's facts, `generate`, `edit`), over the old `load_pipeline`, `sampling.sample` and
`editing.edit`. Its previews are the sampler's current state, not the x0 prediction, and editing has
no previews. Delete this file once `ditkit.pipeline.Pipeline.load` exists (engine.load then uses it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ditkit.pipeline import load_pipeline


@dataclass
class Samples:
    images: Tensor
    labels: Tensor
    ncol: int
    settings: dict[str, Any] = field(default_factory=dict)


class LegacyPipeline:
    def __init__(self, old: Any, device: str):
        from ditkit.models import VideoDiT
        from ditkit.models.control import ControlDiT
        from ditkit.sampling import DEFAULT_STEPS, samplers_for

        self.old, self.device = old, device
        self.model, self.objective, self.info = old.model, old.objective, old.info
        model = old.model
        self.kind = ("control" if isinstance(model, ControlDiT) else "video" if isinstance(model, VideoDiT)
                     else "text" if old.is_text_model else "image")
        self.class_names = list(self.info.get("class_names") or [])
        self.num_classes = len(self.class_names) if self.kind == "text" else int(model.num_classes)
        self.conditional = bool(self.info.get("conditional", self.num_classes > 1))
        size = self.info.get("image_size") or getattr(model, "input_size", (0, 0))
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        self.channels = int(self.info.get("channels") or model.in_channels)
        tc = self.info.get("train_config", {})
        sampler = tc.get("sampler") or samplers_for(old.objective)[0]
        self.defaults = {"sampler": sampler, "steps": tc.get("sample_steps") or DEFAULT_STEPS[sampler],
                         "cfg": float(tc.get("cfg_scale", 1.5)) if self.conditional else 1.0, "cfg_interval": None}

    @classmethod
    def load(cls, path: str | Path, ema: bool = True, device: str | None = None) -> LegacyPipeline:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_pipeline(path, ema=ema, device=device), device)

    def _settings(self, sampler, steps, cfg, cfg_interval) -> dict[str, Any]:
        s = dict(self.defaults)
        s.update({k: v for k, v in dict(sampler=sampler, steps=steps, cfg=cfg, cfg_interval=cfg_interval).items()
                  if v is not None})
        return s

    def _conditioned(self, classes: list[int] | None, prompts: list[str] | None) -> tuple[Any, list[int]]:
        if self.kind == "text":
            return self.old.with_prompts(prompts or self.class_names[:1]), list(range(len(prompts or [0])))
        return self.model, classes if classes is not None else [0]

    def generate(self, classes: list[int] | None = None, prompts: list[str] | None = None, n_per_class: int = 1,
                 sampler: str | None = None, steps: int | None = None, cfg: float | None = None,
                 cfg_interval: tuple[float, float] | None = None, seed: int = 0, frames: int | None = None,
                 progress: bool = True, callback: Callable[[int, int, Tensor], None] | None = None) -> Samples:
        from ditkit.sampling import sample, sampling_schedule

        if self.kind == "control":
            raise ValueError("a control run samples from a condition image: use Edit with an image")
        s = self._settings(sampler, steps, cfg, cfg_interval)
        model, cols = self._conditioned(classes, prompts)
        y = torch.tensor(cols, device=self.device).repeat(n_per_class)
        extra = [frames or self.model.num_frames] if self.kind == "video" else []
        H, W = model.input_size
        total = sampling_schedule(self.objective, s["sampler"], s["steps"])[2]

        def hook(x: Tensor, level: int) -> Tensor:
            if callback is not None:
                callback(level, total, self.old.decode(x).cpu())
            return x

        g = torch.Generator(device=self.device).manual_seed(seed)
        raw = sample(model, self.objective, (len(y), self.model.in_channels, *extra, H, W), y=y,
                     cfg_scale=s["cfg"] if self.conditional else 1.0, cfg_interval=s["cfg_interval"],
                     steps=s["steps"], sampler=s["sampler"], generator=g, progress=progress, step_hook=hook)
        return Samples(self.old.decode(raw).cpu(), y.cpu(), len(cols), s)

    def edit(self, image: Tensor, mask: Tensor | None = None, strength: float | None = None,
             class_label: int | None = None, prompt: str | None = None, n: int = 1, sampler: str | None = None,
             steps: int | None = None, cfg: float | None = None, seed: int = 0, progress: bool = True,
             callback: Callable[[int, int, Tensor], None] | None = None) -> Samples:
        from ditkit.data.conditions import make_condition
        from ditkit.editing import DEFAULT_STRENGTH, edit

        s = self._settings(sampler, steps, cfg, None)
        image = image.to(self.device).repeat(n, 1, 1, 1)
        model, y = self.model, None
        if self.kind == "text":
            model, y = self.old.with_prompts([prompt or self.class_names[0]]), torch.zeros(n, dtype=torch.long)
        elif class_label is not None:
            y = torch.full((n,), class_label)
        if self.kind == "control":
            model = model.bind(make_condition(model.condition, image))
        if strength is None:
            strength = 1.0 if mask is not None or self.kind == "control" else DEFAULT_STRENGTH
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = edit(model, self.objective, image, None if mask is None else mask.to(self.device), strength,
                   y=None if y is None else y.to(self.device), cfg_scale=s["cfg"] if y is not None else 1.0,
                   steps=s["steps"], sampler=s["sampler"], generator=g, progress=progress)
        labels = y if y is not None else torch.zeros(n, dtype=torch.long)
        return Samples(out.float().clamp(-1, 1).cpu(), labels.cpu(), n, {**s, "strength": strength})
